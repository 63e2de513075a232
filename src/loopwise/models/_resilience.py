"""Model-call resilience: a timeout per attempt, retries with backoff, fallback models.

`call_with_policy` wraps the one-method `Model` interface, as the tool policies wrap
a tool (STYLE.md §7). It knows nothing of the loop: it tries the primary model, then
each fallback model in order, each under the same `ModelPolicy`, and reports every
attempt to `on_attempt` so the caller can write it to the event log.

```
attempt ─ ok ──────────────────────────────────────────────► (response, model)
   │
   └ ModelError ─ retryable, retries left, Retry-After ≤ cap ─► sleep, same model again
                └ otherwise ───────────── next model? ─ yes ─► fallback model, attempt 1
                                                      └ no ──► raise the last error
```

What is retried (on the same model): HTTP 408, 409, 429 and 5xx (`retry_on_status`),
`ModelTimeoutError` and `ModelConnectionError`. What is not: other statuses (400, 401,
403, 404, 422...), `ModelBehaviorError` and any other `ModelError`; those go to the
next fallback model at once. An exception that is not a `ModelError` is a bug in the
model adapter: it propagates as is, neither retried nor sent to a fallback.
Cancellation from outside is never caught: it propagates at once, mid-call or
mid-backoff.

Retries belong to the policy. An adapter that retries by itself multiplies them:
`OpenAIModel(max_retries=2)` under `ModelPolicy(retries=2)` makes up to 9 HTTP
requests for what the log shows as 3 attempts. Wrapped models should be made with
`max_retries=0`; `OpenAIModel`'s default stays 2 for code that calls it directly.
"""

from __future__ import annotations

import email.utils
import math
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import anyio

from .._errors import (
    ModelBehaviorError,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelTimeoutError,
    UserError,
)
from .._runtime.clock import current_clock
from .._runtime.clock import driven as _driven
from .._runtime.clock import loop_time as _loop_time
from .._events import ErrorInfo
from .._runtime.scopes import cancel_scope, wait_within
from ._base import Model, ModelRequest, ModelResponse

__all__ = ["AttemptRecord", "ModelPolicy", "call_with_policy", "parse_retry_after"]

# Latencies: the event loop's time if a FakeClock drives a loop, else this (the same clock on Linux).
_perf_counter = time.perf_counter


@dataclass(kw_only=True, slots=True, frozen=True)
class ModelPolicy:
    """How one model call is made to survive a flaky provider.

    Args:
        timeout: Seconds one attempt may take, whole (`None`: no limit). Expiry
            cancels the call and raises `ModelTimeoutError`, which is retried.
        retries: Extra attempts on the same model after a retryable error.
        backoff_initial_s: The wait cap before the first retry; the cap is multiplied
            by `backoff_factor` for each further retry, up to `backoff_max_s`. The wait
            is a random fraction of the cap ("full jitter"), so clients that failed
            together do not retry together.
        backoff_factor: See `backoff_initial_s`.
        backoff_max_s: See `backoff_initial_s`.
        max_retry_after: The longest server-requested wait (`Retry-After`) honoured.
            A longer one is not waited for: the call goes to the next fallback model at
            once, or fails, saying why.
        retry_on_status: HTTP statuses that are retried: ints and ranges.
    """

    timeout: float | None = 60.0
    retries: int = 2
    backoff_initial_s: float = 0.5
    backoff_factor: float = 2.0
    backoff_max_s: float = 20.0
    max_retry_after: float = 60.0
    retry_on_status: tuple[int | range, ...] = (408, 409, 429, range(500, 600))

    def __post_init__(self) -> None:
        if self.timeout is not None and not _positive(self.timeout):
            raise UserError(f"ModelPolicy(timeout={self.timeout!r}) must be a number of seconds > 0, or None")
        if type(self.retries) is not int or self.retries < 0:
            raise UserError(f"ModelPolicy(retries={self.retries!r}) must be an int >= 0")
        for name in ("backoff_initial_s", "backoff_max_s", "max_retry_after"):
            value = getattr(self, name)
            if not (_positive(value) or (type(value) in (int, float) and value == 0)):
                raise UserError(f"ModelPolicy({name}={value!r}) must be a number of seconds >= 0")
        if not _positive(self.backoff_factor) or self.backoff_factor < 1:
            raise UserError(f"ModelPolicy(backoff_factor={self.backoff_factor!r}) must be a number >= 1")
        statuses = self.retry_on_status
        if isinstance(statuses, (int, range)):
            statuses = (statuses,)
        if not isinstance(statuses, (tuple, list, set, frozenset)) or not all(
            isinstance(s, range) or (type(s) is int) for s in statuses
        ):
            raise UserError(
                f"ModelPolicy(retry_on_status={self.retry_on_status!r}) must be a tuple of HTTP status "
                "ints and ranges, e.g. (429, range(500, 600))"
            )
        object.__setattr__(self, "retry_on_status", tuple(statuses))

    def backoff(self, retry: int, rng: Callable[[], float] | None = None) -> float:
        """Seconds to wait before retry number `retry` (1, 2, ...) without a `Retry-After`.

        `rng` returns a float in [0, 1) (default: the `random()` of the clock driving the
        running event loop, a `FakeClock`'s under one, else the system's).
        """
        try:
            cap = min(self.backoff_initial_s * self.backoff_factor ** (retry - 1), self.backoff_max_s)
        except OverflowError:
            cap = self.backoff_max_s
        return (rng or current_clock().random)() * cap

    def retries_status(self, status: int) -> bool:
        """Whether an HTTP error with this status is retried."""
        return any(status in s if isinstance(s, range) else status == s for s in self.retry_on_status)

    def describe(self) -> dict[str, Any]:
        """The policy as JSON-ready values, for the run-started event."""
        return {
            "timeout": self.timeout,
            "retries": self.retries,
            "backoff_initial_s": self.backoff_initial_s,
            "backoff_factor": self.backoff_factor,
            "backoff_max_s": self.backoff_max_s,
            "max_retry_after": self.max_retry_after,
            "retry_on_status": [f"{s.start}-{s.stop - 1}" if isinstance(s, range) else s
                                for s in self.retry_on_status],
        }


