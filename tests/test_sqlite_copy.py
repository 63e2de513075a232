"""How journaled events reach SQLite: copied on the event loop that wrote them, or by the janitor thread.

The event loop copies its batches every `GATHER_S` without ever waiting for the
database; what no loop copies (a loop closed first, writes made outside any loop, a
database that was locked) the janitor thread copies. These tests look at SQLite from
a connection of their own, as another process would.
"""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._stores import sqlite as _sqlite
from loopwise._stores import sqlite_schema as _sqlite_schema
from loopwise._stores import sqlite_write as _sqlite_write
from loopwise._events import IterationStarted, RunStarted
from loopwise.models import ScriptedModel, ToolCall

from .test_journal import _prepared, _rows_in_sqlite as _sqlite_rows, _WriteLock


@lw.tool
def step(n: int) -> str:
    """One step."""
    return f"step {n} done"


def _agent(store: lw.EventStore) -> lw.Agent:
    return lw.Agent(ScriptedModel([ToolCall("step", {"n": 1}), "all done"]), tools=[step], store=store)


# The events of `_runtime.agent`'s run: started; 2 x (iteration, model call started + finished);
# the tool call started + finished; finished.
EVENTS = 10


@pytest.fixture
def db(tmp_path):
    return tmp_path / "c.db"


@pytest.fixture
def store(db):
    store = lw.SQLiteStore(db)
    yield store
    store.close()


def _wait_for_rows(db: Path, run_id: str, n: int, timeout: float = 10.0) -> float:
    """Seconds until `run_id` has `n` rows in SQLite (fails after `timeout`)."""
    started = time.monotonic()
    while _sqlite_rows(db, run_id) != n:
        assert time.monotonic() - started < timeout, f"{run_id}: {_sqlite_rows(db, run_id)} rows, not {n}"
        time.sleep(0.01)
    return time.monotonic() - started


def test_the_event_loop_copies_its_runs_while_they_run(db, store, monkeypatch):
    """A run in progress is in SQLite (for other processes' `loopwise runs`) within milliseconds.

    Twice, in two event loops one after the other (the first closed with a copy
    scheduled), with the janitor out of the way: each loop copies its own runs.
    """
    monkeypatch.setattr(_sqlite_write, "JANITOR_S", 60.0)

    async def main(run_id: str) -> int:
        release = asyncio.Event()

        @lw.tool
        async def wait_here() -> str:
            """Waits until the test has looked."""
            await release.wait()
            return "released"

        agent = lw.Agent(ScriptedModel([ToolCall("wait_here", {}), "done"]), tools=[wait_here], store=store)
        task = asyncio.create_task(agent.run("go", run_id=run_id))
        deadline = time.monotonic() + 10
        # run_started, iteration_started, model_call_started | model_call_finished, tool_call_started
        while _sqlite_rows(db, run_id) < 5:
            assert time.monotonic() < deadline, "the loop never copied the run's first batches"
            await asyncio.sleep(0.005)
        seen = _sqlite_rows(db, run_id)
        release.set()
        await task
        return seen

    assert asyncio.run(main("in-progress-1")) == 5
    assert asyncio.run(main("in-progress-2")) == 5
    assert {r.run_id for r in store.list_runs()} == {"in-progress-1", "in-progress-2"}


def test_a_locked_database_never_holds_up_the_event_loop(tmp_path):
    """Another connection holds the write lock: runs go on at full speed, and their events follow later."""
    db = _prepared(tmp_path / "c.db")
    store = lw.SQLiteStore(db)
    try:
        with _WriteLock(db):

            async def main() -> float:
                started = time.monotonic()
                for i in range(20):
                    await _agent(store).run("go", run_id=f"locked-{i}")
                    await asyncio.sleep(_sqlite_write.GATHER_S / 2)  # let the loop's copies come (and fail)
                return time.monotonic() - started

            elapsed = asyncio.run(main())
            # Waiting on the busy timeout even once would take 10 s.
            assert elapsed < _sqlite_write.BUSY_TIMEOUT_MS / 1000 / 2
            assert _sqlite_rows(db, "locked-0") == 0
            assert len(store.load("locked-19")) == EVENTS  # read from the journal meanwhile
        # The lock is gone: the janitor copies what the (closed) loops left.
        _wait_for_rows(db, "locked-19", EVENTS)
        assert all(_sqlite_rows(db, f"locked-{i}") == EVENTS for i in range(20))
    finally:
        store.close()


def test_the_janitor_copies_what_a_closed_event_loop_left(db, store):
    """`run_sync` closes its loop right after the run's last write: the janitor copies it, unasked."""
    _agent(store).run_sync("go", run_id="sync-1")
    waited = _wait_for_rows(db, "sync-1", EVENTS)
    assert waited < _sqlite_write.JANITOR_S + 5  # generous: the machine may be busy


