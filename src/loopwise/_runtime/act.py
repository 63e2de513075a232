"""ACT + OBSERVE for the driver: a response's tool calls, each under its reservation and policy.

`Acting` is the part of `_runtime.run.Run` that runs tool calls (a base class with no state of
its own: a run is one object). Each call's start and outcome are events; `evolve` adds
the tool messages once every call has an outcome.

One concurrency model for a response's calls, a task group's: the first call runs in
the run's task, the others start as soon as it first waits (at most
`max_parallel_tools` at once, in the model's order, each reserving its budget when its
turn comes), and cancellation is level-triggered: while the run's scope is cancelled (a
kill, the deadline), every call still running is cancelled again at each await.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import anyio

from .._tools.breaker import BreakerChange
from .._policies.budget import BudgetExceeded, reserve
from .._events import (
    BreakerChanged,
    ErrorInfo,
    ThreadAbandoned,
    ToolAttemptFailed,
    ToolFallback,
)
from .._core.decide import tool_finished, tool_started
from .._tools.caller import PolicyToolCaller
from .._tools.execute import Spend, _redactor, execute
from .._tools.expect import NO_VALUE
from .loggable import ascii_error
from .._messages import ToolCall
from .scopes import _asyncio_loop, task_group
from .._stores.storable import clean
from .._tools.result import caller_error, checked
from .._tools.tool import RunContext, Tool, ToolArgumentsError

if TYPE_CHECKING:
    from .agent import Agent
    from .._policies.budget import Budget
    from .clock import Clock
    from .._events import Event

__all__ = ["Acting"]

_log = logging.getLogger("loopwise")


class Acting:
    """Runs a response's tool calls for a `Run` (which has the attributes below)."""

    __slots__ = ()

    if TYPE_CHECKING:
        agent: Agent
        budgets: tuple[Budget, ...]
        clock: Clock
        deps: Any
        run_id: str
        seq: int
        tags: tuple[str, ...]

        def _emit(self, event: Event) -> Event: ...

        def _write(self) -> Any: ...

    def _tool_finished(self, iteration: int, call: ToolCall, outcome: str, content: str,
                       latency: float, error: ErrorInfo | None, attempts: int = 0,
                       fallback: str | None = None, cost_usd: float = 0.0, value: Any = NO_VALUE) -> None:
        """Log the call's end, its content and error made storable first (`_stores.storable`)."""
        replaced: list[str] | None = None
        if not content.isascii() or (error is not None and not ascii_error(error)):
            replaced = []
            content = clean(content, "content", replaced)
            error = clean(error, "error", replaced)
        event = tool_finished(self.run_id, self.seq, self.clock.time(), self.agent, iteration, call, outcome, content,
                              error, latency, attempts, fallback, cost_usd, value)
        if replaced:
            event.replaced = replaced
        self._emit(event)

    async def _act(self, iteration: int, calls: Sequence[ToolCall]) -> None:
        """ACT + OBSERVE: run `calls`; each outcome is an event (`evolve` adds the tool messages)."""
        agent = self.agent
        tools = agent.tools_by_name
        clock = self.clock
        runnable: list[tuple[ToolCall, Tool, dict[str, Any]]] = []
        for call in calls:
            # The call's start is logged; the tool gets the arguments less the model's expectation.
            started, arguments = tool_started(self.run_id, self.seq, clock.time(), agent, iteration, call)
            self._emit(started)
            tool = tools.get(call.name) if isinstance(call.name, str) else None
            if tool is None:
                content = (f"error: unknown tool {call.name!r}; available tools: "
                           f"{', '.join(tools) or '(none)'}")
                self._tool_finished(iteration, call, "unknown_tool", content, 0.0, None)
                continue
            try:
                kwargs = tool.validate(arguments)
            except ToolArgumentsError as exc:
                content = f"error: {tool.name}: {exc}"
                self._tool_finished(iteration, call, "invalid_arguments", content, 0.0,
                                    ErrorInfo(type="ToolArgumentsError", message=str(exc)))
                continue
            runnable.append((call, tool, kwargs))
        if runnable:
            # The calls are durable before any tool runs: after a crash, resume knows
            # what may have happened (and never re-runs a non-idempotent call blindly).
            try:
                if (waiter := self._write()) is not None:
                    await waiter
            except Exception as exc:  # the store failed: no tool runs, and the log says so
                content = f"not executed: the event log could not be written ({exc})"
                for call, _, _ in runnable:
                    self._tool_finished(iteration, call, "not_executed", content, 0.0,
                                        ErrorInfo(type=type(exc).__name__, message=content))
                raise
        if len(runnable) == 1:  # inside the run's cancel scope already: no task needed
            await self._call_tool(iteration, *runnable[0])
            return
        if not runnable:
            return
        # One model for a response's calls: a task group's. The first call runs in this
        # task, the others start as soon as it first waits (at most `max_parallel_tools`
        # at once, in the model's order), and cancellation is level-triggered: while the
        # run's scope is cancelled (a kill, the deadline), every call still running is
        # cancelled again at each await, so a tool that swallows one cancellation cannot
        # hold the run up past its next await.
        bound = self.agent.max_parallel_tools
        limiter = anyio.CapacityLimiter(bound) if bound is not None and bound < len(runnable) else None
        loop = _asyncio_loop()
        if loop is not None:
            await self._call_tools_at_once(loop, iteration, runnable, limiter)
            return
        async with task_group() as tg:  # (the reference: any anyio backend)
            if limiter is not None:
                for item in runnable[1:]:
                    tg.start_soon(self._call_tool_in_turn, limiter, iteration, *item, name=_CALL_TOOL)
                await self._call_tool_in_turn(limiter, iteration, *runnable[0])
            else:
                for item in runnable[1:]:
                    tg.start_soon(self._call_tool, iteration, *item, name=_CALL_TOOL)
                await self._call_tool(iteration, *runnable[0])

    async def _call_tools_at_once(self, loop: asyncio.AbstractEventLoop, iteration: int,
                                  runnable: list[tuple[ToolCall, Tool, dict[str, Any]]],
                                  limiter: anyio.CapacityLimiter | None) -> None:
        """The task group's semantics on asyncio, without its per-task bookkeeping.

        An anyio task group's task handle (an event and a cancel scope of its own) made
        overhead.py's (a) workload, one response with two calls, cost 19% more
        instructions per run (`benchmarks/instructions.py`: 1.35 M against 1.13 M); an
        asyncio task does the same work here. The task group stays the reference: other
        anyio backends use it, and tests/test_act.py runs both. `_call_tool` turns every failure of a tool
        into an outcome, so a call's task ends in a cancellation or a runtime bug only:
        then (or if this task is cancelled) the calls still running are cancelled, again
        at every turn of the event loop until each has ended, as a cancelled scope does,
        and the exception goes on.
        """
        if limiter is None:
            tasks = [loop.create_task(self._call_tool(iteration, *item), name=_CALL_TOOL) for item in runnable[1:]]
        else:
            tasks = [loop.create_task(self._call_tool_in_turn(limiter, iteration, *item), name=_CALL_TOOL)
                     for item in runnable[1:]]
        try:
            if limiter is None:
                await self._call_tool(iteration, *runnable[0])
            else:
                await self._call_tool_in_turn(limiter, iteration, *runnable[0])
            for task in tasks:
                await task
        except BaseException:
            with anyio.CancelScope(shield=True):  # (a cancelled scope would cancel these waits too)
                while pending := [task for task in tasks if not task.done()]:
                    for task in pending:
                        task.cancel()
                    await asyncio.sleep(0)  # each gets its cancellation before the next round
                for task in tasks:
                    if not task.cancelled():
                        task.exception()  # (retrieved: its own end is in the log; ours is raised)
            raise

    async def _call_tool_in_turn(self, limiter: anyio.CapacityLimiter, iteration: int, call: ToolCall,
                                 tool: Tool, kwargs: dict[str, Any]) -> None:
        """`_call_tool` once a place is free (`max_parallel_tools`), in the model's order.

        The turn comes first, then the call's budget reservation: a call waiting for its
        turn holds none. A call cancelled while it waits is logged as cancelled.
        """
        try:
            await limiter.acquire()
        except anyio.get_cancelled_exc_class():
            self._tool_finished(iteration, call, "cancelled", "cancelled", 0.0,
                                ErrorInfo(type="Cancelled", message="the call was cancelled"))
            raise
        try:
            await self._call_tool(iteration, call, tool, kwargs)
        finally:
            limiter.release()

    async def _call_tool(self, iteration: int, call: ToolCall, tool: Tool, kwargs: dict[str, Any]) -> None:
        """One tool call under its reservation, through the agent's tool caller; its outcome is logged.

        The caller (`Agent(tool_caller=...)`, default `PolicyToolCaller`: the tool's policy)
        runs inside the reservation: it cannot skip it, and what it returns settles it.
        """
        policy = tool.policy
        held = spend = None
        if (policy.cost_usd or policy.fallback) and (worst := policy.max_cost_usd()):
            spend = Spend()
            if self.budgets:
                # A paid call reserves its worst case before it runs: every attempt, and
                # every paid fallback its chain can reach. What it spent settles it.
                try:
                    held = reserve(self.budgets, usd=worst)
                except BudgetExceeded as exc:
                    content = f"not executed: {exc} (the worst case of {policy.cost_note(tool.name)})"
                    self._tool_finished(iteration, call, "not_executed", content, 0.0,
                                        ErrorInfo(type="BudgetExceeded", message=str(exc)))
                    return
        caller = self.agent.tool_caller
        call_id: str = call.id  # type: ignore[assignment]  # (the core gave every call an id)
        reporter = _CallReporter(self, iteration, call_id)
        started = self.clock.monotonic()
        try:
            if type(caller) is PolicyToolCaller:
                # The default caller, called as what it is (`execute`), with a RunContext
                # only for a tool that reads one (or a fallback tool, or a `call` of a
                # subclass, that may): a frozen RunContext costs ~3 µs to make, 3.8% of a
                # run's instructions in overhead.py's (a). tests/test_wrappers.py checks
                # that a run through a plain `WrapperToolCaller()` logs the same.
                ctx = (RunContext(run_id=self.run_id, call_id=call_id, iteration=iteration, tags=self.tags,
                                  deps=self.deps)
                       if tool.context_param is not None or policy.fallback or type(tool).call is not _tool_call
                       else None)
                result = await execute(tool, kwargs, ctx, reporter, spend=spend)
            else:
                returned = await caller.call_tool(tool, kwargs, RunContext(
                    run_id=self.run_id, call_id=call_id, iteration=iteration, tags=self.tags, deps=self.deps,
                    _events=reporter, _spend=spend))
                result = checked(returned, caller, tool.name)  # (malformed: a tool error saying so)
                if result is not returned:
                    result.cost_usd = 0.0 if spend is None else spend.usd
        except Exception as exc:  # the caller itself failed (a wrapper): a tool error, as if the tool raised
            result = caller_error(caller, tool.name, _redactor(policy, kwargs)(f"raised {type(exc).__name__}: {exc}"),
                                  type(exc).__name__)
            result.cost_usd = 0.0 if spend is None else spend.usd  # each attempt started may have been billed
        except BaseException as exc:
            spent = 0.0 if spend is None else spend.usd  # each attempt started may have been billed
            if held is not None:
                held.settle(spent, 0)
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            self._tool_finished(iteration, call, "cancelled", "cancelled", self.clock.monotonic() - started,
                                ErrorInfo(type="Cancelled", message="the call was cancelled"), cost_usd=spent)
            raise
        if held is not None and (overrun := held.settle(result.cost_usd, 0)) is not None:
            _log.error("run %s: tool call %s (%s) cost more than its reservation: %s", self.run_id, call.id,
                       tool.name, overrun)
        outcome = result.outcome
        # (positionally: ..., attempts, fallback, cost_usd, value)
        self._tool_finished(iteration, call, outcome, result.content, self.clock.monotonic() - started, result.error,
                            result.attempts, result.fallback, result.cost_usd,
                            result.value if outcome == "ok" else NO_VALUE)