@dataclass(kw_only=True, slots=True, frozen=True)
class AttemptRecord:
    """One attempt of one model call, as `call_with_policy` reports it.

    `attempt` counts from 1 on each model. After a failed attempt exactly one of
    these holds: `retry_in_s` is the wait before the same model is tried again;
    `will_fallback` says the next fallback model is tried now; neither means the call
    failed. `reason` says why, in words ("HTTP 429: retrying in 1 s (Retry-After)").
    """

    model: str
    attempt: int
    ok: bool
    error: ErrorInfo | None
    latency_s: float
    retry_in_s: float | None
    will_fallback: bool
    reason: str


async def call_with_policy(
    models: Sequence[Model],
    request: ModelRequest,
    policy: ModelPolicy,
    on_attempt: Callable[[AttemptRecord], None] | None = None,
    check: Callable[[ModelResponse], None] | None = None,
    report_ok: bool = True,
    *,
    sleep: Callable[[float], Awaitable[object]] = anyio.sleep,
    rng: Callable[[], float] | None = None,
) -> tuple[ModelResponse, Model]:
    """Make one model call under `policy`: the first model, then each fallback in turn.

    Args:
        models: The primary model, then the fallback models in order.
        request: What every attempt sends.
        policy: Timeout, retries and backoff, applied to each model alike.
        on_attempt: Called after every attempt (before any backoff wait).
        check: Validates a response; a `ModelError` it raises fails the attempt
            (a `ModelBehaviorError` is not retried, so the fallback is tried).
        report_ok: False: `on_attempt` hears only of failed attempts (the loop logs
            nothing for an attempt that answered, so it asks for none).
        sleep: Waits between attempts (tests pass one that records instead).
        rng: Returns a float in [0, 1) for the backoff jitter (default: the `random()`
            of the clock driving the running event loop: a `FakeClock`'s under one).

    The loop passes `on_attempt`, `check` and `report_ok` positionally: CPython matches
    keyword arguments one by one, and every model call passes here.

    Returns:
        The response and the model that gave it (its `price` is the one to charge).

    Raises:
        ModelError: The last attempt's error when every attempt failed; its message
            begins with a summary of all attempts (type and attributes unchanged).
    """
    if not models:
        raise UserError("call_with_policy needs at least one model")
    failures: list[tuple[str, int, ModelError]] = []
    timeout = policy.timeout
    now = _perf_counter if not _driven else _loop_time  # a FakeClock's loop time, if one drives a loop
    for index, model in enumerate(models):
        attempt = 0
        while True:
            attempt += 1
            started = now()
            # Only errors are caught below: cancellation (a BaseException on asyncio
            # and trio alike) passes through every `except` here untouched.
            try:
                # A cancel scope of our own (what `anyio.fail_after` uses), so a deadline
                # we set is told apart from a `TimeoutError` the model raises itself, and
                # from a cancellation from outside, which the scope lets through. (Inline
                # rather than in a helper coroutine: every model call passes here.) Its
                # event-loop timer is armed only if the call waits (`wait_within`).
                if timeout is None:  # no deadline: no scope (nothing but the caller's scopes could cancel it)
                    response = await model.request(request)
                else:
                    with cancel_scope() as scope:
                        response = await wait_within(scope, timeout, model.request(request))
                    if scope.cancelled_caught:
                        raise ModelTimeoutError(
                            f"{model.name} did not answer within timeout={timeout:g}s (ModelPolicy.timeout)")
                if not isinstance(response, ModelResponse):
                    raise ModelBehaviorError(f"{model.name} returned {type(response).__name__}, not a ModelResponse")
                if check is not None:
                    check(response)
            except ModelError as exc:
                error = exc
            except Exception as exc:  # a bug in the adapter: reported, then raised as is
                _report(on_attempt, model, attempt, exc, now() - started, None, False,
                        f"{type(exc).__name__} is not a ModelError: not retried, no fallback")
                raise
            else:
                if report_ok:
                    _report(on_attempt, model, attempt, None, now() - started, None, False, "answered")
                return response, model
            latency = now() - started
            failures.append((model.name, attempt, error))
            retry_in, why = _retry_decision(error, attempt, policy, rng)
            if retry_in is not None:
                _report(on_attempt, model, attempt, error, latency, retry_in, False, why)
                await sleep(retry_in)
                continue
            fallback = models[index + 1] if index + 1 < len(models) else None
            why += f"; falling back to {fallback.name}" if fallback is not None else "; no fallback left"
            _report(on_attempt, model, attempt, error, latency, None, fallback is not None, why)
            break
    last = failures[-1][2]
    if len(failures) > 1:
        last.args = (f"{_summary(failures)}; last error: {last}", *last.args[1:])
    raise last


