"""The SQLite store's journal: events are durable before SQLite has them, and never lost.

These tests hold SQLite's write lock from the test process so that a child process
cannot copy anything into SQLite: whatever the child's runs logged is then only in
its journal, and must still be found (by a reader, while the child lives) and recovered
(once it has died).
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._stores import journal as _journal
from loopwise._stores import sqlite_write as _sqlite_write
from loopwise._events import RunStarted, dump_events
from loopwise._stores.journal import journal_files
from loopwise.models import ScriptedModel, ToolCall

CHILD = """
import os, sys, time
import loopwise as lw
from loopwise.models import ScriptedModel, ToolCall

@lw.tool
def step(n: int) -> str:
    return f"step {n} done"

store = lw.SQLiteStore(sys.argv[1])
model = ScriptedModel([ToolCall("step", {"n": 1}), ToolCall("step", {"n": 2}), "all done"])
agent = lw.Agent(model, tools=[step], store=store)
result = agent.run_sync("go", run_id=sys.argv[2])
print("finished", result.stop_reason, flush=True)
if sys.argv[3] == "die":
    os._exit(9)           # no close, no atexit: the journal is all there is
time.sleep(60)            # stay alive (with the journal locked) until killed
"""


def _child(db: Path, run_id: str, mode: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(CHILD), str(db), run_id, mode],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


class _WriteLock:
    """Holds SQLite's write lock on `db` (other writers wait on their busy timeout)."""

    def __init__(self, db: Path) -> None:
        self.conn = sqlite3.connect(db, isolation_level=None, check_same_thread=False)

    def __enter__(self) -> _WriteLock:
        self.conn.execute("BEGIN IMMEDIATE")
        return self

    def __exit__(self, *exc: object) -> None:
        self.conn.execute("ROLLBACK")
        self.conn.close()


def _prepared(db: Path) -> Path:
    """A database with its tables made (the event log's and the control plane's)."""
    store = lw.SQLiteStore(db)
    try:
        lw.Agent(ScriptedModel(["ok"]), store=store).run_sync("make the tables")
    finally:
        store.close()
    return db


def _rows_in_sqlite(db: Path, run_id: str) -> int:
    conn = sqlite3.connect(db)
    try:
        return conn.execute("SELECT count(*) FROM events WHERE run_id = ?", (run_id,)).fetchone()[0]
    finally:
        conn.close()


def _expect_whole_run(events: list) -> None:
    assert [e.seq for e in events] == list(range(len(events)))
    assert events[0].kind == "run_started" and events[-1].kind == "run_finished"
    assert events[-1].stop_reason == "done" and events[-1].output == "all done"
    assert [e.content for e in events if e.kind == "tool_call_finished"] == ["step 1 done", "step 2 done"]


def test_a_process_that_dies_before_sqlite_commits_loses_nothing(tmp_path):
    db = _prepared(tmp_path / "j.db")
    with _WriteLock(db):
        proc = _child(db, "only-in-journal", "die")
        out, err = proc.communicate(timeout=60)
        assert proc.returncode == 9, err
        assert "finished done" in out
        # Nothing reached SQLite (we hold its write lock), yet the run finished: the
        # events it waited for are in its journal.
        assert _rows_in_sqlite(db, "only-in-journal") == 0
        assert journal_files(db)
    store = lw.SQLiteStore(db)  # opening recovers the dead process's journal
    try:
        _expect_whole_run(store.load("only-in-journal"))
        assert _rows_in_sqlite(db, "only-in-journal") == len(store.load("only-in-journal"))
        assert journal_files(db) == []
        assert store.list_runs()[0].run_id == "only-in-journal"
    finally:
        store.close()


def test_a_live_process_journal_is_read_before_sqlite_has_it(tmp_path):
    db = _prepared(tmp_path / "j.db")
    reader = lw.SQLiteStore(db)
    try:
        with _WriteLock(db):
            proc = _child(db, "live", "live")
            assert proc.stdout.readline().strip() == "finished done"
            assert _rows_in_sqlite(db, "live") == 0
            # Another process's run, whole, from its journal: has_run, load, kill's view.
            assert reader.has_run("live")
            _expect_whole_run(reader.load("live"))
            # A live process's journal is read, never recovered (its lock is held).
            assert journal_files(db)
        # The lock is gone: the child copies it all into SQLite.
        deadline = time.monotonic() + 30
        while _rows_in_sqlite(db, "live") < 9 and time.monotonic() < deadline:
            time.sleep(0.02)
        _expect_whole_run(reader.load("live"))
        assert _rows_in_sqlite(db, "live") == len(reader.load("live"))
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        reader.close()
    store = lw.SQLiteStore(db)  # recovers the (already copied) journal: no duplicates
    try:
        _expect_whole_run(store.load("live"))
        assert journal_files(db) == []
    finally:
        store.close()


