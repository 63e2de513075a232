"""`FakeClock`: time that moves when a test says so, or when nothing else can happen.

A fake clock gives a run deterministic time, ids and random numbers: wall time is
`start` plus the fake time elapsed, run ids and backoff jitter come from generators
seeded with `seed`. While a run of its agent is on an asyncio event loop, it also
drives that loop's time (as trio's ``MockClock(autojump_threshold=0)`` drives trio's,
and the ``looptime`` project asyncio's): ``loop.time()`` reads the fake time, and
when the loop would block until its next timer with nothing ready (no callback, no
I/O), the fake time jumps to that timer instead of waiting for it. So a 30 s deadline
over a tool that sleeps 60 s fires at once in real time, at fake time +30 s; so do
backoff waits, a breaker's cool-down, and any ``asyncio.sleep`` of an async tool or
fake model.

Threads keep real time. A sync tool (or sync `FunctionModel` function) runs in
loopwise's worker threads, and ``loop.run_in_executor`` (``asyncio.to_thread``) in the
loop's executor: while any such call is in flight the fake clock does not jump (a
tool's timeout would otherwise fire before its thread ran); the loop waits for real,
and the fake time moves by the real time that passed. Threads loopwise cannot see
(``anyio.to_thread``, a thread of your own) and real network I/O do not stop a jump:
a fake clock is for fakes.

How: `install` (refcounted, by each run of the agent) puts the clock's reading in
place of the loop's ``time`` and wraps its selector's ``select(timeout)``; `uninstall`
by the last run restores both. The loop's time under the clock is the clock's own
(`monotonic()` plus a constant fixed at its first install), continuous from one run to
the next, so what a breaker measured in one run holds in the next, and an `advance`
between runs counts. Pending timers move with each switch between the loop's real
clock and the fake one, each keeping the time it had left. The default event loops on
Linux and macOS (selector loops) can be driven; uvloop and Windows' proactor loop
cannot.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import heapq
import math
import random
import time
import weakref
from collections.abc import Callable
from typing import Any

from .._tools import threads as _threads
from .clock import Clock, driven
from .._errors import UserError

__all__ = ["FakeClock"]

#: Where a fake clock's wall time starts by default: 2025-01-01T00:00:00Z.
DEFAULT_START = 1_735_689_600.0


def _epoch(start: object) -> float:
    if isinstance(start, dt.datetime):
        if start.tzinfo is None:
            raise UserError(f"FakeClock(start={start!r}) is a naive datetime; give it a timezone, "
                            "e.g. datetime(2025, 1, 1, tzinfo=timezone.utc)")
        return start.timestamp()
    if isinstance(start, bool) or not isinstance(start, (int, float)) or not math.isfinite(start):
        raise UserError(f"FakeClock(start={start!r}) must be seconds since the epoch or an aware datetime")
    return float(start)


class FakeClock(Clock):
    """A clock for tests: fake wall and monotonic time, seeded ids and random numbers.

    Args:
        start: The wall time it starts at: seconds since the epoch, or an aware
            `datetime` (default: 2025-01-01T00:00:00Z).
        seed: Seeds the run ids and `random()` (backoff jitter): two runs under clocks
            with the same seed get the same ids and waits.

    ```python
    from loopwise.testing import FakeClock

    clock = FakeClock(seed=1)
    clock.advance(30)
    print(clock.monotonic())
    #> 30.0
    ```

    Pass it as ``Agent(clock=...)``. While a run of that agent is on an event loop the
    clock drives the loop's time, and the loop's waits jump ahead when nothing else can
    happen (see the module docstring), except while a sync tool's thread is running:
    threads keep real time.
    """

    __slots__ = ("_drivers", "_elapsed", "_ids", "_loop_offset", "_rng", "_start", "_start_ns")

    drives_loop = True

    def __init__(self, start: float | dt.datetime = DEFAULT_START, *, seed: int = 0) -> None:
        self._start = _epoch(start)
        self._start_ns = round(self._start * 1e9)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise UserError(f"FakeClock(seed={seed!r}) must be an int")
        self._elapsed = 0.0
        self._rng = random.Random(seed)
        self._ids = random.Random(f"loopwise-ids-{seed}")
        self._drivers: dict[asyncio.AbstractEventLoop, _LoopDriver] = {}
        # loop.time() - monotonic() on the loops it drives: fixed at its first install, where
        # the loop's time goes on from its real clock.
        self._loop_offset: float | None = None

    def __repr__(self) -> str:
        return f"FakeClock(start={self._start!r}, elapsed={self._elapsed!r})"

    # -- the Clock interface --------------------------------------------------------

    def time(self) -> float:
        """`start` plus the fake seconds elapsed."""
        return self._start + self._elapsed

    def time_ns(self) -> int:
        return self._start_ns + round(self._elapsed * 1e9)

    def monotonic(self) -> float:
        """The fake seconds elapsed since the clock was made (``loop.time()`` moves with it)."""
        return self._elapsed

    def random(self) -> float:
        return self._rng.random()

    def token_hex(self, nbytes: int) -> str:
        return self._ids.getrandbits(8 * nbytes).to_bytes(nbytes, "big").hex() if nbytes > 0 else ""

    # -- moving time --------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Move the fake time forward by `seconds`.

        On an event loop the clock drives, timers that fall due by then fire at the loop's
        next turn (the next ``await`` that yields).
        """
        if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0 \
                or not math.isfinite(seconds):
            raise UserError(f"FakeClock.advance({seconds!r}): seconds must be a finite number >= 0 "
                            "(time does not go back)")
        self._elapsed += seconds

    # -- driving an event loop ------------------------------------------------------------

    def install(self, loop: asyncio.AbstractEventLoop) -> None:
        """Drive `loop`'s time, until as many `uninstall` calls (each run of an agent makes one)."""
        driver = self._drivers.get(loop)
        if driver is None:
            other = driven.get(loop)
            if other is not None:
                raise UserError(f"another FakeClock ({other!r}) drives this event loop; runs that share a loop "
                                "must share their FakeClock")
            driver = self._drivers[loop] = _LoopDriver(self, loop)
            driven[loop] = self
        driver.users += 1

    def uninstall(self, loop: asyncio.AbstractEventLoop) -> None:
        driver = self._drivers.get(loop)
        if driver is None:
            return
        driver.users -= 1
        if driver.users == 0:
            del self._drivers[loop]
            driven.pop(loop, None)
            driver.restore()


