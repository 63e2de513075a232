"""The loop against models that misbehave: it must always stop, with one stop reason."""

from __future__ import annotations

import asyncio
import functools

import anyio
import pytest

import loopwise as lw
from loopwise._runtime.run import NOT_EXECUTED
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ScriptedModel, ToolCall, Usage
from loopwise.testing import FakeClock

calls_seen: list[str] = []


@lw.tool
async def analyze_sentiment(text: str) -> str:
    """Classify the sentiment of a customer message."""
    await asyncio.sleep(0.05)
    return "negative"


@lw.tool
async def get_customer_history(customer_id: str) -> dict:
    """A customer's order history."""
    await asyncio.sleep(0.05)
    return {"customer_id": customer_id, "orders": 3}


@lw.tool
def explode(reason: str) -> str:
    """A sync tool that fails."""
    raise RuntimeError(f"boom: {reason}")


@lw.tool
async def whoami(ctx: lw.RunContext) -> str:
    """Echo the run context."""
    return f"{ctx.run_id}|{ctx.call_id}|{ctx.iteration}|{','.join(ctx.tags)}|{ctx.deps}"


TOOLS = [analyze_sentiment, get_customer_history, explode, whoami]


def make_agent(model, store, **kw):
    return lw.Agent(model, tools=TOOLS, store=store, instructions="You are a support agent.", **kw)


def kinds(events):
    return [e.kind for e in events]


def assert_valid_log(events):
    """Invariants every run's log must satisfy."""
    assert events[0].kind == "run_started"
    assert [e.seq for e in events] == list(range(len(events)))
    finished = [e for e in events if e.kind == "run_finished"]
    assert len(finished) == 1 and events[-1] is finished[0]
    end = finished[0]
    think_calls = [e for e in events if e.kind == "model_call_finished"]
    assert end.model_calls == len(think_calls) == len([e for e in events if e.kind == "model_call_started"])
    assert end.usage.input_tokens == sum(e.usage.input_tokens for e in think_calls)
    assert end.usage.output_tokens == sum(e.usage.output_tokens for e in think_calls)
    tool_calls = [e for e in events if e.kind == "tool_call_finished"]
    assert end.cost_usd == pytest.approx(sum(e.cost_usd for e in think_calls) + sum(e.cost_usd for e in tool_calls))
    assert end.iterations == len([e for e in events if e.kind == "iteration_started"])
    started_ids = [e.call_id for e in events if e.kind == "tool_call_started"]
    finished_ids = [e.call_id for e in events if e.kind == "tool_call_finished"]
    assert sorted(started_ids) == sorted(finished_ids)
    assert len(set(started_ids)) == len(started_ids)
    return end


def assert_valid_transcript(messages):
    """Every assistant tool call is answered by exactly one tool message before the next turn."""
    i = 0
    while i < len(messages):
        m = messages[i]
        if m.role == "assistant":
            assert m.content or m.tool_calls, "an assistant message with neither text nor tool calls"
        if m.role == "assistant" and m.tool_calls:
            ids = [c.id for c in m.tool_calls]
            answers = []
            j = i + 1
            while j < len(messages) and messages[j].role == "tool":
                answers.append(messages[j].tool_call_id)
                j += 1
            assert answers == ids, (ids, answers)
            i = j
        else:
            assert m.role != "tool", "a tool message that answers no call"
            i += 1


def test_triage_run_happy_path(store):
    model = ScriptedModel(
        [
            ModelResponse(
                text="I need the sentiment and the history.",
                tool_calls=[
                    ToolCall("analyze_sentiment", {"text": "waiting 3 weeks"}, id="c1"),
                    ToolCall("get_customer_history", '{"customer_id": "CUS-4821"}', id="c2"),
                ],
                usage=Usage(100, 20),
            ),
            ModelResponse(text="Sorry for the wait; a refund is on its way.", usage=Usage(150, 30)),
        ],
        price=Price(input_per_mtok=1.0, output_per_mtok=10.0),
    )
    agent = make_agent(model, store)
    result = agent.run_sync("I've been waiting 3 weeks for my order", tags=["t1"])
    assert result.stop_reason == "done"
    assert result.output == "Sorry for the wait; a refund is on its way."
    assert result.iterations == 2
    assert result.model_calls == 2
    assert (result.usage.input_tokens, result.usage.output_tokens) == (250, 50)
    assert result.cost_usd == pytest.approx((250 * 1.0 + 50 * 10.0) / 1e6)
    assert result.tags == ("t1",)
    assert result.duration_s > 0
    events = store.load(result.run_id)
    assert_valid_log(events)
    assert kinds(events) == [
        "run_started",
        "iteration_started", "model_call_started", "model_call_finished",
        "tool_call_started", "tool_call_started", "tool_call_finished", "tool_call_finished",
        "iteration_started", "model_call_started", "model_call_finished",
        "run_finished",
    ]
    # The result is read from the log: the same result comes back from the store.
    assert lw.RunResult.from_events(events) == result
    # Both tools ran concurrently: each started before the other finished.
    by_id = {}
    for e in events:
        if e.kind.startswith("tool_call_"):
            by_id.setdefault(e.call_id, {})[e.kind] = e.ts
    assert by_id["c1"]["tool_call_started"] < by_id["c2"]["tool_call_finished"]
    assert by_id["c2"]["tool_call_started"] < by_id["c1"]["tool_call_finished"]


