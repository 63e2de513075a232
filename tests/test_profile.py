"""`loopwise profile`: latency profiles read from the events, checked against runs with known sleeps."""

from __future__ import annotations

import dataclasses
import io
import json
import uuid

import anyio
import pytest
from rich.console import Console

import loopwise as lw
from loopwise._demo import scenario as _demo
from loopwise._events import (
    ErrorInfo,
    IterationStarted,
    ModelCallFinished,
    ModelCallStarted,
    RunFinished,
    RunResumed,
    RunStarted,
    ToolAttemptFailed,
    ToolCallFinished,
    ToolCallStarted,
)
from loopwise._views.profile import percentile, phase_times, profile, render_profile
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelResponse, ToolCall

MODEL_SLEEP = 0.1
FAST, SLOW = 0.05, 0.2


@lw.tool
async def fast(n: int) -> str:
    """A fast lookup."""
    await anyio.sleep(FAST)
    return f"fast {n}"


@lw.tool
async def slow(n: int) -> str:
    """A slow lookup."""
    await anyio.sleep(SLOW)
    return f"slow {n}"


@lw.tool(timeout=0.05, retries=1, backoff=lw.Backoff(initial_s=0.01, jitter=False), fallback="cached")
async def hangs(n: int) -> str:
    """A lookup that never answers in time."""
    await anyio.sleep(10)
    return "never"


# iteration 1: fast + slow together; 2 and 3: one fast call each; 4: the answer.
SCRIPT = [
    [ToolCall("fast", {"n": 1}), ToolCall("slow", {"n": 1})],
    [ToolCall("fast", {"n": 2})],
    [ToolCall("fast", {"n": 3})],
    None,
]


def known_sleeps_agent(store: lw.EventStore) -> lw.Agent:
    async def think(request):
        await anyio.sleep(MODEL_SLEEP)
        step = sum(1 for m in request.messages if m.role == "assistant")
        calls = SCRIPT[step] if step < len(SCRIPT) else None
        if calls is None:
            return ModelResponse(text="all done")
        return ModelResponse(tool_calls=list(calls))

    return lw.Agent(FunctionModel(think, name="test:sleepy"), tools=[fast, slow], store=store, name="sleepy")


def hanging_agent(store: lw.EventStore) -> lw.Agent:
    async def think(request):
        if any(m.role == "tool" for m in request.messages):
            return ModelResponse(text="done")
        return ModelResponse(tool_calls=[ToolCall("hangs", {"n": 1})])

    return lw.Agent(FunctionModel(think, name="test:quick"), tools=[hangs], store=store, name="hanging")


# -- a run with known sleeps -------------------------------------------------------------------


