"""`ToolResult`: what one tool call came to, as the model reads it and the log records it.

The default tool caller (`PolicyToolCaller`, the tool's policy: breaker, timeout,
retries, fallback) returns one per call; a wrapper (`WrapperToolCaller`) may return its
own: a denial (`ToolResult.not_executed("a person declined it")`), an answer computed
elsewhere, or the wrapped caller's result, changed.

`checked` is the driver's guard on what a caller other than the default returns: a
result that is not a `ToolResult`, or has an outcome or a field the log cannot hold,
becomes a tool error the model reads (like a tool that raised), never the end of the run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from .._events import ErrorInfo

__all__ = ["RESULT_OUTCOMES", "ToolResult", "caller_error", "checked"]

#: The outcomes a tool caller may return (the driver logs the others itself: an unknown
#: tool, invalid arguments, a call cancelled).
RESULT_OUTCOMES = frozenset(("ok", "fallback", "error", "not_executed"))


@dataclass(slots=True)
class ToolResult:
    """What one tool call came to: the text the model reads, and what the log records of it.

    Args:
        outcome: ``"ok"`` (the tool answered), ``"fallback"`` (a fallback answered after
            the tool failed), ``"error"`` (it failed: `content` tells the model how) or
            ``"not_executed"`` (it was not run: refused by a budget, a gate...).
        content: The text the model reads as the tool's result.
        attempts: How many times the tool itself was started.
        fallback: The label of the fallback that answered, when `outcome == "fallback"`.
        error: What went wrong (type and message), for the log; None when nothing did.
        cost_usd: Dollars the call spent (its attempts and paid fallbacks): what settles
            the call's budget reservation.
        value: What the tool returned, when `outcome == "ok"` (an expectation's `check`
            compares it); the model reads `content`.
    """

    outcome: str
    content: str
    attempts: int = 0
    fallback: str | None = None
    error: ErrorInfo | None = None
    cost_usd: float = 0.0
    value: Any = None

    @classmethod
    def not_executed(cls, reason: str, *, error_type: str = "NotExecuted") -> ToolResult:
        """A call that was not run, and why: the model reads ``"not executed: <reason>"``.

        ```python
        return lw.ToolResult.not_executed("a person declined the refund", error_type="Denied")
        ```
        """
        if not isinstance(reason, str) or not reason:
            raise TypeError(f"ToolResult.not_executed(reason) needs a non-empty str, got {reason!r:.60}")
        return cls("not_executed", f"not executed: {reason}", 0, None, ErrorInfo(type=error_type, message=reason))


def caller_error(caller: object, tool: str, problem: str, error_type: str) -> ToolResult:
    """A tool error for the model when the tool caller itself failed (raised, or returned junk)."""
    import json

    message = f"the tool caller {type(caller).__name__} {problem}"
    body = {"error": {"tool": tool, "type": error_type, "message": f"{tool}: {message}", "attempts": 0}}
    return ToolResult("error", json.dumps(body, ensure_ascii=False), 0, None,
                      ErrorInfo(type=error_type, message=message))


def checked(result: object, caller: object, tool: str) -> ToolResult:
    """`result` if the log can hold it as a tool call's outcome, else a tool error saying what is wrong."""
    if not isinstance(result, ToolResult):
        return caller_error(caller, tool, f"returned {type(result).__name__}, not a loopwise.ToolResult",
                            "ToolCallerError")
    problem = None
    if result.outcome not in RESULT_OUTCOMES:
        problem = f"outcome {result.outcome!r} (one of {', '.join(sorted(RESULT_OUTCOMES))})"
    elif not isinstance(result.content, str):
        problem = f"content of type {type(result.content).__name__} (a str)"
    elif type(result.attempts) is not int or result.attempts < 0:
        problem = f"attempts={result.attempts!r} (an int >= 0)"
    elif (isinstance(result.cost_usd, bool) or not isinstance(result.cost_usd, (int, float))
          or not 0 <= result.cost_usd < math.inf):
        problem = f"cost_usd={result.cost_usd!r} (a number of dollars >= 0)"
    elif result.error is not None and not isinstance(result.error, ErrorInfo):
        problem = f"error of type {type(result.error).__name__} (an ErrorInfo or None)"
    elif result.fallback is not None and not isinstance(result.fallback, str):
        problem = f"fallback of type {type(result.fallback).__name__} (a str or None)"
    if problem is not None:
        return caller_error(caller, tool, f"returned a ToolResult with {problem}", "ToolCallerError")
    return result
