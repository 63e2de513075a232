"""The runtime's decisions as standard `logging` records, for the log pipelines you already have.

Each decision the loop makes (a limit hit, a nudge, a retry, a fallback, a breaker
change, an abandoned thread, a context fold, a failed model attempt, a kill, a resume,
the run's end) is an event in the log; `log_event` also hands it to the ``loopwise``
logger as one record whose ``extra`` carries ``run_id``, ``iteration``, ``event`` (the
event's kind) and the decision's fields, so a JSON formatter or a log shipper gets them
as attributes of the record:

```
logging.getLogger("loopwise")   INFO     decisions (limit_hit, nudge, context_folded, run_resumed,
                                          a breaker closing, run_finished: done)
                                INFO     kill_received (an operator's decision, not a failure)
                                WARNING  failures and fallbacks (tool_attempt_failed, tool_fallback,
                                          model_attempt_failed, breaker opening, thread_abandoned,
                                          a tool call that ended in error,
                                          run_finished: a limit, killed)
                                ERROR    run_finished: error
```

Records carry the event as the log keeps it: redacted. Nothing is formatted, and no
dict is built, unless the logger is enabled for the record's level.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from .._events import Event

__all__ = ["LOGGED_KINDS", "log_event", "logger"]

logger = logging.getLogger("loopwise")

_INFO, _WARNING, _ERROR = logging.INFO, logging.WARNING, logging.ERROR


def _err(error: Any) -> str | None:
    return None if error is None else f"{error.type}: {error.message}"


def _limit_hit(e: Any) -> tuple[int, str, dict[str, Any]]:
    return _INFO, f"limit {e.limit} hit: {e.detail}", {"limit": e.limit, "detail": e.detail}


def _nudge(e: Any) -> tuple[int, str, dict[str, Any]]:
    return _INFO, f"nudge ({e.reason}): {e.content}", {"reason": e.reason, "content": e.content}


def _context_folded(e: Any) -> tuple[int, str, dict[str, Any]]:
    units = ", ".join(map(str, e.units))
    return (_INFO, f"context {e.outcome} iterations [{units}] ({e.n_messages} messages): {e.reason}",
            {"outcome": e.outcome, "units": list(e.units), "n_messages": e.n_messages, "reason": e.reason})


def _tool_attempt_failed(e: Any) -> tuple[int, str, dict[str, Any]]:
    then = "no retry" if e.retry_in_s is None else f"retry in {e.retry_in_s:.2f} s"
    return (_WARNING, f"tool {e.name} attempt {e.attempt} failed: {_err(e.error)}; {then}",
            {"tool": e.name, "call_id": e.call_id, "attempt": e.attempt, "error": _err(e.error),
             "retry_in_s": e.retry_in_s, "latency_s": e.latency_s})


def _tool_fallback(e: Any) -> tuple[int, str, dict[str, Any]]:
    how = "answered" if e.ok else "failed too"
    return (_WARNING, f"tool {e.name} fell back to {e.fallback}, which {how} ({e.reason})",
            {"tool": e.name, "call_id": e.call_id, "fallback": e.fallback, "ok": e.ok, "reason": e.reason})


def _tool_call_finished(e: Any) -> tuple[int, str, dict[str, Any]] | None:
    if e.outcome != "error":
        return None  # ok, fallback (logged as tool_fallback), and the model's own mistakes
    return (_WARNING, f"tool {e.name} failed after {e.attempts} attempt(s): {_err(e.error)}",
            {"tool": e.name, "call_id": e.call_id, "outcome": e.outcome, "attempts": e.attempts,
             "error": _err(e.error)})


def _model_attempt_failed(e: Any) -> tuple[int, str, dict[str, Any]]:
    then = ("next model" if e.will_fallback else "no retry") if e.retry_in_s is None else f"retry in {e.retry_in_s:.2f} s"
    return (_WARNING, f"model {e.model} attempt {e.attempt} failed: {_err(e.error)}; {then} ({e.reason})",
            {"model": e.model, "purpose": e.purpose, "attempt": e.attempt, "error": _err(e.error),
             "retry_in_s": e.retry_in_s, "will_fallback": e.will_fallback, "reason": e.reason})


def _breaker_changed(e: Any) -> tuple[int, str, dict[str, Any]]:
    level = _INFO if e.new == "closed" else _WARNING
    return (level, f"circuit breaker of {e.name}: {e.old} -> {e.new} ({e.reason})",
            {"tool": e.name, "old": e.old, "new": e.new, "reason": e.reason})


def _thread_abandoned(e: Any) -> tuple[int, str, dict[str, Any]]:
    return (_WARNING, f"sync tool {e.name} was cancelled (a timeout or a kill); its thread {e.thread} is "
                      "abandoned and runs on detached",
            {"tool": e.name, "call_id": e.call_id, "thread_name": e.thread})


def _kill_received(e: Any) -> tuple[int, str, dict[str, Any]]:
    return (_INFO, f"killed by {e.by}: {e.reason}",
            {"by": e.by, "reason": e.reason, "halt_latency_s": e.ts - e.requested_ts})


def _run_resumed(e: Any) -> tuple[int, str, dict[str, Any]]:
    return (_INFO, f"resumed (segment {e.segment}) after {e.previous_end} by {e.by}",
            {"segment": e.segment, "previous_end": e.previous_end, "by": e.by,
             "interrupted_calls": len(e.interrupted_calls)})


def _run_finished(e: Any) -> tuple[int, str, dict[str, Any]]:
    reason = e.stop_reason
    level = _INFO if reason == "done" else _ERROR if reason == "error" else _WARNING
    why = f": {e.reason}" if e.reason else ""
    return (level, f"finished: {reason}{why} ({e.iterations} iterations, ${e.cost_usd:.4f}, {e.duration_s:.2f} s)",
            {"stop_reason": reason, "reason": e.reason, "iterations": e.iterations, "model_calls": e.model_calls,
             "cost_usd": e.cost_usd, "duration_s": e.duration_s, "input_tokens": e.usage.input_tokens,
             "output_tokens": e.usage.output_tokens, "error": _err(e.error)})


_Describe = Callable[[Any], "tuple[int, str, dict[str, Any]] | None"]

_DESCRIBE: dict[str, _Describe] = {
    "limit_hit": _limit_hit,
    "nudge": _nudge,
    "context_folded": _context_folded,
    "tool_attempt_failed": _tool_attempt_failed,
    "tool_fallback": _tool_fallback,
    "tool_call_finished": _tool_call_finished,
    "model_attempt_failed": _model_attempt_failed,
    "breaker_changed": _breaker_changed,
    "thread_abandoned": _thread_abandoned,
    "kill_received": _kill_received,
    "run_resumed": _run_resumed,
    "run_finished": _run_finished,
}

#: The kinds of events that may become a record (the loop checks this before calling).
LOGGED_KINDS = frozenset(_DESCRIBE)
# The lowest level each kind logs at: below it, nothing is built at all.
_MIN_LEVEL: dict[str, int] = {kind: _INFO for kind in _DESCRIBE}
_MIN_LEVEL.update(tool_attempt_failed=_WARNING, tool_fallback=_WARNING, tool_call_finished=_WARNING,
                  model_attempt_failed=_WARNING, thread_abandoned=_WARNING)


def log_event(event: Event) -> None:
    """One record on the ``loopwise`` logger for a runtime decision (nothing for other events)."""
    kind = event.kind
    min_level = _MIN_LEVEL.get(kind)
    if min_level is None or not logger.isEnabledFor(min_level):
        return
    described = _DESCRIBE[kind](event)
    if described is None:
        return
    level, message, fields = described  # level >= min_level: enabled
    iteration = getattr(event, "iteration", None)
    extra = {"run_id": event.run_id, "iteration": iteration, "event": kind, **fields}
    where = f"run {event.run_id}" if iteration is None else f"run {event.run_id} iteration {iteration}"
    logger.log(level, "%s: %s", where, message, extra=extra)
