"""One tool call under its policy: breaker → attempts (each under `timeout`, retried with
backoff) → fallback chain, all inside `total_timeout`.

The default tool caller (`_tools.caller.PolicyToolCaller`) calls `execute` for each tool
call of a response (concurrently); the loop writes what it reports through `CallEvents`
to the event log as it happens: each failed attempt, each fallback tried, breaker state
changes and abandoned threads. The returned `ToolResult` is what the model reads.

Money: each attempt of the tool and of each fallback tool costs its `cost_usd` as it
starts (it may be billed even if it fails or is cut off). The loop has reserved the
call's worst case (`ToolPolicy.max_cost_usd`) before calling `execute`; the outcome's
`cost_usd` settles it. A `Spend` given is kept up to date as the attempts start, so a
call cancelled half-way settles what its attempts so far cost.
"""

from __future__ import annotations

import inspect
import json
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

import anyio

from .._runtime.clock import driven as _driven
from .._runtime.clock import loop_time as _loop_time
from .breaker import BreakerChange, CircuitOpenError
from .._errors import LoopwiseError, ToolRetry
from .._events import ErrorInfo
from .._runtime.scopes import cancel_scope, wait_within
from .policy import MAX_FALLBACK_DEPTH, Fallback, ToolPolicy
from .result import ToolResult
from .tool import Tool

if TYPE_CHECKING:
    from .tool import RunContext

__all__ = ["CallEvents", "CallOutcome", "Spend", "execute", "tool_content"]

# Latencies and total_timeout's deadline: the event loop's time if a FakeClock drives a
# loop (`_runtime.clock.driven`), else this (asyncio's clock on Linux, read without the loop).
_perf = time.perf_counter
# An attempt that would get this little less than its timeout from a total_timeout is
# given its timeout: the loop's own microseconds do not make a "total_timeout ran out".
_SLACK_S = 0.001
# What a plain async tool's `call` is (a subclass may have its own).
_tool_call = Tool.call


class CallEvents(Protocol):
    """What `execute` reports while it runs (the loop writes each to the log)."""

    def attempt_failed(self, tool: str, attempt: int, error: ErrorInfo, latency_s: float,
                       retry_in_s: float | None) -> None: ...
    def fallback_tried(self, tool: str, fallback: str, ok: bool, reason: str) -> None: ...
    def breaker_changed(self, change: BreakerChange) -> None: ...
    def thread_abandoned(self, tool: str, thread: str) -> None: ...


class Spend:
    """What one tool call has cost so far, its fallback tools' attempts included."""

    __slots__ = ("usd",)

    def __init__(self) -> None:
        self.usd = 0.0


# What one call came to: the public `ToolResult` (`_tools.result`), by its old name here.
CallOutcome = ToolResult


def tool_content(value: Any) -> str:
    """A tool's return value as the text the model reads.

    Raises `UnusableResult` for a value that has none (one that contains itself, nests
    too deep for the encoder, or whose `str` raises).
    """
    if isinstance(value, str):
        return value
    try:
        return (_to_json or _load_to_json())(value, fallback=str).decode()
    except Exception as exc:  # noqa: BLE001 - whatever the value's own code raised
        raise UnusableResult(f"returned a {type(value).__name__} that cannot be made into text for the model "
                             f"({type(exc).__name__}: {exc})") from None


class UnusableResult(LoopwiseError):
    """A tool (or fallback) returned a value that cannot be made into text: the call failed."""


# pydantic_core's `to_json`, imported on first use (not at `import loopwise`).
_to_json: Callable[..., bytes] | None = None


def _load_to_json() -> Callable[..., bytes]:
    global _to_json
    from pydantic_core import to_json

    _to_json = to_json
    return to_json


def _truncate(content: str, limit: int | None) -> str:
    if limit is None or len(content) <= limit:
        return content
    return (f"{content[:limit]}\n[truncated by loopwise: the result had {len(content):,} characters; "
            f"the first {limit:,} are shown (max_result_chars)]")


class _Failure:
    __slots__ = ("error", "summary")

    def __init__(self, summary: str, error: ErrorInfo) -> None:
        self.summary = summary  # "timed out after 5.0 s", "raised ValueError: ..."
        self.error = error


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _as_is(text: str) -> str:
    return text


def _redactor(policy: ToolPolicy, kwargs: dict[str, Any]) -> Callable[[str], str]:
    if not policy.secret:
        return _as_is  # no closure to make for the common case
    secrets = [str(kwargs[name]) for name in policy.secret if kwargs.get(name) not in (None, "")]
    if not secrets:
        return _as_is

    def redact(text: str) -> str:
        for secret in secrets:
            text = text.replace(secret, "[redacted]")
        return text

    return redact


