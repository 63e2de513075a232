"""`SupportDeskSimulator`: its decisions, its timing and tokens, and runs through the loop."""

from __future__ import annotations

import json

import pytest

import loopwise as lw
from loopwise.models import (
    Message,
    ModelRequest,
    ModelResponse,
    Price,
    ToolCall,
    ToolSpec,
)
from loopwise._demo.simulator import SupportDeskSimulator
from loopwise._demo import simulator as _simulator

TASK = "I've been waiting 3 weeks for my order CUS-7777 and nobody answers. Ridiculous."
HISTORY = {"customer_id": "CUS-7777", "tier": "gold", "orders": 3, "open_tickets": 1,
           "last_order": {"id": "ORD-1042", "status": "in transit", "days_waiting": 21}}
DRAFT = "Hi, sorry for the wait: your parcel ships today."


def spec(name: str, *params: str) -> ToolSpec:
    return ToolSpec(name, f"The {name} tool.", {
        "type": "object", "properties": {p: {"type": "string"} for p in params}, "required": list(params),
    })


SPECS = [spec("analyze_sentiment", "text"), spec("get_customer_history", "customer_id"),
         spec("generate_reply", "sentiment", "history", "context")]


def conversation(*turns: tuple[list[ToolCall], list[str]], task: str = TASK) -> list[Message]:
    """System + task, then per turn an assistant message with calls and their tool results."""
    messages = [Message("system", "You are a support agent."), Message("user", task)]
    for calls, results in turns:
        messages.append(Message("assistant", "thinking", tuple(calls)))
        messages += [Message("tool", r, tool_call_id=c.id) for c, r in zip(calls, results, strict=True)]
    return messages


LOOKUPS = ([ToolCall("analyze_sentiment", {"text": TASK}, "c1"),
            ToolCall("get_customer_history", {"customer_id": "CUS-7777"}, "c2")],
           ["negative", json.dumps(HISTORY)])
REPLY = ([ToolCall("generate_reply", {"sentiment": "negative", "history": "h", "context": "shipping"}, "c3")], [DRAFT])


async def ask(model: SupportDeskSimulator, messages: list[Message], tools=SPECS, max_tokens=1024) -> ModelResponse:
    return await model.request(ModelRequest(messages=messages, tools=list(tools), max_tokens=max_tokens))


@pytest.fixture
def sleeps(monkeypatch) -> list[float]:
    """The simulated latencies, recorded instead of slept."""
    seen: list[float] = []

    async def sleep(delay: float) -> None:
        seen.append(delay)

    monkeypatch.setattr(_simulator, "_sleep", sleep)
    return seen


# -- triage decisions ----------------------------------------------------------------


async def test_first_think_asks_for_sentiment_and_history_at_once():
    response = await ask(SupportDeskSimulator(speed=0), conversation())
    assert [(c.name, c.arguments) for c in response.tool_calls] == [
        ("analyze_sentiment", {"text": TASK}),
        ("get_customer_history", {"customer_id": "CUS-7777"}),
    ]
    assert response.text and "CUS-7777" in response.text
    assert response.finish_reason == "tool_calls"


async def test_customer_id_defaults_when_the_message_names_none():
    response = await ask(SupportDeskSimulator(speed=0), conversation(task="My order is late."))
    assert response.tool_calls[1].arguments == {"customer_id": "CUS-4821"}
    response = await ask(SupportDeskSimulator(speed=0, customer_id="CUS-1"), conversation(task="My order is late."))
    assert response.tool_calls[1].arguments == {"customer_id": "CUS-1"}


async def test_second_think_asks_for_a_reply_from_the_results():
    response = await ask(SupportDeskSimulator(speed=0), conversation(LOOKUPS))
    [call] = response.tool_calls
    assert call.name == "generate_reply"
    assert call.arguments["sentiment"] == "negative"
    assert call.arguments["context"] == "shipping"
    assert "gold tier" in call.arguments["history"] and "3 orders" in call.arguments["history"]
    assert "ORD-1042" in call.arguments["history"]


async def test_final_answer_uses_the_tool_results():
    response = await ask(SupportDeskSimulator(speed=0), conversation(LOOKUPS, REPLY))
    assert response.tool_calls == []
    assert response.finish_reason == "stop"
    assert DRAFT in response.text
    assert "CUS-7777" in response.text and "negative" in response.text and "3 orders" in response.text


async def test_one_tool_per_response_without_parallel_tool_calls():
    model = SupportDeskSimulator(speed=0, parallel_tool_calls=False)
    first = await ask(model, conversation())
    assert [c.name for c in first.tool_calls] == ["analyze_sentiment"]
    sentiment = ([ToolCall("analyze_sentiment", {"text": TASK}, "c1")], ["negative"])
    second = await ask(model, conversation(sentiment))
    assert [c.name for c in second.tool_calls] == ["get_customer_history"]
    history = ([ToolCall("get_customer_history", {"customer_id": "CUS-7777"}, "c2")], [json.dumps(HISTORY)])
    third = await ask(model, conversation(sentiment, history))
    assert [c.name for c in third.tool_calls] == ["generate_reply"]


