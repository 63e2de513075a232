"""The control plane: who is running what, and kill requests that reach them.

A run being executed holds a *lease* in the control plane (which process runs it,
refreshed by a heartbeat) and is *attached* to this process's watcher, which
delivers kill requests to it. A kill is first stored durably (so a watcher that
missed a notification still finds it on its next read of the stored kills), then
delivered: at once to a run in this process, by the watcher to runs in other
processes. The loop itself never polls for kills.

Backends:

- `LocalControl` (default): tables beside the event log in the SQLite database;
  reaches every process on this machine that uses the same file. Every kill also
  overwrites a small marker file beside the database (``<db>-lwkills``). While runs
  are attached, a timer on their event loop compares the marker's bytes (one
  `pread`, no thread switch) every `POLL_S`, and wakes this
  process's watcher thread only when there is work: the marker changed (it reads
  ``lw_kills`` then, one indexed query for all the runs), or leases to write or
  delete. The watcher also reads ``lw_kills`` every `QUERY_EVERY_S` whatever the
  marker says, and refreshes the leases every `HEARTBEAT_S` in one statement.
- `MemoryControl`: for a `MemoryStore`; this process only.
- `RedisControl` (``loopwise._control_redis``): `$LOOPWISE_REDIS_URL`; any machine.

Kills never touch the event log: the run writes its own end (`kill_received`, then
`run_finished` with stop reason `killed`), so the log keeps one writer per run.
"""

from __future__ import annotations

import asyncio
import getpass
import json
import logging
import os
import socket
import sqlite3
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ._errors import UserError, store_error
from ._storable import clean_text

if TYPE_CHECKING:
    from ._store import EventStore

__all__ = [
    "ControlPlane",
    "KillRequest",
    "Lease",
    "LiveRun",
    "LocalControl",
    "MemoryControl",
    "control_for",
    "kill",
    "requester",
    "run_status",
]

_log = logging.getLogger("loopwise")

#: How often the watcher looks for kill requests while runs are attached.
POLL_S = 0.02
#: The watcher reads ``lw_kills`` at least this often even when the kill marker did not
#: change: a kill whose marker write failed (the marker's permissions, or deleted at the
#: wrong moment), or from a loopwise that does not write it, is delivered this late.
QUERY_EVERY_S = 1.0
#: How often leases of running runs are refreshed.
HEARTBEAT_S = 2.0
#: A watcher with no run to watch for this long ends its thread (the next run starts one).
IDLE_EXIT_S = 10.0
#: A lease not refreshed for this long belongs to a process presumed dead.
LEASE_TTL_S = 15.0
#: An unfinished run without a lease whose last event is this recent is presumed running:
#: leases are written one to two polls after the run starts (`POLL_S`), not when it starts.
LEASE_GRACE_S = 2.0

HOST = socket.gethostname()


def requester() -> str:
    """Who is asking: ``user@host pid N`` (recorded with each kill)."""
    try:
        user = getpass.getuser()
    except Exception:  # noqa: BLE001 - no user name in some containers
        user = f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"
    return f"{user}@{HOST} pid {os.getpid()}"


@dataclass(frozen=True, slots=True)
class KillRequest:
    """A request to stop one run, as stored: why, by whom, when (wall-clock seconds)."""

    run_id: str
    reason: str
    by: str
    ts: float


@dataclass(frozen=True, slots=True)
class Lease:
    """A run's claim of being executed by a process, refreshed by its heartbeat."""

    run_id: str
    owner: str
    host: str
    pid: int
    tags: tuple[str, ...]
    acquired: float
    heartbeat: float

    def live(self, now: float | None = None) -> bool:
        """Whether the owner is presumed alive: a recent heartbeat, and (on this host) its pid exists."""
        if self.host == HOST and not _pid_alive(self.pid):
            return False
        return (time.time() if now is None else now) - self.heartbeat < LEASE_TTL_S


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    # A zombie (dead, not yet reaped by its parent) still has a pid: it is dead to us.
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            return f.read().split(b") ", 1)[1][:1] != b"Z"
    except (OSError, IndexError):
        return True


