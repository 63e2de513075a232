"""The SQLite store keeps a row per chunk of a run's consecutive events, and every event as written.

A copy into SQLite makes one `event_chunks` row of each run's batches that follow on
from each other (a short run: one row), a run's end closes its row, and the `events`
view gives back one row per event, its JSON byte for byte as journaled. Recovery of a
dead process's journal adds only what SQLite lacks, however often it runs.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import sqlite3
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise._stores import sqlite as _sqlite
from loopwise._stores import sqlite_write as _sqlite_write
from loopwise._events import dump_events, dump_lines
from loopwise._stores.journal import chunk_rows, json_array, writer_lives
from loopwise.models import ScriptedModel, ToolCall


@lw.tool
def step(n: int) -> str:
    """One step."""
    return f"step {n} done"


def _agent(store: lw.EventStore) -> lw.Agent:
    model = ScriptedModel([ToolCall("step", {"n": 1}), ToolCall("step", {"n": 2}), "all done"])
    return lw.Agent(model, tools=[step], store=store)


def _events(run_id: str) -> list:
    """A finished run's events (made in memory)."""
    source = lw.MemoryStore()
    _agent(source).run_sync("go", run_id=run_id)
    return source.load(run_id)


def _query(db: Path, sql: str, args: tuple = ()) -> list[tuple]:
    conn = sqlite3.connect(db)
    try:
        return conn.execute(sql, args).fetchall()
    finally:
        conn.close()


def _as_written(events: list) -> list[tuple]:
    """`events` as rows of the `events` view: (run_id, seq, kind, ts, the JSON as written)."""
    return [(e.run_id, e.seq, e.kind, e.ts, data.decode()) for e, data in zip(events, dump_events(events))]


@pytest.mark.parametrize("per_insert", [None, (2, 10**9), (500, 1)], ids=["default", "2-rows", "1-byte"])
def test_concurrent_runs_copied_together_make_a_row_each(tmp_path, monkeypatch, per_insert):
    """Batches of several runs, interleaved in the journal, become one row per run; the view gives each event.

    (Also when a copy's rows go in several statements: a few rows, or a few bytes, each.)
    """
    monkeypatch.setattr(_sqlite_write, "GATHER_S", 5.0)  # every batch waits for the one copy `list_runs` makes
    monkeypatch.setattr(_sqlite_write, "JANITOR_S", 5.0)
    if per_insert is not None:
        monkeypatch.setattr(_sqlite_write, "_ROWS_PER_INSERT", per_insert[0])
        monkeypatch.setattr(_sqlite_write, "_BYTES_PER_INSERT", per_insert[1])
    db = tmp_path / "c.db"
    store = lw.SQLiteStore(db)
    try:
        async def main() -> list[lw.RunResult]:
            return await asyncio.gather(*(_agent(store).run("go", run_id=f"r{i}") for i in range(5)))

        results = asyncio.run(main())
        assert {r.run_id for r in store.list_runs()} == {f"r{i}" for i in range(5)}
        for result in results:
            events = store.load(result.run_id)
            assert lw.RunResult.from_events(events) == result
            assert _query(db, "SELECT seq, last_seq FROM event_chunks WHERE run_id = ?",
                          (result.run_id,)) == [(0, len(events) - 1)]
            assert _query(db, "SELECT * FROM events WHERE run_id = ? ORDER BY seq",
                          (result.run_id,)) == _as_written(events)
    finally:
        store.close()


def _meta(run_id: str, first: int, last: int, last_kind: str = "tool_call_finished") -> tuple:
    return (run_id, first, float(first), last, float(last), last_kind)


def _blob(run_id: str, first: int, last: int) -> bytes:
    return b"".join(json.dumps({"run_id": run_id, "seq": s}).encode() + b"\n" for s in range(first, last + 1))


