"""The local control plane: leases and kill requests in the SQLite database of the event log.

`LocalControl` reaches every process on this machine that uses the same file. Every
kill also overwrites a small marker file beside the database (``<db>-lwkills``,
`_control.marker`). While runs are attached, a timer on their event loop compares
the marker's bytes (one `pread`, no thread switch) every `POLL_S`, and wakes this
process's watcher thread only when there is work: the marker changed (it reads
``lw_kills`` then, one indexed query for all the runs), or leases to write or
delete. The watcher also reads ``lw_kills`` every `QUERY_EVERY_S` whatever the
marker says, and refreshes the leases every `HEARTBEAT_S` in one statement.
"""

from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import threading
import time
from collections.abc import Iterable
from pathlib import Path

from .marker import _MARKER_SIZE, _bump_marker, _Marker, _open_marker, marker_path
from .plane import (
    HEARTBEAT_S,
    HOST,
    LEASE_TTL_S,
    Attachable,
    ControlPlane,
    KillRequest,
    Lease,
    _local_runs,
    _log,
    _owner,
    shared_plane,
)
from .._errors import UserError, store_error

__all__ = ["IDLE_EXIT_S", "POLL_S", "QUERY_EVERY_S", "LocalControl", "local_control"]

#: How often the watcher looks for kill requests while runs are attached.
POLL_S = 0.02
#: The watcher reads ``lw_kills`` at least this often even when the kill marker did not
#: change: a kill whose marker write failed (the marker's permissions, or deleted at the
#: wrong moment), or from a loopwise that does not write it, is delivered this late.
QUERY_EVERY_S = 1.0
#: A watcher with no run to watch for this long ends its thread (the next run starts one).
IDLE_EXIT_S = 10.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lw_leases (
    run_id TEXT PRIMARY KEY,
    owner TEXT NOT NULL,
    host TEXT NOT NULL,
    pid INTEGER NOT NULL,
    tags TEXT NOT NULL,
    acquired REAL NOT NULL,
    heartbeat REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS lw_kills (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    run_id TEXT NOT NULL,
    reason TEXT NOT NULL,
    by TEXT NOT NULL,
    ts REAL NOT NULL,
    tag TEXT
);
CREATE INDEX IF NOT EXISTS lw_kills_run ON lw_kills (run_id, id);
"""

# A kill of every run (``tag`` NULL), or of every run with a tag, is also stored as one
# row with an empty ``run_id`` (a run's id is never empty): watchers match it against
# the runs they have attached, those too young to have a lease yet included.
_BROADCAST = ""


def _add_tag_column(conn: sqlite3.Connection) -> None:
    """``lw_kills.tag``, in a database made before it existed."""
    columns = {row[1] for row in conn.execute("PRAGMA table_info(lw_kills)")}
    if "tag" not in columns:
        try:
            conn.execute("ALTER TABLE lw_kills ADD COLUMN tag TEXT")
        except sqlite3.OperationalError as exc:  # another process added it first
            if "duplicate column" not in str(exc):
                raise



def _connect(path: Path) -> sqlite3.Connection:
    conn = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA busy_timeout = 30000")
    conn.execute("PRAGMA synchronous = NORMAL")
    # Checkpoints are the event log's job, on its own schedule (its janitor thread lets the
    # WAL grow past SQLite's default of 1,000 pages on purpose). With the default here, each of our
    # small commits copied the whole WAL back into the database once it was that long:
    # milliseconds of CPU for a lease, most of what the control plane cost.
    conn.execute("PRAGMA wal_autocheckpoint = 0")
    return conn


class LocalControl(ControlPlane):
    """The control plane in the SQLite database of the event log (tables ``lw_leases``, ``lw_kills``).

    One per database file and process (`control_for` caches it).

    What a run costs its event loop: attaching and detaching it are a few dict
    operations under a lock held for nothing longer; while runs are attached, a timer
    on their loop "turns" every `POLL_S` (reading the marker's 8 bytes with one `pread`,
    ageing the runs attached since the last turn). The database is the watcher thread's,
    and it is woken
    only for work: a changed kill marker, a lease to write or delete, a heartbeat, the
    `QUERY_EVERY_S` query. A thread woken 50 times a second would cost more than all
    that: each wake-up must win the GIL back from a busy event loop, which takes tens
    of context switches on a loaded machine.

    Leases: a run still attached at the second turn after it was attached (it has run
    for a poll at least) gets one. Most runs of a busy process end sooner and never
    need one: nobody could have looked for them yet, and a kill by id reaches them by
    their recent events (`LEASE_GRACE_S`). Runs attached outside their event loop's
    thread (or with none) have no timer: the watcher turns and polls for them every
    `POLL_S`, as it does when the marker cannot be opened.
    """

    name = "local"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        # For blocking calls (kill, resume, views), under _conn_lock; never under _lock, which
        # the event loop takes: a kill waiting for the database must not hold up the loop.
        self._conn_lock = threading.Lock()
        conn = None
        try:
            conn = _connect(self.path)
            conn.executescript(_SCHEMA)
            _add_tag_column(conn)
        except sqlite3.Error as exc:  # a full disk, a read-only directory, an I/O error
            if conn is not None:
                conn.close()
            raise store_error(self.path, "create the control tables (lw_leases, lw_kills) in", exc) from None
        self._conn = conn
        # Everything below is under _lock (taken before _conn_lock when both are).
        self._lock = threading.Lock()
        self._runs: dict[str, Attachable] = {}
        # When each run was attached (wall clock): a kill of all runs, or of a tag, stops
        # those attached before it was made.
        self._attached_at: dict[str, float] = {}
        # Where each attached run is counted: its event loop (whose timer turns for it), or
        # None (the watcher turns for it); and how many runs each counts.
        self._keys: dict[str, asyncio.AbstractEventLoop | None] = {}
        self._counts: dict[asyncio.AbstractEventLoop | None, int] = {}
        self._timers: dict[asyncio.AbstractEventLoop, asyncio.TimerHandle] = {}
        # Runs attached since the last turn; attached before it (leased at the next turn if
        # still attached); and due for a lease now (the watcher writes them).
        self._fresh: list[Attachable] = []
        self._aging: list[Attachable] = []
        self._to_lease: list[Attachable] = []
        self._turned = 0.0
        # Leases to delete: (run_id, acquired) of leases this process wrote whose run was
        # detached. The acquired time names one lease: a late delete never removes the
        # lease a later `acquire` (resume) took for the same run.
        self._to_release: list[tuple[str, float]] = []
        # Leases this process wrote (or is about to) and has not released: run_id -> acquired.
        self._written: dict[str, float] = {}
        # The kill marker as the watcher opened it, and its bytes when the watcher last read
        # lw_kills (None: read it at the next poll).
        self._marker: _Marker | None = None
        self._seen: bytes | None = None
        self._wake = threading.Event()
        self._idle = True  # the watcher has no run to watch (it waits to end, not to poll)
        self._thread: threading.Thread | None = None
        self._closing = False  # close(): the watcher ends as soon as it has nothing to watch
        self._last_kill_id = 0

    def describe(self) -> str:
        return f"local ({self.path})"

    # -- the run's side: never blocks ---------------------------------------------

    def _attach(self, run: Attachable) -> None:
        loop = getattr(run, "loop", None)
        if loop is not None and asyncio._get_running_loop() is not loop:
            loop = None  # not in its loop's thread: no timer there, the watcher polls for it
        with self._lock:
            self._runs[run.run_id] = run
            self._attached_at[run.run_id] = time.time()
            self._fresh.append(run)
            self._keys[run.run_id] = loop
            counts = self._counts
            counts[loop] = counts.get(loop, 0) + 1
            if loop is not None and loop not in self._timers:
                for stale in [x for x in self._timers if x.is_closed()]:
                    del self._timers[stale]  # closed before its timer came (`asyncio.run` after a run)
                self._timers[loop] = loop.call_later(POLL_S, self._on_timer, loop)
            if self._thread is None or not self._thread.is_alive():
                self._start_watcher()
            wake = self._idle or loop is None
        if wake:  # (a watcher with runs on their loops is woken by their timers)
            self._wake.set()

    def _detach(self, run_id: str) -> None:
        with self._lock:
            if self._runs.pop(run_id, None) is not None:
                self._attached_at.pop(run_id, None)
                key = self._keys.pop(run_id, None)
                n = self._counts[key] - 1
                if n:
                    self._counts[key] = n
                else:
                    del self._counts[key]
            acquired = self._written.pop(run_id, None)
            if acquired is None:
                return  # never leased: nothing to undo
            self._to_release.append((run_id, acquired))
            if self._thread is None or not self._thread.is_alive():
                self._start_watcher()  # (a lease `acquire` took for a resume that failed)
        self._wake.set()  # released promptly: a lease left behind says the run is running

    def _start_watcher(self) -> None:
        # (Under _lock.) Kill requests stored from now on are for us; older ones are history.
        with self._conn_lock:
            row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM lw_kills").fetchone()
        self._last_kill_id = row[0]
        self._seen = None
        self._thread = threading.Thread(target=self._watch, name=f"loopwise-control-{self.path.name}", daemon=True)
        self._thread.start()

    def _on_timer(self, loop: asyncio.AbstractEventLoop) -> None:
        """Every `POLL_S` on a loop with attached runs: turn, and wake the watcher if there is work."""
        with self._lock:
            if loop in self._counts:
                self._timers[loop] = loop.call_later(POLL_S, self._on_timer, loop)
            else:
                self._timers.pop(loop, None)
            work = self._turn(time.monotonic()) or self._signalled()
        if work:
            self._wake.set()

    def _turn(self, now: float) -> bool:
        """(Under _lock.) Age the runs attached since the last turn; whether leases are to be written or deleted.

        Turns are `POLL_S` apart at least, whoever turns (the timers of several loops, the
        watcher): a lease is written one to two polls after its run was attached, or
        sooner after a pause.
        """
        if now - self._turned >= POLL_S * 0.9:
            # Attached at the last turn and still attached (the same run, not a later segment).
            due = self._aging
            if now - self._turned > 3 * POLL_S:
                # No turn for several polls: the timers were held up (a loop blocked by a sync
                # call: the watcher's turn every `QUERY_EVERY_S` is the one that comes), or
                # there was no run. Every run attached by then is leased, well within
                # `LEASE_GRACE_S`.
                due, self._fresh = due + self._fresh, []
            self._turned = now
            runs, written = self._runs, self._written
            self._to_lease += [r for r in due if runs.get(r.run_id) is r and r.run_id not in written]
            self._aging, self._fresh = self._fresh, []
        return bool(self._to_lease or self._to_release)

    def _signalled(self) -> bool:
        """(Under _lock.) Whether the kill marker changed since the watcher last read lw_kills."""
        m = self._marker
        if m is None:
            return True
        seen = m.read()
        return seen is None or seen != self._seen

    # -- the watcher thread -------------------------------------------------------

    def _watch(self) -> None:
        conn = _connect(self.path)
        now = time.monotonic()
        next_beat = now + HEARTBEAT_S
        next_query = now  # at once: kills stored before the marker was opened
        while True:
            self._wake.clear()  # (before the work: a wake-up during it is not lost)
            now = time.monotonic()
            try:
                full = now >= next_query
                if full:
                    self._remap()
                with self._lock:
                    polling = self._polling()
                    if full or polling:
                        self._turn(now)  # (for runs no timer turns for, or whose loop is blocked)
                    watching = bool(self._runs)
                    query = watching and (full or polling or self._signalled())
                    m = self._marker
                if query:
                    # The marker is read before the query: a kill stored after the query
                    # overwrites it after this read, and the next turn sees the change.
                    before = m.read() if m is not None else None
                    self._poll_kills(conn)
                    with self._lock:
                        self._seen = before
                if full:
                    next_query = now + QUERY_EVERY_S
                self._write_leases(conn)
                if now >= next_beat:
                    if self._written:
                        conn.execute("UPDATE lw_leases SET heartbeat = ? WHERE owner = ?", (time.time(), _owner()))
                    next_beat = now + HEARTBEAT_S
            except (sqlite3.Error, ValueError) as exc:  # a locked or vanished database: say so, keep trying
                _log.warning("loopwise control plane (%s): %s; retrying", self.path, exc)
                time.sleep(0.2)
            with self._lock:
                idle = self._idle = not self._runs and not self._to_lease and not self._to_release
                polling = self._polling()
            if idle:
                timeout = IDLE_EXIT_S
            elif polling:
                timeout = POLL_S
            else:
                timeout = max(0.0, min(next_query, next_beat) - time.monotonic())
            woken = self._wake.wait(timeout)
            if (idle and not woken) or self._closing:
                with self._lock:
                    if not self._runs and not self._to_lease and not self._to_release:
                        # Nothing to watch for a while: end the thread (the next run starts one).
                        self._thread = None
                        conn.close()
                        return

    def _polling(self) -> bool:
        """(Under _lock.) Whether the watcher must turn and read lw_kills every `POLL_S` itself."""
        return None in self._counts or (self._marker is None and bool(self._runs))

    def _remap(self) -> None:
        """Open the kill marker (again, if it was deleted, replaced or emptied; it is `stat`-ed once a `QUERY_EVERY_S`)."""
        marker = self._marker
        try:
            st = os.stat(marker_path(self.path))
            if marker is not None and (st.st_dev, st.st_ino) == marker.id and st.st_size >= _MARKER_SIZE:
                return
        except OSError:
            pass
        opened = _open_marker(self.path)
        with self._lock:
            # A new marker's bytes were never compared: the next poll reads lw_kills.
            old, self._marker = self._marker, opened
            self._seen = None
        if old is not None:
            old.close()

    def _write_leases(self, conn: sqlite3.Connection) -> None:
        """Write the leases due, delete those of detached runs: one transaction."""
        with self._lock:
            now = time.time()
            runs, written = self._runs, self._written
            lease = [r for r in self._to_lease if runs.get(r.run_id) is r and r.run_id not in written]
            self._to_lease = []
            for r in lease:
                written[r.run_id] = now
            release, self._to_release = self._to_release, []
        if not lease and not release:
            return
        owner = _owner()
        pid = os.getpid()
        try:
            conn.execute("BEGIN IMMEDIATE")
            try:
                for i in range(0, len(release), 400):
                    part = release[i:i + 400]
                    conn.execute("DELETE FROM lw_leases WHERE owner = ? AND (run_id, acquired) IN "
                                 f"(VALUES {','.join(['(?,?)'] * len(part))})",
                                 [owner, *(v for pair in part for v in pair)])
                for i in range(0, len(lease), 400):
                    runs_part = lease[i:i + 400]
                    conn.execute("INSERT OR REPLACE INTO lw_leases (run_id, owner, host, pid, tags, acquired, "
                                 f"heartbeat) VALUES {','.join(['(?,?,?,?,?,?,?)'] * len(runs_part))}",
                                 [v for r in runs_part
                                  for v in (r.run_id, owner, HOST, pid, json.dumps(list(r.tags)), now, now)])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        except BaseException:
            # Not written: again at the next wake-up.
            with self._lock:
                self._to_release[:0] = release
                for r in lease:
                    if self._written.get(r.run_id) == now:  # (not detached, nor acquired again since)
                        del self._written[r.run_id]
                        self._to_lease.append(r)
            raise

    def _poll_kills(self, conn: sqlite3.Connection) -> None:
        rows = conn.execute("SELECT id, run_id, reason, by, ts, tag FROM lw_kills WHERE id > ? ORDER BY id",
                            (self._last_kill_id,)).fetchall()
        if rows:
            self._last_kill_id = rows[-1][0]
            targets: list[tuple[Attachable | None, str, tuple]] = []
            with self._lock:
                for r in rows:
                    if r[1] != _BROADCAST:
                        targets.append((self._runs.get(r[1]), r[1], r))
                        continue
                    tag, ts = r[5], r[4]  # every run (tag NULL) or every run with the tag, attached before
                    attached_at = self._attached_at
                    targets += [(run, run.run_id, r) for run in self._runs.values()
                                if (tag is None or tag in run.tags) and attached_at.get(run.run_id, ts) <= ts]
            for run, run_id, r in targets:
                if run is not None:
                    run.deliver(KillRequest(run_id, r[2], r[3], r[4]))

    # -- blocking calls -------------------------------------------------------------

    def acquire(self, run_id: str, tags: Iterable[str]) -> None:
        now = time.time()
        with self._conn_lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT run_id, owner, host, pid, tags, acquired, heartbeat FROM lw_leases "
                                   "WHERE run_id = ?", (run_id,)).fetchone()
                if row is not None:
                    lease = _lease(row)
                    # (A lease of ours for a run not executing here is being released: free.)
                    if lease.live(now) and not (lease.owner == _owner() and run_id not in _local_runs):
                        raise UserError(
                            f"run {run_id} is being executed by {lease.host} pid {lease.pid} (its lease was "
                            f"renewed {now - lease.heartbeat:.0f} s ago); stop it with `loopwise kill {run_id}` "
                            f"or wait for it to end (a dead process's lease expires after {LEASE_TTL_S:g} s)"
                        )
                conn.execute(
                    "INSERT OR REPLACE INTO lw_leases (run_id, owner, host, pid, tags, acquired, heartbeat) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (run_id, _owner(), HOST, os.getpid(), json.dumps(list(tags)), now, now),
                )
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        with self._lock:
            self._written[run_id] = now

    def leases(self, run_ids: Iterable[str] | None = None) -> dict[str, Lease]:
        sql = "SELECT run_id, owner, host, pid, tags, acquired, heartbeat FROM lw_leases"
        with self._conn_lock:
            if run_ids is None:
                rows = self._conn.execute(sql).fetchall()
            else:
                ids = list(run_ids)
                rows = []
                for i in range(0, len(ids), 500):
                    chunk = ids[i:i + 500]
                    rows += self._conn.execute(f"{sql} WHERE run_id IN ({','.join('?' * len(chunk))})",
                                               chunk).fetchall()
        return {r[0]: _lease(r) for r in rows}

    def record_kills(self, requests: list[KillRequest]) -> None:
        if not requests:
            return
        with self._conn_lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO lw_kills (run_id, reason, by, ts) VALUES (?, ?, ?, ?)",
                                 [(r.run_id, r.reason, r.by, r.ts) for r in requests])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        # After the commit: a watcher that sees the marker change reads the new rows.
        _bump_marker(self.path)

    def record_broadcast(self, tag: str | None, request: KillRequest) -> None:
        with self._conn_lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.execute("INSERT INTO lw_kills (run_id, reason, by, ts, tag) VALUES (?, ?, ?, ?, ?)",
                             (_BROADCAST, request.reason, request.by, request.ts, tag))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        _bump_marker(self.path)

    def pending_kill(self, run_id: str) -> KillRequest | None:
        with self._conn_lock:
            row = self._conn.execute("SELECT run_id, reason, by, ts FROM lw_kills WHERE run_id = ? "
                                     "ORDER BY id DESC LIMIT 1", (run_id,)).fetchone()
        return None if row is None else KillRequest(*row)

    def close(self) -> None:
        """Close the connections and the marker; the watcher thread ends once it has no run
        to watch (at once, if none is attached).

        Its connection must close too: while any connection of this process has the
        database open, SQLite keeps the descriptors of the ones closed before it (their
        POSIX locks would be lost otherwise), so a process that opened and closed many
        databases would keep their files open.
        """
        with self._lock:
            self._closing = True
            thread = self._thread
        self._wake.set()
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout=5.0)  # (a database locked by another process: at most this)
        with self._conn_lock:
            self._conn.close()
        with self._lock:
            marker, self._marker = self._marker, None
        if marker is not None:
            marker.close()


def _lease(row: tuple) -> Lease:
    return Lease(row[0], row[1], row[2], row[3], tuple(json.loads(row[4])), row[5], row[6])



def local_control(path: str | os.PathLike[str]) -> LocalControl:
    """The `LocalControl` of database `path` in this process (one per file)."""
    resolved = str(Path(path).resolve())
    return shared_plane(("local", resolved), lambda: LocalControl(resolved))  # type: ignore[return-value]