@dataclass(slots=True, eq=False)
class LiveRun:
    """A run executing in this process, as the control plane sees it.

    What a backend uses of it: `run_id`, `tags` and `deliver`. The loop's `Run` has the
    same three (so it is attached as it is); this class is for anything else to attach.
    """

    run_id: str
    tags: tuple[str, ...]
    #: Called in the run's event loop thread with the request.
    on_kill: Callable[[KillRequest], None]
    loop: asyncio.AbstractEventLoop | None = None
    #: Kill requests stored before this (wall-clock seconds) were for an earlier segment of
    #: the run (before a resume took its lease): they are not delivered again.
    since: float = 0.0
    delivered: bool = field(default=False)

    def deliver(self, request: KillRequest) -> None:
        """Hand `request` to the run from any thread (once; later requests are ignored)."""
        if self.delivered or request.ts < self.since:
            return
        self.delivered = True
        call_in_loop(self.loop, self.on_kill, request)


def call_in_loop(loop: asyncio.AbstractEventLoop | None, fn: Callable[[KillRequest], None],
                 request: KillRequest) -> None:
    """`fn(request)` in `loop`'s thread, from any thread (at once when there is no loop)."""
    if loop is None:
        fn(request)
        return
    try:
        loop.call_soon_threadsafe(fn, request)
    except RuntimeError:  # the loop is closed: the run is over
        pass


# Runs executing in this process, by id, whatever their backend: the fast path for a
# kill issued here, and what a shutdown signal stops.
_local_runs: dict[str, LiveRun] = {}
_local_lock = threading.Lock()


def local_runs() -> list[LiveRun]:
    with _local_lock:
        return list(_local_runs.values())


