"""`OpenAIModel` against a real HTTP server that speaks the chat-completions protocol.

The server (`tests/openai_server.py`) runs on 127.0.0.1 in a thread; the openai SDK
talks to it over real sockets, so these tests cover what users run: the SDK's request
encoding, its response parsing, retries, timeouts, and the errors it raises.
"""

from __future__ import annotations

import gc
import json
import socket
import subprocess
import sys

import anyio
import pytest

import loopwise as lw
from loopwise._errors import ModelBehaviorError, ModelConnectionError, ModelHTTPError, ModelTimeoutError
from loopwise.models import Message, ModelPolicy, ModelRequest, OpenAIModel, Price, ToolCall, ToolSpec
from loopwise.models._openai import uses_max_completion_tokens

from .openai_server import OpenAIServer, completion


@pytest.fixture
def server():
    with OpenAIServer() as s:
        yield s


@pytest.fixture
async def model(server):
    async with OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test", max_retries=0) as m:
        yield m


@lw.tool
async def analyze_sentiment(text: str) -> str:
    """Classify the sentiment of a customer message."""
    return "negative"


@lw.tool
async def get_customer_history(customer_id: str) -> dict:
    """A customer's order history."""
    return {"customer_id": customer_id, "orders": 3}


TOOLS = [analyze_sentiment, get_customer_history]


def agent(model, store, **kw):
    # No retries by default here: these tests are about the adapter (test_model_resilience
    # covers the retrying ModelPolicy).
    kw.setdefault("model_policy", ModelPolicy(retries=0))
    if getattr(model, "price", None) is None:  # a loopback server has no known price: no dollar budget
        kw.setdefault("limits", lw.Limits(budget_usd=None))
    return lw.Agent(model, tools=TOOLS, store=store, instructions="You are a support agent.", **kw)


def only(events, kind):
    (event,) = [e for e in events if e.kind == kind]
    return event


# -- a whole run -----------------------------------------------------------------------


async def test_run_through_parallel_tool_calls_to_an_answer(server, store):
    server.reply(
        text="Let me look.",
        tool_calls=[
            ("call_a", "analyze_sentiment", {"text": "waiting 3 weeks"}),
            ("call_b", "get_customer_history", {"customer_id": "CUS-4821"}),
        ],
        usage=(100, 20, 40, 5),
    )
    server.reply(text="Sorry for the wait; a refund is on its way.", usage=(150, 30))
    price = Price(input_per_mtok=1.0, output_per_mtok=10.0, cached_input_per_mtok=0.5)
    async with OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test", price=price) as model:
        result = await agent(model, store).run("I've been waiting 3 weeks for my order")

    assert result.stop_reason == "done", result.error
    assert result.output == "Sorry for the wait; a refund is on its way."
    assert (result.iterations, result.model_calls) == (2, 2)
    usage = result.usage
    assert (usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens) == (250, 50, 40, 5)
    assert result.cost_usd == pytest.approx(((100 - 40) * 1.0 + 40 * 0.5 + 20 * 10.0 + 150 * 1.0 + 30 * 10.0) / 1e6)

    first, second = server.requests
    assert server.paths == ["/v1/chat/completions"] * 2
    assert server.headers[0]["authorization"] == "Bearer test"
    assert first["model"] == "gpt-4o-mini"
    assert first["messages"] == [
        {"role": "system", "content": "You are a support agent."},
        {"role": "user", "content": "I've been waiting 3 weeks for my order"},
    ]
    assert first["max_tokens"] == 1024 and "max_completion_tokens" not in first
    assert first["tools"] == [
        {
            "type": "function",
            "function": {
                "name": "analyze_sentiment",
                "description": "Classify the sentiment of a customer message.",
                "parameters": analyze_sentiment.spec.parameters,
            },
        },
        {
            "type": "function",
            "function": {
                "name": "get_customer_history",
                "description": "A customer's order history.",
                "parameters": get_customer_history.spec.parameters,
            },
        },
    ]
    assert first["tools"][0]["function"]["parameters"]["properties"]["text"]["type"] == "string"
    # The provider's call ids round-trip: the assistant turn, then one tool message per call, in order.
    assert second["messages"][2:] == [
        {
            "role": "assistant",
            "content": "Let me look.",
            "tool_calls": [
                {"id": "call_a", "type": "function",
                 "function": {"name": "analyze_sentiment", "arguments": '{"text": "waiting 3 weeks"}'}},
                {"id": "call_b", "type": "function",
                 "function": {"name": "get_customer_history", "arguments": '{"customer_id": "CUS-4821"}'}},
            ],
        },
        {"role": "tool", "tool_call_id": "call_a", "content": "negative"},
        {"role": "tool", "tool_call_id": "call_b", "content": '{"customer_id":"CUS-4821","orders":3}'},
    ]

    events = store.load(result.run_id)
    assert [e.call_id for e in events if e.kind == "tool_call_started"] == ["call_a", "call_b"]
    assert sorted(e.call_id for e in events if e.kind == "tool_call_finished") == ["call_a", "call_b"]
    assert all(e.outcome == "ok" for e in events if e.kind == "tool_call_finished")
    think = [e for e in events if e.kind == "model_call_finished"]
    assert [e.finish_reason for e in think] == ["tool_calls", "stop"]
    assert not any(e.usage_estimated for e in think)
    # The tool-call arguments were kept as the raw JSON string the server sent.
    assert think[0].tool_calls[0].arguments == '{"text": "waiting 3 weeks"}'
    started = only(events, "run_started")
    assert started.agent["model"] == {
        "name": "openai:gpt-4o-mini", "class": "OpenAIModel", "model": "gpt-4o-mini",
        "base_url": server.base_url + "/", "timeout": 60.0, "max_retries": 2,
    }


