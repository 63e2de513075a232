"""`SQLiteStore.prune`: delete whole runs past their retention, in short transactions.

Runs are chosen, then deleted a chunk at a time (`_PRUNE_CHUNK` runs), each chunk in
one ``BEGIN IMMEDIATE`` transaction that checks its runs again under the write lock,
so the writers of running agents wait milliseconds, not the whole prune.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Collection
from pathlib import Path
from typing import TYPE_CHECKING

from .._control.local import _lease
from .._errors import UserError
from .sqlite_schema import _connect, _table_exists
from .base import PruneResult, check_prune_args, running_here

__all__: list[str] = []

# Tables beside the event log keyed by a `run_id` column: `prune` deletes a pruned run's
# rows from each one that exists (the control plane's leases and kill requests).
_PRUNE_TABLES: tuple[str, ...] = ("lw_leases", "lw_kills")
# Runs deleted per transaction: each run goes whole, and writers wait at most one chunk.
_PRUNE_CHUNK = 200

# Every run whose last event is before the cutoff: its id, its last event's kind and
# stop reason, its tags (JSON), and its number of events (seqs have no gaps).
_PRUNE_CANDIDATES = """
    SELECT s.run_id, l.last_kind,
           CASE WHEN json_valid(l.data) THEN json_extract(l.data, '$[#-1].stop_reason') END,
           CASE WHEN json_valid(s.data) THEN json_extract(s.data, '$[0].tags') END,
           l.last_seq + 1
      FROM event_chunks s
      JOIN event_chunks l ON l.run_id = s.run_id
                         AND l.seq = (SELECT MAX(m.seq) FROM event_chunks m WHERE m.run_id = s.run_id)
     WHERE s.seq = 0 AND l.last_ts < ?
"""


class _Pruner:
    """`SQLiteStore.prune` (a part of the class)."""

    path: Path

    if TYPE_CHECKING:  # of the composed class: `_Writer`, `SQLiteStore`
        def _sync(self, timeout: float = 30.0) -> None: ...
        def _recover(self) -> None: ...

    def prune(self, *, before: float, statuses: Collection[str] | None = None, tags: Collection[str] = (),
              dry_run: bool = False, vacuum: bool = False) -> PruneResult:
        """`EventStore.prune`; `vacuum` then gives the freed pages back to the file system.

        Runs are chosen, then deleted a chunk at a time, each chunk in one ``BEGIN
        IMMEDIATE`` transaction that checks its runs again under the write lock: a run
        resumed meanwhile (its last event no longer old, or no longer an end) stays.
        """
        cutoff, wanted, tag_set = check_prune_args(before, statuses, tags)
        self._recover()
        self._sync()
        conn = _connect(self.path)
        try:
            chosen, events, kept = self._prune_candidates(conn, cutoff, wanted, tag_set, None)
            if dry_run:
                return PruneResult(run_ids=tuple(chosen), events=events, dry_run=True, unfinished_kept=kept)
            deleted: list[str] = []
            deleted_events = 0
            for i in range(0, len(chosen), _PRUNE_CHUNK):
                ids, n = self._prune_chunk(conn, chosen[i:i + _PRUNE_CHUNK], cutoff, wanted, tag_set)
                deleted += ids
                deleted_events += n
            if _table_exists(conn, "lw_kills"):
                # Kills of a tag or of all runs (no run id): read by the watchers once, at once;
                # past the cutoff they are history of no run.
                conn.execute("DELETE FROM lw_kills WHERE run_id = '' AND ts < ?", (cutoff,))
            if vacuum:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            return PruneResult(run_ids=tuple(deleted), events=deleted_events, unfinished_kept=kept)
        except sqlite3.Error as exc:
            raise UserError(f"cannot prune the loopwise database {self.path}: {exc}") from None
        finally:
            conn.close()

    def _prune_candidates(self, conn: sqlite3.Connection, cutoff: float, wanted: frozenset[str],
                          tags: frozenset[str], among: list[str] | None) -> tuple[list[str], int, int]:
        sql = _PRUNE_CANDIDATES
        args: tuple[float | str, ...] = (cutoff,)
        if among is not None:
            sql += " AND s.run_id IN (SELECT value FROM json_each(?))"
            args = (cutoff, json.dumps(among))
        rows = conn.execute(sql, args).fetchall()
        busy = running_here() | self._leased(conn, [r[0] for r in rows if r[1] != "run_finished"])
        chosen: list[str] = []
        events = kept = 0
        for run_id, last_kind, stop_reason, tags_json, n in rows:
            if run_id in busy:
                continue
            if tags and tags.isdisjoint(json.loads(tags_json or "[]")):
                continue
            status = stop_reason if last_kind == "run_finished" else "unfinished"
            if status not in wanted:
                kept += status == "unfinished"
                continue
            chosen.append(run_id)
            events += n
        return chosen, events, kept

    @staticmethod
    def _leased(conn: sqlite3.Connection, run_ids: list[str]) -> set[str]:
        """Of `run_ids` (runs without an end), those a live process holds a lease on."""
        if not run_ids or not _table_exists(conn, "lw_leases"):
            return set()
        rows = conn.execute(
            "SELECT run_id, owner, host, pid, tags, acquired, heartbeat FROM lw_leases "
            "WHERE run_id IN (SELECT value FROM json_each(?))", (json.dumps(run_ids),)
        ).fetchall()
        return {row[0] for row in rows if _lease(row).live()}

    def _prune_chunk(self, conn: sqlite3.Connection, ids: list[str], cutoff: float, wanted: frozenset[str],
                     tags: frozenset[str]) -> tuple[list[str], int]:
        conn.execute("BEGIN IMMEDIATE")
        try:
            still, _, _ = self._prune_candidates(conn, cutoff, wanted, tags, ids)
            n = conn.execute("SELECT COALESCE(SUM(last_seq - seq + 1), 0) FROM event_chunks "
                             "WHERE run_id IN (SELECT value FROM json_each(?))", (json.dumps(still),)).fetchone()[0]
            conn.executemany("DELETE FROM event_chunks WHERE run_id = ?", [(i,) for i in still])
            for table in _PRUNE_TABLES:
                if _table_exists(conn, table):
                    conn.executemany(f"DELETE FROM {table} WHERE run_id = ?", [(i,) for i in still])
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return still, n