def test_a_row_is_a_run_s_batches_that_follow_on_and_an_end_closes_it():
    batches = [
        (_meta("a", 0, 2), _blob("a", 0, 2)),
        (_meta("b", 0, 1), _blob("b", 0, 1)),
        (_meta("a", 3, 5, "run_finished"), _blob("a", 3, 5)),
        (_meta("a", 6, 7), _blob("a", 6, 7)),  # (a resumed run: after its end, a row of its own)
        (_meta("b", 2, 2), _blob("b", 2, 2)),
        (_meta("a", 9, 9), _blob("a", 9, 9)),  # a gap: a row of its own
    ]
    rows = chunk_rows(batches)
    assert [(r[0], r[1], r[2], r[3], r[4], r[5]) for r in rows] == [
        ("a", 0, 5, 0.0, 5.0, "run_finished"),
        ("b", 0, 2, 0.0, 2.0, "tool_call_finished"),
        ("a", 6, 7, 6.0, 7.0, "tool_call_finished"),
        ("a", 9, 9, 9.0, 9.0, "tool_call_finished"),
    ]
    for run_id, first, last, *_, blobs in rows:
        assert json.loads(json_array(blobs)) == [{"run_id": run_id, "seq": s} for s in range(first, last + 1)]


def test_a_write_of_several_runs_events_is_kept_apart(tmp_path):
    """A batch that is not one run's consecutive events (no run writes one) is split, not mislabelled."""
    a, b = _events("mix-a"), _events("mix-b")
    db = tmp_path / "m.db"
    store = lw.SQLiteStore(db)
    try:
        store.write([a[0], a[1], b[0], a[2], b[1]])
        store.write(a[3:])
        store.write(b[2:])
        assert store.load("mix-a") == a and store.load("mix-b") == b  # (from the journal)
        assert {r.run_id for r in store.list_runs()} == {"mix-a", "mix-b"}  # (copies first)
        assert _query(db, "SELECT * FROM events WHERE run_id = 'mix-a' ORDER BY seq") == _as_written(a)
        assert _query(db, "SELECT * FROM events WHERE run_id = 'mix-b' ORDER BY seq") == _as_written(b)
    finally:
        store.close()


def _dead_journal(db: Path, lines: bytes, n: int = 1) -> Path:
    """A journal segment as a process that died would leave it (nobody holds its lock)."""
    path = db.parent / f"{db.name}-lwj-999999-dead{n:04d}-1"
    path.write_bytes(lines)
    return path


@pytest.mark.parametrize("in_sqlite", [0, 4, 11])
def test_recovery_adds_only_what_sqlite_lacks_however_often_it_runs(tmp_path, in_sqlite):
    """A process died after copying a prefix of its journal: the rest goes in once, as a row."""
    events = _events("crashed")
    db = tmp_path / "r.db"
    lw.SQLiteStore(db).close()  # the tables
    if in_sqlite:
        prefix = events[:in_sqlite]
        conn = sqlite3.connect(db, isolation_level=None)
        _sqlite_write._insert(conn, chunk_rows([(_sqlite_meta(prefix), dump_lines(prefix))]), "1-dead")
        conn.close()
    for attempt in range(2):  # the second: a crash between the copy and the unlink left it again
        journal = _dead_journal(db, dump_lines(events) + b'{"run_id": "crashed", "seq"', attempt)  # a torn line
        store = lw.SQLiteStore(db)  # recovers on open
        try:
            assert not journal.exists()
            assert store.load("crashed") == events
            assert _query(db, "SELECT * FROM events ORDER BY seq") == _as_written(events)
            rows = _query(db, "SELECT seq, last_seq FROM event_chunks ORDER BY seq")
            assert rows == ([(0, in_sqlite - 1)] if in_sqlite else []) + (
                [(in_sqlite, len(events) - 1)] if in_sqlite < len(events) else [])
            assert [r.run_id for r in store.list_runs()] == ["crashed"]
            assert store.list_runs()[0].stop_reason == "done"
        finally:
            store.close()


def _sqlite_meta(events: list) -> tuple:
    first, last = events[0], events[-1]
    return (first.run_id, first.seq, first.ts, last.seq, last.ts, last.kind)


def test_a_run_id_taken_by_another_process_s_run_keeps_that_run_whole(tmp_path, caplog):
    """Two stores (as two processes) log runs with the same id: SQLite keeps the first, none of the second.

    The second's first batch breaks the key of the first's first row; its later batches
    would not (their first seqs are free) and must be dropped too, not mixed in.
    """
    first, second = _events("same-id"), _events("same-id")
    assert first != second  # (the same shape, other timestamps)
    db = tmp_path / "d.db"
    a, b = lw.SQLiteStore(db), lw.SQLiteStore(db)
    try:
        a.write(first)
        a.list_runs()  # in SQLite, as one row
        for start, end in [(0, 3), (3, 7), (7, 9), (9, len(second))]:
            b.write(second[start:end])
            if start == 3:
                b.list_runs()  # (one copy refuses the first batches, a later one gets the rest)
        b.list_runs()
        assert "refused" in caplog.text and "same-id" in caplog.text
        assert _query(db, "SELECT * FROM events ORDER BY seq") == _as_written(first)
        assert a.load("same-id") == first
    finally:
        a.close()
        b.close()