async def test_malformed_arguments_become_a_correctable_observation(server, model, store):
    server.reply(tool_calls=[("call_1", "analyze_sentiment", '{"text": "unterminated')])
    server.reply(text="recovered")
    result = await agent(model, store).run("go")
    assert result.stop_reason == "done" and result.output == "recovered"
    finished = only(store.load(result.run_id), "tool_call_finished")
    assert finished.outcome == "invalid_arguments"
    assert "not valid JSON" in finished.content
    assistant, tool_message = server.requests[1]["messages"][-2:]
    # Sent back exactly as the model wrote it, followed by the error it can correct.
    assert assistant["tool_calls"][0]["function"]["arguments"] == '{"text": "unterminated'
    assert tool_message["tool_call_id"] == "call_1" and "not valid JSON" in tool_message["content"]


async def test_missing_usage_is_estimated_and_marked(server, model, store):
    server.reply(text="an answer", usage=None)
    result = await agent(model, store).run("go")
    assert result.stop_reason == "done"
    finished = only(store.load(result.run_id), "model_call_finished")
    assert finished.usage_estimated is True
    assert finished.usage.input_tokens > 0 and finished.usage.output_tokens > 0


async def test_answer_cut_by_max_tokens_is_not_final(server, model, store):
    server.reply(text="Sorry for the", finish_reason="length")
    server.reply(text="Sorry.")
    result = await agent(model, store, max_tokens=5).run("go")
    assert result.stop_reason == "done" and result.output == "Sorry."
    assert server.requests[0]["max_tokens"] == 5
    assert server.requests[1]["messages"][-2] == {"role": "assistant", "content": "Sorry for the"}
    assert server.requests[1]["messages"][-1]["role"] == "user"


async def test_no_tools_sends_no_tools_key(server, model, store):
    server.reply(text="hello")
    result = await lw.Agent(model, store=store, max_tokens=None, limits=lw.Limits(budget_usd=None)).run("hi")
    assert result.stop_reason == "done"
    (request,) = server.requests
    assert "tools" not in request and "max_tokens" not in request and "max_completion_tokens" not in request


async def test_best_effort_answer_after_the_limit_is_asked_without_tools(server, model, store):
    server.reply(tool_calls=[("call_1", "analyze_sentiment", {"text": "x"})])
    server.reply(text="best effort")
    result = await agent(model, store, limits=lw.Limits(max_iterations=1, budget_usd=None)).run("go")
    assert result.stop_reason == "max_iterations" and result.output == "best effort"
    assert "tools" in server.requests[0] and "tools" not in server.requests[1]


