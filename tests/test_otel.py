"""OpenTelemetry export: the GenAI span tree of real runs, and OTLP/HTTP to a real receiver."""

from __future__ import annotations

import asyncio
import json
import socket
import sys

import pytest

import loopwise as lw
from loopwise._events import ModelCallFinished, ModelCallStarted, RunFinished, RunStarted, ToolCallFinished
from loopwise._events import ToolCallStarted
from loopwise._views.otel import plan_spans, resolve_endpoint
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelPolicy, ModelRequest, ModelResponse, Price
from loopwise.models import ScriptedModel, ToolCall, Usage
from loopwise.otel import OTLPExportError, export_events, export_run, send_run

pytest.importorskip("opentelemetry.sdk")
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider  # noqa: E402
from opentelemetry.sdk.trace.export import SimpleSpanProcessor  # noqa: E402
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter  # noqa: E402
from opentelemetry.trace import SpanKind, StatusCode  # noqa: E402

from .otlp_receiver import OTLPReceiver  # noqa: E402

SENSITIVE = ("gen_ai.tool.call.arguments", "gen_ai.tool.call.result", "gen_ai.input.messages",
             "gen_ai.output.messages", "gen_ai.system_instructions")


def _ns(ts: float) -> int:
    return int(round(ts * 1e9))


def _spans(events, *, include_content: bool = False) -> list[ReadableSpan]:
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    n = export_events(events, provider, include_content=include_content)
    spans = list(memory.get_finished_spans())
    assert n == len(spans)
    provider.shutdown()
    return spans


def _children(spans: list[ReadableSpan], parent: ReadableSpan) -> list[ReadableSpan]:
    return sorted((s for s in spans if s.parent is not None and s.parent.span_id == parent.context.span_id),
                  key=lambda s: (s.start_time, s.name))


def _root(spans: list[ReadableSpan]) -> ReadableSpan:
    roots = [s for s in spans if s.parent is None]
    assert len(roots) == 1, [s.name for s in roots]
    return roots[0]


def _support_agent(store: lw.EventStore) -> lw.Agent:
    attempts = {"n": 0}

    @lw.tool
    async def slow_lookup(order_id: str) -> dict:
        """Look up an order."""
        await asyncio.sleep(0.05)
        return {"order_id": order_id, "status": "shipped"}

    @lw.tool(retries=2, backoff=lw.Backoff(initial_s=0.01, jitter=False))
    async def flaky(order_id: str) -> str:
        """Check the carrier (fails twice, then answers)."""
        await asyncio.sleep(0.01)
        attempts["n"] += 1
        if attempts["n"] < 3:
            raise ConnectionError("carrier API down")
        return f"{order_id}: in transit"

    model = ScriptedModel(
        [
            ModelResponse(
                text="Both at once.",
                tool_calls=[ToolCall("slow_lookup", {"order_id": "1"}, id="a"),
                            ToolCall("slow_lookup", {"order_id": "2"}, id="b")],
                usage=Usage(100, 10, cached_input_tokens=40),
                finish_reason="tool_calls",
            ),
            ModelResponse(tool_calls=[ToolCall("flaky", {"order_id": "1"}, id="c")], usage=Usage(180, 8)),
            ModelResponse(text="Order 1 is in transit, order 2 shipped.", usage=Usage(240, 12), finish_reason="stop"),
        ],
        price=Price(1.0, 2.0),
        name="openai:gpt-4o-mini",
    )
    return lw.Agent(model, tools=[slow_lookup, flaky], store=store, name="support",
                    instructions="You are a support agent.", max_tokens=300)


@pytest.fixture
def run_events():
    store = lw.MemoryStore()
    result = _support_agent(store).run_sync("Where are orders 1 and 2? My email is ann@example.com",
                                            tags=["batch-7"])
    assert result.stop_reason == "done", result
    return store.load(result.run_id)


