"""Time, ids and randomness: what a run reads from the world, behind one small interface.

A run reads the wall clock (event timestamps), a monotonic clock (latencies, active
time), makes ids (run ids) and draws random numbers (backoff jitter) only through the
`Clock` of its agent (`Agent(clock=...)`). `SystemClock` is the real one;
`loopwise.testing.FakeClock` makes all four deterministic, so a test of loopwise's own
timing decisions (deadlines, backoff, breaker cool-down, leases) needs no sleep, and a
replay can be exact.

Deadlines and timeouts are cancel scopes on the event loop's clock (`anyio.current_time()`,
i.e. ``loop.time()``). `SystemClock.monotonic` is asyncio's own `loop.time()` clock
(``time.monotonic``); a `FakeClock` drives the loop's time while a run of its agent is
on it (`install`), so its `monotonic()` moves with ``loop.time()``, and a latency in the
log and a deadline agree, under the system clock and under a fake one.

Loopwise's own timing decisions outside the run driver read the clock of the running
loop: `current_clock()` (backoff jitter, `Retry-After` dates, a breaker's "open since")
and `loop_time()` (a breaker's cool-down, tool and model latencies). With no
`FakeClock` installed anywhere, both cost one check of an empty dict.
"""

from __future__ import annotations

import os
import random
import time
from asyncio import AbstractEventLoop, _get_running_loop
from typing import ClassVar

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock", "current_clock", "loop_time"]

_system_time = time.time
_system_monotonic = time.monotonic


class Clock:
    """What a run reads from the world: wall time, monotonic time, fresh ids, random numbers.

    Subclass it to control all four (`loopwise.testing.FakeClock` does); the defaults are
    the system's.
    """

    __slots__ = ()

    #: Whether the clock drives the event loop's time while a run is on it (`install`).
    drives_loop: ClassVar[bool] = False

    def install(self, loop: AbstractEventLoop) -> None:
        """Called by a run of the agent as it starts on `loop`: a clock that drives the loop's time takes it."""

    def uninstall(self, loop: AbstractEventLoop) -> None:
        """Called by a run as it ends: the loop gets its own time back once no run needs this clock."""

    def time(self) -> float:
        """Wall-clock time, seconds since the epoch: event timestamps."""
        return time.time()

    def time_ns(self) -> int:
        """Wall-clock time in nanoseconds since the epoch (the time-ordered part of run ids)."""
        return time.time_ns()

    def monotonic(self) -> float:
        """Seconds on a clock that never goes back: latencies and active time."""
        return time.monotonic()

    def random(self) -> float:
        """A float in [0, 1): backoff jitter."""
        return random.random()

    def token_hex(self, nbytes: int) -> str:
        """`nbytes` random bytes as hex: the random part of ids."""
        return os.urandom(nbytes).hex()

    def new_run_id(self) -> str:
        """A unique, time-ordered run id: 16 hex digits of nanoseconds, 16 random.

        Time order keeps SQLite's inserts at the end of the primary key's b-tree (random
        ids cost several times more per row) and lists runs in start order.
        """
        return f"{self.time_ns():016x}{self.token_hex(8)}"


class SystemClock(Clock):
    """The real clock (the default of every agent)."""

    __slots__ = ()

    # The builtins themselves: every event reads the clock, and this costs it no Python frame.
    time = staticmethod(_system_time)
    monotonic = staticmethod(_system_monotonic)


#: The clock of every agent that is not given one.
SYSTEM_CLOCK: Clock = SystemClock()

#: The clocks that drive an event loop's time now, by loop (`FakeClock.install` adds,
#: `uninstall` removes). A plain dict: its truth is what every tool call checks.
driven: dict[AbstractEventLoop, Clock] = {}


def current_clock() -> Clock:
    """The clock driving the running event loop, else the system's."""
    if driven:
        loop = _get_running_loop()
        if loop is not None:
            clock = driven.get(loop)
            if clock is not None:
                return clock
    return SYSTEM_CLOCK


def loop_time() -> float:
    """The running event loop's time (``loop.time()``: fake under a `FakeClock`), else ``time.monotonic()``.

    What a circuit breaker's cool-down is measured on: a breaker is shared by every run
    of its tool, and the loop's time is what deadlines use too.
    """
    loop = _get_running_loop()
    return time.monotonic() if loop is None else loop.time()