def test_model_sees_instructions_tools_and_results_in_order(store):
    requests: list[ModelRequest] = []

    def fn(request: ModelRequest) -> ModelResponse:
        requests.append(request)
        if len(requests) == 1:
            # Asked in this order; the slow one first, so completion order differs.
            return ModelResponse(tool_calls=[
                ToolCall("get_customer_history", {"customer_id": "A"}, id="slow"),
                ToolCall("whoami", {}, id="fast"),
            ])
        return ModelResponse(text="ok")

    result = make_agent(FunctionModel(fn), store, deps="D").run_sync("hi", run_id="run-1", tags=["x"])
    assert result.stop_reason == "done"
    first, second = requests
    assert [m.role for m in first.messages] == ["system", "user"]
    assert first.messages[0].content == "You are a support agent."
    assert [t.name for t in first.tools] == ["analyze_sentiment", "get_customer_history", "explode", "whoami"]
    assert first.max_tokens == 1024
    assert [m.role for m in second.messages] == ["system", "user", "assistant", "tool", "tool"]
    assert [m.tool_call_id for m in second.messages[3:]] == ["slow", "fast"]
    assert second.messages[4].content == "run-1|fast|1|x|D"
    assert second.messages[3].content == '{"customer_id":"A","orders":3}'
    assert_valid_transcript(second.messages)


@pytest.mark.parametrize(
    ("call", "outcome", "snippet"),
    [
        (ToolCall("no_such_tool", {}), "unknown_tool", "unknown tool 'no_such_tool'; available tools: analyze_sentiment"),
        (ToolCall("analyze_sentiment", '{"text": "unterminated'), "invalid_arguments", "not valid JSON"),
        (ToolCall("analyze_sentiment", {"txt": "typo"}), "invalid_arguments", "text: Field required"),
        (ToolCall("analyze_sentiment", "[1]"), "invalid_arguments", "must be a JSON object"),
        (ToolCall("explode", {"reason": "db down"}), "error", "explode raised RuntimeError: boom: db down"),
        # What only a Python model can send: types the protocol has no room for.
        (ToolCall(None, {}), "unknown_tool", "unknown tool ''"),  # type: ignore[arg-type]
        (ToolCall(123, {}), "unknown_tool", "unknown tool '123'"),  # type: ignore[arg-type]
        (ToolCall("analyze_sentiment", [1, 2]), "invalid_arguments", "must be a JSON object, got list"),  # type: ignore[arg-type]
        (ToolCall("analyze_sentiment", None), "invalid_arguments", "must be a JSON object"),  # type: ignore[arg-type]
        (ToolCall("analyze_sentiment", {"text": "hi"}, 7), "ok", "negative"),  # type: ignore[arg-type]
        (ToolCall("analyze_sentiment", '{"text": ' + "[" * 5000 + "]" * 5000 + "}"), "invalid_arguments",
         "arguments nest deeper than 100 levels"),
    ],
)
def test_bad_tool_calls_become_observations_the_model_can_correct(sqlite_store, call, outcome, snippet):
    """Each becomes a tool result the model reads; the run goes on, and its log reads back (from SQLite's JSON)."""
    store = sqlite_store
    seen = []

    def fn(request):
        seen.append(request)
        if len(seen) == 1:
            return ModelResponse(tool_calls=[call])
        return ModelResponse(text="recovered")

    result = make_agent(FunctionModel(fn), store).run_sync("go")
    assert result.stop_reason == "done" and result.output == "recovered"
    events = store.load(result.run_id)
    assert_valid_log(events)
    assert lw.RunResult.from_events(events) == result
    (finished,) = [e for e in events if e.kind == "tool_call_finished"]
    assert finished.outcome == outcome
    assert snippet in finished.content
    tool_message = seen[1].messages[-1]
    assert tool_message.role == "tool" and snippet in tool_message.content


