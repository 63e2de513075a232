"""Tool calls behind one interface: `ToolCaller`, the default `PolicyToolCaller`, `WrapperToolCaller`.

The driver (`_runtime.act.Acting`) makes every tool call of a run through its agent's tool
caller (`Agent(tool_caller=...)`), with one method:

    await caller.call_tool(tool, args, ctx) -> ToolResult

What happens around it is the driver's, whatever the caller does:

```
tool_call_started ─ arguments validated ─ worst case reserved on the budgets
    ─► caller.call_tool(tool, args, ctx) ─► ToolResult ─ reservation settled ─ tool_call_finished
         │ raises ─► a tool error the model reads (the run goes on)
         │ returns junk ─► a tool error saying what was wrong with it
         └ cancelled (kill, deadline) ─► tool_call_finished "cancelled", the cancellation goes on
```

`PolicyToolCaller` runs the tool under its policy (`_tools.execute.execute`: breaker, a
timeout per attempt, retries with backoff, the fallback chain, inside `total_timeout`)
and reports each attempt, fallback and breaker change to the run's log as it happens.

An agent with the default caller has its calls made as what that caller does, `execute`,
with no `RunContext` for a tool that reads none (`_runtime.act.Acting._call_tool`: making one
costs ~3 µs a call); a subclass of `PolicyToolCaller`, or any other caller, is called
through `call_tool` with a `RunContext` for every call.

`WrapperToolCaller(wrapped)` delegates to `wrapped` (default: a `PolicyToolCaller`);
subclass it and override `call_tool` to act before or after a call: deny it
(`ToolResult.not_executed(...)`), change its arguments, record it, run it elsewhere (a
durable engine's activity). Wrappers nest: ``Recorder(ApprovalGate())``.

Why the policy layers (timeout, retries, fallback, breaker) are one function and not a
stack of wrappers: they are not independent layers. The timeout of an attempt is cut by
what `total_timeout` leaves after reserving time for the fallbacks, the breaker is asked
before each attempt and told each attempt's end, a retry's wait is skipped when it
would eat the fallbacks' time, and the cost is counted per attempt as it starts (the
budget reservation settles on it if the call is cancelled). As separate wrappers each
would need the others' state passed through `ctx`, and every call of every tool would
pay for three more coroutine frames: `execute` stays the single default implementation,
and a user wrapper goes around all of it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any

from .._errors import UserError
from .execute import execute

if TYPE_CHECKING:
    from .result import ToolResult
    from .tool import RunContext, Tool

__all__ = ["PolicyToolCaller", "ToolCaller", "WrapperToolCaller"]


class ToolCaller(ABC):
    """How a run calls a tool: one async method from a call to its `ToolResult`.

    Implement `call_tool`, or (more often) subclass `WrapperToolCaller` to act around
    the default. The run has already validated the arguments and reserved the call's
    worst case on its budgets; it logs the result and settles the reservation with its
    `cost_usd`.
    """

    @abstractmethod
    async def call_tool(self, tool: Tool, args: dict[str, Any], ctx: RunContext) -> ToolResult:
        """Make one tool call; return what the model reads (raising makes it a tool error).

        Args:
            tool: The tool the model called (`tool.name`, `tool.policy`, `tool.fn`).
            args: Its validated keyword arguments (the model's expectation removed).
            ctx: The run id, the call id (stable across resume: an idempotency key), the
                iteration, the run's tags and `deps`.
        """

    def describe(self) -> dict[str, Any]:
        """What the run-started event records about this caller."""
        return {"class": type(self).__name__}


class PolicyToolCaller(ToolCaller):
    """The default: the tool under its policy (breaker, timeout, retries, fallback).

    Its attempts, fallbacks and breaker changes are written to the run's log as they
    happen. Outside a run (a durable engine's worker calling it with a `RunContext` of
    its own) they are not reported anywhere; the result says what happened.
    """

    async def call_tool(self, tool: Tool, args: dict[str, Any], ctx: RunContext) -> ToolResult:
        return await execute(tool, args, ctx, ctx._events or _UNREPORTED, spend=ctx._spend)


class WrapperToolCaller(ToolCaller):
    """A tool caller that delegates to another: subclass it and override `call_tool`.

    Args:
        wrapped: The caller it delegates to (default: a `PolicyToolCaller`, the tool
            under its policy).

    ```python
    class Deny(lw.WrapperToolCaller):
        async def call_tool(self, tool, args, ctx):
            if tool.name == "delete_account":
                return lw.ToolResult.not_executed("deleting accounts needs a person")
            return await super().call_tool(tool, args, ctx)
    ```
    """

    def __init__(self, wrapped: ToolCaller | None = None) -> None:
        if wrapped is None:
            wrapped = PolicyToolCaller()
        elif not isinstance(wrapped, ToolCaller):
            raise UserError(f"{type(self).__name__}(wrapped) must be a loopwise.ToolCaller, "
                            f"got {type(wrapped).__name__}")
        self.wrapped = wrapped

    async def call_tool(self, tool: Tool, args: dict[str, Any], ctx: RunContext) -> ToolResult:
        return await self.wrapped.call_tool(tool, args, ctx)

    def describe(self) -> dict[str, Any]:
        return {"class": type(self).__name__, "wraps": self.wrapped.describe()}


class _Unreported:
    """Where `execute`'s reports go when nobody listens (a call made outside a run)."""

    __slots__ = ()

    def attempt_failed(self, *args: Any) -> None:
        pass

    def fallback_tried(self, *args: Any) -> None:
        pass

    def breaker_changed(self, *args: Any) -> None:
        pass

    def thread_abandoned(self, *args: Any) -> None:
        pass


_UNREPORTED = _Unreported()
#: The caller of an agent given none (shared: it holds no state).
DEFAULT_TOOL_CALLER = PolicyToolCaller()
