"""The control plane: who is running what, and kill requests that reach them.

A run being executed holds a *lease* in the control plane (which process runs it,
refreshed by a heartbeat) and is *attached* to this process's watcher, which
delivers kill requests to it. A kill is first stored durably (so a run can read it
between iterations even if a notification was lost), then delivered: at once to a
run in this process, by the watcher to runs in other processes.

Backends:

- `LocalControl` (default): tables beside the event log in the SQLite database;
  reaches every process on this machine that uses the same file. A watcher thread
  per process polls for new kill requests every `POLL_S` while runs are attached
  (one indexed query for all of them), and refreshes their leases every
  `HEARTBEAT_S` in one statement.
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

from ._errors import UserError

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
#: How often leases of running runs are refreshed.
HEARTBEAT_S = 2.0
#: A watcher with no run to watch for this long ends its thread (the next run starts one).
IDLE_EXIT_S = 10.0
#: A lease not refreshed for this long belongs to a process presumed dead.
LEASE_TTL_S = 15.0
#: An unfinished run without a lease whose last event is this recent is presumed running:
#: leases are written at the watcher's next poll, not when the run starts.
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
        """The latest stored kill request of `run_id`, if any (the check between iterations)."""

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
    ts REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS lw_kills_run ON lw_kills (run_id, id);
"""

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
    return conn


class LocalControl(ControlPlane):
    """The control plane in the SQLite database of the event log (tables ``lw_leases``, ``lw_kills``).

    One per database file and process (`control_for` caches it). Attaching a run queues
    its lease for the watcher thread, which writes leases, refreshes heartbeats and
    polls for kill requests off the event loop.
    """

    name = "local"

    def __init__(self, path: str | os.PathLike[str]) -> None:
        self.path = Path(path)
        self._lock = threading.Lock()
        self._conn = _connect(self.path)  # for blocking calls (kill, resume, views); under _lock
        with self._lock:
            self._conn.executescript(_SCHEMA)
        self._runs: dict[str, LiveRun] = {}
        self._to_attach: list[LiveRun] = []
        self._to_detach: list[str] = []
        self._wake = threading.Event()
        self._idle = True  # the watcher waits for a first run (not polling)
        self._thread: threading.Thread | None = None
        self._last_kill_id = 0
        # Leases this process has written and not deleted yet (the watcher's, and `acquire`'s).
        self._written: set[str] = set()

    def describe(self) -> str:
        return f"local ({self.path})"

    # -- the run's side: never blocks ---------------------------------------------

    def _attach(self, run: LiveRun) -> None:
        with self._lock:
            self._runs[run.run_id] = run
            self._to_attach.append(run)
            if self._thread is None or not self._thread.is_alive():
                # Kill requests stored from now on are for us; older ones are history.
                row = self._conn.execute("SELECT COALESCE(MAX(id), 0) FROM lw_kills").fetchone()
                self._last_kill_id = row[0]
                self._thread = threading.Thread(target=self._watch, name=f"loopwise-control-{self.path.name}",
                                                daemon=True)
                self._thread.start()
            idle = self._idle
        if idle:  # otherwise the watcher takes it at its next poll, with others: one transaction
            self._wake.set()

    def _detach(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            self._to_detach.append(run_id)

    # -- the watcher thread -------------------------------------------------------

    def _watch(self) -> None:
        conn = _connect(self.path)
        next_beat = time.monotonic() + HEARTBEAT_S
        while True:
            try:
                self._tick(conn)
                now = time.monotonic()
                if now >= next_beat:
                    conn.execute("UPDATE lw_leases SET heartbeat = ? WHERE owner = ?", (time.time(), _owner()))
                    next_beat = now + HEARTBEAT_S
            except sqlite3.Error as exc:  # a locked or vanished database: say so, keep trying
                _log.warning("loopwise control plane (%s): %s; retrying", self.path, exc)
                time.sleep(0.2)
            with self._lock:
                idle = self._idle = not self._runs and not self._to_attach and not self._to_detach
                self._wake.clear()
            woken = self._wake.wait(IDLE_EXIT_S if idle else POLL_S)
            if idle and not woken:
                with self._lock:
                    if not self._runs and not self._to_attach and not self._to_detach:
                        # Nothing to watch for a while: end the thread (the next run starts one).
                        self._thread = None
                        conn.close()
                        return

    def _tick(self, conn: sqlite3.Connection) -> None:
        with self._lock:
            attach, self._to_attach = self._to_attach, []
            detach, self._to_detach = self._to_detach, []
            watching = bool(self._runs)
            # A run that came and went within one poll never needed a lease: nobody could
            # have looked for it yet (kills for it were delivered all the same).
            gone = set(detach)
            attach = [r for r in attach if r.run_id not in gone]
            detach = [run_id for run_id in detach if run_id in self._written]
            self._written.update(r.run_id for r in attach)
            self._written.difference_update(detach)
        if attach or detach:
            now = time.time()
            owner = _owner()
            pid = os.getpid()
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany(
                    "INSERT OR REPLACE INTO lw_leases (run_id, owner, host, pid, tags, acquired, heartbeat) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?)",
                    [(r.run_id, owner, HOST, pid, json.dumps(list(r.tags)), now, now) for r in attach],
                )
                conn.executemany("DELETE FROM lw_leases WHERE run_id = ? AND owner = ?",
                                 [(run_id, owner) for run_id in detach])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        if watching:
            rows = conn.execute("SELECT id, run_id, reason, by, ts FROM lw_kills WHERE id > ? ORDER BY id",
                                (self._last_kill_id,)).fetchall()
            if rows:
                self._last_kill_id = rows[-1][0]
                with self._lock:
                    targets = [(self._runs.get(r[1]), r) for r in rows]
                for run, r in targets:
                    if run is not None:
                        run.deliver(KillRequest(r[1], r[2], r[3], r[4]))

    # -- blocking calls -------------------------------------------------------------

    def acquire(self, run_id: str, tags: Iterable[str]) -> None:
        now = time.time()
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT run_id, owner, host, pid, tags, acquired, heartbeat FROM lw_leases "
                                   "WHERE run_id = ?", (run_id,)).fetchone()
                if row is not None:
                    lease = _lease(row)
                    if lease.live(now):
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
                self._written.add(run_id)
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def leases(self, run_ids: Iterable[str] | None = None) -> dict[str, Lease]:
        sql = "SELECT run_id, owner, host, pid, tags, acquired, heartbeat FROM lw_leases"
        with self._lock:
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
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                conn.executemany("INSERT INTO lw_kills (run_id, reason, by, ts) VALUES (?, ?, ?, ?)",
                                 [(r.run_id, r.reason, r.by, r.ts) for r in requests])
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise

    def pending_kill(self, run_id: str) -> KillRequest | None:
        with self._lock:
            row = self._conn.execute("SELECT run_id, reason, by, ts FROM lw_kills WHERE run_id = ? "
                                     "ORDER BY id DESC LIMIT 1", (run_id,)).fetchone()
        return None if row is None else KillRequest(*row)

    def close(self) -> None:
        with self._lock:
            self._conn.close()


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
    reaches the runs running at that moment.

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