def _retry_decision(error: ModelError, attempt: int, policy: ModelPolicy,
                    rng: Callable[[], float] | None) -> tuple[float | None, str]:
    """The wait before retrying the same model (None: do not), and why."""
    what = _label(error)
    if not _retryable(error, policy):
        return None, f"{what} is not retried"
    if attempt > policy.retries:
        return None, f"{what}: retries exhausted ({attempt} attempt{'s' if attempt > 1 else ''})"
    retry_after = _retry_after_of(error)
    if retry_after is not None:
        if retry_after > policy.max_retry_after:
            return None, (f"{what}: Retry-After of {retry_after:g}s exceeds max_retry_after="
                          f"{policy.max_retry_after:g}s, not waiting")
        wait = max(retry_after, 0.0)
        return wait, f"{what}: retrying in {wait:.3g}s (Retry-After, retry {attempt} of {policy.retries})"
    wait = policy.backoff(attempt, rng)
    return wait, f"{what}: retrying in {wait:.3g}s (backoff, retry {attempt} of {policy.retries})"


def _retryable(error: ModelError, policy: ModelPolicy) -> bool:
    if isinstance(error, (ModelTimeoutError, ModelConnectionError)):
        return True
    if isinstance(error, ModelHTTPError):
        should = (getattr(error, "headers", None) or {}).get("x-should-retry")
        if should in ("true", "false"):  # the server says (OpenAI sends this header)
            return should == "true"
        return policy.retries_status(error.status_code)
    return False


def _retry_after_of(error: ModelError) -> float | None:
    if not isinstance(error, ModelHTTPError):
        return None
    retry_after = getattr(error, "retry_after", None)
    if retry_after is None:
        retry_after = parse_retry_after(getattr(error, "headers", None))
    if retry_after is None or math.isnan(retry_after):
        return None
    return retry_after


def parse_retry_after(headers: Mapping[str, str] | None, *, now: float | None = None) -> float | None:
    """Seconds to wait, from `retry-after-ms`, or `Retry-After` in seconds or as an HTTP-date.

    `headers` keys are matched case-insensitively. A date in the past gives 0; no
    header or an unreadable one gives `None`. A date is compared with `now` (default:
    the wall time of the clock driving the running event loop, a `FakeClock`'s under one).
    """
    if not headers:
        return None
    lower = {str(k).lower(): v for k, v in headers.items()}
    for name, scale in (("retry-after-ms", 1000.0), ("retry-after", 1.0)):
        value = lower.get(name)
        if value is None:
            continue
        try:
            seconds = float(value) / scale
        except (TypeError, ValueError):
            continue
        if not math.isnan(seconds):
            return max(seconds, 0.0)
    value = lower.get("retry-after")
    if not isinstance(value, str):
        return None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:  # RFC 9110 dates are GMT
        return None
    return max(when.timestamp() - (current_clock().time() if now is None else now), 0.0)


def _report(on_attempt: Callable[[AttemptRecord], None] | None, model: Model, attempt: int,
            error: BaseException | None, latency: float, retry_in: float | None, will_fallback: bool,
            reason: str) -> None:
    if on_attempt is not None:
        on_attempt(AttemptRecord(
            model=model.name, attempt=attempt, ok=error is None,
            error=None if error is None else ErrorInfo.from_exception(error),
            latency_s=latency, retry_in_s=retry_in, will_fallback=will_fallback, reason=reason,
        ))


def _label(error: BaseException) -> str:
    if isinstance(error, ModelHTTPError):
        return f"HTTP {error.status_code}"
    return type(error).__name__


def _summary(failures: list[tuple[str, int, ModelError]]) -> str:
    parts: list[str] = []
    for name, attempt, error in failures:
        if attempt == 1:
            parts.append(f"{name} #1 {_label(error)}")
        else:
            parts[-1] += f", #{attempt} {_label(error)}"
    return f"all {len(failures)} model call attempts failed ({'; '.join(parts)})"


def _positive(value: object) -> bool:
    return not isinstance(value, bool) and isinstance(value, (int, float)) and value > 0 and not math.isnan(value)
