"""Retention: `loopwise prune` deletes whole runs, leaves the database consistent, never touches a live run."""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

import loopwise as lw
from loopwise._events import RunStarted
from loopwise.cli import main
from loopwise.models import ScriptedModel, ToolCall

DAY = 86400.0

# Runs written by another process, with the runtime's clock moved back `age_days`: the
# events are what a real run writes, only older.
WRITER = """
    import os, sys, time
    import loopwise as lw
    from loopwise._runtime.clock import Clock
    from loopwise.models import ScriptedModel, ToolCall

    db, age_days, prefix, count, stop = sys.argv[1], float(sys.argv[2]), sys.argv[3], int(sys.argv[4]), sys.argv[5]

    class Older(Clock):
        def time(self):
            return time.time() - age_days * 86400

    @lw.tool
    def lookup(order: str) -> str:
        if stop == "crash":
            os._exit(17)   # dies mid-run: the run has no end in the log
        if stop == "hang":
            open(db + ".hanging", "w").close()
            time.sleep(60)
        return f"{order}: shipped"

    store = lw.SQLiteStore(db)
    limits = lw.Limits(max_iterations=1 if stop == "max_iterations" else 8, final_answer_on_limit=False)
    for i in range(count):
        model = ScriptedModel([ToolCall("lookup", {"order": f"ORD-{i}"}), ToolCall("lookup", {"order": "x"}), "done"])
        agent = lw.Agent(model, tools=[lookup], store=store, limits=limits, clock=Older())
        agent.run_sync("where is my order?", run_id=f"{prefix}-{i}", tags=[prefix, "batch"])
    store.close()
"""


def _write_runs(db, age_days: float, prefix: str, count: int = 3, stop: str = "done") -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(WRITER), str(db), str(age_days), prefix, str(count),
                           stop], capture_output=True, text=True, timeout=60)


def _run_ids(db) -> set[str]:
    conn = sqlite3.connect(db)
    try:
        return {r[0] for r in conn.execute("SELECT DISTINCT run_id FROM events")}
    finally:
        conn.close()


def _rows(db) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT * FROM events ORDER BY run_id, seq").fetchall()
    finally:
        conn.close()


def _assert_consistent(db) -> None:
    """integrity_check passes, and every run left is whole: run_started at seq 0, no gaps."""
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = conn.execute("SELECT run_id, MIN(seq), MAX(seq), COUNT(*) FROM events GROUP BY run_id").fetchall()
        for run_id, lo, hi, n in rows:
            assert lo == 0 and hi == n - 1, run_id
            kind = conn.execute("SELECT kind FROM events WHERE run_id = ? AND seq = 0", (run_id,)).fetchone()[0]
            assert kind == "run_started", run_id
    finally:
        conn.close()