class _LoopDriver:
    """One event loop's time, read from a `FakeClock` and jumped ahead when the loop would wait."""

    __slots__ = ("clock", "executor_jobs", "loop", "offset", "real_select", "saved", "selector", "users")

    def __init__(self, clock: FakeClock, loop: asyncio.AbstractEventLoop) -> None:
        selector = getattr(loop, "_selector", None)
        if not isinstance(loop, asyncio.BaseEventLoop) or selector is None or not hasattr(loop, "_scheduled"):
            raise UserError(f"a FakeClock drives asyncio's selector event loop (the default on Linux and macOS), "
                            f"not a {type(loop).__module__}.{type(loop).__name__}: run the test on the default "
                            "event loop (no uvloop; on Windows, asyncio.WindowsSelectorEventLoopPolicy())")
        self.clock = clock
        self.loop = loop
        self.selector = selector
        self.users = 0
        real_now = loop.time()
        if clock._loop_offset is None:
            clock._loop_offset = real_now - clock._elapsed
        self.offset = clock._loop_offset
        self.executor_jobs: weakref.WeakSet[asyncio.Future[Any]] = weakref.WeakSet()
        self.real_select: Callable[[float | None], list[Any]] = selector.select
        own = loop.__dict__
        self.saved: dict[str, Any] = {name: own[name] for name in ("time", "run_in_executor") if name in own}
        self.saved["select"] = selector.__dict__.get("select")
        real_run_in_executor = loop.run_in_executor

        def run_in_executor(executor: Any, func: Callable[..., Any], *args: Any) -> asyncio.Future[Any]:
            future = real_run_in_executor(executor, func, *args)
            self.executor_jobs.add(future)
            return future

        loop.time = self.time  # type: ignore[method-assign]
        loop.run_in_executor = run_in_executor  # type: ignore[method-assign,assignment]
        selector.select = self.select
        _shift(loop, self.time() - real_now)

    def time(self) -> float:
        return self.offset + self.clock._elapsed

    def _threads_busy(self) -> bool:
        return _threads.busy() or any(not f.done() for f in self.executor_jobs)

    def select(self, timeout: float | None = None) -> list[Any]:
        """The loop's wait for I/O until its next timer (`timeout`), jumped over when nothing can happen."""
        real_select = self.real_select
        if timeout is not None and timeout <= 0:
            return real_select(timeout)
        if timeout is not None and not self._threads_busy():
            ready = real_select(0)  # anything ready now (I/O, a thread's wake-up) goes first
            if not ready:
                self.clock._elapsed += timeout  # nothing else can happen: on to the next timer
            return ready
        # A thread is working (or no timer is set): wait for real, and let the fake time
        # move by the real time that passed.
        t0 = time.monotonic()
        ready = real_select(timeout)
        waited = time.monotonic() - t0
        self.clock._elapsed += timeout if not ready and timeout is not None else (
            waited if timeout is None else min(waited, timeout))
        return ready

    def restore(self) -> None:
        """Give the loop its own time back; its pending timers keep the time they had left."""
        loop = self.loop
        fake_now = self.time()
        for name in ("time", "run_in_executor"):
            if name in self.saved:
                setattr(loop, name, self.saved[name])
            else:
                loop.__dict__.pop(name, None)
        if self.saved["select"] is None:
            self.selector.__dict__.pop("select", None)
        else:
            self.selector.select = self.saved["select"]
        _shift(loop, loop.time() - fake_now)


def _shift(loop: asyncio.AbstractEventLoop, seconds: float) -> None:
    """Move `loop`'s pending timers by `seconds`: what its clock did, so each keeps the time it had left."""
    if not seconds:
        return
    scheduled: list[Any] = loop._scheduled  # type: ignore[attr-defined]
    for handle in scheduled:
        handle._when += seconds  # the same shift for all: still a heap
    heapq.heapify(scheduled)  # (a no-op, unless a float rounding reordered equal times)
