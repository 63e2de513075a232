"""Circuit breakers: a tool that keeps failing stops being called.

One breaker per tool, shared by every run in the process (it lives on the `Tool`).
After `failures` failed attempts within `window_s` seconds it opens: calls skip the
tool and go straight to its fallback (or fail fast) for `cooldown_s`. Then it is
half-open: one call probes the tool; success closes the breaker, failure opens it
for another cooldown. Every state change is reported to the caller so the run that
caused it writes it to its event log.

This is the fix for the agent that retried a missing tool 754 times (~$70): the
breaker opens after a handful of failures, and the model reads "circuit open".
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from ._errors import UserError

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError"]

BreakerState = Literal["closed", "open", "half_open"]


class CircuitOpenError(Exception):
    """Raised instead of calling a tool whose breaker is open."""


@dataclass(kw_only=True, slots=True, frozen=True)
class BreakerChange:
    tool: str
    old: BreakerState
    new: BreakerState
    reason: str


class CircuitBreaker:
    """A circuit breaker for one tool.

    Args:
        failures: Failed attempts within `window_s` that open the breaker.
        window_s: The sliding window failures are counted in.
        cooldown_s: How long the breaker stays open before one probe call.
    """

    __slots__ = ("_clock", "_failures", "_lock", "_opened_at", "_probing", "cooldown_s", "failures",
                 "state", "window_s")

    def __init__(self, *, failures: int = 5, window_s: float = 60.0, cooldown_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if type(failures) is not int or failures < 1:
            raise UserError(f"CircuitBreaker(failures={failures!r}) must be an int >= 1")
        for name, value in (("window_s", window_s), ("cooldown_s", cooldown_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"CircuitBreaker({name}={value!r}) must be a number of seconds > 0")
        self.failures = failures
        self.window_s = float(window_s)
        self.cooldown_s = float(cooldown_s)
        self.state: BreakerState = "closed"
        self._clock = clock
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._probing = False
        self._lock = threading.Lock()  # runs in several event loops/threads may share a tool

    def __repr__(self) -> str:
        return (f"CircuitBreaker(failures={self.failures}, window_s={self.window_s:g}, "
                f"cooldown_s={self.cooldown_s:g}, state={self.state!r})")

    def before_call(self, tool: str) -> BreakerChange | None:
        """Check the breaker before an attempt; raises `CircuitOpenError` when it is open.

        Returns the state change this check caused (open → half-open), if any.
        """
        if self.state == "closed":
            # Nearly every call: one read of the state, as if the lock were taken then.
            return None
        with self._lock:
            if self.state == "closed":
                return None
            now = self._clock()
            if self.state == "open":
                remaining = self._opened_at + self.cooldown_s - now
                if remaining > 0:
                    raise CircuitOpenError(
                        f"circuit open for {tool}: it failed {self.failures} times within "
                        f"{self.window_s:g} s; not called for another {remaining:.1f} s"
                    )
                self.state = "half_open"
                self._probing = True
                return BreakerChange(tool=tool, old="open", new="half_open",
                                     reason=f"cooldown of {self.cooldown_s:g} s over: one probe call")
            # half-open: one probe at a time; other calls fail fast meanwhile
            if self._probing:
                raise CircuitOpenError(f"circuit half-open for {tool}: a probe call is in flight")
            self._probing = True
            return None

    def on_success(self, tool: str) -> BreakerChange | None:
        if self.state == "closed" and not self._probing:
            return None  # nothing to change (closed: no probe in flight), as if under the lock
        with self._lock:
            self._probing = False
            if self.state == "closed":
                return None
            old = self.state
            self.state = "closed"
            self._failures.clear()
            return BreakerChange(tool=tool, old=old, new="closed", reason="probe call succeeded")

    def on_failure(self, tool: str) -> BreakerChange | None:
        with self._lock:
            now = self._clock()
            if self.state == "half_open":
                self._probing = False
                self.state = "open"
                self._opened_at = now
                return BreakerChange(tool=tool, old="half_open", new="open",
                                     reason=f"probe call failed; open for {self.cooldown_s:g} s")
            if self.state == "open":
                return None
            failures = self._failures
            failures.append(now)
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if len(failures) >= self.failures:
                self.state = "open"
                self._opened_at = now
                failures.clear()
                return BreakerChange(
                    tool=tool, old="closed", new="open",
                    reason=f"{self.failures} failures within {self.window_s:g} s; open for {self.cooldown_s:g} s",
                )
            return None

    def on_abort(self) -> None:
        """An attempt ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            self._probing = False