def test_the_span_tree_follows_the_genai_conventions(run_events):
    spans = _spans(run_events)
    started, finished = run_events[0], run_events[-1]
    assert isinstance(started, RunStarted) and isinstance(finished, RunFinished)
    run_id = started.run_id

    root = _root(spans)
    assert root.name == "invoke_agent support" and root.kind is SpanKind.INTERNAL
    assert root.status.status_code is StatusCode.UNSET
    assert len({s.context.trace_id for s in spans}) == 1
    a = root.attributes
    assert a["gen_ai.operation.name"] == "invoke_agent"
    assert a["gen_ai.agent.name"] == "support"
    assert a["gen_ai.conversation.id"] == run_id
    assert a["gen_ai.provider.name"] == "openai" and a["gen_ai.request.model"] == "gpt-4o-mini"
    assert a["gen_ai.usage.input_tokens"] == 520 and a["gen_ai.usage.output_tokens"] == 30
    assert a["loopwise.cost_usd"] == pytest.approx(finished.cost_usd) and finished.cost_usd > 0
    assert "gen_ai.usage.cost" not in a, "the run's total must not be summed again with its calls"
    assert a["loopwise.stop_reason"] == "done" and a["loopwise.iterations"] == 3
    assert list(a["loopwise.tags"]) == ["batch-7"]
    assert "loopwise.incomplete" not in a
    assert (root.start_time, root.end_time) == (_ns(started.ts), _ns(finished.ts))
    assert [e.name for e in root.events] == ["run_finished"]
    assert root.events[0].attributes["loopwise.stop_reason"] == "done"

    iterations = _children(spans, root)
    assert [s.name for s in iterations] == ["iteration 1", "iteration 2", "iteration 3"]
    for n, it in enumerate(iterations, 1):
        assert it.kind is SpanKind.INTERNAL and it.attributes["loopwise.iteration"] == n
        assert it.attributes["gen_ai.conversation.id"] == run_id
        assert root.start_time <= it.start_time <= it.end_time <= root.end_time
    assert iterations[0].end_time <= iterations[1].start_time  # one after another

    # Model calls: CLIENT spans under their iteration, from model_call_started to _finished.
    model_started = [e for e in run_events if isinstance(e, ModelCallStarted)]
    model_finished = [e for e in run_events if isinstance(e, ModelCallFinished)]
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert len(chats) == 3
    for it, chat, s, f in zip(iterations, sorted(chats, key=lambda c: c.start_time), model_started, model_finished):
        assert chat.name == "chat gpt-4o-mini" and chat.kind is SpanKind.CLIENT
        assert chat.parent.span_id == it.context.span_id
        assert (chat.start_time, chat.end_time) == (_ns(s.ts), _ns(f.ts))
        c = chat.attributes
        assert c["gen_ai.operation.name"] == "chat" and c["gen_ai.provider.name"] == "openai"
        assert c["gen_ai.request.model"] == "gpt-4o-mini" and c["gen_ai.response.model"] == "gpt-4o-mini"
        assert c["gen_ai.request.max_tokens"] == s.max_tokens and s.max_tokens <= 300
        assert c["gen_ai.usage.input_tokens"] == f.usage.input_tokens
        assert c["gen_ai.usage.output_tokens"] == f.usage.output_tokens
        assert c["gen_ai.usage.cost"] == pytest.approx(f.cost_usd) and f.cost_usd > 0
        assert c["loopwise.purpose"] == "think"
        assert chat.status.status_code is StatusCode.UNSET
    first = min(chats, key=lambda c: c.start_time)
    assert list(first.attributes["gen_ai.response.finish_reasons"]) == ["tool_calls"]
    assert first.attributes["gen_ai.usage.cache_read.input_tokens"] == 40
    assert sum(c.attributes["gen_ai.usage.cost"] for c in chats) == pytest.approx(finished.cost_usd)

    # Tool calls: INTERNAL spans under their iteration; the two parallel ones overlap in time.
    tools = {s.attributes["gen_ai.tool.call.id"]: s for s in spans if s.name.startswith("execute_tool ")}
    assert set(tools) == {"a", "b", "c"}
    a_span, b_span, c_span = tools["a"], tools["b"], tools["c"]
    assert a_span.name == "execute_tool slow_lookup" and a_span.kind is SpanKind.INTERNAL
    assert a_span.parent.span_id == b_span.parent.span_id == iterations[0].context.span_id
    assert c_span.parent.span_id == iterations[1].context.span_id
    assert a_span.start_time < b_span.end_time and b_span.start_time < a_span.end_time, "siblings must overlap"
    assert a_span.end_time - a_span.start_time >= 40_000_000  # the tool's own 50 ms sleep
    starts = {e.call_id: e for e in run_events if isinstance(e, ToolCallStarted)}
    ends = {e.call_id: e for e in run_events if isinstance(e, ToolCallFinished)}
    for call_id, span in tools.items():
        assert (span.start_time, span.end_time) == (_ns(starts[call_id].ts), _ns(ends[call_id].ts))
        assert span.attributes["gen_ai.operation.name"] == "execute_tool"
        assert span.attributes["gen_ai.tool.type"] == "function"
        assert span.attributes["loopwise.tool.outcome"] == "ok"
        assert span.status.status_code is StatusCode.UNSET
    # The flaky call's failed attempts are events on its span, inside it.
    assert c_span.attributes["loopwise.tool.attempts"] == 3
    retries = [e for e in c_span.events if e.name == "tool_attempt_failed"]
    assert [e.attributes["loopwise.attempt"] for e in retries] == [1, 2]
    assert all(e.attributes["error.type"] == "ConnectionError" for e in retries)
    assert all(c_span.start_time <= e.timestamp <= c_span.end_time for e in retries)

    # Content is opt-in: none of the task, instructions, outputs, arguments or results by default.
    for span in spans:
        assert not set(SENSITIVE) & set(span.attributes), span.name
        for event in span.events:
            assert "ann@example.com" not in str(dict(event.attributes))
        assert "ann@example.com" not in str(dict(span.attributes))