def test_model_that_never_stops_is_capped_and_asked_for_a_best_effort_answer(store):
    requests = []

    def fn(request):
        requests.append(request)
        if not request.tools:
            return ModelResponse(text="best effort: probably a shipping delay", usage=Usage(10, 5))
        return ModelResponse(text="more context needed", tool_calls=[ToolCall("analyze_sentiment", {"text": "x"})],
                             usage=Usage(10, 5))

    agent = make_agent(FunctionModel(fn), store, limits=lw.Limits(max_iterations=3))
    result = agent.run_sync("loop forever")
    assert result.stop_reason == "max_iterations"
    assert result.iterations == 3
    assert result.model_calls == 4  # 3 THINKs + the best-effort call, which is not an iteration
    assert result.output == "best effort: probably a shipping delay"
    assert "iteration limit of 3" in result.reason
    final = requests[-1]
    assert final.tools == []
    assert final.messages[-1].role == "user" and "limit of 3 iterations" in final.messages[-1].content
    # The last THINK's tool calls were not run, and the transcript stays valid.
    assert final.messages[-2].role == "tool" and final.messages[-2].content == NOT_EXECUTED
    assert_valid_transcript(final.messages)
    events = store.load(result.run_id)
    end = assert_valid_log(events)
    assert end.stop_reason == "max_iterations"
    ran = [e for e in events if e.kind == "tool_call_finished"]
    assert [e.outcome for e in ran] == ["ok", "ok", "not_executed"]
    assert [e.kind for e in events if e.kind == "limit_hit"] == ["limit_hit"]
    final_call = [e for e in events if e.kind == "model_call_started"][-1]
    assert final_call.purpose == "final_answer" and final_call.n_tools == 0


def test_final_answer_on_limit_can_be_turned_off(store):
    model = FunctionModel(lambda r: ModelResponse(tool_calls=[ToolCall("analyze_sentiment", {"text": "x"})]))
    result = make_agent(model, store, limits=lw.Limits(max_iterations=2, final_answer_on_limit=False)).run_sync("t")
    assert (result.stop_reason, result.iterations, result.model_calls, result.output) == ("max_iterations", 2, 2, None)


def test_default_cap_is_eight(store):
    model = FunctionModel(lambda r: ModelResponse(tool_calls=[ToolCall("whoami", {})]) if r.tools else "gave up")
    result = make_agent(model, store, runaway=lw.RunawayDetector(enabled=False)).run_sync("t")
    assert (result.stop_reason, result.iterations, result.output) == ("max_iterations", 8, "gave up")


def test_the_seeds_loop_is_stopped_as_runaway_within_a_handful_of_iterations(store):
    model = FunctionModel(lambda r: ModelResponse(tool_calls=[ToolCall("whoami", {})]) if r.tools else "gave up")
    result = make_agent(model, store).run_sync("t")
    assert (result.stop_reason, result.output) == ("runaway", "gave up")
    assert result.iterations <= 5
    events = store.load(result.run_id)
    nudges = [e for e in events if e.kind == "nudge" and e.reason.startswith("runaway")]
    assert len(nudges) == 1  # warned once, then stopped
    assert_valid_log(events)


def test_best_effort_call_failure_still_stops_for_the_limit(store):
    def fn(request):
        if not request.tools:
            raise ConnectionError("provider went away")
        return ModelResponse(tool_calls=[ToolCall("whoami", {})])

    result = make_agent(FunctionModel(fn), store, limits=lw.Limits(max_iterations=1)).run_sync("t")
    assert result.stop_reason == "max_iterations" and result.output is None
    events = store.load(result.run_id)
    assert_valid_log(events)
    assert events[-2].kind == "model_call_finished" and events[-2].error.type == "ConnectionError"


def test_scripted_model_running_out_is_an_error_with_a_clear_message(store):
    model = ScriptedModel([ToolCall("whoami", {})])
    result = make_agent(model, store).run_sync("t")
    assert result.stop_reason == "error"
    assert result.error.type == "ModelBehaviorError"
    assert "ran out of responses: call #2" in result.error.message
    assert result.iterations == 2  # the THINK whose call failed counts
    assert_valid_log(store.load(result.run_id))


