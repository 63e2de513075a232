"""Time, ids and randomness: what a run reads from the world, behind one small interface.

A run reads the wall clock (event timestamps), a monotonic clock (latencies, active
time), makes ids (run ids) and draws random numbers (backoff jitter) only through the
`Clock` of its agent (`Agent(clock=...)`). `SystemClock` is the real one;
`loopwise.testing.FakeClock` makes all four deterministic, so a test of loopwise's own
timing decisions (deadlines, backoff, breaker cool-down, leases) needs no sleep, and a
replay can be exact.

Deadlines and timeouts are cancel scopes on the event loop's clock (`anyio.current_time()`,
i.e. ``loop.time()``): `monotonic()` reads that same clock, so a latency in the log and a
deadline agree, under the system clock and under a fake one.
"""

from __future__ import annotations

import os
import random
import time

__all__ = ["SYSTEM_CLOCK", "Clock", "SystemClock"]

_system_time = time.time
_system_monotonic = time.monotonic


class Clock:
    """What a run reads from the world: wall time, monotonic time, fresh ids, random numbers.

    Subclass it to control all four (`loopwise.testing.FakeClock` does); the defaults are
    the system's.
    """

    __slots__ = ()

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