def test_content_when_asked_for(run_events):
    spans = _spans(run_events, include_content=True)
    root = _root(spans)
    assert '"You are a support agent."' in root.attributes["gen_ai.system_instructions"]
    assert "ann@example.com" in root.attributes["gen_ai.input.messages"]
    assert "order 2 shipped" in root.attributes["gen_ai.output.messages"]
    tools = {s.attributes["gen_ai.tool.call.id"]: s for s in spans if s.name.startswith("execute_tool ")}
    assert tools["a"].attributes["gen_ai.tool.call.arguments"] == '{"order_id": "1"}'
    assert tools["c"].attributes["gen_ai.tool.call.result"] == "1: in transit"
    chat = min((s for s in spans if s.name.startswith("chat ")), key=lambda s: s.start_time)
    assert '"name": "slow_lookup"' in chat.attributes["gen_ai.output.messages"]


def test_a_run_read_back_from_sqlite_exports_the_same_tree_as_the_live_one(tmp_path):
    store = lw.SQLiteStore(tmp_path / "runs.db")
    agent = _support_agent(store)

    async def live() -> list:
        return [e async for e in agent.stream("Where are orders 1 and 2?", run_id="live-1")]

    try:
        live_events = asyncio.run(live())
    finally:
        store.close()
    reopened = lw.SQLiteStore(tmp_path / "runs.db")
    try:
        stored_events = reopened.load("live-1")
    finally:
        reopened.close()

    def shape(spans: list[ReadableSpan]) -> list[tuple]:
        names = {s.context.span_id: s.name for s in spans}
        return sorted((s.name, names.get(s.parent.span_id) if s.parent else None, s.kind, s.start_time, s.end_time,
                       tuple(sorted((k, str(v)) for k, v in s.attributes.items())),
                       tuple((e.name, e.timestamp) for e in s.events), s.status.status_code) for s in spans)

    assert shape(_spans(live_events)) == shape(_spans(stored_events))
    assert len(_spans(stored_events)) == 1 + 3 + 3 + 3


def _never_done(request: ModelRequest) -> ModelResponse:
    if not request.tools:  # the best-effort call after the limit
        return ModelResponse(text="Best effort: escalating.", usage=Usage(50, 5))
    return ModelResponse(text="More context.", tool_calls=[ToolCall("search", {"query": "more"})], usage=Usage(80, 9))


def test_a_run_stopped_by_the_iteration_cap():
    @lw.tool
    def search(query: str) -> str:
        """Search the knowledge base."""
        return "nothing new"

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(_never_done), tools=[search], store=store, limits=lw.Limits(max_iterations=2))
    result = agent.run_sync("Why is my order late?")
    assert result.stop_reason == "max_iterations"
    spans = _spans(store.load(result.run_id))
    root = _root(spans)
    assert root.status.status_code is StatusCode.UNSET, "a limit is a result, not an error"
    assert root.attributes["loopwise.stop_reason"] == "max_iterations"
    assert "iteration limit of 2" in root.attributes["loopwise.stop_detail"]
    assert root.attributes["gen_ai.provider.name"] == "function"
    last = [s for s in _children(spans, root) if s.name == "iteration 2"][0]
    limit = [e for e in last.events if e.name == "limit_hit"]
    assert len(limit) == 1 and limit[0].attributes["loopwise.limit"] == "max_iterations"
    assert any(e.name == "nudge" and e.attributes["loopwise.reason"] == "best-effort answer after a limit"
               for e in last.events)
    calls = _children(spans, last)
    purposes = [s.attributes.get("loopwise.purpose") for s in calls if s.name.startswith("chat ")]
    assert purposes == ["think", "final_answer"]
    skipped = [s for s in calls if s.name == "execute_tool search"]
    assert len(skipped) == 1 and skipped[0].attributes["loopwise.tool.outcome"] == "not_executed"
    assert skipped[0].status.status_code is StatusCode.UNSET
    assert root.attributes["gen_ai.usage.input_tokens"] == 80 + 80 + 50


