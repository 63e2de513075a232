"""`loopwise demo`: every scenario runs, says what it answers, and reads its numbers from the log."""

from __future__ import annotations

import io
import itertools
import os
import json
import re
import shlex

import pytest
from rich.console import Console

import loopwise as lw
from loopwise._demo import scenario as _demo
from loopwise._views.decisions import decisions
from loopwise._events import (
    ModelCallFinished,
    RunFinished,
    RunStarted,
    ToolCallFinished,
    ToolCallStarted,
)
from loopwise._messages import Usage


def console() -> Console:
    return Console(file=io.StringIO(), width=120)


def output(c: Console) -> str:
    return c.file.getvalue()  # type: ignore[attr-defined]


def runs_by_tags(store: lw.MemoryStore) -> dict[tuple[str, ...], list]:
    return {summary.tags: store.load(summary.run_id) for summary in store.list_runs(limit=100)}


def act_time(events) -> float:
    """Wall time of a run's ACT phases: per iteration, first tool start to last tool end."""
    spans: dict[int, list[float]] = {}
    for e in events:
        if e.kind == "tool_call_started":
            spans.setdefault(e.iteration, [e.ts, e.ts])[0] = min(spans.get(e.iteration, [e.ts])[0], e.ts)
        elif e.kind == "tool_call_finished":
            span = spans.setdefault(e.iteration, [e.ts, e.ts])
            span[1] = max(span[1], e.ts)
    return sum(end - start for start, end in spans.values())


def test_the_demo_runs_every_scenario(store):
    c = console()
    assert _demo.main(c, speed=0, store=store) == 0
    text = output(c)
    flat = " ".join(text.split())  # phrases may wrap across lines
    for words in ("1. Triage", "2. Error recovery", "3. The latency trap", "4. The cost spiral", "5. Debugging",
                  "the problem:", "400 lines of JSON", "one slow DB call", "14-second loading screen",
                  "$47"):
        assert words in text, words
    # The error-recovery trace: the hung lookup timed out, the cache answered, and the trace says so.
    assert "✗ attempt 1  get_customer_history timed out after" in text
    assert "↳ answered from get_cached_history" in text
    # The triage trace comes from the renderer: its iterations and its stop reason.
    assert "iteration 1" in text and "2 ran concurrently" in text
    assert "done   3 iterations" in text
    # The cost spiral: stopped by the cap, with a best-effort answer, and said plainly what is missing.
    assert "max_iterations" in text and "best-effort answer" in flat
    assert "Limits(budget_usd=0.03)" in flat and "runaway" in flat
    # The kill switch: a second process ran `loopwise kill`, and the trace says who and why.
    assert "6. The kill switch" in text and "$ loopwise kill" in flat and "kill sent to 1 run" in flat
    assert "KILL by " in flat and "stuck on a hung lookup" in flat and "killed 1 iteration" in flat

    runs = runs_by_tags(store)
    assert set(runs) == {("demo", "triage"), ("demo", "recovery"), ("demo", "latency", "sequential"),
                         ("demo", "latency", "concurrent"), ("demo", "cost-spiral"),
                         ("demo", "cost-spiral", "budget"), ("demo", "cost-spiral", "defaults"),
                         ("demo", "debugging")}
    recovery = runs[("demo", "recovery")]
    (history,) = [e for e in recovery if e.kind == "tool_call_finished" and e.name == "get_customer_history"]
    assert (history.outcome, history.fallback) == ("fallback", "get_cached_history")
    assert "from get_cached_history" in recovery[-1].output  # the model's answer says where the data came from
    stops = {tags: events[-1].stop_reason for tags, events in runs.items()}
    assert stops == {("demo", "triage"): "done", ("demo", "recovery"): "done",
                     ("demo", "latency", "sequential"): "done",
                     ("demo", "latency", "concurrent"): "done", ("demo", "cost-spiral"): "max_iterations",
                     ("demo", "cost-spiral", "budget"): "budget", ("demo", "cost-spiral", "defaults"): "runaway",
                     ("demo", "debugging"): "done"}
    budgeted = runs[("demo", "cost-spiral", "budget")][-1]
    assert budgeted.cost_usd <= 0.03
    spiral = runs[("demo", "cost-spiral")]
    assert spiral[-1].iterations == 8 and spiral[-1].output
    inputs = [e.usage.input_tokens for e in spiral if e.kind == "model_call_finished" and e.purpose == "think"]
    assert len(inputs) == 8 and all(a < b for a, b in itertools.pairwise(inputs))
    # Each of the spiral's per-iteration input token counts is in its table.
    for n in inputs:
        assert f"{n:,}" in text
    # One tool per response takes a THINK more than all calls in one response.
    assert runs[("demo", "latency", "sequential")][-1].model_calls == 4
    assert runs[("demo", "latency", "concurrent")][-1].model_calls == 3


