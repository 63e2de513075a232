"""The SQLite store's reads: a run's events (journals included), its existence, the list of runs.

`load` and `has_run` read the journals (this process's and other live ones') besides
the database, and recover those of crashed processes, so they see every event that
is durable without waiting; `list_runs` first copies what this process has pending,
so it sees its own writes. Its filters are SQL over the partial index of runs' first
rows; see `EventStore.list_runs` for the cursor.
"""

from __future__ import annotations

import logging
import sqlite3
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from .._errors import UserError
from .._events import Event, RunFinished, RunStarted, load_event, load_events
from .._events import first_error as _first_error
from .journal import journal_events, live_journal_mentions, writer_lives
from .sqlite_write import _FORKED, _open_stores
from .base import RunPage, RunSummary, check_list_args, encode_cursor

__all__: list[str] = []

_log = logging.getLogger("loopwise")

# The latest runs: each one's first event and its latest end (an end is always the last
# event of its row), by the partial index over first rows, newest first (start time, then
# run id: `list_runs`'s cursor names a place in that order). A row that is not JSON (an
# edit) comes back whole, for `list_runs` to leave out: SQLite's JSON functions would
# fail the whole query on it (hence the CASEs, which SQLite evaluates lazily).
# `{where}`: conditions on the first row `s`; `{having}`: on the end `finished`.
_LIST_RUNS = """
    SELECT started, finished, ts, run_id FROM (
        SELECT CASE WHEN json_valid(s.data) THEN json_extract(s.data, '$[0]') ELSE s.data END AS started,
               (SELECT CASE WHEN json_valid(f.data) THEN json_extract(f.data, '$[#-1]') ELSE f.data END
                  FROM event_chunks f
                 WHERE f.run_id = s.run_id AND f.last_kind = 'run_finished'
                 ORDER BY f.seq DESC LIMIT 1) AS finished,
               s.ts AS ts, s.run_id AS run_id
          FROM event_chunks s
         WHERE s.seq = 0{where}
    )
     WHERE 1{having}
     ORDER BY ts DESC, run_id DESC
     LIMIT ?
"""
_LIST_SINCE = " AND s.ts >= ?"
_LIST_BEFORE = " AND s.ts <= ? AND (s.ts < ? OR s.run_id < ?)"
_LIST_TAG = (" AND CASE WHEN json_valid(s.data) THEN EXISTS (SELECT 1 FROM json_each(s.data, '$[0].tags') "
             "WHERE value = ?) ELSE 0 END")
_LIST_RUNNING = " AND finished IS NULL"
_LIST_FINISHED = " AND finished IS NOT NULL"
_LIST_STOP_REASON = " AND CASE WHEN json_valid(finished) THEN json_extract(finished, '$.stop_reason') END = ?"