async def test_profile_of_a_run_with_known_sleeps(store):
    result = await known_sleeps_agent(store).run("go", run_id="sleepy-1")
    assert result.stop_reason == "done"
    events = store.load(result.run_id)
    prof = profile([events])

    assert prof.run_ids == ["sleepy-1"]
    assert prof.think.count == 4
    assert 0.09 <= prof.think.p50_s <= 0.5 and 0.09 <= prof.think.max_s <= 0.5
    assert list(prof.models) == ["test:sleepy"] and prof.models["test:sleepy"].count == 4
    assert set(prof.tools) == {"fast", "slow"}
    assert prof.tools["fast"].latency.count == 3 and prof.tools["slow"].latency.count == 1
    assert 0.04 <= prof.tools["fast"].latency.p50_s <= 0.3
    assert 0.19 <= prof.tools["slow"].latency.max_s <= 0.6
    assert all((t.timeouts, t.retries, t.fallbacks, t.errors) == (0, 0, 0, 0) for t in prof.tools.values())
    # ACT: three iterations ran tools; the first one's fast and slow overlapped.
    assert prof.act.count == 3
    assert 0.19 <= prof.act.max_s <= 0.6
    assert prof.overhead.count == 1 and prof.overhead.total_s >= 0
    assert prof.think.total_s + prof.act.total_s + prof.overhead.total_s == pytest.approx(prof.total_s)

    its = {i.iteration: i for i in prof.iterations}
    assert len(its) == 4
    first = its[min(its)]
    assert first.tool_calls == 2 and first.slowest_tool == "slow"
    assert first.critical_path_s == pytest.approx(first.think_s + first.slowest_tool_s)
    assert 0.29 <= first.critical_path_s <= 1.0
    assert first.duration_s >= first.critical_path_s - 0.01
    # The slowest iteration is the one that waited for the slow tool.
    assert prof.slowest[0].iteration == first.iteration and prof.slowest[0].run_id == "sleepy-1"
    assert len(prof.slowest) == 4
    # Iterations 2 and 3 each ran one tool call, one after the other: the latency trap.
    [streak] = prof.sequential
    assert streak.run_id == "sleepy-1" and streak.iterations == 2 and streak.tools == ("fast", "fast")
    assert streak.first_iteration == first.iteration + 1
    assert "2 iterations each ran a single tool call" in streak.message and "latency trap" in streak.message

    # The same numbers as the demo's phase_times for this run.
    phases = phase_times(events)
    assert prof.think.total_s == pytest.approx(phases.think_s)
    assert prof.act.total_s == pytest.approx(phases.act_s)
    assert prof.overhead.total_s == pytest.approx(phases.overhead_s)
    assert _demo.phase_times is phase_times

    data = json.loads(json.dumps(prof.to_dict()))
    assert data["runs"] == 1 and data["phases"]["think"]["count"] == 4
    assert data["tools"]["fast"]["count"] == 3 and len(data["slowest_iterations"]) == 4
    assert data["sequential"][0]["iterations"] == 2


async def test_timeouts_retries_and_fallbacks_are_counted_per_tool(store):
    result = await hanging_agent(store).run("go")
    assert result.stop_reason == "done"
    prof = profile([store.load(result.run_id)])
    t = prof.tools["hangs"]
    assert (t.latency.count, t.timeouts, t.retries, t.fallbacks, t.errors) == (1, 2, 1, 1, 0)
    assert prof.sequential == []  # one single-call iteration is no streak


# -- hand-made events: exact numbers -----------------------------------------------------------


def test_percentiles_interpolate_between_ranks():
    assert percentile([], 50) == 0.0
    assert percentile([3.0], 95) == 3.0
    assert percentile([4.0, 1.0, 3.0, 2.0], 50) == 2.5
    assert percentile([1.0, 2.0, 3.0, 4.0, 5.0], 50) == 3.0
    assert percentile([float(i) for i in range(1, 21)], 95) == pytest.approx(19.05)
    assert percentile([1.0, 2.0], 100) == 2.0


def hand_made_run(run_id: str, t0: float) -> list:
    seq = iter(range(100))

    def ev(cls, ts, **kw):
        return cls(run_id=run_id, seq=next(seq), ts=t0 + ts, **kw)

    def tool(it, start, end, call_id, name, **kw):
        return [ev(ToolCallStarted, start, iteration=it, call_id=call_id, name=name),
                ev(ToolCallFinished, end, iteration=it, call_id=call_id, name=name,
                   outcome=kw.pop("outcome", "ok"), content="", latency_s=end - start, **kw)]

    return [
        ev(RunStarted, 0.0, task=[], tags=["hand"]),
        ev(IterationStarted, 0.0, iteration=1),
        ev(ModelCallStarted, 0.0, iteration=1, model="m-a", n_messages=1, n_tools=2),
        ev(ModelCallFinished, 1.0, iteration=1, latency_s=1.0, model="m-a"),
        *tool(1, 1.0, 1.5, "a", "x"),
        ev(ToolCallStarted, 1.0, iteration=1, call_id="b", name="y"),
        ev(ToolAttemptFailed, 1.5, iteration=1, call_id="b", name="y", attempt=1,
           error=ErrorInfo(type="TimeoutError", message="y timed out"), latency_s=0.5, retry_in_s=0.1),
        ev(ToolAttemptFailed, 2.1, iteration=1, call_id="b", name="y", attempt=2,
           error=ErrorInfo(type="ValueError", message="bad"), latency_s=0.5, retry_in_s=None),
        ev(ToolCallFinished, 2.2, iteration=1, call_id="b", name="y", outcome="fallback", content="",
           latency_s=1.2, attempts=2, fallback="cached"),
        ev(IterationStarted, 2.2, iteration=2),
        ev(ModelCallStarted, 2.2, iteration=2, model="m-a", n_messages=3, n_tools=2),
        ev(ModelCallFinished, 4.2, iteration=2, latency_s=2.0),  # model name from its start
        *tool(2, 4.2, 4.5, "c", "x"),
        ev(IterationStarted, 4.5, iteration=3),
        ev(ModelCallFinished, 7.5, iteration=3, latency_s=3.0, model="m-b"),
        *tool(3, 7.5, 8.0, "d", "x", outcome="error"),
        ev(IterationStarted, 8.0, iteration=4),
        ev(ModelCallFinished, 12.0, iteration=4, latency_s=4.0, model="m-b"),
        ev(RunFinished, 12.5, stop_reason="done", duration_s=12.5),
    ]