def test_writes_from_a_thread_without_an_event_loop_are_copied(db, store):
    events = [
        RunStarted(run_id="threaded", seq=0, ts=time.time(), task=[lw.Message("user", "hi")]),
        IterationStarted(run_id="threaded", seq=1, ts=time.time(), iteration=1),
    ]
    thread = threading.Thread(target=store.write, args=(events,))
    thread.start()
    thread.join()
    _wait_for_rows(db, "threaded", 2)
    assert [e.kind for e in store.load("threaded")] == ["run_started", "iteration_started"]


def test_reads_in_this_process_copy_what_is_pending_first(db, store):
    """`list_runs` right after a run sees it, without waiting for the loop's or the janitor's copy."""
    async def main() -> list[str]:
        await _agent(store).run("go", run_id="just-now")
        return [r.run_id for r in store.list_runs()]  # before the loop's copy is due

    assert asyncio.run(main()) == ["just-now"]


def test_the_janitor_checkpoints_the_wal(db, store, monkeypatch):
    """The copies never checkpoint (it would hold the event loop up); the janitor does, off the loop."""
    monkeypatch.setattr(_sqlite_write, "CHECKPOINT_BYTES", 1)
    size_before = db.stat().st_size
    for i in range(20):
        _agent(store).run_sync("go", run_id=f"cp-{i}")
    deadline = time.monotonic() + 10
    # Pages reach the database file itself only through a checkpoint.
    while db.stat().st_size <= size_before:
        assert time.monotonic() < deadline, "the WAL was never checkpointed"
        time.sleep(0.02)


def test_a_version_2_database_is_migrated_with_its_events(tmp_path):
    """Schema 2 (a WITHOUT ROWID table) becomes 5 (a row per chunk of events), every event kept."""
    db = tmp_path / "v2.db"
    conn = sqlite3.connect(db)
    conn.execute("PRAGMA journal_mode = WAL")
    for version in (1, 2):
        conn.executescript(_sqlite_schema._MIGRATIONS[version])
    conn.execute("PRAGMA user_version = 2")
    conn.commit()
    conn.close()
    # Events written the way version 2 stored them.
    source = lw.MemoryStore()
    result = _agent(source).run_sync("go", run_id="old-run")
    from loopwise._events import dump_events

    conn = sqlite3.connect(db)
    conn.executemany("INSERT INTO events (run_id, seq, kind, ts, data) VALUES (?, ?, ?, ?, ?)",
                     [(e.run_id, e.seq, e.kind, e.ts, data.decode())
                      for e, data in zip(source.load("old-run"), dump_events(source.load("old-run")))])
    conn.commit()
    conn.close()

    store = lw.SQLiteStore(db)
    try:
        assert lw.RunResult.from_events(store.load("old-run")) == result
        assert [r.run_id for r in store.list_runs()] == ["old-run"]
        _agent(store).run_sync("go", run_id="new-run")
        assert {r.run_id for r in store.list_runs()} == {"old-run", "new-run"}
    finally:
        store.close()
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == _sqlite.SCHEMA_VERSION == 5
        sql = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'event_chunks'").fetchone()[0]
        assert "WITHOUT ROWID" not in sql.upper()
        with pytest.raises(sqlite3.IntegrityError):  # (run_id, seq) is still a key
            conn.execute("INSERT INTO event_chunks VALUES ('old-run', 0, 0, 0, 0, 'x', '[]', NULL)")
        # The old run's events, one row each, read back through the `events` view as they were written.
        old = [(e.run_id, e.seq, e.kind, e.ts, data.decode())
               for e, data in zip(source.load("old-run"), dump_events(source.load("old-run")))]
        assert conn.execute("SELECT * FROM events WHERE run_id = 'old-run' ORDER BY seq").fetchall() == old
        assert conn.execute("SELECT count(*) FROM event_chunks WHERE run_id = 'old-run'").fetchone()[0] == len(old)
        # The new run's events went in as a few rows (one here: a short run is copied at once).
        chunks = conn.execute("SELECT count(*) FROM event_chunks WHERE run_id = 'new-run'").fetchone()[0]
        events = conn.execute("SELECT count(*) FROM events WHERE run_id = 'new-run'").fetchone()[0]
        assert events == len(old) and 1 <= chunks < events
    finally:
        conn.close()


def test_event_loops_in_several_threads_share_one_store(db, store):
    """Each loop copies what is pending, its own batches and the others' alike: nothing twice, nothing lost."""
    errors: list[BaseException] = []

    def worker(t: int) -> None:
        async def main() -> None:
            await asyncio.gather(*(_agent(store).run("go", run_id=f"t{t}-{i}") for i in range(25)))

        try:
            asyncio.run(main())
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    ids = {f"t{t}-{i}" for t in range(4) for i in range(25)}
    assert {r.run_id for r in store.list_runs(limit=200)} == ids
    conn = sqlite3.connect(db)
    try:
        counts = dict(conn.execute("SELECT run_id, count(*) FROM events GROUP BY run_id").fetchall())
        gaps = conn.execute("SELECT count(*) FROM (SELECT run_id FROM events GROUP BY run_id "
                            "HAVING max(seq) + 1 != count(*))").fetchone()[0]
    finally:
        conn.close()
    assert counts == dict.fromkeys(ids, EVENTS) and gaps == 0