class _Reader:
    """`SQLiteStore`'s reads (a part of the class: the state is set in its `__init__`)."""

    path: Path
    _closed: bool | str
    _writer: str
    _reader: sqlite3.Connection
    _read_lock: threading.Lock

    if TYPE_CHECKING:  # of the composed class: `_Writer`, `SQLiteStore`, `EventStore`
        def _sync(self, timeout: float = 30.0) -> None: ...
        def _recover(self) -> None: ...
        def _own_paths(self) -> set[Path]: ...
        def _unknown(self, run_id: str) -> UserError: ...

    def _read(self, sql: str, args: tuple = (), *, sync: bool = True) -> list[tuple]:
        """A query of the database, once this process's journaled events are in it (unless not `sync`)."""
        if self._closed is _FORKED:
            raise UserError(f"the store {self.path} is {_FORKED}")
        if sync:
            self._sync()
        with self._read_lock:
            try:
                return self._reader.execute(sql, args).fetchall()
            except sqlite3.Error as exc:
                raise UserError(f"cannot read the loopwise database {self.path}: {exc}") from None

    def _journaled(self, run_id: str) -> dict[int, bytes]:
        """`run_id`'s events in the journals (this process's and other live ones'), by seq.

        Read before the database: a line gone from a journal meanwhile (emptied once in
        SQLite) is then in the database when it is read. So `load` and `has_run` never
        wait for a copy (this process's may be held up by another's long transaction).
        """
        return {event["seq"]: line for event, line in journal_events(self.path, run_id)
                if isinstance(event.get("seq"), int)}

    def load(self, run_id: str) -> list[Event]:
        """All of a run's events: a crashed process's journal is recovered first, live ones are read too."""
        self._recover()
        journaled = self._journaled(run_id)
        rows = self._read("SELECT data FROM event_chunks WHERE run_id = ? ORDER BY seq", (run_id,), sync=False)
        by_seq: dict[int, Event] = {}
        try:
            for (data,) in rows:
                for event in load_events(data):
                    by_seq.setdefault(event.seq, event)  # (rows never overlap; if they did, one event a seq)
            for seq, line in journaled.items():
                if seq not in by_seq:
                    by_seq[seq] = load_event(line)
        except ValueError as exc:  # pydantic's ValidationError, or JSON that is not
            raise UserError(f"run {run_id} in {self.path} holds an event this loopwise cannot read "
                            f"({_first_error(exc)}): written by a newer loopwise, or edited") from None
        if not by_seq:
            raise self._unknown(run_id)
        return [by_seq[seq] for seq in sorted(by_seq)]

    def written_elsewhere(self, run_id: str) -> bool:
        """Whether another live process wrote `run_id`'s latest events.

        Its journal holds them, or (once they are in SQLite: a busy process empties its
        journal every few milliseconds) the run's latest row names it as the writer and
        its journal files are still locked. A process that has journaled anything keeps
        one until its store is closed.
        """
        if live_journal_mentions(self.path, run_id, self._own_paths()):
            return True
        rows = self._read("SELECT writer FROM event_chunks WHERE run_id = ? ORDER BY seq DESC LIMIT 1", (run_id,),
                          sync=False)
        writer = rows[0][0] if rows else None
        if writer is None or writer in {store._writer for store in list(_open_stores)}:
            return False  # (unknown: written before schema 5; or by this process, which knows its runs)
        return writer_lives(self.path, writer)

    def has_run(self, run_id: str) -> bool:
        query = "SELECT 1 FROM event_chunks WHERE run_id = ? LIMIT 1"
        if self._read(query, (run_id,), sync=False):
            return True
        self._recover()
        return bool(self._journaled(run_id)) or bool(self._read(query, (run_id,), sync=False))

    def list_runs(self, *, status: str | None = None, stop_reason: str | None = None, tag: str | None = None,
                  since: float | None = None, limit: int = 20, cursor: str | None = None) -> RunPage:
        q = check_list_args(status, stop_reason, tag, since, limit, cursor)
        where, having = "", ""
        args: list[float | str] = []
        if q.since is not None:
            where += _LIST_SINCE
            args.append(q.since)
        if q.before is not None:
            where += _LIST_BEFORE
            args += [q.before[0], q.before[0], q.before[1]]
        if q.tag is not None:
            where += _LIST_TAG
            args.append(q.tag)
        if q.status == "running":
            having += _LIST_RUNNING
        elif q.status == "finished" or q.stop_reason is not None:
            having += _LIST_FINISHED
        if q.stop_reason is not None:
            having += _LIST_STOP_REASON
            args.append(q.stop_reason)
        rows = self._read(_LIST_RUNS.format(where=where, having=having), (*args, q.limit + 1))
        page = RunPage(self._summaries(rows[:q.limit]))
        if len(rows) > q.limit:  # (from the rows, not the summaries: a row left out is passed all the same)
            page.next_cursor = encode_cursor(rows[q.limit - 1][2], rows[q.limit - 1][3])
        return page

    def _summaries(self, rows: list[tuple]) -> list[RunSummary]:
        summaries = []
        for started_json, finished_json, _, _ in rows:
            try:
                started = load_event(started_json)
                finished = load_event(finished_json) if finished_json else None
            except ValueError as exc:  # one unreadable run does not hide the others
                _log.warning("the event log %s holds a run this loopwise cannot read (%s); it is left out of "
                             "the list", self.path, _first_error(exc))
                continue
            if not isinstance(started, RunStarted) or not (finished is None or isinstance(finished, RunFinished)):
                _log.warning("the event log %s holds a run whose first or last event is not what it should be "
                             "(%s, %s); it is left out of the list", self.path, started.kind,
                             None if finished is None else finished.kind)
                continue
            summaries.append(RunSummary.from_events(started, finished))
        return summaries