def test_profile_of_hand_made_events_is_exact():
    prof = profile([hand_made_run("h-1", 1000.0)])
    assert (prof.think.count, prof.think.total_s, prof.think.p50_s, prof.think.max_s) == (4, 10.0, 2.5, 4.0)
    assert prof.think.p95_s == pytest.approx(3.85)
    # ACT per iteration: 1.2 (1.0 -> 2.2), 0.3, 0.5
    assert prof.act.count == 3
    assert prof.act.total_s == pytest.approx(2.0) and prof.act.max_s == pytest.approx(1.2)
    assert prof.act.p50_s == pytest.approx(0.5)
    assert prof.overhead.count == 1 and prof.overhead.total_s == pytest.approx(0.5)
    assert prof.total_s == 12.5
    assert set(prof.models) == {"m-a", "m-b"}
    assert prof.models["m-a"].count == 2 and prof.models["m-a"].p50_s == 1.5
    assert prof.models["m-b"].max_s == 4.0
    x, y = prof.tools["x"], prof.tools["y"]
    assert (x.latency.count, x.timeouts, x.retries, x.fallbacks, x.errors) == (3, 0, 0, 0, 1)
    assert x.latency.p50_s == pytest.approx(0.5) and x.latency.max_s == pytest.approx(0.5)
    assert (y.latency.count, y.timeouts, y.retries, y.fallbacks, y.errors) == (1, 1, 1, 1, 0)

    its = {i.iteration: i for i in prof.iterations}
    assert its[1].duration_s == pytest.approx(2.2) and its[1].critical_path_s == pytest.approx(2.2)
    assert its[1].slowest_tool == "y" and its[1].tool_calls == 2
    assert its[2].critical_path_s == pytest.approx(2.3) and its[3].critical_path_s == pytest.approx(3.5)
    assert its[4].duration_s == pytest.approx(4.5) and its[4].critical_path_s == 4.0 and its[4].tool_calls == 0
    assert [i.iteration for i in prof.slowest] == [4, 3, 2, 1]
    [streak] = prof.sequential
    assert (streak.first_iteration, streak.last_iteration, streak.tools) == (2, 3, ("x", "x"))
    assert streak.act_s == pytest.approx(0.8)


def test_profile_over_many_runs_keeps_the_five_slowest_iterations():
    runs = [hand_made_run(f"h-{n}", 1000.0 * n) for n in range(3)]
    prof = profile([*runs, []])
    assert prof.run_ids == ["h-0", "h-1", "h-2"]
    assert prof.think.count == 12 and prof.overhead.count == 3 and prof.total_s == pytest.approx(37.5)
    assert prof.tools["y"].timeouts == 3 and len(prof.sequential) == 3
    assert len(prof.slowest) == 5
    assert [i.iteration for i in prof.slowest[:3]] == [4, 4, 4]


def test_phase_times_of_a_run_still_going_counts_to_its_last_event():
    events = [e for e in hand_made_run("h", 0.0) if not isinstance(e, RunFinished)]
    assert phase_times(events).total_s == pytest.approx(12.0)