_tool_call = Tool.call
# The name anyio gives a task of `_call_tool` (`module.qualname`), worked out once.
_CALL_TOOL = f"{Acting._call_tool.__module__}.{Acting._call_tool.__qualname__}"


class _CallReporter:
    """Writes what `execute` reports about one tool call to the run's log, as it happens."""

    __slots__ = ("call_id", "iteration", "run")

    def __init__(self, run: Acting, iteration: int, call_id: str) -> None:
        self.run = run
        self.iteration = iteration
        self.call_id = call_id

    def attempt_failed(self, tool: str, attempt: int, error: ErrorInfo, latency_s: float,
                       retry_in_s: float | None) -> None:
        run = self.run
        run._emit(ToolAttemptFailed(run_id=run.run_id, seq=run.seq, ts=run.clock.time(), iteration=self.iteration,
                                    call_id=self.call_id, name=tool, attempt=attempt, error=error,
                                    latency_s=latency_s, retry_in_s=retry_in_s))

    def fallback_tried(self, tool: str, fallback: str, ok: bool, reason: str) -> None:
        run = self.run
        run._emit(ToolFallback(run_id=run.run_id, seq=run.seq, ts=run.clock.time(), iteration=self.iteration,
                               call_id=self.call_id, name=tool, fallback=fallback, ok=ok, reason=reason))

    def breaker_changed(self, change: BreakerChange) -> None:
        run = self.run
        run._emit(BreakerChanged(run_id=run.run_id, seq=run.seq, ts=run.clock.time(), iteration=self.iteration,
                                 name=change.tool, old=change.old, new=change.new, reason=change.reason))

    def thread_abandoned(self, tool: str, thread: str) -> None:
        run = self.run
        run._emit(ThreadAbandoned(run_id=run.run_id, seq=run.seq, ts=run.clock.time(), iteration=self.iteration,
                                  call_id=self.call_id, name=tool, thread=thread))