async def execute(tool: Tool, kwargs: dict[str, Any], ctx: RunContext | None, events: CallEvents,
                  *, depth: int = 0, spend: Spend | None = None) -> CallOutcome:
    """Run one tool call under its policy; never raises except for cancellation.

    `ctx` may be None for a tool that takes no `RunContext` and has no fallback. `spend`,
    when given, adds each attempt's cost as the attempt starts.
    """
    policy = tool.policy
    name = tool.name
    redact = _redactor(policy, kwargs) if policy.secret else _as_is
    now = _perf if not _driven else _loop_time  # (the dict FakeClock.install fills: never rebound)
    started = now()
    total = policy.total_timeout
    # Only a total_timeout given bounds the parts by what is left of it (see below).
    total_given = total if policy.total_timeout_explicit else None
    attempts = 0
    cost = 0.0
    failure: _Failure | None = None
    breaker = policy.breaker

    # -- attempts ----------------------------------------------------------------------
    # The attempts and the waits between them must end in time for the fallbacks: a
    # total_timeout given cuts the last attempt short, or skips it. A derived one is
    # their sum already (each attempt is bounded by its own timeout, each wait by the
    # backoff's ceiling), so it cuts nothing: the event loop's lateness in firing the
    # earlier attempts' timers (a few ms on a busy machine) must not shorten the last
    # attempt and make it "run out of a total_timeout" nobody set.
    deadline = None
    if total_given is not None:
        reserve = (policy.fallback_reserve() or 0.0) if policy.fallback else 0.0
        deadline = started + max(0.0, total_given - reserve)
    # A plain async tool is awaited here: what `Tool.call` does for it, less a frame.
    direct = tool.fn if tool.is_async and tool.context_param is None and type(tool).call is _tool_call else None
    last_attempt = policy.retries + 1
    for attempt in range(1, last_attempt + 1):
        if breaker is not None:
            try:
                change = breaker.before_call(name)
            except CircuitOpenError as exc:
                failure = _Failure(exc.detail, ErrorInfo(type="CircuitOpenError", message=str(exc)))
                break
            if change is not None:
                events.breaker_changed(change)
        limit = policy.timeout
        cut_by_total = False
        if deadline is not None:
            left = deadline - now()
            if limit is None or left < limit - _SLACK_S:
                limit, cut_by_total = max(0.0, left), True
        attempts += 1
        cost += policy.cost_usd
        if spend is not None:
            spend.usd += policy.cost_usd
        t0 = now()
        raised: BaseException | None = None
        timed_out = False
        try:
            if limit is None:  # no deadline: no scope (nothing but the caller's scopes could cancel it)
                value = await (tool.call(kwargs, ctx, events) if direct is None else direct(**kwargs))
            elif policy.isolation == "process" and not cut_by_total:
                # Its timeout counts from when the function starts in its process (the process's
                # start-up is bounded apart: `_tools.isolation`); a total_timeout given bounds it all.
                from .isolation import ProcessTimeoutError

                try:
                    if deadline is None:
                        value = await tool.call(kwargs, ctx, events, timeout=limit)
                    else:
                        with cancel_scope() as scope:
                            value = await wait_within(scope, max(0.0, deadline - now()),
                                                      tool.call(kwargs, ctx, events, timeout=limit))
                        timed_out = cut_by_total = scope.cancelled_caught
                except ProcessTimeoutError:
                    timed_out = True
            else:  # `move_on_after(limit)`, its timer armed only if the tool waits
                with cancel_scope() as scope:
                    value = await wait_within(scope, limit, tool.call(kwargs, ctx, events) if direct is None
                                              else direct(**kwargs))
                timed_out = scope.cancelled_caught
        except anyio.get_cancelled_exc_class():
            if breaker is not None:
                breaker.on_abort()
            raise
        except Exception as e:  # the tool failed (cancellation is not an Exception on asyncio)
            raised = e
        latency = now() - t0
        if raised is None and not timed_out:
            try:
                content = _truncate(tool_content(value), policy.max_result_chars)
            except UnusableResult as e:  # the tool's answer is unusable: a failure like any other
                raised = e
            else:
                if breaker is not None and (change := breaker.on_success(name)) is not None:
                    events.breaker_changed(change)
                return CallOutcome("ok", content, attempts, None, None, cost, value)  # (..., fallback, error, cost_usd, value)
        if raised is None:
            if cut_by_total:
                summary = f"ran out of its total_timeout of {total:g} s after {_plural(attempts, 'attempt')}"
            else:
                summary = f"timed out after {policy.timeout:g} s"
            error = ErrorInfo(type="TimeoutError", message=f"{name} {summary}")
            retryable = not cut_by_total
        elif isinstance(raised, UnusableResult):
            summary = redact(str(raised))
            error = ErrorInfo(type="UnusableResult", message=redact(f"{name} {raised}"))
            retryable = False
        else:
            summary = redact(f"raised {type(raised).__name__}: {raised}")
            error = ErrorInfo(type=type(raised).__name__, message=redact(str(raised)))
            retryable = isinstance(raised, (ToolRetry, *policy.retry_on))
        failure = _Failure(summary, error)
        # The breaker counts timeouts (`raised` None), infrastructure errors, and the types the
        # tool named in retry_on (its "transient"; not the default, which is any exception).
        if breaker is not None and (change := breaker.on_failure(
                name, raised, transient=raised is not None and policy.retry_on != (Exception,)
                and isinstance(raised, policy.retry_on))) is not None:
            events.breaker_changed(change)
        delay = policy.backoff.delay(attempt) if retryable and attempt < last_attempt else None
        if delay is not None and deadline is not None and now() + delay >= deadline:
            delay = None  # no time left for another attempt within total_timeout
        events.attempt_failed(name, attempt, error, latency, delay)
        if delay is None:
            break
        await anyio.sleep(delay)
    assert failure is not None

    # -- fallbacks -----------------------------------------------------------------------
    reason = f"{name} {failure.summary}"
    remaining: float | None
    for step in policy.fallback:
        if total_given is not None:
            remaining = total_given - (now() - started)
        else:
            # No total, or a derived one: the sum of what each part may take, so each step
            # has its own share (a tool its own policy, a callable this tool's timeout), not
            # what late timers left of the sum.
            remaining = policy.timeout if total is not None and step.kind == "callable" else None
        answered, content, step_cost, why = await _try_fallback(step, kwargs, ctx, events, remaining, depth, spend)
        cost += step_cost
        events.fallback_tried(name, step.label, answered, reason if answered else why)
        if answered:
            content = _truncate(f"{redact(reason)}; answered from {step.label}: {content}", policy.max_result_chars)
            return CallOutcome("fallback", content, attempts, fallback=step.label, error=failure.error,
                               cost_usd=cost)
        reason = f"{reason}; fallback {step.label} {why}"

    body: dict[str, Any] = {"tool": name, "type": failure.error.type, "message": redact(reason),
                            "attempts": attempts}
    if policy.alternatives:
        body["alternatives"] = list(policy.alternatives)
    return CallOutcome("error", json.dumps({"error": body}, ensure_ascii=False), attempts,
                       error=failure.error, cost_usd=cost)


