"""Exports: raw JSON lines, and Chrome trace JSON (Perfetto) with strict nesting per track."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict

import pytest

import loopwise as lw
from loopwise._events import LimitHit, ModelCallFinished, event_to_dict, load_event
from loopwise._views.export import to_jsonl, to_perfetto
from loopwise.cli import main
from loopwise.models import ModelResponse, Price, ScriptedModel, ToolCall, Usage


def _agent(store: lw.EventStore) -> lw.Agent:
    attempts = {"n": 0}

    @lw.tool
    async def slow_lookup(order_id: str) -> dict:
        """Look up an order."""
        await asyncio.sleep(0.05)
        return {"order_id": order_id, "status": "shipped"}

    @lw.tool(retries=2, backoff=lw.Backoff(initial_s=0.01, jitter=False))
    async def flaky(order_id: str) -> str:
        """Check the carrier (fails twice, then answers)."""
        await asyncio.sleep(0.02)
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
                usage=Usage(100, 10),
            ),
            ModelResponse(tool_calls=[ToolCall("flaky", {"order_id": "1"}, id="c")], usage=Usage(180, 8)),
            ModelResponse(text="Order 1 is in transit, order 2 shipped.", usage=Usage(240, 12)),
        ],
        price=Price(1.0, 2.0),
        name="test:scripted",
    )
    return lw.Agent(model, tools=[slow_lookup, flaky], store=store, name="exporter")


@pytest.fixture
def run_events():
    store = lw.MemoryStore()
    result = _agent(store).run_sync("Where are orders 1 and 2?")
    assert result.stop_reason == "done", result
    return store.load(result.run_id)


def _complete_by_tid(trace: dict) -> dict[int, list[dict]]:
    by_tid: dict[int, list[dict]] = defaultdict(list)
    for ev in trace["traceEvents"]:
        if ev["ph"] == "X":
            by_tid[ev["tid"]].append(ev)
    return by_tid


def _assert_valid(trace: dict) -> None:
    trace = json.loads(json.dumps(trace))  # valid JSON, as written
    assert trace["displayTimeUnit"] == "ms"
    for ev in trace["traceEvents"]:
        assert ev["ph"] in {"X", "i", "C", "M"}, ev
        assert isinstance(ev["ts"], (int, float)) and ev["ts"] >= 0, ev
        assert isinstance(ev["pid"], int) and isinstance(ev["tid"], int), ev
        assert isinstance(ev["name"], str) and ev["name"], ev
        if ev["ph"] == "X":
            assert isinstance(ev["dur"], (int, float)) and ev["dur"] >= 0, ev
        if ev["ph"] == "i":
            assert ev["s"] in {"t", "p", "g"}
    # Strict nesting per thread: sorted by start, two complete events either nest or are disjoint.
    for tid, spans in _complete_by_tid(trace).items():
        spans.sort(key=lambda e: (e["ts"], -e["dur"]))
        stack: list[float] = []
        for ev in spans:
            start, end = ev["ts"], ev["ts"] + ev["dur"]
            while stack and stack[-1] <= start + 1e-6:
                stack.pop()
            if stack:
                assert end <= stack[-1] + 1e-6, f"tid {tid}: {ev['name']} partially overlaps its parent"
            stack.append(end)


def test_perfetto_trace_is_valid_and_nests_strictly(run_events):
    trace = to_perfetto(run_events)
    _assert_valid(trace)
    events = trace["traceEvents"]
    run_id = run_events[0].run_id

    meta = [e for e in events if e["ph"] == "M"]
    assert {"name": "process_name", "ph": "M", "pid": 1, "tid": 0, "ts": 0,
            "args": {"name": f"loopwise run {run_id}"}} in meta
    names = {e["tid"]: e["args"]["name"] for e in meta if e["name"] == "thread_name"}
    assert names[0] == "iterations" and names[1] == "model"

    model = [e for e in events if e["ph"] == "X" and e["tid"] == 1]
    assert [e["name"] for e in model] == ["think test:scripted"] * 3
    assert model[0]["args"]["input_tokens"] == 100 and model[0]["args"]["output_tokens"] == 10
    assert model[0]["args"]["cost_usd"] == pytest.approx((100 * 1.0 + 10 * 2.0) / 1e6)
    assert "finish_reason" in model[0]["args"]
    # Model spans lie where the log says: they end at model_call_finished.ts.
    first_finished = next(e for e in run_events if isinstance(e, ModelCallFinished))
    origin = trace["otherData"]["origin_unix_s"]
    assert model[0]["ts"] + model[0]["dur"] == pytest.approx((first_finished.ts - origin) * 1e6, abs=1)

    iterations = [e for e in events if e["ph"] == "X" and e["tid"] == 0 and e["cat"] == "iteration"]
    assert len(iterations) == 3
    assert [e["args"]["iteration"] for e in iterations] == sorted(e["args"]["iteration"] for e in iterations)

    tools = {e["args"]["call_id"]: e for e in events if e["ph"] == "X" and e["cat"] == "tool"}
    assert set(tools) == {"a", "b", "c"}
    assert tools["a"]["tid"] != tools["b"]["tid"], "parallel tool calls must get tracks of their own"
    assert {tools["a"]["tid"], tools["b"]["tid"]} == {10, 11}
    assert tools["c"]["tid"] == 10, "a later call reuses the lowest free track"
    assert tools["c"]["args"]["attempts"] == 3 and tools["c"]["args"]["outcome"] == "ok"
    assert names[10] == "tool 1" and names[11] == "tool 2"

    retries = [e for e in events if e["ph"] == "i" and e["name"] == "tool_attempt_failed flaky"]
    assert len(retries) == 2 and all(e["tid"] == tools["c"]["tid"] for e in retries)
    for r in retries:  # on the call's track, within its span
        assert tools["c"]["ts"] <= r["ts"] <= tools["c"]["ts"] + tools["c"]["dur"]

    costs = [e for e in events if e["ph"] == "C" and e["name"] == "cost_usd"]
    values = [e["args"]["cost_usd"] for e in costs]
    assert values == sorted(values) and values[-1] == pytest.approx(sum(m["args"]["cost_usd"] for m in model))
    assert [e["ts"] for e in costs] == sorted(e["ts"] for e in costs)
    context = [e["args"]["input_tokens"] for e in events if e["ph"] == "C" and e["name"] == "context_tokens"]
    assert context == [100, 180, 240]


def test_many_parallel_tools_never_overlap_on_a_track():
    store = lw.MemoryStore()

    @lw.tool
    async def nap(s: float) -> str:
        """Sleep."""
        await asyncio.sleep(s)
        return "ok"

    calls = [ToolCall("nap", {"s": s}, id=f"n{i}") for i, s in enumerate([0.06, 0.01, 0.03, 0.01, 0.02])]
    agent = lw.Agent(ScriptedModel([calls, calls, "done"]), tools=[nap], store=store)
    result = agent.run_sync("nap")
    trace = to_perfetto(store.load(result.run_id))
    _assert_valid(trace)
    tool_tids = {e["tid"] for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "tool"}
    assert len(tool_tids) == 5 and min(tool_tids) == 10


def test_a_run_in_flight_exports_what_it_has(run_events):
    partial = [e for e in run_events if e.kind != "run_finished"][:-3]
    trace = to_perfetto(partial)
    _assert_valid(trace)
    assert trace["otherData"]["in_flight"] is True
    # A tool call with no tool_call_finished yet still shows, up to the last event.
    cut = next(i for i, e in enumerate(run_events) if e.kind == "tool_call_started")
    trace = to_perfetto(run_events[: cut + 1])
    _assert_valid(trace)
    spans = [e for e in trace["traceEvents"] if e["ph"] == "X" and e["cat"] == "tool"]
    assert len(spans) == 1 and spans[0]["args"]["outcome"] == "in_flight"
    assert to_perfetto([]) == {"traceEvents": [], "displayTimeUnit": "ms"}


def test_instants_for_the_runtime_decisions(run_events):
    run_id = run_events[0].run_id
    last = run_events[-1]
    extra = LimitHit(run_id=run_id, seq=last.seq + 1, ts=last.ts, iteration=2, limit="budget", detail="over")
    trace = to_perfetto([*run_events[:-1], extra, last])
    _assert_valid(trace)
    hits = [e for e in trace["traceEvents"] if e["ph"] == "i" and e["name"] == "limit_hit budget"]
    assert len(hits) == 1 and hits[0]["tid"] == 0 and hits[0]["args"]["detail"] == "over"


def test_jsonl_round_trips(run_events):
    lines = list(to_jsonl(run_events))
    assert len(lines) == len(run_events)
    assert all("\n" not in line for line in lines)
    back = [load_event(line) for line in lines]
    assert back == run_events
    assert [json.loads(line) for line in lines] == [event_to_dict(e) for e in run_events]


@pytest.fixture
def db(tmp_path):
    path = tmp_path / "runs.db"
    store = lw.SQLiteStore(path)
    try:
        result = _agent(store).run_sync("Where are orders 1 and 2?", run_id="export-1")
    finally:
        store.close()
    assert result.stop_reason == "done"
    return path


def test_cli_export_perfetto_to_a_file(db, tmp_path, capsys):
    out = tmp_path / "trace.json"
    assert main(["export", "export", "--format", "perfetto", "--output", str(out), "--db", str(db)]) == 0
    captured = capsys.readouterr()
    assert captured.out == ""
    assert str(out) in captured.err
    trace = json.loads(out.read_text(encoding="utf-8"))
    _assert_valid(trace)
    assert trace["otherData"]["run_id"] == "export-1"


def test_cli_export_jsonl_to_stdout(db, capsys):
    assert main(["export", "export-1", "--format", "jsonl", "--db", str(db)]) == 0
    lines = capsys.readouterr().out.splitlines()
    events = [load_event(line) for line in lines]
    assert events[0].kind == "run_started" and events[-1].kind == "run_finished"
    assert {e.run_id for e in events} == {"export-1"}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--format", "csv"], "error: unknown --format 'csv'; choose one of: jsonl, perfetto, otlp\n"),
    ],
)
def test_cli_export_refuses_other_formats(db, capsys, args, message):
    assert main(["export", "export-1", *args, "--db", str(db)]) == 2
    captured = capsys.readouterr()
    assert captured.err == message and captured.out == ""


def test_cli_export_unknown_run(db, capsys):
    assert main(["export", "nope", "--format", "jsonl", "--db", str(db)]) == 2
    assert "no run with id 'nope'" in capsys.readouterr().err


def test_export_is_a_command(capsys):
    assert main(["--help"]) == 0
    assert " export " in capsys.readouterr().out