def _die(store: lw.SQLiteStore) -> None:
    """What a SIGKILL leaves of `store`: its journal files, unlocked, with nothing more copied."""
    with store._cond:
        for segment in store._segments:
            os.close(segment.fd)  # (the lock goes with it)
        store._segments, store._segment, store._pending = [], None, []
        store._closed = True  # (the store object is dead: its close() at exit does nothing)
        store._stopping = True
        store._cond.notify_all()
    _sqlite._open_stores.discard(store)


_TEMPLATE = _events("template")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_interleaving_of_batches_copies_and_a_crash_keeps_every_event_once(tmp_path_factory, data):
    """Runs' batches in any order, copies after any of them, then the process dies: after recovery,
    SQLite has every event once, each run reads back whole, and no two rows of a run overlap."""
    n_runs = data.draw(st.integers(1, 4), label="runs")
    runs = {f"p{i}": [dataclasses.replace(e, run_id=f"p{i}") for e in _TEMPLATE] for i in range(n_runs)}
    # Each run cut into consecutive batches; the batches of all runs interleaved, each run's in order.
    queues = {}
    for run_id, events in runs.items():
        cuts = sorted(data.draw(st.sets(st.integers(1, len(events) - 1), max_size=6), label=f"cuts {run_id}"))
        bounds = [0, *cuts, len(events)]
        queues[run_id] = [events[a:b] for a, b in zip(bounds, bounds[1:])]
    order = []
    while any(queues.values()):
        run_id = data.draw(st.sampled_from(sorted(r for r, q in queues.items() if q)))
        order.append(queues[run_id].pop(0))
    copies = data.draw(st.sets(st.integers(0, len(order) - 1)), label="copy after")
    crash_at = data.draw(st.integers(0, len(order)), label="batches written before the crash")

    db = tmp_path_factory.mktemp("prop") / "p.db"
    store = lw.SQLiteStore(db)
    try:
        for i, batch in enumerate(order[:crash_at]):
            store.write(batch)
            if i in copies:
                store._flush(blocking=True)
    finally:
        _die(store)
    written = {}
    for batch in order[:crash_at]:
        for e in batch:
            written.setdefault(e.run_id, []).append(e)

    store = lw.SQLiteStore(db)  # recovers the dead journal
    try:
        assert not list(db.parent.glob("p.db-lwj-*"))
        for run_id, events in written.items():
            assert store.load(run_id) == events
        expected = sorted(row for events in written.values() for row in _as_written(events))
        assert sorted(_query(db, "SELECT * FROM events")) == expected
        rows = _query(db, "SELECT run_id, seq, last_seq FROM event_chunks ORDER BY run_id, seq")
        for (r1, _, last1), (r2, first2, _) in zip(rows, rows[1:]):
            assert r1 != r2 or last1 < first2, rows
        finished = {r.run_id for r in store.list_runs(limit=10) if r.stop_reason is not None}
        assert finished == {r for r, events in written.items() if events[-1].kind == "run_finished"}
    finally:
        store.close()


def test_a_store_keeps_a_journal_file_locked_while_open_even_when_all_is_copied(tmp_path, monkeypatch):
    """How other processes tell the writer of a run's rows lives: its journal's lock, held until close."""
    monkeypatch.setattr(_sqlite_write, "SEGMENT_MAX", 1)  # every batch seals its segment
    monkeypatch.setattr(_sqlite_write, "TRUNCATE_AT", 1)  # and the live one is emptied at every copy
    db = tmp_path / "w.db"
    store = lw.SQLiteStore(db)
    try:
        events = _events("lives")
        for part in (events[:3], events[3:]):
            store.write(part)
            store.list_runs()  # copied: every segment drained
            assert writer_lives(db, store._writer)
        assert _query(db, "SELECT DISTINCT writer FROM event_chunks") == [(store._writer,)]
        assert not store.written_elsewhere("lives")  # (its own writer: this process knows its runs)
    finally:
        store.close()
    assert not writer_lives(db, store._writer) and not list(db.parent.glob("w.db-lwj-*"))