# -- failures end the run as `error`, with the most specific error ------------------------


@pytest.mark.parametrize(
    ("status", "message"),
    [(500, "the database is on fire"), (401, "Incorrect API key provided: sk-secret-123")],
)
async def test_error_status_ends_the_run_as_error(server, store, status, message):
    server.reply_error(status, {"error": {"message": message, "type": "server_error", "code": None}})
    async with OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="sk-secret-123", max_retries=0) as model:
        result = await agent(model, store).run("go")
    assert result.stop_reason == "error"
    assert result.error.type == "ModelHTTPError"
    assert f"HTTP {status}" in result.error.message
    assert "openai:gpt-4o-mini" in result.error.message and server.base_url in result.error.message
    assert "sk-secret-123" not in result.error.message and "sk-secret-123" not in (result.reason or "")
    if status == 500:
        assert message in result.error.message
    else:
        assert "Incorrect API key provided: <api key>" in result.error.message
    assert len(server.requests) == 1  # max_retries=0
    assert result.iterations == 1
    assert only(store.load(result.run_id), "model_call_finished").error.type == "ModelHTTPError"


async def test_the_exception_carries_status_and_body(server, model):
    server.reply_error(429, {"error": {"message": "slow down", "type": "rate_limit"}})
    with pytest.raises(ModelHTTPError) as info:
        await model.request(ModelRequest([Message("user", "hi")]))
    assert info.value.status_code == 429
    assert info.value.body == {"message": "slow down", "type": "rate_limit"}  # the SDK unwraps "error"
    assert "HTTP 429: slow down" in str(info.value)
    assert isinstance(info.value, lw.ModelError)


async def test_retries_follow_max_retries(server, store):
    server.reply_error(503, headers={"retry-after-ms": "1"})
    server.reply(text="second time lucky")
    async with OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test", max_retries=1) as model:
        result = await agent(model, store).run("go")
    assert result.stop_reason == "done" and result.output == "second time lucky"
    assert len(server.requests) == 2


async def test_timeout_ends_the_run_as_error(server, store):
    server.reply(text="too late", delay=3.0)
    async with OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test", timeout=0.5,
                           max_retries=0) as model:
        result = await agent(model, store).run("go")
    assert result.stop_reason == "error"
    assert result.error.type == "ModelTimeoutError"
    assert "did not answer within timeout=0.5s" in result.error.message
    assert "openai:gpt-4o-mini" in result.error.message
    assert result.duration_s < 2.5


async def test_unreachable_server_is_a_connection_error(store):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base_url = f"http://127.0.0.1:{port}/v1"
    async with OpenAIModel("gpt-4o-mini", base_url=base_url, api_key="test", max_retries=0) as model:
        result = await agent(model, store).run("go")
    assert result.stop_reason == "error"
    assert result.error.type == "ModelConnectionError"
    assert f"could not reach openai:gpt-4o-mini at {base_url}" in result.error.message


@pytest.mark.parametrize(
    "body",
    [
        {**completion(text="x"), "choices": []},
        {"id": "chatcmpl-odd", "object": "chat.completion", "created": 0, "model": "m"},
    ],
    ids=["empty-choices", "no-choices-key"],
)
async def test_no_choices_is_a_behavior_error(server, model, store, body):
    server.reply(body)
    result = await agent(model, store).run("go")
    assert result.stop_reason == "error"
    assert result.error.type == "ModelBehaviorError"
    assert "no choices" in result.error.message


async def test_exceptions_are_loopwise_errors(server, model):
    server.reply({**completion(text="x"), "choices": []})
    with pytest.raises(ModelBehaviorError):
        await model.request(ModelRequest([Message("user", "hi")]))
    server.reply(text="late", delay=3.0)
    async with OpenAIModel("m", base_url=server.base_url, api_key="test", timeout=0.2, max_retries=0) as fast:
        with pytest.raises(ModelTimeoutError) as info:
            await fast.request(ModelRequest([Message("user", "hi")]))
    assert isinstance(info.value.__cause__, Exception)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    async with OpenAIModel("m", base_url=f"http://127.0.0.1:{port}", api_key="t", max_retries=0) as gone:
        with pytest.raises(ModelConnectionError):
            await gone.request(ModelRequest([Message("user", "hi")]))