class ControlPlane(ABC):
    """Leases of running runs and durable kill requests, shared by processes.

    `attach`/`detach` are called on the event loop of the run and must not block:
    backends queue the I/O for their own thread. Everything else may block briefly
    (it is called by `kill`, the CLI and `resume`, not by the loop).
    """

    #: A short name for messages: ``"local"``, ``"memory"``, ``"redis"``.
    name: str = "?"

    def attach(self, run: LiveRun) -> None:
        """Start delivering kills for `run` here and take its lease (without blocking)."""
        with _local_lock:
            _local_runs[run.run_id] = run
        self._attach(run)

    def detach(self, run_id: str) -> None:
        """Stop delivering kills for `run_id` and release its lease (without blocking)."""
        with _local_lock:
            _local_runs.pop(run_id, None)
        self._detach(run_id)

    @abstractmethod
    def _attach(self, run: LiveRun) -> None: ...

    @abstractmethod
    def _detach(self, run_id: str) -> None: ...

    @abstractmethod
    def acquire(self, run_id: str, tags: Iterable[str]) -> None:
        """Take the lease of `run_id` now (blocking), for `resume`.

        Raises:
            UserError: another live process holds it.
        """

    @abstractmethod
    def leases(self, run_ids: Iterable[str] | None = None) -> dict[str, Lease]:
        """The leases held (live or not) for `run_ids`, or all of them."""

    @abstractmethod
    def record_kills(self, requests: list[KillRequest]) -> None:
        """Store `requests` durably; watchers in every process deliver them."""

    @abstractmethod
    def pending_kill(self, run_id: str) -> KillRequest | None:
        """The latest stored kill request of `run_id`, if any.

        For inspection (and tests): the loop does not poll it; a kill reaches a run
        through the plane's watcher, which calls the run's `deliver`.
        """

    def record_broadcast(self, tag: str | None, request: KillRequest) -> None:  # noqa: B027 - optional hook
        """Also stop the runs (every one, or those with `tag`) attached before `request.ts`, leased or not.

        For a backend whose leases lag behind its runs: `LocalControl` writes a run's lease
        a poll or two after the run starts, so `kill(tag=...)` cannot name the youngest
        runs of other processes; it stores one row their watchers match. The default
        does nothing (`request.run_id` is unused).
        """

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release resources (threads, connections)."""

    def describe(self) -> str:
        return self.name


# -- in memory ------------------------------------------------------------------------


class MemoryControl(ControlPlane):
    """The control plane of a `MemoryStore`: this process only."""

    name = "memory"

    def __init__(self) -> None:
        self._leases: dict[str, Lease] = {}
        self._kills: dict[str, KillRequest] = {}
        self._runs: dict[str, LiveRun] = {}
        self._lock = threading.Lock()

    def _attach(self, run: LiveRun) -> None:
        now = time.time()
        with self._lock:
            self._runs[run.run_id] = run
            self._leases[run.run_id] = Lease(run.run_id, _OWNER, HOST, os.getpid(), run.tags, now, now)

    def _detach(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            self._leases.pop(run_id, None)

    def acquire(self, run_id: str, tags: Iterable[str]) -> None:
        with self._lock:
            if run_id in self._runs:
                raise UserError(f"run {run_id} is being executed in this process; it cannot be resumed twice")

    def leases(self, run_ids: Iterable[str] | None = None) -> dict[str, Lease]:
        now = time.time()
        with self._lock:
            leases = {k: Lease(v.run_id, v.owner, v.host, v.pid, v.tags, v.acquired, now)
                      for k, v in self._leases.items()}
        if run_ids is None:
            return leases
        return {r: leases[r] for r in run_ids if r in leases}

    def record_kills(self, requests: list[KillRequest]) -> None:
        with self._lock:
            for r in requests:
                self._kills[r.run_id] = r
            targets = [(self._runs.get(r.run_id), r) for r in requests]
        for run, request in targets:
            if run is not None:
                run.deliver(request)

    def pending_kill(self, run_id: str) -> KillRequest | None:
        with self._lock:
            return self._kills.get(run_id)


# -- local: the SQLite database -------------------------------------------------------

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


# Identifies this process's leases: host, pid, and a random part (pids are reused).
_OWNER = f"{HOST}:{os.getpid()}:{os.urandom(4).hex()}"


def _owner() -> str:
    # After a fork the child is another owner.
    global _OWNER
    if not _OWNER.startswith(f"{HOST}:{os.getpid()}:"):
        _OWNER = f"{HOST}:{os.getpid()}:{os.urandom(4).hex()}"
    return _OWNER


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


def marker_path(db: Path) -> Path:
    """The kill marker of database `db`: 8 bytes that every `record_kills` overwrites after its commit."""
    return db.with_name(db.name + "-lwkills")


_MARKER_SIZE = 8
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)


def _marker_mode(db: Path) -> int:
    # The database's permissions, as SQLite gives its -wal and -shm files: whoever may
    # store a kill may signal it.
    try:
        return os.stat(db).st_mode & 0o666
    except OSError:
        return 0o644


def _bump_marker(db: Path) -> None:
    """Tell the watchers of every process on `db` that ``lw_kills`` has new rows (best effort).

    Fresh random bytes, written in place: whatever another killer writes at the same
    time, the marker ends up different from what any watcher saw before either write
    (a collision is a 2**-64 chance, and `QUERY_EVERY_S` catches even that). Never
    truncated or appended to: a watcher reads its first 8 bytes. A marker that cannot
    be written only slows delivery to `QUERY_EVERY_S`: the request is already stored.
    """
    path = marker_path(db)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | _CLOEXEC, _marker_mode(db))
        try:
            if hasattr(os, "pwrite"):
                os.pwrite(fd, os.urandom(_MARKER_SIZE), 0)
            else:  # Windows
                os.write(fd, os.urandom(_MARKER_SIZE))
        finally:
            os.close(fd)
    except OSError as exc:
        _log.debug("loopwise control plane (%s): cannot signal the kill through %s (%s); watchers "
                   "read it within %g s", db, path, exc, QUERY_EVERY_S)


class _Marker:
    """The kill marker, open: its bytes read with `pread`, and its (device, inode).

    Not a memory map: a map of a file someone empties faults (SIGBUS) at the next read
    and kills the process; a read of it is short, which counts as a change.
    """

    __slots__ = ("fd", "id")

    def __init__(self, fd: int, id: tuple[int, int]) -> None:
        self.fd = fd
        self.id = id

    def read(self) -> bytes | None:
        try:
            return os.pread(self.fd, _MARKER_SIZE, 0)
        except OSError:  # (closed meanwhile)
            return None

    def close(self) -> None:
        try:
            os.close(self.fd)
        except OSError:
            pass


def _open_marker(db: Path) -> _Marker | None:
    """The kill marker of `db`, open for reading (created if missing).

    None where it cannot be: the watcher then reads ``lw_kills`` at every poll.
    """
    path = marker_path(db)
    try:
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | _CLOEXEC, _marker_mode(db))
        except PermissionError:  # another user's marker: watch it all the same
            fd = os.open(path, os.O_RDONLY | _CLOEXEC)
        try:
            st = os.fstat(fd)
            if st.st_size < _MARKER_SIZE:
                # Only ever grown (a killer's write may land first; it is kept).
                os.ftruncate(fd, _MARKER_SIZE)
                if hasattr(os, "fchmod"):
                    try:
                        os.fchmod(fd, _marker_mode(db))
                    except OSError:
                        pass
        except BaseException:
            os.close(fd)
            raise
        return _Marker(fd, (st.st_dev, st.st_ino))
    except OSError as exc:
        _log.debug("loopwise control plane (%s): cannot open the kill marker %s (%s); polling the "
                   "database instead", db, path, exc)
        return None


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
        self._runs: dict[str, LiveRun] = {}
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
        self._fresh: list[LiveRun] = []
        self._aging: list[LiveRun] = []
        self._to_lease: list[LiveRun] = []
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

    def _attach(self, run: LiveRun) -> None:
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
                    part = lease[i:i + 400]
                    conn.execute("INSERT OR REPLACE INTO lw_leases (run_id, owner, host, pid, tags, acquired, "
                                 f"heartbeat) VALUES {','.join(['(?,?,?,?,?,?,?)'] * len(part))}",
                                 [v for r in part
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
            targets: list[tuple[LiveRun | None, str, tuple]] = []
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


# -- choosing a backend ---------------------------------------------------------------

_controls: dict[Any, ControlPlane] = {}
_controls_lock = threading.Lock()


def control_for(store: EventStore, control: ControlPlane | str | None = None) -> ControlPlane:
    """The control plane for runs logged in `store`.

    `control` wins (a `ControlPlane`, or a ``redis://`` URL); then `$LOOPWISE_REDIS_URL`;
    then the store's own: `LocalControl` on an SQLite file, `MemoryControl` for a
    `MemoryStore`. One instance per target and process.
    """
    if isinstance(control, ControlPlane):
        return control
    if control is not None and not isinstance(control, str):
        raise UserError(f"control must be a redis:// URL or a control plane, got {type(control).__name__}")
    url = control or os.environ.get("LOOPWISE_REDIS_URL") or None
    if url:
        key: Any = ("redis", url)
    else:
        path = getattr(store, "path", None)
        key = ("local", str(Path(path).resolve())) if path is not None else ("memory", id(store))
    with _controls_lock:
        plane = _controls.get(key)
        if plane is None:
            if key[0] == "redis":
                plane = _redis_control(url)  # type: ignore[arg-type]
            elif key[0] == "local":
                plane = LocalControl(key[1])
            else:
                plane = getattr(store, "_control", None)
                if plane is None:
                    plane = MemoryControl()
                    store._control = plane  # type: ignore[attr-defined]
            _controls[key] = plane
        return plane


def _redis_control(url: str) -> ControlPlane:
    if not url.startswith(("redis://", "rediss://", "unix://")):
        raise UserError(f"the control plane URL must start with redis://, rediss:// or unix://, got {url!r}")
    try:
        from ._control_redis import RedisControl
    except ImportError as exc:
        if getattr(exc, "name", "") == "redis":
            raise UserError("the Redis control plane needs the redis package: pip install 'loopwise[redis]'") from None
        raise
    return RedisControl(url)


# -- kill ----------------------------------------------------------------------------


def kill(
    run_id: str | None = None,
    *,
    tag: str | None = None,
    all: bool = False,  # noqa: A002 - the contract's name
    reason: str | None = None,
    store: EventStore | None = None,
    control: ControlPlane | str | None = None,
) -> int:
    """Stop a run (by id), the runs with a tag, or all runs, from any process.

    Returns how many runs were signalled, once the request is durably stored. The
    runs stop within milliseconds, cancelling their in-flight model call and tool
    calls, and end with stop reason ``killed`` and this reason in their log.

    A finished run is a no-op (0, and a log line says so); so is a run whose process
    died (resume it instead). An unknown run id raises `UserError`. A tag or `all`
    reaches the runs running at that moment, in every process; the count leaves out
    runs of other processes younger than a few tens of milliseconds (no lease yet),
    which the local control plane stops all the same.

    Args:
        run_id: The run to stop.
        tag: Stop every running run with this tag.
        all: Stop every running run.
        reason: Why (recorded in each run's log with who asked).
        store: The event store the runs write to (default: the default SQLite store).
        control: The control plane (default: `$LOOPWISE_REDIS_URL`, else the store's).
    """
    chosen = sum((run_id is not None, tag is not None, bool(all)))
    if chosen != 1:
        raise UserError("kill needs exactly one of: a run id, tag=..., or all=True")
    if run_id is not None and (not isinstance(run_id, str) or not run_id):
        raise UserError(f"run_id must be a non-empty str, got {run_id!r}")
    if tag is not None and (not isinstance(tag, str) or not tag):
        raise UserError(f"tag must be a non-empty str, got {tag!r}")
    if reason is not None and not isinstance(reason, str):
        raise UserError(f"reason must be a str, got {type(reason).__name__}")
    if reason is not None and (fixed := clean_text(reason)) is not None:
        reason = fixed  # text UTF-8 cannot encode: U+FFFD, as in the runs' logs (`_storable`)
    if tag is not None and (fixed := clean_text(tag)) is not None:
        tag = fixed  # (as the runs' tags were stored)
    if store is None:
        from ._agent import _default_store

        store = _default_store()
    plane = control_for(store, control)
    by = requester()
    now = time.time()
    text = reason.strip() if reason and reason.strip() else "no reason given"
    if run_id is not None:
        targets = [run_id] if _running(run_id, store, plane) else []
    else:
        with _local_lock:
            local = {r.run_id for r in _local_runs.values() if tag is None or tag in r.tags}
        now_live = time.time()
        me = _owner()
        remote = {lease.run_id for lease in plane.leases().values()
                  if lease.live(now_live) and lease.owner != me and (tag is None or tag in lease.tags)}
        targets = sorted(local | remote)
    if run_id is None:
        # The runs of other processes too young to hold a lease yet: their watchers match this.
        plane.record_broadcast(tag, KillRequest("", text, by, now))
    requests = [KillRequest(t, text, by, now) for t in targets]
    plane.record_kills(requests)
    # Runs in this process hear of it at once; others through their watcher.
    with _local_lock:
        here = [(_local_runs.get(r.run_id), r) for r in requests]
    for run, request in here:
        if run is not None:
            run.deliver(request)
    return len(requests)


def run_status(run_id: str, store: EventStore, plane: ControlPlane) -> str:
    """``running``, ``orphaned`` (its process ended without finishing it), or ``finished:REASON``.

    Raises:
        UserError: no such run.
    """
    with _local_lock:
        if run_id in _local_runs:
            return "running"
    lease = plane.leases([run_id]).get(run_id)
    if lease is not None and lease.live() and lease.owner != _owner():
        return "running"  # (a lease of ours for a run not running here is being released)
    if not store.has_run(run_id):
        if lease is not None:
            return "orphaned"  # a lease without a log: its process died before the first commit
        raise UserError(f"no run with id {run_id!r} in {store.describe()}; `loopwise runs` lists the runs there")
    events = store.load(run_id)
    last = events[-1] if events else None
    if last is not None and last.kind == "run_finished":
        return f"finished:{last.stop_reason}"  # type: ignore[union-attr]
    if lease is None and last is not None and time.time() - last.ts < LEASE_GRACE_S:
        return "running"  # its process writes leases at its next poll: a kill still reaches it
    return "orphaned"


def _running(run_id: str, store: EventStore, plane: ControlPlane) -> bool:
    """Whether `run_id` is running now (so a kill can reach it); False with a log line if it is not."""
    status = run_status(run_id, store, plane)
    if status.startswith("finished:"):
        _log.info("run %s already finished (%s); nothing to kill", run_id, status.partition(":")[2])
    elif status == "orphaned":
        _log.warning("run %s is not running: its process ended without finishing it (orphaned); resume it "
                     "with `loopwise resume %s --agent MODULE:AGENT`", run_id, run_id)
    return status == "running"