def test_a_failed_run_and_its_failed_model_attempts():
    calls = {"n": 0}

    def down(request: ModelRequest) -> ModelResponse:
        calls["n"] += 1
        raise lw.ModelHTTPError("HTTP 503 from the stand-in", status_code=503)

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(down, name="openai:gpt-4o"), store=store,
                     model_policy=ModelPolicy(retries=2, backoff_initial_s=0.001, backoff_max_s=0.001))
    result = agent.run_sync("hello")
    assert result.stop_reason == "error" and calls["n"] == 3
    spans = _spans(store.load(result.run_id))
    root = _root(spans)
    assert root.status.status_code is StatusCode.ERROR
    assert root.attributes["error.type"] == "ModelHTTPError"
    assert "503" in root.status.description
    chat = [s for s in spans if s.name == "chat gpt-4o"]
    assert len(chat) == 1 and chat[0].status.status_code is StatusCode.ERROR
    assert chat[0].attributes["error.type"] == "ModelHTTPError"
    failed = [e for e in chat[0].events if e.name == "model_attempt_failed"]
    assert [e.attributes["loopwise.attempt"] for e in failed] == [1, 2, 3]
    assert all(e.attributes["error.type"] == "ModelHTTPError" for e in failed)


def test_tool_errors_and_fallbacks():
    @lw.tool(timeout=0.05, fallback="neutral")
    async def sentiment(text: str) -> str:
        """Classify."""
        await asyncio.sleep(5)
        return "negative"

    @lw.tool
    def broken(x: int) -> str:
        """Always fails."""
        raise RuntimeError("database is down")

    store = lw.MemoryStore()
    model = ScriptedModel([[ToolCall("sentiment", {"text": "hi"}, id="s"), ToolCall("broken", {"x": 1}, id="k"),
                            ToolCall("nope", {}, id="u")], "done"])
    result = lw.Agent(model, tools=[sentiment, broken], store=store).run_sync("go")
    assert result.stop_reason == "done"
    spans = _spans(store.load(result.run_id))
    tools = {s.attributes["gen_ai.tool.call.id"]: s for s in spans if s.name.startswith("execute_tool ")}
    fell_back = tools["s"]
    assert fell_back.attributes["loopwise.tool.outcome"] == "fallback"
    assert fell_back.status.status_code is StatusCode.UNSET, "a fallback that answered is not an error"
    events = [e.name for e in fell_back.events]
    assert "tool_fallback" in events
    fallback = next(e for e in fell_back.events if e.name == "tool_fallback")
    assert fallback.attributes["loopwise.ok"] is True and fallback.attributes["loopwise.reason"]
    failed = tools["k"]
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes["error.type"] == "RuntimeError" and "database is down" in failed.status.description
    unknown = tools["u"]
    assert unknown.name == "execute_tool nope" and unknown.status.status_code is StatusCode.ERROR
    assert unknown.attributes["loopwise.tool.outcome"] == "unknown_tool"


def test_a_run_in_flight_exports_what_it_has(run_events):
    cut = next(i for i, e in enumerate(run_events) if isinstance(e, ToolCallStarted) and e.call_id == "c")
    partial = run_events[: cut + 1]
    spans = _spans(partial)
    root = _root(spans)
    assert root.attributes["loopwise.incomplete"] is True
    assert root.end_time == _ns(partial[-1].ts)
    assert "loopwise.stop_reason" not in root.attributes and root.status.status_code is StatusCode.UNSET
    open_call = [s for s in spans if s.attributes.get("gen_ai.tool.call.id") == "c"]
    assert len(open_call) == 1 and open_call[0].attributes["loopwise.incomplete"] is True
    assert open_call[0].end_time == _ns(partial[-1].ts)
    done = [s for s in spans if s.attributes.get("gen_ai.tool.call.id") == "a"]
    assert "loopwise.incomplete" not in done[0].attributes
    # Totals so far, from the calls that finished.
    assert root.attributes["gen_ai.usage.input_tokens"] == 100 + 180
    assert export_events([], TracerProvider()) == 0


