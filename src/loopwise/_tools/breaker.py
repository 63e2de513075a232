"""Circuit breakers: a tool whose infrastructure keeps failing stops being called.

One breaker per tool, shared by every run in the process (it lives on the `Tool`).
After `failures` counted failures within `window_s` seconds it opens: calls skip the
tool and go straight to its fallback (or fail fast) for `cooldown_s`. Then it is
half-open: one call probes the tool; a call that reaches the tool (it answers, or
fails in a way that is not counted) closes the breaker, a counted failure opens it
for another cooldown. Every state change is reported to the caller so the run that
caused it writes it to its event log.

What counts: by default only failures of the infrastructure, which fail every caller
alike: a timeout of the attempt, the exceptions `_tools.infra_errors.is_infrastructure`
lists (connection errors, network `OSError`s, HTTP 429/5xx, a dead process), and the
errors the tool marks as transient (`lw.ToolRetry`, or a type it names in
`retry_on=`). A business error (`ValueError("amount over the refund limit")`) is the
tool working: it must not stop other runs from calling it. `failure_on=` counts more
(exception types, or a predicate).

The window and the cool-down are measured on the running event loop's time
(`_runtime.clock.loop_time`, what deadlines use): a breaker is shared by every run of its tool,
whatever its agent's clock, and a `FakeClock` that drives the loop makes it fake time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from .._runtime.clock import current_clock, loop_time
from .._errors import LoopwiseError, ToolRetry, UserError
from .infra_errors import is_infrastructure

__all__ = ["BreakerState", "CircuitBreaker", "CircuitOpenError"]

BreakerState = Literal["closed", "open", "half_open"]


_log = logging.getLogger("loopwise")


class CircuitOpenError(LoopwiseError):
    """Raised instead of calling a tool whose breaker is open.

    ``str()`` is the whole sentence, naming the tool; `detail` is the same without the
    tool's name in front (for a message that names it already).
    """

    def __init__(self, tool: str, detail: str) -> None:
        super().__init__(f"{tool} {detail}")
        self.tool = tool
        self.detail = detail


def _failure_on(value: object) -> Callable[[BaseException], bool] | None:
    """`failure_on=` as a predicate (None: nothing beyond the defaults), or a UserError."""
    if value is None:
        return None
    items = value if isinstance(value, (tuple, list)) else (value,)
    if items and all(isinstance(t, type) and issubclass(t, BaseException) for t in items):
        types = tuple(items)
        return lambda exc: isinstance(exc, types)
    if callable(value) and not isinstance(value, type):
        return value
    raise UserError(
        f"CircuitBreaker(failure_on={value!r}) must be an exception type, a tuple of them, "
        "or a function taking the exception and returning True to count it"
    )


def _kind(error: BaseException | None) -> str:
    return "a timeout" if error is None else type(error).__name__


@dataclass(kw_only=True, slots=True, frozen=True)
class BreakerChange:
    tool: str
    old: BreakerState
    new: BreakerState
    reason: str


class CircuitBreaker:
    """A circuit breaker for one tool.

    Args:
        failures: Counted failures within `window_s` that open the breaker.
        window_s: The sliding window failures are counted in.
        cooldown_s: How long the breaker stays open before one probe call.
        failure_on: What counts besides the defaults (timeouts, connection and network
            errors, HTTP 429/5xx, a dead tool process, `lw.ToolRetry` and the tool's
            `retry_on` types): an exception type, a tuple of them, or a function that
            takes the exception and returns True to count it. ``Exception`` counts
            every failure.
        clock: What the window and the cool-down are measured on (default: the
            running event loop's time, ``loop.time()``, which a `FakeClock` drives; a
            breaker is shared by every run of its tool, so it reads the loop, not an
            agent).
    """

    __slots__ = ("_clock", "_count_also", "_failures", "_last_kind", "_lock", "_opened_at", "_opened_wall",
                 "_probing", "cooldown_s", "failure_on", "failures", "state", "window_s")

    def __init__(self, *, failures: int = 5, window_s: float = 60.0, cooldown_s: float = 30.0,
                 failure_on: type[BaseException] | tuple[type[BaseException], ...]
                 | Callable[[BaseException], bool] | None = None,
                 clock: Callable[[], float] = loop_time) -> None:
        if type(failures) is not int or failures < 1:
            raise UserError(f"CircuitBreaker(failures={failures!r}) must be an int >= 1")
        for name, value in (("window_s", window_s), ("cooldown_s", cooldown_s)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
                raise UserError(f"CircuitBreaker({name}={value!r}) must be a number of seconds > 0")
        self._count_also = _failure_on(failure_on)
        self.failure_on = failure_on
        self.failures = failures
        self.window_s = float(window_s)
        self.cooldown_s = float(cooldown_s)
        self.state: BreakerState = "closed"
        self._clock = clock
        self._failures: deque[float] = deque()
        self._opened_at = 0.0
        self._opened_wall = 0.0
        self._last_kind = ""  # what the failure that opened the breaker was
        self._probing = False
        self._lock = threading.Lock()  # runs in several event loops/threads may share a tool

    def __repr__(self) -> str:
        return (f"CircuitBreaker(failures={self.failures}, window_s={self.window_s:g}, "
                f"cooldown_s={self.cooldown_s:g}, state={self.state!r})")

    def counts(self, error: BaseException | None, *, transient: bool = False) -> bool:
        """Whether a failed attempt counts: `error` None is a timeout of the attempt.

        `transient`: the tool marked this failure as one (a type in its `retry_on`).
        """
        if error is None or transient or isinstance(error, ToolRetry) or is_infrastructure(error):
            return True
        if self._count_also is None:
            return False
        try:
            return bool(self._count_also(error))
        except Exception as exc:  # noqa: BLE001 - the user's predicate: any bug in it
            _log.warning("CircuitBreaker failure_on=%r raised %s: %s; the failure was counted",
                         self.failure_on, type(exc).__name__, exc)
            return True

    def before_call(self, tool: str) -> BreakerChange | None:
        """Check the breaker before an attempt; raises `CircuitOpenError` when it is open.

        Returns the state change this check caused (open → half-open), if any.
        """
        if self.state == "closed":
            # Nearly every call: one read of the state, as if the lock were taken then.
            return None
        with self._lock:
            # mypy keeps the narrowing above; another thread may have closed it since.
            if self.state == "closed":  # type: ignore[comparison-overlap]
                return None
            now = self._clock()
            if self.state == "open":
                remaining = self._opened_at + self.cooldown_s - now
                if remaining > 0:
                    raise CircuitOpenError(tool, f"was not called: {self._why_open(now)}; "
                                                 f"it will be tried again in {remaining:.1f} s")
                self.state = "half_open"
                self._probing = True
                return BreakerChange(tool=tool, old="open", new="half_open",
                                     reason=f"cooldown of {self.cooldown_s:g} s over: one probe call")
            # half-open: one probe at a time; other calls fail fast meanwhile
            if self._probing:
                raise CircuitOpenError(tool, f"was not called: {self._why_open(now)}; a probe call is in "
                                             "flight to see if it works again, and calls resume if it does")
            self._probing = True
            return None

    def _why_open(self, now: float) -> str:
        since = time.strftime("%H:%M:%S", time.localtime(self._opened_wall))
        return (f"its circuit breaker has been open since {since} ({now - self._opened_at:.1f} s ago), "
                f"after {self.failures} failures within {self.window_s:g} s (the last: {self._last_kind})")

    def on_success(self, tool: str, *, reason: str = "probe call succeeded") -> BreakerChange | None:
        if self.state == "closed" and not self._probing:
            return None  # nothing to change (closed: no probe in flight), as if under the lock
        with self._lock:
            self._probing = False
            if self.state == "closed":
                return None
            old = self.state
            self.state = "closed"
            self._failures.clear()
            return BreakerChange(tool=tool, old=old, new="closed", reason=reason)

    def on_failure(self, tool: str, error: BaseException | None = None, *,
                   transient: bool = False) -> BreakerChange | None:
        """A failed attempt: `error` is what it raised, None if it timed out.

        A failure that does not count (`counts`) is, for the breaker, the tool working:
        a probe call that ends that way closes it.
        """
        if not self.counts(error, transient=transient):
            return self.on_success(tool, reason=f"probe call reached the tool (it raised {_kind(error)}, "
                                                "which the breaker does not count)")
        with self._lock:
            now = self._clock()
            if self.state == "half_open":
                self._probing = False
                self._open(now, error)
                return BreakerChange(tool=tool, old="half_open", new="open",
                                     reason=f"probe call failed ({_kind(error)}); open for {self.cooldown_s:g} s")
            if self.state == "open":
                return None
            failures = self._failures
            failures.append(now)
            while failures and failures[0] <= now - self.window_s:
                failures.popleft()
            if len(failures) >= self.failures:
                self._open(now, error)
                failures.clear()
                return BreakerChange(
                    tool=tool, old="closed", new="open",
                    reason=f"{self.failures} failures within {self.window_s:g} s (the last: {_kind(error)}); "
                           f"open for {self.cooldown_s:g} s",
                )
            return None

    def _open(self, now: float, error: BaseException | None) -> None:
        self.state = "open"
        self._opened_at = now
        self._opened_wall = current_clock().time()
        self._last_kind = _kind(error)

    def on_abort(self) -> None:
        """An attempt ended without a verdict (cancelled): free the probe slot."""
        with self._lock:
            self._probing = False