async def test_cancelling_the_caller_mid_call_ends_the_run_as_killed(server, model, store):
    server.reply(text="too late", delay=3.0)
    with anyio.move_on_after(0.3) as scope:
        await agent(model, store).run("go", run_id="cancelled-run")
    assert scope.cancelled_caught
    events = store.load("cancelled-run")
    assert events[-1].kind == "run_finished" and events[-1].stop_reason == "killed"
    assert only(events, "model_call_finished").error.type == "Cancelled"


# -- the request the server receives ---------------------------------------------------


async def test_messages_and_arguments_are_encoded_as_the_protocol_says(server, model):
    server.reply(text="ok")
    messages = [
        Message("system", "be brief"),
        Message("user", "hi"),
        Message("assistant", None, (ToolCall("lookup", {"q": "café", "n": 2}, id="c1"),
                                    ToolCall("lookup", '{"q": "raw"}', id="c2"))),
        Message("tool", "found", tool_call_id="c1"),
        Message("tool", "also found", tool_call_id="c2"),
        Message("assistant", "and?"),
        Message("user", None),
    ]
    spec = ToolSpec("lookup", "Look it up.", {"type": "object", "properties": {"q": {"type": "string"}}})
    response = await model.request(ModelRequest(messages, [spec], max_tokens=64))
    assert response.text == "ok" and response.finish_reason == "stop" and response.tool_calls == []
    (request,) = server.requests
    assert request["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "hi"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "c1", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "café", "n": 2}'}},
            {"id": "c2", "type": "function", "function": {"name": "lookup", "arguments": '{"q": "raw"}'}},
        ]},
        {"role": "tool", "tool_call_id": "c1", "content": "found"},
        {"role": "tool", "tool_call_id": "c2", "content": "also found"},
        {"role": "assistant", "content": "and?"},
        {"role": "user", "content": ""},
    ]
    assert json.loads(request["messages"][2]["tool_calls"][0]["function"]["arguments"]) == {"q": "café", "n": 2}
    assert request["tools"] == [{"type": "function", "function": {
        "name": "lookup", "description": "Look it up.", "parameters": spec.parameters}}]
    assert request["max_tokens"] == 64


async def test_response_is_converted(server, model):
    server.reply(text=None, tool_calls=[("c9", "lookup", '{"q": 1}'), ("c10", "other", "{}")],
                 usage=(7, 3, 2, 1))
    response = await model.request(ModelRequest([Message("user", "hi")]))
    assert response.text is None
    assert response.tool_calls == [ToolCall("lookup", '{"q": 1}', "c9"), ToolCall("other", "{}", "c10")]
    assert response.finish_reason == "tool_calls"
    assert response.usage == lw.models.Usage(7, 3, cached_input_tokens=2, reasoning_tokens=1)


async def test_lenient_servers_refusals_and_object_arguments(server, model):
    body = completion(tool_calls=[("c1", "lookup", "{}"), ("c2", "lookup", "{}"), ("c3", "other", "{}")])
    calls = body["choices"][0]["message"]["tool_calls"]
    calls[0]["function"]["arguments"] = {"q": "sent as an object"}  # some servers do
    del calls[1]["function"]["arguments"]
    calls[2]["function"]["arguments"] = [1, 2]
    server.reply(body)
    response = await model.request(ModelRequest([Message("user", "hi")]))
    assert [c.arguments for c in response.tool_calls] == [{"q": "sent as an object"}, "{}", "[1, 2]"]

    body = completion(text=None)
    body["choices"][0]["message"]["refusal"] = "I can't help with that."
    server.reply(body)
    response = await model.request(ModelRequest([Message("user", "hi")]))
    assert response.text == "I can't help with that." and response.tool_calls == []

    server.reply({**completion(text="x"), "usage": {"prompt_tokens": None, "completion_tokens": 3}})
    assert (await model.request(ModelRequest([Message("user", "hi")]))).usage is None

    # Content as parts (some compatible servers): the text parts, joined; other parts left out.
    body = completion(text=None)
    body["choices"][0]["message"]["content"] = [
        {"type": "thinking", "thinking": "hmm"}, {"type": "text", "text": "Hello, "}, {"type": "text", "text": "you."},
    ]
    server.reply(body)
    assert (await model.request(ModelRequest([Message("user", "hi")]))).text == "Hello, you."
    body["choices"][0]["message"]["content"] = [{"type": "image_url", "image_url": {"url": "x"}}]
    server.reply(body)
    with pytest.raises(lw.ModelBehaviorError, match="content of type list"):
        await model.request(ModelRequest([Message("user", "hi")]))