def test_a_resumed_run_is_one_trace_with_its_segments_apart(run_events):
    import dataclasses

    from loopwise._events import RunResumed as resumed_cls
    cut = next(i for i, e in enumerate(run_events) if isinstance(e, ToolCallStarted) and e.call_id == "c")
    first = run_events[: cut + 1]  # the process died while tool call c ran
    crash_ts = first[-1].ts
    later = 100.0
    resumed = resumed_cls(run_id=first[0].run_id, seq=len(first), ts=crash_ts + later, segment=1,
                          previous_end="crashed", iteration=2, by="test")
    # The new segment runs c again (same call id) and goes on; no iteration_started 2 again.
    second = [dataclasses.replace(e, seq=len(first) + 1 + i, ts=e.ts + later) for i, e in enumerate(run_events[cut:])]
    spans = _spans([*first, resumed, *second])
    root = _root(spans)
    assert "loopwise.incomplete" not in root.attributes and root.attributes["loopwise.stop_reason"] == "done"
    assert any(e.name == "run_resumed" and e.attributes["loopwise.previous_end"] == "crashed" for e in root.events)
    iterations = _children(spans, root)
    assert [s.name for s in iterations] == ["iteration 1", "iteration 2", "iteration 2", "iteration 3"]
    died, continued = iterations[1], iterations[2]
    assert died.end_time == _ns(crash_ts), "the dead segment's iteration ends where its log ends"
    assert continued.attributes["loopwise.resumed"] is True and continued.start_time >= _ns(crash_ts + later)
    calls = [s for s in spans if s.attributes.get("gen_ai.tool.call.id") == "c"]
    assert len(calls) == 2
    lost, rerun = sorted(calls, key=lambda s: s.start_time)
    assert lost.attributes["loopwise.incomplete"] is True and lost.end_time == _ns(crash_ts)
    assert lost.parent.span_id == died.context.span_id
    assert rerun.parent.span_id == continued.context.span_id
    assert rerun.attributes["loopwise.tool.outcome"] == "ok" and "loopwise.incomplete" not in rerun.attributes

    # Killed, then resumed and still running: the kill's run_finished is not the run's end.
    killed = RunFinished(run_id=first[0].run_id, seq=len(first), ts=crash_ts + 0.001, stop_reason="killed",
                         reason="operator")
    resumed_after_kill = dataclasses.replace(resumed, seq=len(first) + 1, previous_end="killed")
    in_flight = [*first, killed, resumed_after_kill,
                 *[dataclasses.replace(e, seq=e.seq + 1) for e in second[:2]]]
    root = _root(_spans(in_flight))
    assert root.attributes["loopwise.incomplete"] is True and "loopwise.stop_reason" not in root.attributes
    assert root.end_time == _ns(in_flight[-1].ts)
    assert [e.attributes.get("loopwise.stop_reason") for e in root.events if e.name == "run_finished"] == ["killed"]


def test_plans_are_pure_and_refuse_mixed_runs(run_events):
    other = lw.MemoryStore()
    lw.Agent(ScriptedModel(["hi"]), store=other).run_sync("x", run_id="other")
    with pytest.raises(lw.UserError, match="belong to 2 runs"):
        plan_spans([*run_events, *other.load("other")])
    plan = plan_spans(run_events)
    assert plan is not None and plan.count() == 10
    assert plan_spans([]) is None


def test_export_run_reads_a_store_and_needs_a_provider(tmp_path):
    store = lw.SQLiteStore(tmp_path / "runs.db")
    try:
        lw.Agent(ScriptedModel(["hi"]), store=store).run_sync("x", run_id="r1")
        memory = InMemorySpanExporter()
        provider = TracerProvider()
        provider.add_span_processor(SimpleSpanProcessor(memory))
        assert export_run("r1", store=store, tracer_provider=provider) == 3
        assert [s.name for s in memory.get_finished_spans()] == ["chat scripted", "iteration 1", "invoke_agent agent"]
        # No global provider configured: refused loudly, not spans dropped.
        with pytest.raises(lw.UserError, match="no OpenTelemetry tracer provider is configured"):
            export_run("r1", store=store)
        with pytest.raises(lw.UserError, match="no run with id 'nope'"):
            export_run("nope", store=store, tracer_provider=provider)
        with pytest.raises(lw.UserError, match="store must be a loopwise EventStore"):
            export_run("r1", store="runs.db", tracer_provider=provider)  # type: ignore[arg-type]
    finally:
        store.close()