def test_concurrent_tools_spend_less_time_in_act_than_sequential_ones(store):
    # Simulated latencies must be on for ACT time to mean anything (speed 0 makes them 0);
    # a quarter of real time keeps the test short with a margin of tens of milliseconds.
    c = console()
    sequential, concurrent = _demo.latency_trap(c, store, speed=0.25)
    seq_events, con_events = store.load(sequential.run_id), store.load(concurrent.run_id)
    assert act_time(con_events) < act_time(seq_events)
    # The concurrent run's lookups overlapped: its ACT took less than its tools' own time.
    con = _demo.phase_times(con_events)
    assert con.act_s < con.tool_s
    assert con.act_s == pytest.approx(act_time(con_events))
    assert "faster" in output(c)


def test_phase_times_are_read_from_the_events():
    def ev(cls, seq, ts, **kw):
        return cls(run_id="r", seq=seq, ts=ts, **kw)

    events = [
        ev(RunStarted, 0, 100.0, task=[]),
        ev(ModelCallFinished, 1, 100.7, iteration=1, latency_s=0.7, usage=Usage(10, 1)),
        ev(ToolCallStarted, 2, 100.7, iteration=1, call_id="a", name="x"),
        ev(ToolCallStarted, 3, 100.7, iteration=1, call_id="b", name="y"),
        ev(ToolCallFinished, 4, 101.0, iteration=1, call_id="a", name="x", outcome="ok", content="", latency_s=0.3),
        ev(ToolCallFinished, 5, 101.1, iteration=1, call_id="b", name="y", outcome="ok", content="", latency_s=0.4),
        ev(ModelCallFinished, 6, 101.7, iteration=2, latency_s=0.6),
        ev(RunFinished, 7, 101.75, stop_reason="done", duration_s=1.75),
    ]
    phases = _demo.phase_times(events)
    assert (phases.model_calls, phases.tool_calls, phases.act_phases) == (2, 2, 1)
    assert phases.think_s == pytest.approx(1.3)
    assert phases.act_s == pytest.approx(0.4)
    assert phases.tool_s == pytest.approx(0.7)
    assert phases.overhead_s == pytest.approx(0.05)
    assert phases.total_s == 1.75


def test_speed_comes_from_the_environment(monkeypatch, store):
    monkeypatch.setenv("LOOPWISE_DEMO_SPEED", "0")
    c = console()
    assert _demo.main(c, store=store) == 0
    assert "(speed 0)" in output(c)


def test_a_bad_speed_is_an_error_naming_it(monkeypatch):
    monkeypatch.setenv("LOOPWISE_DEMO_SPEED", "fast")
    c = console()
    assert _demo.main(c) == 2
    assert "$LOOPWISE_DEMO_SPEED='fast' is not a number" in output(c)
    # An explicit speed wins over the environment.
    c = console()
    assert _demo.main(c, speed=-1) == 2
    assert "speed=-1 must be a number >= 0" in output(c)
    assert _demo.main(console(), speed=0) == 0


def test_given_a_memory_store_the_demo_says_no_command_can_read_its_runs(store):
    c = console()
    assert _demo.main(c, speed=0, store=store) == 0
    text = output(c)
    assert "kept in memory" in " ".join(text.split())
    # The one command shown is the kill the demo ran, on a temporary database of its own.
    [kill] = printed_commands(text)
    assert kill.startswith("loopwise kill ") and " --db " in kill


def test_the_demo_can_log_to_sqlite(tmp_path):
    store = lw.SQLiteStore(tmp_path / "demo.db")
    try:
        assert _demo.main(console(), speed=0, store=store) == 0
        assert len(store.list_runs()) == 9  # the kill switch's run too
    finally:
        store.close()


# -- `loopwise demo` as a user runs it ------------------------------------------------------

#: What each command's output must hold (besides the run id it names, if any).
EXPECTED = {"runs": ["support-triage", "support-refund", "support-stuck"],
            "show": ["iteration "], "kill": ["already finished (killed)"], "profile": ["THINK"],
            "resume": ["resumed (segment 2)", "done"]}


def printed_commands(text: str) -> list[str]:
    """Every `loopwise ...` command the demo printed: on a `$` line, or in backquotes."""
    commands = [m.group(1) for m in re.finditer(r"^\s*\$ (loopwise .*)$", text, re.MULTILINE)]
    commands += re.findall(r"`(loopwise [^`]*)`", text)
    return commands