@pytest.mark.parametrize(
    ("name", "reasoning"),
    [
        ("o1", True), ("o1-mini", True), ("o3-mini", True), ("o4-mini-2025-04-16", True), ("gpt-5", True),
        ("gpt-5-mini", True), ("gpt-5.1", True), ("openai/o3", True),
        ("gpt-4o-mini", False), ("gpt-4.1", False), ("llama3.1:8b", False), ("qwen2.5", False), ("omni", False),
    ],
)
def test_which_models_take_max_completion_tokens(name, reasoning):
    assert uses_max_completion_tokens(name) is reasoning


async def test_reasoning_models_get_max_completion_tokens(server):
    server.reply(text="ok")
    async with OpenAIModel("o3-mini", base_url=server.base_url, api_key="test") as model:
        await model.request(ModelRequest([Message("user", "hi")], max_tokens=100))
    (request,) = server.requests
    assert request["max_completion_tokens"] == 100 and "max_tokens" not in request


# -- configuration -----------------------------------------------------------------------


def test_openai_model_string_resolves_from_the_environment(server, store, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "env-key")
    monkeypatch.setenv("OPENAI_BASE_URL", server.base_url)
    a = agent("openai:gpt-4o-mini", store)
    assert isinstance(a.model, OpenAIModel)
    assert a.model.name == "openai:gpt-4o-mini" and a.model.model == "gpt-4o-mini"
    assert a.model.base_url == server.base_url + "/"
    assert a.model.price is None
    server.reply(text="from the environment")
    result = a.run_sync("hi")
    assert result.output == "from the environment"
    assert server.headers[0]["authorization"] == "Bearer env-key"


def test_missing_api_key_is_a_user_error(monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_ADMIN_KEY", raising=False)
    with pytest.raises(lw.UserError, match=r"set the OPENAI_API_KEY environment variable or pass api_key=") as info:
        lw.Agent("openai:gpt-4o-mini", store=lw.MemoryStore())
    assert '"unused"' in str(info.value)
    with pytest.raises(lw.UserError, match="OPENAI_API_KEY"):
        OpenAIModel("gpt-4o-mini", base_url="http://127.0.0.1:9/v1")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"model": ""}, "needs a model name"),
        ({"model": "m", "price": (1, 2)}, r"price=...\) must be a loopwise.models.Price"),
        ({"model": "m", "timeout": 0}, r"timeout=...\) must be a number of seconds > 0"),
        ({"model": "m", "timeout": "60"}, r"timeout=...\) must be a number"),
        ({"model": "m", "max_retries": -1}, r"max_retries=...\) must be an int >= 0"),
        ({"model": "m", "base_url": 8080}, r"base_url=...\) must be a str"),
        ({"model": "m", "api_key": None, "client": object()}, r"client=...\) must be an openai.AsyncOpenAI"),
    ],
)
def test_bad_configuration(kwargs, message):
    with pytest.raises(lw.UserError, match=message):
        OpenAIModel(**{"api_key": "k", **kwargs})


def test_describe_names_the_server_not_the_key():
    model = OpenAIModel("gpt-4o-mini", base_url="http://127.0.0.1:9/v1", api_key="sk-very-secret",
                        price=Price(0, 0))
    assert model.name == "openai:gpt-4o-mini"
    assert model.price == Price(0, 0)
    described = model.describe()
    assert described["base_url"] == "http://127.0.0.1:9/v1/"
    assert "sk-very-secret" not in repr(described) and "sk-very-secret" not in repr(model)