async def test_asks_only_for_tools_it_is_offered():
    model = SupportDeskSimulator(speed=0)
    response = await ask(model, conversation(), tools=[SPECS[1]])
    assert [c.name for c in response.tool_calls] == ["get_customer_history"]
    # No reply tool: it answers once the lookups are in, with a holding reply.
    response = await ask(model, conversation(LOOKUPS), tools=SPECS[:2])
    assert response.tool_calls == [] and "holding reply" in response.text
    # No tools at all (the best-effort call after a limit): text.
    response = await ask(model, conversation(), tools=[])
    assert response.tool_calls == [] and "CUS-7777" in response.text


async def test_a_failed_tool_is_read_as_unknown_and_triage_goes_on():
    failed = (LOOKUPS[0], ["error: analyze_sentiment raised TimeoutError: slow", json.dumps(HISTORY)])
    response = await ask(SupportDeskSimulator(speed=0), conversation(failed))
    [call] = response.tool_calls
    assert call.name == "generate_reply" and call.arguments["sentiment"] == "unknown"


async def test_each_tool_is_asked_for_at_most_once():
    not_run = (LOOKUPS[0], ["not executed: iteration limit reached"] * 2)
    response = await ask(SupportDeskSimulator(speed=0), conversation(not_run))
    assert [c.name for c in response.tool_calls] == ["generate_reply"]


# -- tokens, latency, reproducibility -----------------------------------------------


async def test_token_counts_come_from_the_text():
    messages = [Message("user", "x" * 400)]
    response = await ask(SupportDeskSimulator(speed=0), messages, tools=[])
    # 4 per message + 400 bytes / 4; output: the answer's bytes / 4, rounded up.
    assert response.usage.input_tokens == 4 + 100
    assert response.usage.output_tokens == (len(response.text.encode()) + 3) // 4
    # Tool specs count as input, and so does every message.
    with_tools = await ask(SupportDeskSimulator(speed=0), messages, tools=SPECS)
    specs_bytes = len(json.dumps([{"name": s.name, "description": s.description, "parameters": s.parameters}
                                  for s in SPECS]).encode())
    assert with_tools.usage.input_tokens == 104 + (specs_bytes + 3) // 4
    calls_out = sum((len(c.name) + 3) // 4 + (len(json.dumps(c.arguments).encode()) + 3) // 4
                    for c in with_tools.tool_calls)
    assert with_tools.usage.output_tokens == (len(with_tools.text.encode()) + 3) // 4 + calls_out


async def test_a_response_longer_than_max_tokens_is_cut():
    response = await ask(SupportDeskSimulator(speed=0), conversation(), max_tokens=5)
    assert response.finish_reason == "length"
    assert response.tool_calls == []
    assert response.usage.output_tokens <= 5
    assert len(response.text.encode()) <= 20


async def test_latency_is_drawn_from_the_range_and_scaled_by_speed(sleeps):
    model = SupportDeskSimulator(latency_s=(0.5, 0.9), speed=2, seed=1)
    for _ in range(20):
        await ask(model, conversation())
    assert all(1.0 <= s <= 1.8 for s in sleeps)
    sleeps.clear()
    await ask(SupportDeskSimulator(speed=0), conversation())
    assert sleeps == [0.0]


async def test_same_seed_same_calls(sleeps):
    requests = [conversation(), conversation(LOOKUPS), conversation(LOOKUPS, REPLY)]
    runs = []
    for _ in range(2):
        model = SupportDeskSimulator(seed=42)
        runs.append([await ask(model, m) for m in requests])
    assert runs[0] == runs[1]
    assert sleeps[:3] == sleeps[3:]
    # A call's draws depend on the seed and the request, not on the calls made before.
    model = SupportDeskSimulator(seed=42)
    sleeps.clear()
    assert await ask(model, requests[2]) == runs[0][2]
    assert sleeps == [sleeps[0]] and sleeps[0] > 0


async def test_other_seeds_vary_latency_and_wording(sleeps):
    texts = set()
    for seed in range(12):
        texts.add((await ask(SupportDeskSimulator(seed=seed), conversation())).text)
    assert len(set(sleeps)) == 12
    assert len(texts) > 1


async def test_costs_nothing_unless_priced(store):
    result = await lw.Agent(SupportDeskSimulator(speed=0), store=store).run("hello")
    assert result.cost_usd == 0
    priced = SupportDeskSimulator(speed=0, price=Price(1.0, 2.0))
    result = await lw.Agent(priced, store=store).run("hello")
    usage = result.usage
    assert result.cost_usd == pytest.approx((usage.input_tokens * 1.0 + usage.output_tokens * 2.0) / 1e6)
    assert result.cost_usd > 0


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"mode": "chatty"}, "modes: 'triage', 'never_done'"),
        ({"latency_s": (0.9, 0.5)}, "0 <= min <= max"),
        ({"latency_s": 0.5}, "(min, max)"),
        ({"speed": -1}, "speed=-1"),
        ({"speed": float("nan")}, "speed=nan"),
        ({"seed": 1.5}, "seed=1.5"),
        ({"parallel_tool_calls": "yes"}, "True or False"),
        ({"price": 3}, "Price"),
    ],
)
def test_bad_settings_are_refused(kwargs, words):
    with pytest.raises(lw.UserError) as info:
        SupportDeskSimulator(**kwargs)
    assert words in str(info.value)