def test_scripted_model_replays_from_the_start_for_each_run(store):
    agent = make_agent(ScriptedModel([ToolCall("whoami", {}), "first"]), store)
    assert [agent.run_sync("a").output, agent.run_sync("b").output] == ["first", "first"]


@pytest.mark.parametrize(
    ("returned", "message"),
    [
        (42, "returned int; expected a ModelResponse"),
        (ModelResponse(tool_calls=[{"name": "x"}]), "holds a dict, not a ToolCall"),  # type: ignore[list-item]
        (ModelResponse(text=b"bytes"), "text is bytes"),  # type: ignore[arg-type]
        (ModelResponse(tool_calls="whoami"), "tool_calls is str"),  # type: ignore[arg-type]
    ],
)
def test_junk_from_the_model_ends_the_run_as_error(store, returned, message):
    result = make_agent(FunctionModel(lambda r: returned), store).run_sync("t")
    assert result.stop_reason == "error"
    assert message in result.error.message
    assert_valid_log(store.load(result.run_id))


def test_model_exception_is_recorded_not_raised(store):
    def fn(request):
        raise lw.ModelError("upstream 503")

    result = make_agent(FunctionModel(fn), store).run_sync("t")
    assert result.stop_reason == "error" and result.iterations == 1
    assert result.error.type == "ModelError" and result.error.message == "upstream 503"


def test_empty_and_cut_responses_are_not_final_answers(store):
    model = ScriptedModel([
        ModelResponse(text="   "),
        ModelResponse(text="The answer is", finish_reason="length"),
        ModelResponse(text="The answer is 42.", finish_reason="stop"),
    ])
    result = make_agent(model, store).run_sync("t")
    assert result.stop_reason == "done" and result.output == "The answer is 42." and result.iterations == 3
    nudges = [e for e in store.load(result.run_id) if e.kind == "nudge"]
    assert [n.reason for n in nudges] == ["the model returned an empty response", "the answer was cut by max_tokens"]


def test_missing_or_nonsense_usage_is_estimated_and_marked(store):
    model = ScriptedModel([
        ModelResponse(tool_calls=[ToolCall("whoami", {})], usage=None),
        ModelResponse(text="done", usage=Usage(-5, 3)),
    ])
    result = make_agent(model, store).run_sync("a task of some length")
    calls = [e for e in store.load(result.run_id) if e.kind == "model_call_finished"]
    assert [c.usage_estimated for c in calls] == [True, True]
    assert all(c.usage.input_tokens > 0 for c in calls)
    assert result.usage.input_tokens == sum(c.usage.input_tokens for c in calls)


def test_missing_and_duplicate_call_ids_are_made_unique(store):
    seen = []

    def fn(request):
        seen.append(request)
        if len(seen) == 1:
            return ModelResponse(tool_calls=[ToolCall("whoami", {}), ToolCall("whoami", {}, id="dup"),
                                             ToolCall("whoami", {}, id="dup"), ToolCall("whoami", {}, id="")])
        return ModelResponse(text="ok")

    result = make_agent(FunctionModel(fn), store).run_sync("t")
    assistant = seen[1].messages[2]
    ids = [c.id for c in assistant.tool_calls]
    assert len(set(ids)) == 4 and all(ids)
    assert ids[0] == "lw-1-0"
    assert_valid_transcript(seen[1].messages)
    assert_valid_log(store.load(result.run_id))


def test_many_parallel_tool_calls(store):
    n = 50
    model = ScriptedModel([[ToolCall("analyze_sentiment", {"text": str(i)}) for i in range(n)], "done"])
    result = make_agent(model, store).run_sync("t")
    events = store.load(result.run_id)
    assert_valid_log(events)
    starts = [e.ts for e in events if e.kind == "tool_call_started"]
    ends = [e.ts for e in events if e.kind == "tool_call_finished"]
    assert len(starts) == n and max(starts) < min(ends)  # all started before any finished


def test_task_as_a_conversation(store):
    seen = []
    task = [lw.Message("user", "hi"), lw.Message("assistant", "hello"), lw.Message("user", "refund please")]
    result = make_agent(FunctionModel(lambda r: seen.append(r) or "ok"), store).run_sync(task)
    assert result.output == "ok"
    assert [m.content for m in seen[0].messages[1:]] == ["hi", "hello", "refund please"]