async def _try_fallback(step: Fallback, kwargs: dict[str, Any], ctx: RunContext | None, events: CallEvents,
                        remaining: float | None, depth: int, spend: Spend | None) -> tuple[bool, str, float, str]:
    """(answered, content, cost, why it did not answer)."""
    if step.kind == "value":
        try:
            return True, tool_content(step.target), 0.0, ""
        except UnusableResult as exc:
            return False, "", 0.0, str(exc)
    if step.kind == "template":
        try:
            return True, step.target.render(kwargs), 0.0, ""
        except Exception as exc:  # a field the argument does not fit: "{amount:.2f}" given a str
            return False, "", 0.0, f"could not be filled: {type(exc).__name__}: {exc}"
    if remaining is not None and remaining <= 0:
        return False, "", 0.0, "was skipped: no time left in total_timeout"
    if step.kind == "tool":
        if depth >= MAX_FALLBACK_DEPTH:
            return False, "", 0.0, f"was skipped: fallbacks nested deeper than {MAX_FALLBACK_DEPTH}"
        target: Tool = step.target
        from .tool import ToolArgumentsError

        try:
            sub_kwargs = target.validate(kwargs)
        except ToolArgumentsError as exc:
            return False, "", 0.0, f"cannot take these arguments ({exc})"
        meter = Spend() if spend is None else spend  # (what its attempts cost, if it is cut off)
        before = meter.usd
        with anyio.move_on_after(remaining) as scope:
            sub = await execute(target, sub_kwargs, ctx, events, depth=depth + 1, spend=meter)
        if scope.cancelled_caught:
            return False, "", meter.usd - before, f"did not answer in the {remaining:g} s left"
        if sub.outcome == "ok":
            return True, sub.content, sub.cost_usd, ""
        if sub.outcome == "fallback":
            return True, sub.content, sub.cost_usd, ""
        return False, "", sub.cost_usd, f"failed too ({sub.error.type if sub.error else 'error'})"
    # a plain callable taking the same arguments
    fn = step.target
    with anyio.move_on_after(remaining) as scope:
        try:
            if inspect.iscoroutinefunction(fn):
                value = await fn(**kwargs)
            else:
                from .threads import default_pool

                value = await default_pool().run(lambda: fn(**kwargs))
                if inspect.isawaitable(value):
                    value = await value
        except Exception as exc:
            return False, "", 0.0, f"raised {type(exc).__name__}: {exc}"
    if scope.cancelled_caught:
        return False, "", 0.0, f"did not answer in the {remaining:g} s left"
    try:
        return True, tool_content(value), 0.0, ""
    except UnusableResult as exc:
        return False, "", 0.0, str(exc)