# -- never done ------------------------------------------------------------------------


async def test_never_done_keeps_asking_for_more_context():
    model = SupportDeskSimulator(mode="never_done", speed=0)
    turns: list = []
    previous = None
    for step in range(6):
        response = await ask(model, conversation(*turns))
        assert response.tool_calls, f"step {step + 1} gave a final answer"
        assert "context" in response.text
        if previous is not None:
            assert response.usage.output_tokens > previous.usage.output_tokens
            assert response.usage.input_tokens > previous.usage.input_tokens
        previous = response
        calls = [ToolCall(c.name, c.arguments, f"s{step}-{i}") for i, c in enumerate(response.tool_calls)]
        turns.append((calls, ["negative", json.dumps(HISTORY)][: len(calls)]))
    # With tools off (the best-effort call after a limit) it does answer.
    answer = await ask(model, conversation(*turns), tools=[])
    assert answer.tool_calls == [] and "CUS-7777" in answer.text


async def test_never_done_asks_for_a_tool_even_when_it_knows_none():
    response = await ask(SupportDeskSimulator(mode="never_done", speed=0), conversation(), tools=[spec("search", "q")])
    assert [c.name for c in response.tool_calls] == ["search"]


# -- through the loop ----------------------------------------------------------------


@lw.tool
async def analyze_sentiment(text: str) -> str:
    """Classify the sentiment of a customer message."""
    return "negative"


@lw.tool
async def get_customer_history(customer_id: str) -> dict:
    """A customer's history."""
    return {**HISTORY, "customer_id": customer_id}


@lw.tool
async def generate_reply(sentiment: str, history: str, context: str) -> str:
    """Draft a reply."""
    return f"{DRAFT} ({sentiment}, {context})"


TOOLS = [analyze_sentiment, get_customer_history, generate_reply]


async def test_triage_runs_through_the_agent(store):
    agent = lw.Agent(SupportDeskSimulator(speed=0, seed=3), tools=TOOLS, store=store, instructions="Support.")
    result = await agent.run(TASK)
    assert result.stop_reason == "done"
    assert result.iterations == 3 and result.model_calls == 3
    assert f"{DRAFT} (negative, shipping)" in result.output
    events = store.load(result.run_id)
    asked = [[c.name for c in e.tool_calls] for e in events if e.kind == "model_call_finished"]
    assert asked == [["analyze_sentiment", "get_customer_history"], ["generate_reply"], []]
    outcomes = [e.outcome for e in events if e.kind == "tool_call_finished"]
    assert outcomes == ["ok", "ok", "ok"]
    finished = [e for e in events if e.kind == "model_call_finished"]
    assert not any(e.usage_estimated for e in finished)
    assert result.usage.input_tokens == sum(e.usage.input_tokens for e in finished)
    assert events[0].agent["model"]["mode"] == "triage"


async def test_the_same_seed_replays_the_same_run(store):
    outputs = []
    for _ in range(2):
        agent = lw.Agent(SupportDeskSimulator(speed=0, seed=9), tools=TOOLS, store=store)
        result = await agent.run(TASK)
        events = store.load(result.run_id)
        outputs.append([(e.text, e.tool_calls, e.usage) for e in events if e.kind == "model_call_finished"])
    assert outputs[0] == outputs[1]


async def test_never_done_is_stopped_by_the_iteration_cap(store):
    model = SupportDeskSimulator(mode="never_done", speed=0)
    agent = lw.Agent(model, tools=TOOLS, store=store, limits=lw.Limits(max_iterations=5, final_answer_on_limit=False),
                     runaway=lw.RunawayDetector(enabled=False))
    result = await agent.run(TASK)
    assert result.stop_reason == "max_iterations"
    assert result.output is None
    assert result.iterations == 5
    events = store.load(result.run_id)
    thinks = [e for e in events if e.kind == "model_call_finished"]
    assert len(thinks) == 5 and all(e.tool_calls for e in thinks)
    inputs = [e.usage.input_tokens for e in thinks]
    assert inputs == sorted(inputs) and len(set(inputs)) == 5


async def test_never_done_gives_a_best_effort_answer_after_the_cap(store):
    model = SupportDeskSimulator(mode="never_done", speed=0)
    agent = lw.Agent(model, tools=TOOLS, store=store, limits=lw.Limits(max_iterations=3))
    result = await agent.run(TASK)
    assert result.stop_reason == "max_iterations"
    assert result.model_calls == 4
    assert result.output and "CUS-7777" in result.output and "negative" in result.output