@pytest.mark.parametrize("where", ["default", "--db before", "--db after", "env"])
def test_every_command_the_demo_prints_works_when_pasted(tmp_path, monkeypatch, capsys, where):
    from loopwise.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("LOOPWISE_DB")
    monkeypatch.setenv("LOOPWISE_DEMO_SPEED", "0")
    monkeypatch.setenv("COLUMNS", "80")
    argv = {"default": ["demo"], "--db before": ["--db", "my runs.db", "demo"],
            "--db after": ["demo", "--db", "my runs.db"], "env": ["demo"]}[where]
    if where == "env":
        monkeypatch.setenv("LOOPWISE_DB", str(tmp_path / "from env" / "x.db"))
    assert main(argv) == 0
    text = capsys.readouterr().out
    assert "seed" not in text.lower()  # the project's story is not the user's
    expected_db = {"default": tmp_path / ".loopwise" / "loopwise.db", "env": tmp_path / "from env" / "x.db"}.get(
        where, tmp_path / "my runs.db")
    assert expected_db.exists()
    commands = printed_commands(text)
    assert {shlex.split(c, comments=True)[1] for c in commands} == set(EXPECTED), commands
    resumed = False
    for command in commands:
        args = shlex.split(command, comments=True)
        assert args[0] == "loopwise"
        assert "RUN_ID" not in args and "MODULE:AGENT" not in args and not any("…" in a for a in args), command
        assert ("--db" in args) == where.startswith("--db"), command
        if args[1] == "resume":
            assert not resumed, "the demo prints one resume: a run resumes once"
            resumed = True
        monkeypatch.setenv("COLUMNS", "200")
        assert main(args[1:]) == 0, (command, capsys.readouterr())
        out = capsys.readouterr().out
        for words in EXPECTED[args[1]]:
            assert words in out, (command, words, out)
        run_ids = [a for a in args[2:] if re.fullmatch(r"[0-9a-f]{32}", a)]
        for run_id in run_ids:
            assert run_id in out, (command, out)
    assert resumed
    # What the demo says at 80 columns: the error-recovery trace keeps each tool row's outcome,
    # latency and the start of its result, and names the fallback that answered.
    recovery = text.split("2. Error recovery")[1].split("3. The latency trap")[0]
    assert all(len(line) <= 80 for line in recovery.splitlines())
    assert re.search(r"^ +fallback +\d+ms  get_customer_history timed out", recovery, re.MULTILINE), recovery
    assert re.search(r"^ +ok +\d+ms  negative", recovery, re.MULTILINE), recovery
    assert "↳ answered from get_cached_history" in recovery


def test_the_debugging_scenario_points_at_the_partial_observe_on_iteration_3(store):
    c = console()
    result = _demo.debugging(c, store, speed=0)
    assert result.stop_reason == "done"
    events = store.load(result.run_id)
    log = decisions(events)
    assert [d.iteration for d in log] == [1, 2, 3, 4, 5, 6]
    # Iteration 3: the lookup asked for three orders and got two, with no error: the one mismatch.
    assert [d.iteration for d in log if d.match is False] == [3]
    (lookup,) = log[2].calls
    assert lookup.name == "lookup_orders" and lookup.outcome == "ok"
    assert lookup.arguments == {"order_ids": ["ORD-7", "ORD-8", "ORD-9"]}  # the expectation is not the tool's
    assert json.loads(lookup.expected) == {"count": 3}
    assert json.loads(lookup.actual)["count"] == 2
    # It goes wrong later: iteration 5 refunds two orders' worth, and its own prediction held.
    (refund,) = log[4].calls
    assert refund.name == "issue_refund" and refund.match is True
    assert json.loads(refund.actual)["amount"] == 65.0
    assert all(d.match is True for d in log[:2] + log[3:5])
    assert log[5].action_kind == "answer" and "$65.00" in (log[5].answer or "")
    assert log[5].why == ["run stopped: done"]
    # Every tool call of the run was "ok": the trace alone shows nothing wrong.
    assert {e.outcome for e in events if e.kind == "tool_call_finished"} == {"ok"}
    text = output(c)
    flat = " ".join(text.split())
    assert "5. Debugging" in text and "the mismatches view (loopwise show --mismatches)" in text
    assert "1 mismatch, first at iteration 3" in flat
    assert "◀ first mismatch" in text
    # The mismatch view (after its heading) shows iteration 3 and no other iteration.
    mismatch_view = text.split("the mismatches view (loopwise show --mismatches)", 1)[1]
    assert re.findall(r"^iteration (\d+)", mismatch_view, re.MULTILINE) == ["3"]
    assert "paid $65.00 of the $95.00 owed" in flat


def test_the_kill_switch_scenario_stops_the_run_from_another_process():
    c = console()
    result = _demo.kill_switch(c, speed=0)
    assert result.stop_reason == "killed"
    # Who: the `loopwise kill` child process, not this one.
    assert f"pid {os.getpid()}:" not in result.reason
    assert result.reason.startswith("killed by ") and result.reason.endswith(": stuck on a hung lookup")
    assert "cancelled" in output(c)