def test_prune_by_age_removes_whole_old_runs_and_keeps_the_database_consistent(tmp_path, capsys):
    db = tmp_path / "log.db"
    old = _write_runs(db, 40, "old")
    assert old.returncode == 0, old.stderr
    recent = _write_runs(db, 2, "recent")
    assert recent.returncode == 0, recent.stderr
    assert _run_ids(db) == {"old-0", "old-1", "old-2", "recent-0", "recent-1", "recent-2"}
    capsys.readouterr()

    assert main(["prune", "--older-than", "30d", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("pruned 3 runs (") and str(db) in out
    assert _run_ids(db) == {"recent-0", "recent-1", "recent-2"}
    _assert_consistent(db)
    # The views still work on what is left, and a pruned run is simply unknown.
    assert main(["runs", "--json", "--db", str(db)]) == 0
    assert {r["run_id"] for r in json.loads(capsys.readouterr().out)} == {"recent-0", "recent-1", "recent-2"}
    assert main(["show", "recent-1", "--db", str(db)]) == 0
    capsys.readouterr()
    assert main(["show", "old-1", "--db", str(db)]) == 2
    assert "no run with id 'old-1'" in capsys.readouterr().err
    # A second prune finds nothing more; agents keep writing to the file afterwards.
    assert main(["prune", "--older-than", "30d", "--db", str(db)]) == 0
    assert capsys.readouterr().out.startswith("pruned 0 runs (0 events)")
    store = lw.SQLiteStore(db)
    lw.Agent(ScriptedModel(["ok"]), store=store).run_sync("again", run_id="after")
    store.close()
    assert "after" in _run_ids(db)
    _assert_consistent(db)


def test_prune_counts_every_event_of_each_run(tmp_path):
    db = tmp_path / "log.db"
    assert _write_runs(db, 40, "old", count=2).returncode == 0
    conn = sqlite3.connect(db)
    n_events = conn.execute("SELECT COUNT(*) FROM events").fetchone()[0]
    conn.close()
    store = lw.SQLiteStore(db)
    try:
        dry = store.prune(before=time.time() - 30 * DAY, dry_run=True)
        assert dry.dry_run and dry.runs == 2 and dry.events == n_events
        done = store.prune(before=time.time() - 30 * DAY)
        assert sorted(done.run_ids) == ["old-0", "old-1"] and done.events == n_events and not done.dry_run
        assert store.list_runs() == []
    finally:
        store.close()


def test_prune_by_status_and_tag(tmp_path, capsys):
    db = tmp_path / "log.db"
    assert _write_runs(db, 40, "ok", count=2).returncode == 0
    assert _write_runs(db, 40, "capped", count=2, stop="max_iterations").returncode == 0
    capsys.readouterr()
    assert main(["prune", "--older-than", "30d", "--status", "max_iterations", "--db", str(db)]) == 0
    assert capsys.readouterr().out.startswith("pruned 2 runs")
    assert _run_ids(db) == {"ok-0", "ok-1"}
    assert main(["prune", "--older-than", "30d", "--tag", "nobody-has-this", "--db", str(db)]) == 0
    assert _run_ids(db) == {"ok-0", "ok-1"}
    assert main(["prune", "--older-than", "30d", "--tag", "nobody-has-this", "--tag", "ok", "--db", str(db)]) == 0
    assert _run_ids(db) == set()
    _assert_consistent(db)


def test_dry_run_deletes_nothing(tmp_path, capsys):
    db = tmp_path / "log.db"
    assert _write_runs(db, 40, "old", count=2).returncode == 0
    before = _rows(db)
    capsys.readouterr()
    assert main(["prune", "--older-than", "30d", "--dry-run", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("would prune 2 runs (") and "old-0" in out and "old-1" in out
    assert _run_ids(db) == {"old-0", "old-1"}
    assert _rows(db) == before


def test_unfinished_runs_are_left_alone_unless_asked(tmp_path, capsys):
    db = tmp_path / "log.db"
    crashed = _write_runs(db, 40, "crashed", count=1, stop="crash")
    assert crashed.returncode == 17, crashed.stderr
    assert _write_runs(db, 40, "old", count=1).returncode == 0
    capsys.readouterr()
    assert main(["prune", "--older-than", "30d", "--db", str(db)]) == 0
    out = capsys.readouterr().out
    assert "pruned 1 run (" in out and "left 1 unfinished run alone" in out and "--status unfinished" in out
    assert _run_ids(db) == {"crashed-0"}
    assert main(["prune", "--older-than", "30d", "--status", "unfinished", "--db", str(db)]) == 0
    assert _run_ids(db) == set()
    _assert_consistent(db)


def test_a_run_being_executed_is_never_pruned(tmp_path, capsys):
    db = tmp_path / "log.db"
    proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(db), "40", "live", "1", "hang"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 30
        # In its tool, and its events in SQLite (copied from its journal within milliseconds).
        while not (tmp_path / "log.db.hanging").exists() or _run_ids(db) != {"live-0"}:
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the run never reached its tool"
            time.sleep(0.02)
        assert main(["prune", "--older-than", "30d", "--status", "unfinished", "--db", str(db)]) == 0
        assert capsys.readouterr().out.startswith("pruned 0 runs")
        assert _run_ids(db) == {"live-0"}
    finally:
        proc.kill()
        proc.communicate()
    # Its process is gone: the lease expires with it, and now it may go.
    assert main(["prune", "--older-than", "30d", "--status", "unfinished", "--db", str(db)]) == 0
    assert _run_ids(db) == set()


def test_prune_deletes_the_runs_rows_in_the_control_tables(tmp_path):
    db = tmp_path / "log.db"
    assert _write_runs(db, 40, "old", count=1).returncode == 0
    assert _write_runs(db, 1, "recent", count=1).returncode == 0
    conn = sqlite3.connect(db)
    tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
    assert {"lw_kills", "lw_leases"} <= tables
    with conn:
        for run_id in ("old-0", "recent-0"):
            conn.execute("INSERT INTO lw_kills (run_id, reason, by, ts) VALUES (?, 'test', 'me', 0)", (run_id,))
        # Kills of a tag and of all runs (an empty run id): the old one goes, the recent one stays.
        conn.execute("INSERT INTO lw_kills (run_id, reason, by, ts, tag) VALUES ('', 'old', 'me', ?, 'nightly')",
                     (time.time() - 40 * DAY,))
        conn.execute("INSERT INTO lw_kills (run_id, reason, by, ts, tag) VALUES ('', 'recent', 'me', ?, NULL)",
                     (time.time() - DAY,))
    conn.close()
    store = lw.SQLiteStore(db)
    try:
        assert store.prune(before=time.time() - 30 * DAY).run_ids == ("old-0",)
    finally:
        store.close()
    conn = sqlite3.connect(db)
    assert [r[:2] for r in conn.execute("SELECT run_id, reason FROM lw_kills ORDER BY id")] == [
        ("recent-0", "test"), ("", "recent")]
    conn.close()


def test_prune_while_another_process_writes(tmp_path):
    # A writer keeps adding runs while prune deletes old ones: no error on either side,
    # and every run left is whole.
    db = tmp_path / "log.db"
    assert _write_runs(db, 40, "old", count=30).returncode == 0
    writer = subprocess.Popen([sys.executable, "-c", textwrap.dedent(WRITER), str(db), "0", "new", "40", "done"],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        store = lw.SQLiteStore(db)
        try:
            result = store.prune(before=time.time() - 30 * DAY)
        finally:
            store.close()
        out, err = writer.communicate(timeout=60)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == 0, err
    assert result.runs == 30
    ids = _run_ids(db)
    assert not any(i.startswith("old-") for i in ids)
    assert {f"new-{i}" for i in range(40)} <= ids
    _assert_consistent(db)


def test_vacuum_gives_the_space_back(tmp_path, capsys):
    db = tmp_path / "log.db"
    assert _write_runs(db, 40, "old", count=40).returncode == 0
    store = lw.SQLiteStore(db)
    store.close()  # checkpoints: the file holds the runs
    size = db.stat().st_size
    assert main(["prune", "--older-than", "30d", "--vacuum", "--db", str(db)]) == 0
    assert capsys.readouterr().out.strip().endswith("then vacuumed")
    assert db.stat().st_size < size
    _assert_consistent(db)


def test_memory_store_prune():
    store = lw.MemoryStore()

    @lw.tool
    def lookup(order: str) -> str:
        """Look up."""
        return "shipped"

    def agent(*responses):
        return lw.Agent(ScriptedModel(list(responses)), tools=[lookup], store=store,
                        limits=lw.Limits(max_iterations=1, final_answer_on_limit=False))

    agent("ok").run_sync("a", run_id="a", tags=["t"])
    agent(ToolCall("lookup", {"order": "1"})).run_sync("b", run_id="b")
    agent("ok").run_sync("c", run_id="c")
    # A run that has started but not ended, as a crash leaves it.
    store.write([RunStarted(run_id="crashed", seq=0, ts=time.time() - 10, task=[lw.Message("user", "x")])])
    future = time.time() + 1
    assert store.prune(before=time.time() - DAY).runs == 0
    assert store.prune(before=future, statuses=["max_iterations"], dry_run=True).run_ids == ("b",)
    assert store.has_run("b")
    result = store.prune(before=future, tags=["t"])
    assert result.run_ids == ("a",) and result.events == 5
    result = store.prune(before=future)
    assert set(result.run_ids) == {"b", "c"} and result.unfinished_kept == 1
    assert store.prune(before=future, statuses=["unfinished"]).run_ids == ("crashed",)
    assert store.list_runs() == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--older-than", "30x"], "--older-than '30x' is not a duration; write a number and a unit, such as 90m, "
                                  "12h, 30d or 2w (units: s, m, h, d, w)"),
        (["--older-than", "month"], "--older-than 'month' is not a duration"),
        (["--older-than", "30d", "--status", "finished"], "--status 'finished' is not a status; choose among done, "
                                                          "max_iterations, budget, deadline, killed, runaway, error, "
                                                          "unfinished"),
    ],
)
def test_bad_arguments_are_one_line_errors(tmp_path, capsys, args, message):
    db = tmp_path / "log.db"
    lw.SQLiteStore(db).close()
    assert main(["prune", *args, "--db", str(db)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_prune_needs_older_than_and_an_existing_database(tmp_path, capsys):
    assert main(["prune", "--db", str(tmp_path / "log.db")]) == 2
    assert "--older-than" in capsys.readouterr().err
    assert main(["prune", "--older-than", "1d", "--db", str(tmp_path / "missing.db")]) == 2
    assert "no loopwise database at" in capsys.readouterr().err


def test_prune_arguments_are_checked():
    store = lw.MemoryStore()
    with pytest.raises(lw.UserError, match="unknown status finished"):
        store.prune(before=0, statuses=["finished"])
    with pytest.raises(lw.UserError, match="must be a time in seconds"):
        store.prune(before="30d")  # type: ignore[arg-type]
    with pytest.raises(lw.UserError, match="must be a list of tags"):
        store.prune(before=0, tags="t")