def test_without_the_extra_the_error_says_what_to_install(monkeypatch, run_events, tmp_path, capsys):
    for name in ("opentelemetry", "opentelemetry.sdk.trace", "opentelemetry.exporter.otlp.proto.http.trace_exporter"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(lw.UserError, match=r"pip install 'loopwise\[otel\]'"):
        export_events(run_events, None)
    assert main(["export", "x", "--format", "otlp", "--endpoint", "http://127.0.0.1:1",
                 "--db", str(tmp_path / "none.db")]) == 2
    assert capsys.readouterr().err == (
        "error: OTLP export needs the OpenTelemetry SDK and exporter: pip install 'loopwise[otel]'\n")


# -- the endpoint ----------------------------------------------------------------------


@pytest.fixture
def clean_otel_env(monkeypatch):
    for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT", "OTEL_EXPORTER_OTLP_PROTOCOL",
                 "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_HEADERS",
                 "OTEL_EXPORTER_OTLP_TRACES_HEADERS", "OTEL_SERVICE_NAME", "OTEL_RESOURCE_ATTRIBUTES"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


@pytest.mark.parametrize(
    ("endpoint", "env", "expected"),
    [
        ("http://localhost:4318", {}, "http://localhost:4318/v1/traces"),
        ("http://localhost:4318/", {}, "http://localhost:4318/v1/traces"),
        ("http://localhost:6006/v1/traces", {}, "http://localhost:6006/v1/traces"),
        ("https://cloud.langfuse.com/api/public/otel", {}, "https://cloud.langfuse.com/api/public/otel/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318/"}, "http://collector:4318/v1/traces"),
        (None, {"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/custom/traces",
                "OTEL_EXPORTER_OTLP_ENDPOINT": "http://other:4318"}, "http://collector:4318/custom/traces"),
        ("http://explicit:4318", {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://env:4318"}, "http://explicit:4318/v1/traces"),
        ("http://localhost:4318", {"OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf"}, "http://localhost:4318/v1/traces"),
    ],
)
def test_endpoint_resolution(clean_otel_env, endpoint, env, expected):
    for name, value in env.items():
        clean_otel_env.setenv(name, value)
    assert resolve_endpoint(endpoint) == expected


@pytest.mark.parametrize(
    ("endpoint", "env", "message"),
    [
        (None, {}, "no OTLP collector is configured: pass --endpoint URL"),
        ("localhost:4318", {}, "is not an http(s) URL"),
        ("http://host:99999", {}, "is not a valid URL"),
        (None, {"OTEL_EXPORTER_OTLP_ENDPOINT": "grpc://x"}, "OTEL_EXPORTER_OTLP_ENDPOINT 'grpc://x' is not an http(s)"),
        ("http://localhost:4317", {"OTEL_EXPORTER_OTLP_PROTOCOL": "grpc"}, "sends OTLP over HTTP as protobuf"),
    ],
)
def test_endpoint_mistakes(clean_otel_env, endpoint, env, message):
    for name, value in env.items():
        clean_otel_env.setenv(name, value)
    with pytest.raises(lw.UserError) as info:
        resolve_endpoint(endpoint)
    assert message in str(info.value)


# -- end to end: the CLI and send_run against a real OTLP/HTTP receiver ------------------------


@pytest.fixture
def receiver():
    r = OTLPReceiver().start()
    yield r
    r.stop()


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)
    try:
        result = _support_agent(store).run_sync("Where are orders 1 and 2?", run_id="otlp-run-1")
    finally:
        store.close()
    assert result.stop_reason == "done"
    return path


def test_cli_sends_the_run_to_a_collector(clean_otel_env, receiver, db, capsys):
    args = ["export", "otlp-run", "--format", "otlp", "--endpoint", receiver.url, "--db", str(db),
            "--header", "Authorization=Bearer test-key"]
    assert main(args) == 0
    captured = capsys.readouterr()
    assert captured.out == f"sent 10 spans of run otlp-run-1 to {receiver.url}/v1/traces\n"
    assert captured.err == ""
    assert len(receiver.requests) == 1, "one request for the whole run"
    request = receiver.requests[0]
    assert request["path"] == "/v1/traces"
    assert {k.lower(): v for k, v in request["headers"].items()}["authorization"] == "Bearer test-key"

    spans = receiver.spans
    assert len(spans) == 10
    by_id = {s.span_id: s for s in spans}
    assert len({s.trace_id for s in spans}) == 1
    roots = [s for s in spans if not s.parent_span_id]
    assert [r.name for r in roots] == ["invoke_agent support"]
    root = roots[0]
    assert root.kind == 1  # SPAN_KIND_INTERNAL
    assert root.resource["service.name"] == "loopwise" and root.scope == "loopwise"
    assert root.attributes["gen_ai.conversation.id"] == "otlp-run-1"
    assert root.attributes["gen_ai.usage.input_tokens"] == 520
    assert root.events[0][0] == "run_finished"

    def path(span) -> str:
        parts = [span.name]
        while span.parent_span_id:
            span = by_id[span.parent_span_id]
            parts.append(span.name)
        return " / ".join(reversed(parts))

    assert sorted(path(s) for s in spans) == sorted([
        "invoke_agent support",
        "invoke_agent support / iteration 1",
        "invoke_agent support / iteration 1 / chat gpt-4o-mini",
        "invoke_agent support / iteration 1 / execute_tool slow_lookup",
        "invoke_agent support / iteration 1 / execute_tool slow_lookup",
        "invoke_agent support / iteration 2",
        "invoke_agent support / iteration 2 / chat gpt-4o-mini",
        "invoke_agent support / iteration 2 / execute_tool flaky",
        "invoke_agent support / iteration 3",
        "invoke_agent support / iteration 3 / chat gpt-4o-mini",
    ])
    chats = [s for s in spans if s.name.startswith("chat ")]
    assert all(s.kind == 3 for s in chats)  # SPAN_KIND_CLIENT
    assert all(isinstance(s.attributes["gen_ai.usage.cost"], float) for s in chats)
    assert sorted(s.attributes["gen_ai.usage.input_tokens"] for s in chats) == [100, 180, 240]
    flaky = next(s for s in spans if s.name == "execute_tool flaky")
    assert [name for name, _, _ in flaky.events] == ["tool_attempt_failed", "tool_attempt_failed"]
    assert all(flaky.start_ns <= ts <= flaky.end_ns for _, ts, _ in flaky.events)
    for s in spans:
        assert not set(SENSITIVE) & set(s.attributes), s.name
        parent = by_id.get(s.parent_span_id)
        if parent is not None:
            assert parent.start_ns <= s.start_ns <= s.end_ns <= parent.end_ns, path(s)

    # Read back from the file, the times are the log's.
    store = lw.SQLiteStore(db)
    try:
        events = store.load("otlp-run-1")
    finally:
        store.close()
    assert root.start_ns == _ns(events[0].ts) and root.end_ns == _ns(events[-1].ts)


def test_cli_reads_the_standard_environment(clean_otel_env, receiver, db, capsys):
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_ENDPOINT", receiver.url)
    clean_otel_env.setenv("OTEL_EXPORTER_OTLP_HEADERS", "x-api-key=from-env")
    clean_otel_env.setenv("OTEL_SERVICE_NAME", "support-desk")
    assert main(["export", "otlp-run-1", "--format", "otlp", "--include-content", "--db", str(db)]) == 0
    assert capsys.readouterr().out.startswith("sent 10 spans")
    assert {k.lower(): v for k, v in receiver.requests[0]["headers"].items()}["x-api-key"] == "from-env"
    root = next(s for s in receiver.spans if not s.parent_span_id)
    assert root.resource["service.name"] == "support-desk"
    assert "Where are orders 1 and 2?" in root.attributes["gen_ai.input.messages"]
    tool = next(s for s in receiver.spans if s.name == "execute_tool flaky")
    assert tool.attributes["gen_ai.tool.call.result"] == "1: in transit"


def test_send_run_from_python(clean_otel_env, receiver, db):
    store = lw.SQLiteStore(db)
    try:
        assert send_run("otlp-run-1", store=store, endpoint=receiver.url) == 10
    finally:
        store.close()
    assert len(receiver.spans) == 10


def test_a_collector_that_refuses_is_one_line_exit_1(clean_otel_env, receiver, db, capsys):
    receiver.status = 401
    assert main(["export", "otlp-run-1", "--format", "otlp", "--endpoint", receiver.url, "--db", str(db)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1 and captured.err.startswith("error: could not send 10 spans to ")
    assert "the collector answered HTTP 401" in captured.err
    assert len(receiver.requests) == 1, "a 401 is not retried"
    store = lw.SQLiteStore(db)
    try:
        with pytest.raises(OTLPExportError, match="401"):
            send_run("otlp-run-1", store=store, endpoint=receiver.url)
    finally:
        store.close()


def test_an_unreachable_collector_is_one_line_exit_1(clean_otel_env, db, capsys):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    assert main(["export", "otlp-run-1", "--format", "otlp", "--endpoint", url, "--timeout", "1",
                 "--db", str(db)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1, captured.err
    assert captured.err.startswith(f"error: could not send 10 spans to {url}/v1/traces: ")
    assert "refused" in captured.err.lower(), captured.err


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["--format", "otlp"], 2, "error: no OTLP collector is configured: pass --endpoint URL"),
        (["--format", "otlp", "--endpoint", "http://127.0.0.1:4318", "-o", "x.json"], 2,
         "error: --output does not apply to --format otlp"),
        (["--format", "jsonl", "--endpoint", "http://127.0.0.1:4318"], 2,
         "error: --endpoint only applies to --format otlp (this is --format jsonl)"),
        (["--format", "otlp", "--endpoint", "http://127.0.0.1:4318", "--header", "nokey"], 2,
         "error: --header 'nokey' is not KEY=VALUE"),
        (["--format", "otlp", "--endpoint", "ftp://x"], 2, "error: the endpoint 'ftp://x' is not an http(s) URL"),
        (["--format", "csv"], 2, "error: unknown --format 'csv'; choose one of: jsonl, perfetto, otlp"),
    ],
)
def test_cli_mistakes(clean_otel_env, db, capsys, args, code, message):
    assert main(["export", "otlp-run-1", *args, "--db", str(db)]) == code
    captured = capsys.readouterr()
    assert captured.err.startswith(message) and captured.err.count("\n") == 1, captured.err
    assert captured.out == ""


# -- what each chat span was shown; the same ids on every export --------------------------


def _expected_input(messages) -> list:
    """`gen_ai.input.messages` of a request, as the GenAI conventions write it (built here independently)."""
    out = []
    for m in messages:
        if m.role == "tool":
            parts = [{"type": "tool_call_response", "id": m.tool_call_id, "response": m.content}]
        else:
            parts = [{"type": "text", "content": m.content}] if m.content else []
            parts += [{"type": "tool_call", "id": c.id, "name": c.name, "arguments": c.arguments}
                      for c in m.tool_calls]
        out.append({"role": m.role, "parts": parts})
    return out


def _windowed_db(tmp_path, run_id: str):
    """A SQLite log of a run whose model records each request: a sliding window with summaries."""
    requests = []

    @lw.tool
    def lookup(order_id: str) -> dict:
        """Look up an order."""
        return {"order_id": order_id, "status": "shipped"}

    thinks = []

    def think(request: ModelRequest) -> ModelResponse:
        requests.append(list(request.messages))
        if not request.tools:  # the summary call
            return ModelResponse(text=f"looked up {len(thinks)} orders")
        thinks.append(request)
        if len(thinks) >= 4:
            return ModelResponse(text="All shipped.")
        return ModelResponse(text=f"step {len(thinks)}", tool_calls=[ToolCall("lookup", {"order_id": str(len(thinks))})])

    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)
    try:
        agent = lw.Agent(FunctionModel(think, name="openai:gpt-4o-mini"), tools=[lookup], store=store,
                         instructions="You are a support agent.", context=lw.SlidingWindow(keep_last=1),
                         runaway=None)
        result = agent.run_sync("Where are my orders?", run_id=run_id)
    finally:
        store.close()
    assert result.stop_reason == "done"
    return path, requests


def test_each_chat_span_holds_the_messages_its_call_was_shown(clean_otel_env, receiver, tmp_path, capsys):
    db, requests = _windowed_db(tmp_path, "shown-run")
    assert main(["export", "shown-run", "--format", "otlp", "--endpoint", receiver.url, "--db", str(db),
                 "--include-content"]) == 0
    chats = sorted((s for s in receiver.spans if s.name.startswith("chat ")), key=lambda s: s.start_ns)
    assert len(chats) == len(requests) > 3
    assert {s.attributes["loopwise.purpose"] for s in chats} == {"think", "summary"}
    for span, request in zip(chats, requests):
        assert json.loads(span.attributes["gen_ai.input.messages"]) == _expected_input(request)
    # Without --include-content, no span carries what the model was shown.
    receiver.spans.clear()
    capsys.readouterr()
    assert main(["export", "shown-run", "--format", "otlp", "--endpoint", receiver.url, "--db", str(db)]) == 0
    assert receiver.spans and not any(k in SENSITIVE for s in receiver.spans for k in s.attributes)


@pytest.mark.parametrize("run_id", ["0199aa3f5c1e7b2d9f00c0ffee15600d", "nightly/run-7"])
def test_exporting_a_run_again_gives_the_same_trace_and_span_ids(clean_otel_env, receiver, tmp_path, run_id):
    db, _ = _windowed_db(tmp_path, run_id)
    exports = []
    for _ in range(2):
        receiver.spans.clear()
        assert main(["export", run_id, "--format", "otlp", "--endpoint", receiver.url, "--db", str(db)]) == 0
        exports.append(sorted((s.trace_id, s.span_id, s.parent_span_id, s.name) for s in receiver.spans))
    assert exports[0] == exports[1]
    [trace_id] = {t for t, _, _, _ in exports[0]}
    if run_id.isalnum():  # a run id that is a trace id (as loopwise makes them) is the trace id
        assert trace_id == run_id
    else:
        assert len(trace_id) == 32 and int(trace_id, 16) != 0
    assert len({s for _, s, _, _ in exports[0]}) == len(exports[0])  # every span its own id
    # From Python, through an SDK tracer provider of one's own: the same ids again.
    store = lw.SQLiteStore(db)
    try:
        events = store.load(run_id)
    finally:
        store.close()
    spans = _spans(events) + _spans(events)
    ids = sorted((f"{s.context.trace_id:032x}", f"{s.context.span_id:016x}") for s in spans)
    assert ids[::2] == ids[1::2] == sorted((t, s) for t, s, _, _ in exports[0])


def test_a_tracer_provider_keeps_its_own_ids_for_other_spans(run_events):
    memory = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(memory))
    export_events(run_events, provider)
    tracer = provider.get_tracer("loopwise")
    with tracer.start_as_current_span("mine") as mine:
        pass
    planned = {s.context.span_id for s in memory.get_finished_spans() if s.name != "mine"}
    assert mine.get_span_context().span_id not in planned
    assert mine.get_span_context().trace_id != int(run_events[0].run_id, 16)
    provider.shutdown()