class BrokenStore(lw.MemoryStore):
    def __init__(self, fail_after: int, fail_times: int = 10**9) -> None:
        super().__init__()
        self.writes = 0
        self.fail_after = fail_after
        self.fail_times = fail_times

    def write(self, events):
        self.writes += 1
        if self.fail_after < self.writes <= self.fail_after + self.fail_times:
            raise OSError("disk full")
        return super().write(events)


def test_a_store_failure_mid_run_ends_it_as_error_not_a_lost_run():
    """A write that fails once: the run ends as `error`, and the events it could not write are written with its end."""
    store = BrokenStore(fail_after=2, fail_times=1)
    model = ScriptedModel([ToolCall("whoami", {}), ToolCall("whoami", {}), "done"])
    result = make_agent(model, store).run_sync("t")
    assert result.stop_reason == "error"
    assert "disk full" in result.reason
    assert result.error.traceback and "OSError" in result.error.traceback
    events = store.load(result.run_id)
    assert_valid_log(events)  # gap-free from run_started, one run_finished
    assert lw.RunResult.from_events(events) == result


def test_a_store_that_cannot_take_the_end_raises_rather_than_return_an_unlogged_end():
    store = BrokenStore(fail_after=2)
    model = ScriptedModel([ToolCall("whoami", {}), ToolCall("whoami", {}), "done"])
    with pytest.raises(lw.StoreError, match=r"its end \(error\) could not be written to the event store .*disk full"):
        make_agent(model, store).run_sync("t", run_id="unlogged-end")
    assert not any(e.kind == "run_finished" for e in store.load("unlogged-end"))


async def test_cancelled_by_caller_is_written_as_killed_and_propagates(store):
    started = anyio.Event()

    @lw.tool
    async def hang() -> str:
        """Never returns."""
        started.set()
        await anyio.sleep_forever()
        return "never"

    agent = lw.Agent(ScriptedModel([ToolCall("hang", {})]), tools=[hang], store=store)
    with anyio.move_on_after(5) as outer:
        async with anyio.create_task_group() as tg:
            tg.start_soon(functools.partial(agent.run, "t", run_id="to-cancel"))
            await started.wait()
            tg.cancel_scope.cancel()
    assert not outer.cancelled_caught
    events = store.load("to-cancel")
    end = assert_valid_log(events)
    assert end.stop_reason == "killed" and end.reason == "cancelled by caller"


async def test_stream_yields_events_as_they_happen(store):
    agent = make_agent(ScriptedModel([ToolCall("whoami", {}), "done"]), store)
    events = [e async for e in agent.stream("t")]
    assert events[-1].kind == "run_finished" and events[-1].output == "done"
    assert events == store.load(events[0].run_id)


async def test_closing_a_stream_early_kills_the_run(store):
    from contextlib import aclosing

    agent = make_agent(ScriptedModel([ToolCall("analyze_sentiment", {"text": "x"}), "done"]), store)
    async with aclosing(agent.stream("t", run_id="early")) as stream:
        async for event in stream:
            if event.kind == "tool_call_started":
                break
    end = assert_valid_log(store.load("early"))
    assert end.stop_reason == "killed"


def test_sqlite_store_gets_every_event_and_result_matches(sqlite_store):
    agent = make_agent(ScriptedModel([ToolCall("whoami", {}), "done"]), sqlite_store)
    result = agent.run_sync("t")
    events = sqlite_store.load(result.run_id)
    assert_valid_log(events)
    assert lw.RunResult.from_events(events) == result