def killed_and_resumed_run(run_id: str, gap: float, finished: bool = True) -> list:
    """A run killed mid-ACT at t=1.5 (its tool finished, a second one cut), resumed `gap`
    seconds later; it reruns the cut tool (0.4 s), then THINKs 1 s and is done."""
    seq = iter(range(100))

    def ev(cls, ts, **kw):
        return cls(run_id=run_id, seq=next(seq), ts=ts, **kw)

    r = 1.5 + gap  # the resume
    events = [
        ev(RunStarted, 0.0, task=[]),
        ev(IterationStarted, 0.0, iteration=1),
        ev(ModelCallFinished, 1.0, iteration=1, latency_s=1.0, model="m"),
        ev(ToolCallStarted, 1.0, iteration=1, call_id="a", name="fast"),
        ev(ToolCallStarted, 1.0, iteration=1, call_id="b", name="slow"),
        ev(ToolCallFinished, 1.2, iteration=1, call_id="a", name="fast", outcome="ok", content="", latency_s=0.2),
        ev(RunFinished, 1.5, stop_reason="killed", duration_s=1.5),
        ev(RunResumed, r, segment=1, previous_end="killed", iteration=1, by="me"),
        ev(ToolCallStarted, r + 0.1, iteration=1, call_id="b", name="slow"),
        ev(ToolCallFinished, r + 0.5, iteration=1, call_id="b", name="slow", outcome="ok", content="",
           latency_s=0.4),
        ev(IterationStarted, r + 0.5, iteration=2),
        ev(ModelCallFinished, r + 1.5, iteration=2, latency_s=1.0, model="m"),
    ]
    if finished:
        events.append(ev(RunFinished, r + 1.5, stop_reason="done", duration_s=3.0))
    return events


@pytest.mark.parametrize("gap", [0.001, 40.0, 86_400.0])
def test_time_between_segments_of_a_resumed_run_does_not_count(gap):
    prof = profile([killed_and_resumed_run("k", gap)])
    assert prof.total_s == 3.0
    # ACT of iteration 1: 1.0 -> 1.5 (killed), then r -> r + 0.5: 1.0 s however long the gap
    assert prof.act.count == 1 and prof.act.max_s == pytest.approx(1.0)
    assert prof.think.total_s == pytest.approx(2.0)
    assert prof.overhead.total_s == pytest.approx(0.0, abs=1e-6)
    its = {i.iteration: i for i in prof.iterations}
    assert its[1].duration_s == pytest.approx(2.0) and its[1].act_s == pytest.approx(1.0)
    assert its[2].duration_s == pytest.approx(1.0)
    for s in (prof.think, prof.act, prof.overhead):
        assert s.total_s <= prof.total_s + 1e-9
    phases = phase_times(killed_and_resumed_run("k", gap))
    assert phases.act_s == pytest.approx(1.0) and phases.act_phases == 1


def test_a_resumed_run_still_going_counts_its_active_time_only():
    events = killed_and_resumed_run("k", 500.0, finished=False)
    assert phase_times(events).total_s == pytest.approx(3.0)


