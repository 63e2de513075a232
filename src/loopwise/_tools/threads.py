"""Daemon worker threads for sync tools, abandoned (not waited for) on timeout.

Python cannot stop a thread. When a sync tool's call is cancelled — its timeout
expired, or the run was killed — the awaiting task returns at once and the thread
is *abandoned*: it runs on detached, its eventual result is discarded, and
`on_abandon` is told about it so the loop can record the leak as an event.

Why not `anyio.to_thread.run_sync(..., abandon_on_cancel=True)`:

- anyio's worker threads are not daemon threads, so one abandoned 60 s tool
  holds the whole process at exit for a minute;
- abandoning frees anyio's limiter slot, so each timeout can add a thread and
  the pool does not stay bounded.

Here `max_workers` bounds the calls that are running and still awaited;
`max_abandoned` bounds the calls that were abandoned and have not finished yet.
Once that many are stuck, `run` fails at once with `PoolExhaustedError` rather
than leak another thread. So the pool never holds more than
`max_workers + max_abandoned` busy threads. Idle workers exit after
`idle_timeout` seconds: an unused pool costs nothing.

```python
pool = default_pool()
with anyio.fail_after(5):
    rows = await pool.run(functools.partial(query_db, sql), label="query_db")
```

Only the asyncio backend is supported: the result travels from the thread to
the loop with `loop.call_soon_threadsafe`.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import itertools
import logging
import threading
import time
import weakref
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal, TypeVar

from .._errors import LoopwiseError

__all__ = ["AbandonedThread", "DaemonThreadPool", "PoolExhaustedError", "busy", "default_pool"]

T = TypeVar("T")

_log = logging.getLogger("loopwise")


@dataclass(kw_only=True, slots=True, frozen=True)
class AbandonedThread:
    """A sync call whose awaiting task was cancelled while its thread kept running."""

    label: str
    thread_name: str
    #: Wall-clock time (`time.time()`) the call started running in its thread.
    started_at: float
    #: Wall-clock time the call was abandoned.
    abandoned_at: float


class PoolExhaustedError(LoopwiseError, RuntimeError):
    """Too many abandoned sync calls are still running; no thread is started for another."""


class _Waiter:
    """A call waiting for a worker slot. `granted` is set under the pool's lock."""

    __slots__ = ("future", "granted", "loop")

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.future: asyncio.Future[None] = loop.create_future()
        self.granted = False


class _Job:
    __slots__ = ("fn", "future", "label", "loop", "started_at", "state", "thread_name")

    def __init__(self, fn: Callable[[], Any], loop: asyncio.AbstractEventLoop, label: str) -> None:
        self.fn = fn
        self.loop = loop
        self.future: asyncio.Future[tuple[bool, Any]] = loop.create_future()
        self.label = label
        self.state: Literal["running", "done", "abandoned"] = "running"
        self.thread_name = ""
        self.started_at = 0.0


class _Handoff:
    """An idle worker waiting for its next job."""

    __slots__ = ("event", "job", "thread_name")

    def __init__(self, thread_name: str) -> None:
        self.event = threading.Event()
        self.job: _Job | None = None
        self.thread_name = thread_name


def _set_once(future: asyncio.Future[Any], value: Any) -> None:
    if not future.done():
        future.set_result(value)