def test_the_loops_fast_constructors_make_what_the_classes_make():
    """The positional constructors the loop uses (no keyword matching, no checks it does not need)."""
    import dataclasses

    from loopwise import _events
    from loopwise._messages import Message, new_message

    makers = {name: fn for name, fn in vars(_events).items() if name.startswith("new_") and callable(fn)}
    assert len(makers) == 7
    for fn in makers.values():
        cls = getattr(_events, fn.__name__.removeprefix("new_"))  # new_ToolCallFinished: ToolCallFinished
        names = [f.name for f in dataclasses.fields(cls)][1:-1]  # less `kind`, and `replaced` (None)
        values = [object() for _ in names]
        made = fn(*values)
        assert type(made) is cls and made == cls(**dict(zip(names, values)))
    call = ToolCall("t", {"a": 1}, "c")
    assert new_message("assistant", "x", (call,)) == Message("assistant", "x", (call,))
    assert new_message("tool", "y", (), "c") == Message("tool", "y", tool_call_id="c")
    started = _events.RunStarted(run_id="r", seq=0, ts=1.0, task=[Message("user", "t")], tags=["a"])
    finished = _events.RunFinished(run_id="r", seq=9, ts=2.0, stop_reason="done", output="o", iterations=2,
                                   model_calls=3, usage=Usage(1, 2), cost_usd=0.5, duration_s=1.5, reason="x",
                                   error=_events.ErrorInfo(type="E", message="m"))
    assert dataclasses.asdict(lw.RunResult.of(started, finished)) == {
        "run_id": "r", "output": "o", "stop_reason": "done", "iterations": 2,
        "usage": {"input_tokens": 1, "output_tokens": 2, "cached_input_tokens": 0, "reasoning_tokens": 0},
        "cost_usd": 0.5, "duration_s": 1.5, "model_calls": 3, "tags": ("a",), "reason": "x",
        "error": {"type": "E", "message": "m", "traceback": None},
    }


def _three_hanging_calls(cleaned: list[str], limits: lw.Limits, clock=None) -> lw.Agent:
    """An agent whose model asks for three calls at once that hang (each records its cleanup)."""

    @lw.tool(timeout=60)
    async def hang(n: int) -> str:
        """Hangs for a minute."""
        try:
            await asyncio.sleep(60)
        finally:
            cleaned.append(f"hang {n}")
        return "late"

    model = ScriptedModel([[ToolCall("hang", {"n": i}) for i in range(3)], "never"])
    return lw.Agent(model, tools=[hang], store=lw.MemoryStore(), limits=limits, clock=clock)


def test_the_deadline_cancels_every_parallel_call_in_flight():
    cleaned: list[str] = []
    clock = FakeClock()
    agent = _three_hanging_calls(cleaned, lw.Limits(deadline_s=0.3), clock)
    result = agent.run_sync("go")
    assert result.stop_reason == "deadline" and clock.monotonic() == pytest.approx(0.3)
    events = agent.store.load(result.run_id)
    assert sorted(cleaned) == ["hang 0", "hang 1", "hang 2"]  # each call's own cleanup ran, before the end
    assert [e.outcome for e in events if e.kind == "tool_call_finished"] == ["cancelled"] * 3
    assert_valid_log(events)


async def test_cancelling_the_caller_cancels_every_parallel_call_and_leaves_no_task():
    cleaned: list[str] = []
    agent = _three_hanging_calls(cleaned, lw.Limits())  # no deadline: only the caller's cancellation stops it
    before = len(asyncio.all_tasks())
    with anyio.move_on_after(0.2):
        await agent.run("go", run_id="cancelled-caller")
    assert sorted(cleaned) == ["hang 0", "hang 1", "hang 2"]
    assert len(asyncio.all_tasks()) == before  # the calls' tasks are over, not left behind
    events = agent.store.load("cancelled-caller")
    assert [e.outcome for e in events if e.kind == "tool_call_finished"] == ["cancelled"] * 3
    assert events[-1].kind == "run_finished" and events[-1].stop_reason == "killed"


@pytest.mark.parametrize("exc", [SystemExit(3), KeyboardInterrupt()])
def test_a_tool_that_exits_the_process_leaves_the_run_s_end_in_the_log(sqlite_store, exc):
    """sys.exit() in a tool (or an interrupt): the exit goes on, the run is not lost (it ends as error, resumable)."""

    @lw.tool
    def leave() -> str:
        """Leave."""
        raise exc

    agent = lw.Agent(ScriptedModel([ToolCall("leave", {}), "never"]), tools=[leave], store=sqlite_store)
    with pytest.raises(type(exc)):
        agent.run_sync("go", run_id="leaving")
    events = sqlite_store.load("leaving")
    end = events[-1]
    assert end.kind == "run_finished" and end.stop_reason == "error" and type(exc).__name__ in end.reason
    assert [r.status for r in sqlite_store.list_runs()] == ["finished"]
    # Resumable: the call that was in flight is reported to the model, not run again.
    resumer = lw.Agent(ScriptedModel([ToolCall("leave", {}), "resumed"]), tools=[leave], store=sqlite_store)
    result = resumer.resume_sync("leaving")
    assert (result.stop_reason, result.output) == ("done", "resumed")
    (interrupted,) = [e for e in sqlite_store.load("leaving") if e.kind == "tool_call_finished"]
    assert interrupted.outcome == "unknown"