def test_render_profile_fits_one_screen():
    console = Console(file=io.StringIO(), width=120)
    render_profile(profile([hand_made_run("h-1", 1000.0)]), console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    for fragment in ("latency profile", "THINK", "ACT", "overhead", "m-a", "m-b", "timeouts", "retries",
                     "slowest iterations", "critical path", "h-1", "latency trap"):
        assert fragment in out, fragment
    assert len(out.splitlines()) <= 50


def renamed(events: list, run_id: str, names: dict[str, str]) -> list:
    """`events` as another run's, with its tools and models renamed."""
    out = []
    for e in events:
        changes: dict = {"run_id": run_id}
        for attr in ("name", "model"):
            if getattr(e, attr, None) in names:
                changes[attr] = names[getattr(e, attr)]
        out.append(dataclasses.replace(e, **changes))
    return out


@pytest.mark.parametrize("width", [60, 80, 120])
def test_render_profile_cuts_nothing_at_any_width(width):
    names = {"x": "check_refund_eligibility", "y": "get_customer_history", "m-a": "simulator:support-desk",
             "m-b": "openai:gpt-4o-mini-2024-07-18", "fast": "analyze_sentiment", "slow": "generate_reply"}
    ids = [uuid.uuid4().hex for _ in range(3)]
    runs = [renamed(hand_made_run("h", 1000.0 * n), ids[n], names) for n in range(2)]
    runs.append(renamed(killed_and_resumed_run("k", 40.0), ids[2], names))
    prof = profile(runs)
    shown = {i.run_id for i in prof.slowest} | {s.run_id for s in prof.sequential}
    assert len(shown) == 2
    console = Console(file=io.StringIO(), width=width)
    render_profile(prof, console)
    out = console.file.getvalue()  # type: ignore[attr-defined]
    assert "…" not in out and "..." not in out
    assert max(len(line) for line in out.splitlines()) <= width
    words = set(out.split())
    for name in [*names.values(), *shown]:
        assert name in words or name + ":" in words, name
    for header in ("count", "p50", "p95", "max", "total", "share", "timeouts", "retries", "fallbacks", "errors",
                   "duration", "THINK", "ACT", "critical"):
        assert header in words, header
    assert {"28.00s", "4.50s", "1.20s"} <= words  # all the runs, the slowest iteration, the longest ACT


def test_render_profile_of_no_runs():
    console = Console(file=io.StringIO(), width=120)
    render_profile(profile([]), console)
    assert "0 runs" in console.file.getvalue()  # type: ignore[attr-defined]


# -- the command line --------------------------------------------------------------------------


@pytest.fixture(scope="module")
def db(tmp_path_factory):
    """Two runs of the known-sleeps agent, made once for the module (the commands only read)."""
    path = tmp_path_factory.mktemp("profile") / "runs.db"
    store = lw.SQLiteStore(path)
    try:
        agent = known_sleeps_agent(store)
        agent.run_sync("go", run_id="sleepy-1", tags=["nightly"])
        agent.run_sync("go", run_id="sleepy-2")
    finally:
        store.close()
    return path


def assert_one_line_error(err: str, *fragments: str) -> None:
    assert "Traceback" not in err
    error_lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(error_lines) == 1, err
    for fragment in fragments:
        assert fragment in error_lines[0], err


def test_cli_profile_of_the_last_runs(db, capsys):
    assert main(["profile", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "latency profile" in out and "2 runs" in out
    assert "test:sleepy" in out and "fast" in out and "slow" in out and "latency trap" in out


def test_cli_profile_json(db, capsys):
    assert main(["profile", "--json", "--db", str(db)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["runs"] == 2 and set(data["run_ids"]) == {"sleepy-1", "sleepy-2"}
    assert data["phases"]["think"]["count"] == 8 and data["tools"]["fast"]["count"] == 6
    assert 0.09 <= data["phases"]["think"]["p50_s"] <= 0.5

    assert main(["profile", "--last", "1", "--json", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["run_ids"] == ["sleepy-2"]

    assert main(["profile", "--tag", "nightly", "--json", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["run_ids"] == ["sleepy-1"]

    assert main(["profile", "sleepy-1", "--json", "--db", str(db)]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["run_ids"] == ["sleepy-1"] and data["models"]["test:sleepy"]["count"] == 4


def test_cli_profile_of_one_run_by_prefix(db, capsys):
    assert main(["profile", "sleepy-2", "--db", str(db)]) == 0
    assert "1 run," in capsys.readouterr().out


def test_cli_profile_with_no_matching_runs(db, capsys):
    assert main(["profile", "--tag", "nope", "--db", str(db)]) == 0
    assert "no runs tagged 'nope'" in capsys.readouterr().out
    assert main(["profile", "--tag", "nope", "--json", "--db", str(db)]) == 0
    assert json.loads(capsys.readouterr().out)["runs"] == 0


def test_cli_profile_errors(db, tmp_path, capsys):
    assert main(["profile", "no-such-run", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, "no-such-run")
    assert main(["profile", "sleepy", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, "matches several runs")
    assert main(["profile", "sleepy-1", "--last", "3", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, "not both")
    assert main(["profile", "--last", "0", "--db", str(db)]) == 2
    assert_one_line_error(capsys.readouterr().err, "--last")
    assert main(["profile", "--db", str(tmp_path / "missing.db")]) == 2
    assert_one_line_error(capsys.readouterr().err, "no loopwise database")