def _label(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _running_loop() -> asyncio.AbstractEventLoop:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        raise RuntimeError(
            "DaemonThreadPool.run needs a running asyncio event loop; "
            "the trio backend is not supported for sync tools"
        ) from None


class DaemonThreadPool:
    """A bounded pool of daemon threads for sync tools; see the module docstring.

    Args:
        max_workers: Most calls running at once (not counting abandoned ones);
            more calls wait their turn.
        max_abandoned: Most abandoned calls still running before `run` raises
            `PoolExhaustedError`.
        idle_timeout: Seconds an idle worker waits for work before it exits.
        name: Prefix of the worker threads' names.
    """

    def __init__(
        self,
        *,
        max_workers: int = 32,
        max_abandoned: int = 64,
        idle_timeout: float = 10.0,
        name: str = "loopwise-tool",
    ) -> None:
        if max_workers < 1:
            raise ValueError(f"max_workers must be at least 1, got {max_workers}")
        if max_abandoned < 1:
            raise ValueError(f"max_abandoned must be at least 1, got {max_abandoned}")
        self.max_workers = max_workers
        self.max_abandoned = max_abandoned
        self.idle_timeout = idle_timeout
        self.name = name
        self._lock = threading.Lock()
        self._running = 0  # slots held: calls running (or about to), not abandoned
        self._abandoned = 0  # abandoned calls whose thread has not finished
        self._waiters: deque[_Waiter] = deque()
        self._idle: list[_Handoff] = []  # a stack: the most recently idle worker is reused first
        self._counter = itertools.count(1)
        _pools.add(self)

    def __repr__(self) -> str:
        return (
            f"<DaemonThreadPool {self.name!r} running={self._running}/{self.max_workers} "
            f"abandoned={self._abandoned}/{self.max_abandoned} idle={len(self._idle)}>"
        )

    @property
    def running(self) -> int:
        """Calls running now and still awaited."""
        return self._running

    @property
    def abandoned(self) -> int:
        """Abandoned calls whose thread is still running."""
        return self._abandoned

    @property
    def idle(self) -> int:
        """Worker threads waiting for work."""
        return len(self._idle)

    async def run(
        self,
        fn: Callable[[], T],
        *,
        label: str | None = None,
        on_abandon: Callable[[AbandonedThread], None] | None = None,
    ) -> T:
        """Run `fn()` in a worker thread and return its result (or raise its exception).

        The call runs in a copy of the caller's context (context variables), as
        with `anyio.to_thread.run_sync`. If the awaiting task is cancelled while
        `fn` runs, the thread is abandoned: this raises the cancellation at once,
        and `on_abandon` (called in the event loop's thread) gets the details.

        Raises:
            PoolExhaustedError: `max_abandoned` abandoned calls are still running.
        """
        loop = _running_loop()
        label = label or _label(fn)
        await self._acquire(loop, label)
        ctx = contextvars.copy_context()
        job = _Job(functools.partial(ctx.run, fn), loop, label)
        self._dispatch(job)
        try:
            ok, value = await job.future
        except BaseException:
            with self._lock:
                abandon = job.state == "running"
                if abandon:
                    job.state = "abandoned"
                    self._abandoned += 1
                    self._release_locked()
            if abandon and on_abandon is not None:
                info = AbandonedThread(
                    label=label,
                    thread_name=job.thread_name,
                    started_at=job.started_at,
                    abandoned_at=time.time(),
                )
                try:
                    on_abandon(info)
                except Exception:  # noqa: BLE001 - a hook must not replace the cancellation in flight
                    _log.exception("on_abandon hook failed for sync tool %r", label)
            raise
        if ok:
            return value
        try:
            raise value
        finally:
            del value

    # -- slots ---------------------------------------------------------------

    def _exhausted_locked(self, label: str) -> PoolExhaustedError | None:
        if self._abandoned < self.max_abandoned:
            return None
        return PoolExhaustedError(
            f"cannot run sync tool {label!r}: {self._abandoned} sync tool calls are still running "
            f"after being abandoned on timeout or cancellation (limit max_abandoned="
            f"{self.max_abandoned}); make the tool async, fix the hang, or use isolation='process'"
        )

    async def _acquire(self, loop: asyncio.AbstractEventLoop, label: str) -> None:
        with self._lock:
            error = self._exhausted_locked(label)
            if error is not None:
                raise error
            if self._running < self.max_workers and not self._waiters:
                self._running += 1
                return
            waiter = _Waiter(loop)
            self._waiters.append(waiter)
        try:
            await waiter.future
        except BaseException:
            with self._lock:
                if waiter.granted:
                    self._release_locked()
                else:
                    self._waiters.remove(waiter)
            raise
        with self._lock:
            error = self._exhausted_locked(label)
            if error is not None:
                self._release_locked()
                raise error

    def _release_locked(self) -> None:
        """Give a slot to the next waiter, or free it."""
        while self._waiters:
            waiter = self._waiters.popleft()
            try:
                waiter.loop.call_soon_threadsafe(_set_once, waiter.future, None)
            except RuntimeError:  # that waiter's loop is closed: it will never resume
                continue
            waiter.granted = True
            return
        self._running -= 1

    # -- workers -------------------------------------------------------------

    def _dispatch(self, job: _Job) -> None:
        job.started_at = time.time()
        with self._lock:
            if self._idle:
                handoff = self._idle.pop()
                job.thread_name = handoff.thread_name
                handoff.job = job
                handoff.event.set()
                return
            job.thread_name = f"{self.name}-{next(self._counter)}"
        thread = threading.Thread(target=self._work, args=(job,), name=job.thread_name, daemon=True)
        try:
            thread.start()
        except BaseException:
            with self._lock:
                self._release_locked()
            raise

    def _work(self, job: _Job | None) -> None:
        while job is not None:
            try:
                outcome: tuple[bool, Any] = (True, job.fn())
            except BaseException as exc:  # noqa: BLE001 - everything goes back to the caller
                outcome = (False, exc)
            name = job.thread_name
            with self._lock:
                if job.state == "abandoned":
                    # Nobody waits for this result. The thread leaves rather than go
                    # idle: it no longer holds a slot, so it is not the pool's to keep.
                    self._abandoned -= 1
                    return
                job.state = "done"
                # Free the slot and go idle before the caller sees the result, so the
                # next call (or a look at the stats) finds this worker ready.
                self._release_locked()
                handoff = _Handoff(name)
                self._idle.append(handoff)
                try:
                    job.loop.call_soon_threadsafe(_set_once, job.future, outcome)
                except RuntimeError:  # the loop closed under a running call
                    pass
            del job, outcome
            handoff.event.wait(self.idle_timeout)
            with self._lock:
                job = handoff.job
                if job is None:
                    self._idle.remove(handoff)


_pools: weakref.WeakSet[DaemonThreadPool] = weakref.WeakSet()


def busy() -> bool:
    """Whether a call is running in any pool's thread and still awaited (not abandoned).

    A `FakeClock` does not jump its event loop's time ahead while one is: the thread
    runs in real time. Read under each pool's lock: a worker frees its slot and hands
    its result to the loop in one step, so a False here means the result, if any, is
    already in the loop's wake-up pipe.
    """
    for pool in list(_pools):
        with pool._lock:
            if pool._running:
                return True
    return False


_default_pool: DaemonThreadPool | None = None
_default_lock = threading.Lock()


def default_pool() -> DaemonThreadPool:
    """The process-wide pool sync tools run in."""
    global _default_pool
    if _default_pool is None:
        with _default_lock:
            if _default_pool is None:
                _default_pool = DaemonThreadPool()
    return _default_pool