async def test_a_client_passed_in_is_used_and_left_open(server, store):
    import openai

    async with openai.AsyncOpenAI(base_url=server.base_url, api_key="mine") as client:
        with pytest.raises(lw.UserError, match="client= together with base_url= or api_key="):
            OpenAIModel("gpt-4o-mini", client=client, base_url=server.base_url)
        model = OpenAIModel("gpt-4o-mini", client=client, timeout=5, max_retries=0)
        assert model.base_url == server.base_url + "/"
        server.reply(text="via your client")
        result = await agent(model, store).run("hi")
        assert result.output == "via your client"
        assert server.headers[0]["authorization"] == "Bearer mine"
        await model.aclose()
        assert not client.is_closed()


def test_one_model_serves_runs_on_successive_event_loops(server, store):
    # Each run_sync runs its own event loop; connections must not leak from one to the next
    # (filterwarnings=error turns an unclosed socket's ResourceWarning into a failure).
    model = OpenAIModel("gpt-4o-mini", base_url=server.base_url, api_key="test", max_retries=0)
    a = agent(model, store)
    for i in range(3):
        server.reply(text=f"answer {i}")
        assert a.run_sync("hi").output == f"answer {i}"
    del a, model
    gc.collect()
    assert len(server.requests) == 3


async def test_model_is_usable_after_aclose(server, model):
    server.reply(text="one")
    server.reply(text="two")
    assert (await model.request(ModelRequest([Message("user", "hi")]))).text == "one"
    await model.aclose()
    assert (await model.request(ModelRequest([Message("user", "hi")]))).text == "two"


def test_importing_loopwise_does_not_import_openai():
    code = "import sys, loopwise, loopwise.models; print('openai' in sys.modules, 'httpx2' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]


async def test_the_agent_retries_a_503_and_falls_back_to_another_model(server, store):
    """Model-call resilience end to end: every attempt is in the log, the answer says who gave it."""
    from .openai_server import OpenAIServer

    server.reply_error(503, {"error": {"message": "overloaded"}}, headers={"Retry-After": "0"})
    server.reply_error(503, {"error": {"message": "still overloaded"}}, headers={"Retry-After": "0"})
    backup_server = OpenAIServer()
    try:
        backup_server.reply(text="answered by the backup", usage=(7, 3))
        async with OpenAIModel("primary", base_url=server.base_url, api_key="k", max_retries=0) as primary, \
                OpenAIModel("backup", base_url=backup_server.base_url, api_key="k", max_retries=0,
                            price=Price(1, 2)) as backup:
            result = await agent(primary, store, fallback_models=[backup],
                                 model_policy=ModelPolicy(retries=1)).run("go")
    finally:
        backup_server.close()
    assert (result.stop_reason, result.output) == ("done", "answered by the backup")
    events = store.load(result.run_id)
    attempts = [e for e in events if e.kind == "model_attempt_failed"]
    assert [(a.model, a.attempt, a.retry_in_s is not None, a.will_fallback) for a in attempts] == [
        ("openai:primary", 1, True, False),
        ("openai:primary", 2, False, True),
    ]
    finished = only(events, "model_call_finished")
    assert finished.model == "openai:backup"
    assert finished.cost_usd == pytest.approx((7 * 1 + 3 * 2) / 1e6)  # priced at the model that answered
    assert len(server.requests) == 2 and len(backup_server.requests) == 1


def test_an_unknown_price_under_a_dollar_budget_is_refused_before_the_run(server, store):
    """PRODUCT.md: a provider model with no known price, under the default $0.50 budget."""
    model = OpenAIModel("my-finetune", base_url=server.base_url, api_key="k")
    agent_ = lw.Agent(model, store=store)
    with pytest.raises(lw.UserError, match=r"price of openai:my-finetune is unknown.*Price\(0, 0\).*budget_usd=None"):
        agent_.run_sync("hi")
    assert server.requests == [] and store.list_runs() == []  # refused before anything was sent or logged
    priced = lw.Agent(OpenAIModel("my-finetune", base_url=server.base_url, api_key="k", price=Price(0, 0)),
                      store=store)
    server.reply(text="ok")
    assert priced.run_sync("hi").stop_reason == "done"