def test_sigkill_mid_run_then_resume_reads_the_journal(tmp_path):
    """A SIGKILL while SQLite is locked: the write-ahead record is in the journal only."""
    db = _prepared(tmp_path / "j.db")
    code = """
        import sys, time
        import loopwise as lw
        from loopwise.models import ScriptedModel, ToolCall

        @lw.tool
        def charge(amount: int) -> str:
            print("charging", flush=True)
            time.sleep(60)
            return "charged"

        agent = lw.Agent(ScriptedModel([ToolCall("charge", {"amount": 5}), "done"]), tools=[charge],
                         store=lw.SQLiteStore(sys.argv[1]))
        agent.run_sync("pay", run_id="paying")
    """
    with _WriteLock(db):
        proc = subprocess.Popen([sys.executable, "-c", textwrap.dedent(code), str(db)],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert proc.stdout.readline().strip() == "charging"
        proc.send_signal(signal.SIGKILL)
        proc.communicate(timeout=30)
        assert _rows_in_sqlite(db, "paying") == 0

    @lw.tool
    def charge(amount: int) -> str:
        raise AssertionError("a non-idempotent call that may have happened must not run again")

    store = lw.SQLiteStore(db)
    try:
        agent = lw.Agent(ScriptedModel([ToolCall("charge", {"amount": 5}), "done"]), tools=[charge], store=store)
        result = agent.resume_sync("paying")
        events = store.load("paying")
    finally:
        store.close()
    assert result.stop_reason == "done"
    finished = [e for e in events if e.kind == "tool_call_finished"]
    assert [e.outcome for e in finished] == ["unknown"]


def test_a_torn_last_line_is_left_out_and_the_rest_recovered(tmp_path):
    db = tmp_path / "j.db"
    store = lw.SQLiteStore(db)
    agent = lw.Agent(ScriptedModel(["hi"]), store=lw.MemoryStore())
    result = agent.run_sync("x", run_id="torn")
    events = agent.store.load("torn")
    store.close()
    lines = dump_events(events)
    # A dead process's journal whose last write was cut short.
    path = db.parent / f"{db.name}-lwj-999999-dead-1"
    path.write_bytes(b"\n".join(lines[:-1]) + b"\n" + lines[-1][: len(lines[-1]) // 2])
    store = lw.SQLiteStore(db)
    try:
        loaded = store.load("torn")
    finally:
        store.close()
    assert [e.kind for e in loaded] == [e.kind for e in events[:-1]]
    assert result.stop_reason == "done"
    assert not path.exists()


def test_two_processes_recovering_at_once_copy_each_event_once(tmp_path):
    db = _prepared(tmp_path / "j.db")
    with _WriteLock(db):
        procs = [_child(db, f"dead-{i}", "die") for i in range(3)]
        for p in procs:
            _, err = p.communicate(timeout=60)
            assert p.returncode == 9, err
    opener = "import sys, loopwise as lw; s = lw.SQLiteStore(sys.argv[1]); s.close()"
    racers = [subprocess.Popen([sys.executable, "-c", opener, str(db)], stderr=subprocess.PIPE, text=True)
              for _ in range(4)]
    for p in racers:
        _, err = p.communicate(timeout=60)
        assert p.returncode == 0, err
    store = lw.SQLiteStore(db)
    try:
        for i in range(3):
            _expect_whole_run(store.load(f"dead-{i}"))
            assert _rows_in_sqlite(db, f"dead-{i}") == len(store.load(f"dead-{i}"))
        assert journal_files(db) == []
    finally:
        store.close()


def test_segments_rotate_and_are_deleted_once_in_sqlite(tmp_path, monkeypatch):
    monkeypatch.setattr(_sqlite_write, "SEGMENT_MAX", 2000)
    monkeypatch.setattr(_sqlite_write, "TRUNCATE_AT", 1000)
    db = tmp_path / "j.db"
    store = lw.SQLiteStore(db)
    seen: set[Path] = set()

    def watch() -> None:
        while not done.is_set():
            seen.update(journal_files(db))
            time.sleep(0.001)

    done = threading.Event()
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        ids = []
        for i in range(40):
            agent = lw.Agent(ScriptedModel(["ok"]), store=store)
            ids.append(agent.run_sync(f"task {i}").run_id)
        runs = {r.run_id for r in store.list_runs(limit=100)}
    finally:
        done.set()
        watcher.join()
        store.close()
    assert set(ids) <= runs
    assert len(seen) > 3  # it rotated
    assert journal_files(db) == []  # and every segment went once it was in SQLite
    store = lw.SQLiteStore(db)
    try:
        for run_id in ids:
            assert store.load(run_id)[-1].kind == "run_finished"
    finally:
        store.close()


def test_a_run_reads_its_own_writes_at_once(tmp_path):
    store = lw.SQLiteStore(tmp_path / "j.db")
    try:
        agent = lw.Agent(ScriptedModel(["ok"]), store=store)
        for i in range(20):
            result = agent.run_sync(f"t{i}")
            assert store.list_runs(limit=1)[0].run_id == result.run_id
            assert store.load(result.run_id)[-1].kind == "run_finished"
    finally:
        store.close()


def test_a_store_used_in_a_forked_child_says_so_instead_of_hanging(tmp_path):
    """SQLite connections and the store's locks do not survive fork(): a clear error, at once."""
    if not hasattr(os, "fork"):
        pytest.skip("no fork on this platform")
    db = tmp_path / "j.db"
    store = lw.SQLiteStore(db)
    try:
        store.write([RunStarted(run_id="parent", seq=0, ts=time.time(), task=[lw.Message("user", "p")])])
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child
            code = 1
            try:
                try:
                    store.write([RunStarted(run_id="child", seq=0, ts=time.time(),
                                            task=[lw.Message("user", "c")])])
                except lw.UserError as exc:
                    if "os.fork()" in str(exc) and "open a new SQLiteStore" in str(exc):
                        code = 0
                try:
                    store.list_runs()
                    code = 1
                except lw.UserError:
                    pass
            finally:
                os._exit(code)
        deadline = time.monotonic() + 30
        while (done := os.waitpid(pid, os.WNOHANG))[0] == 0 and time.monotonic() < deadline:
            time.sleep(0.01)
        if done[0] == 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail("the forked child hung")
        assert os.waitstatus_to_exitcode(done[1]) == 0
        store.write([RunStarted(run_id="parent-2", seq=0, ts=time.time(), task=[lw.Message("user", "p")])])
        assert {r.run_id for r in store.list_runs()} == {"parent", "parent-2"}
    finally:
        store.close()
    assert journal_files(db) == []


def test_the_journal_line_format_is_the_stored_json(tmp_path):
    """Recovery stores exactly the bytes a copy would: one JSON event a line."""
    db = tmp_path / "j.db"
    store = lw.SQLiteStore(db)
    try:
        lw.Agent(ScriptedModel(["ok"]), store=store).run_sync("x", run_id="fmt")
        conn = sqlite3.connect(db)
        rows = conn.execute("SELECT data FROM events WHERE run_id = 'fmt' ORDER BY seq").fetchall()
        conn.close()
    finally:
        store.close()
    assert all(_journal._row(r[0].encode())[4] == r[0] for r in rows)


def test_load_in_this_process_does_not_wait_for_a_blocked_writer(tmp_path):
    """Another connection holds SQLite's write lock: this process's run is still read whole, at once."""
    db = _prepared(tmp_path / "j.db")
    store = lw.SQLiteStore(db)
    try:
        with _WriteLock(db):
            agent = lw.Agent(ScriptedModel([ToolCall("step", {"n": 1}), ToolCall("step", {"n": 2}), "all done"]),
                             tools=[_step], store=store)
            agent.run_sync("go", run_id="blocked-writer")
            started = time.monotonic()
            assert store.has_run("blocked-writer")
            _expect_whole_run(store.load("blocked-writer"))
            assert time.monotonic() - started < 2.0  # a blocking copy would wait for the lock up to 10 s
            assert _rows_in_sqlite(db, "blocked-writer") == 0
        _expect_whole_run(store.load("blocked-writer"))
        assert store.list_runs(limit=1)[0].run_id == "blocked-writer"  # waits for the writer: now in SQLite
        assert _rows_in_sqlite(db, "blocked-writer") == len(store.load("blocked-writer"))
    finally:
        store.close()


@lw.tool(name="step")
def _step(n: int) -> str:
    return f"step {n} done"
