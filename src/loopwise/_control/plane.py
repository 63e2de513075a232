"""What every control plane shares: kill requests, leases, runs attached here, the interface.

A run being executed holds a *lease* in the control plane (which process runs it,
refreshed by a heartbeat) and is *attached* to this process's watcher, which
delivers kill requests to it. A kill is first stored durably (so a watcher that
missed a notification still finds it on its next read of the stored kills), then
delivered: at once to a run in this process, by the watcher to runs in other
processes. The loop itself never polls for kills.

This module is the bottom of the control layer: the backends (`MemoryControl` here,
`_control.local.LocalControl`, `_control.redis.RedisControl`), the stores that
declare them (`EventStore.control_plane`) and the loop import it; it imports none of
them. Choosing a plane and `kill` are `_control.kill`'s.
"""

from __future__ import annotations

import asyncio
import getpass
import logging
import os
import socket
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Protocol

from .._errors import UserError

__all__ = [
    "HEARTBEAT_S",
    "HOST",
    "LEASE_GRACE_S",
    "LEASE_TTL_S",
    "ControlPlane",
    "Attachable",
    "KillRequest",
    "Lease",
    "LiveRun",
    "MemoryControl",
    "call_in_loop",
    "local_runs",
    "requester",
    "shared_plane",
]

_log = logging.getLogger("loopwise")

#: How often leases of running runs are refreshed.
HEARTBEAT_S = 2.0
#: A lease not refreshed for this long belongs to a process presumed dead.
LEASE_TTL_S = 15.0
#: An unfinished run without a lease whose last event is this recent is presumed running:
#: leases are written one to two polls after the run starts (`_control.local.POLL_S`), not when it starts.
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


class Attachable(Protocol):
    """A run executing in this process, as the control plane sees it: what `attach` takes.

    What a backend uses of it: `run_id`, `tags` and `deliver`. The loop's `Run` has the
    same three (so it is attached as it is); `LiveRun` is one for anything else to attach.
    """

    @property
    def run_id(self) -> str: ...

    @property
    def tags(self) -> tuple[str, ...]: ...

    def deliver(self, request: KillRequest) -> None:
        """Hand `request` to the run from any thread (once; later requests are ignored)."""


@dataclass(slots=True, eq=False)
class LiveRun:
    """An `Attachable` for anything but the loop's `Run`: delivers a kill to `on_kill`, in `loop`."""

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
_local_runs: dict[str, Attachable] = {}
_local_lock = threading.Lock()


def local_runs() -> list[Attachable]:
    with _local_lock:
        return list(_local_runs.values())




# Identifies this process's leases: host, pid, and a random part (pids are reused).
_OWNER = f"{HOST}:{os.getpid()}:{os.urandom(4).hex()}"


def _owner() -> str:
    # After a fork the child is another owner.
    global _OWNER
    if not _OWNER.startswith(f"{HOST}:{os.getpid()}:"):
        _OWNER = f"{HOST}:{os.getpid()}:{os.urandom(4).hex()}"
    return _OWNER

class ControlPlane(ABC):
    """Leases of running runs and durable kill requests, shared by processes.

    `attach`/`detach` are called on the event loop of the run and must not block:
    backends queue the I/O for their own thread. Everything else may block briefly
    (it is called by `kill`, the CLI and `resume`, not by the loop).
    """

    #: A short name for messages: ``"local"``, ``"memory"``, ``"redis"``.
    name: str = "?"

    def attach(self, run: Attachable) -> None:
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
    def _attach(self, run: Attachable) -> None: ...

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
        self._runs: dict[str, Attachable] = {}
        self._lock = threading.Lock()

    def _attach(self, run: Attachable) -> None:
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


# -- one plane per target and process ---------------------------------------------------

# Planes by target: ("local", resolved database path), ("redis", url).
_controls: dict[Hashable, ControlPlane] = {}
_controls_lock = threading.Lock()


def shared_plane(key: Hashable, make: Callable[[], ControlPlane]) -> ControlPlane:
    """The plane of this process for `key`, made by `make` the first time."""
    with _controls_lock:
        plane = _controls.get(key)
        if plane is None:
            plane = _controls[key] = make()
        return plane
