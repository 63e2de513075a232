"""One run of the loop: THINK → ACT → OBSERVE → REFINE → CHECK, until a stop reason.

`Run` holds a run's state and emits its events; it is the only writer of the log
for that run. Each pass of the loop:

1. THINK: one model call with the context and the tool specs.
2. ACT: every tool call of that response starts at once and runs concurrently.
3. OBSERVE: results and errors become tool messages, in the order the model asked.
4. REFINE: the context the next THINK sees (this version keeps the whole transcript).
5. CHECK: the iteration cap.

Events are buffered in memory and handed to the store before every model call and at
the end, so an iteration's events are durable before the next model call starts.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from ._errors import ModelBehaviorError, StoreError, UserError
from ._breaker import BreakerChange
from ._context import estimate_tokens
from ._budget import Budget, BudgetExceeded, CallReservation, reserve, reserve_call
from ._events import (
    BreakerChanged,
    ContextFolded,
    ErrorInfo,
    ModelAttemptFailed,
    Event,
    KillReceived,
    LimitHit,
    ModelCallFinished,
    Nudge,
    RunFinished,
    RunStarted,
    StopReason,
    ThreadAbandoned,
    ToolAttemptFailed,
    ToolFallback,
    new_iteration_started,
    new_model_call_finished,
    new_model_call_started,
    new_run_finished,
    new_run_started,
    new_tool_call_finished,
    new_tool_call_started,
)
from ._control import call_in_loop
from ._execute import Spend, execute
from ._expect import NO_VALUE, judge, split_expectation
from ._logging import LOGGED_KINDS, log_event
from ._resume import UNKNOWN_OUTCOME
from ._messages import Message, ToolCall, Usage, new_message
from ._storable import TOO_DEEP, TooDeep, clean, clean_event, clean_text, plain, too_deep
from ._seen import shown
from ._runvars import CurrentRun, _asyncio_loop, cancel_scope, current_run, task_group
from ._tools import RunContext, Tool, ToolArgumentsError
from .models._base import Model, ModelRequest, ModelResponse
from .models._resilience import AttemptRecord, call_with_policy

if TYPE_CHECKING:
    from ._agent import Agent
    from ._control import KillRequest
    from ._resume import Resumption
    from ._store import EventStore

__all__ = ["Run"]

_log = logging.getLogger("loopwise")
_wall = time.time
_mono = time.perf_counter

NOT_EXECUTED = "not executed: iteration limit reached"
FINAL_ANSWER_PROMPT = (
    "You have reached the limit of {limit} iterations, so tools are disabled now. "
    "Give your best final answer from what you already know."
)
RUNAWAY_FINAL_PROMPT = (
    "You keep repeating yourself without getting closer to an answer, so tools are disabled now. "
    "Give your best final answer from what you already know."
)
LIMIT_FINAL_PROMPT = (
    "The run has reached its {limit} limit, so tools are disabled now. "
    "Give your best final answer from what you already know."
)
EMPTY_RESPONSE_NUDGE = (
    "Your last response was empty (no text and no tool calls). "
    "Call a tool or give your final answer."
)
LENGTH_NUDGE = (
    "Your last answer was cut off by the max_tokens limit, so it is not a final answer. "
    "Give a shorter complete answer."
)
# How long a stopping run may take to write its last events when shielded from cancellation.
FINISH_TIMEOUT_S = 5.0


# Internal, not a LoopwiseError: caught in `Run`, never reaches a caller (see `_errors`).
class _Stop(Exception):
    """Internal: the loop has decided to stop."""

    def __init__(self, reason: StopReason, detail: str | None = None, error: ErrorInfo | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.error = error


class Run:
    """The state of one run, and the loop that advances it."""

    __slots__ = (
        "active_before",
        "agent",
        "budgets",
        "call_ids",
        "context",
        "cost_usd",
        "counts_tokens",
        "deadline",
        "delivered",
        "current",
        "deps",
        "iteration",
        "kill_scope",
        "killed",
        "loop",
        "model_calls",
        "monitor",
        "output",
        "pending",
        "redact",
        "resumption",
        "run_id",
        "seq",
        "shown",
        "since",
        "sink",
        "started",
        "started_mono",
        "store",
        "tags",
        "think_input_tokens",
        "transcript",
        "usage",
    )

    def __init__(
        self,
        agent: Agent,
        run_id: str,
        task: list[Message],
        tags: tuple[str, ...],
        deps: Any,
        store: EventStore,
        sink: Callable[[Event], None] | None = None,
        budgets: tuple[Budget, ...] = (),
    ) -> None:
        self.agent = agent
        self.run_id = run_id
        self.deps = deps
        self.store = store
        self.sink = sink
        #: What every event passes through before the log, the stream and `logging` see it.
        self.redact = agent.redact_event
        self.pending: list[Event] = []
        self.seq = 0
        self.iteration = 0
        self.model_calls = 0
        self.usage = Usage()
        self.cost_usd = 0.0
        self.output: str | None = None
        self.call_ids: set[str] = set()
        self.budgets = budgets
        # A free model under dollar budgets only cannot overspend: no estimate, no reservation.
        self.counts_tokens = any(b.tokens is not None for b in budgets)
        # The first system message: the instructions, plus how to state expectations when on.
        instructions = agent.system_prompt
        replaced: list[str] = []
        task, instructions, tags = _storable_start(task, instructions, tags, replaced)
        self.transcript: list[Message] = (
            [new_message("system", instructions), *task] if instructions else list(task)
        )
        self.context = agent.context.start(head=len(self.transcript))
        self.monitor = agent.runaway.start() if agent.runaway is not None else None
        self.think_input_tokens = 0
        #: How much of the transcript the log has recorded as shown to the model (`_seen`).
        self.shown = 0
        self.deadline: float | None = None
        self.current = CurrentRun(run_id)
        self.started_mono = 0.0
        self.killed: KillRequest | None = None
        self.kill_scope: anyio.CancelScope | None = None
        #: The event loop the run executes on (set when it starts): where kills are delivered.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.delivered = False
        #: Set by `resume`: where this segment picks up, and the active time of the earlier ones.
        self.resumption: Resumption | None = None
        self.active_before = 0.0
        self.since = 0.0
        # (run_id, seq, ts, task, instructions, agent, limits, tags)
        # RunResult reads it: as logged (redacted).
        started = new_run_started(run_id, 0, _wall(), task, instructions, agent.describe(), agent.limits.to_dict(),
                                  list(tags))
        if replaced:
            started.replaced = replaced
        self.started: RunStarted = self._emit(started)  # type: ignore[assignment]
        # Tags as logged (redacted), for the control plane's leases and kills, and for tools:
        # what a resumed run reads from the log too.
        self.tags = tuple(self.started.tags)

    # -- the log -------------------------------------------------------------------

    def _emit(self, event: Event) -> Event:
        """Append `event` to the log (and the stream, and `logging`); return it as logged."""
        self.seq += 1
        # What the log, the stream and `logging` get is redacted; the run keeps the real content.
        redact = self.redact
        if redact is not None:
            event = redact(event)
        self.pending.append(event)
        if self.sink is not None:
            self.sink(event)
        if event.kind in LOGGED_KINDS:
            log_event(event)
        return event

    async def _flush(self) -> None:
        if (waiter := self._write()) is not None:
            await waiter

    def _write(self) -> Awaitable[None] | None:
        """Hand the pending events to the store; what to await for them to be durable, if anything.

        (`_flush` without a coroutine of its own: a store that is done at once, like the
        in-memory one, costs no frame.) A batch the store refuses stays pending, in front,
        so the run's end is written with it (no gap in the log). Refused for a value it
        cannot encode that no edge caught: that value is made storable (`clean_event`,
        which says so in the event) and the batch written again.
        """
        if not self.pending:
            return None
        batch, self.pending = self.pending, []
        try:
            try:
                return self.store.write(batch)
            except Exception:
                if not any([clean_event(event) for event in batch]):
                    raise
            return self.store.write(batch)
        except BaseException:
            self.pending[:0] = batch
            raise

    # -- the run -------------------------------------------------------------------

    async def execute(self) -> RunFinished:
        """Run to a stop reason; the run's end is written to the log in every case.

        Returns the run's end as logged (redacted).
        """
        token = current_run.set(self.current)
        self.started_mono = _mono()
        try:
            try:
                stop = await self._guarded_loop()
            except anyio.get_cancelled_exc_class():
                with anyio.CancelScope(shield=True), anyio.move_on_after(FINISH_TIMEOUT_S):
                    await self._finish_quietly(_Stop("killed", "cancelled by caller"))
                raise
            except _Stop as s:
                stop = s
            except Exception as exc:  # a bug or a store failure: recorded, not lost
                stop = _Stop("error", f"internal error: {type(exc).__name__}: {exc}",
                             ErrorInfo.from_exception(exc, with_traceback=True))
            except (SystemExit, KeyboardInterrupt, GeneratorExit) as exc:
                # The process is leaving (a tool called sys.exit(), an interrupt), or this
                # coroutine is being closed: the run's end first, without awaiting anything,
                # then the exception goes on. Resumable.
                self._finish_now(_Stop("error", f"interrupted: {type(exc).__name__}({exc})",
                                       ErrorInfo.from_exception(exc, with_traceback=True)))
                raise
            except BaseException as exc:
                # Not an Exception, not a cancellation (a tool's or a model's own `class
                # Boom(BaseException)`): meant to unwind past `except Exception`, so it is not
                # made a tool error. The run ends as `error`, then it goes on. Resumable.
                with anyio.CancelScope(shield=True), anyio.move_on_after(FINISH_TIMEOUT_S):
                    await self._finish_quietly(_Stop(
                        "error", f"interrupted: {type(exc).__name__}({exc}), a BaseException that is not an "
                        "Exception, was raised", ErrorInfo.from_exception(exc, with_traceback=True)))
                raise
            return await self._finish(stop)
        finally:
            current_run.reset(token)

    def deliver(self, request: KillRequest) -> None:
        """Hand a kill request to the run from any thread (the control plane's side; once).

        A request stored before `since` was for an earlier segment (before a resume took
        the run's lease): not delivered again.
        """
        if self.delivered or request.ts < self.since:
            return
        self.delivered = True
        call_in_loop(self.loop, self.kill, request)

    def kill(self, request: KillRequest) -> None:
        """A kill request reached the run (called on its event loop): cancel what is in flight, stop.

        The first request wins; one that arrives after the run decided to stop is ignored.
        """
        if self.killed is not None:
            return
        self.killed = request
        if self.kill_scope is not None:
            self.kill_scope.cancel()

    async def _guarded_loop(self) -> _Stop:
        """The loop inside one cancel scope: a kill cancels it, and so does the deadline.

        Whatever is in flight then (the model call, the tool calls) is cancelled. One
        scope for both (a scope is a frame and a timer entry per run; 1000 runs at once
        feel each).
        """
        deadline_s = self.agent.limits.deadline_s
        deadline = math.inf
        if deadline_s is not None:
            # The deadline counts active time: a resumed run has only what its earlier segments left.
            deadline = self.deadline = anyio.current_time() + deadline_s - self.active_before
        with cancel_scope(deadline) as self.kill_scope:
            if self.killed is None:
                return await self._loop()
        self.kill_scope = None
        request = self.killed
        if request is None:  # the deadline
            detail = f"deadline of {deadline_s:g} s reached during iteration {self.iteration}"
            self._emit(LimitHit(run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=self.iteration,
                                limit="deadline", detail=detail))
            return _Stop("deadline", detail)
        self._emit(KillReceived(run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=self.iteration,
                                by=request.by, reason=request.reason, requested_ts=request.ts))
        return _Stop("killed", f"killed by {request.by}: {request.reason}")

    def _out_of_time(self, iteration: int) -> str | None:
        """Why another iteration would not fit before the deadline (from the ones so far), if so."""
        if self.deadline is None or iteration < 2:
            return None
        now = anyio.current_time()
        spent = now - (self.deadline - self.agent.limits.deadline_s)  # type: ignore[operator]
        per_iteration = spent / (iteration - 1)
        left = self.deadline - now
        # Another iteration, then still time for the best-effort answer (at most another).
        if left >= 2 * per_iteration:
            return None
        return (f"deadline of {self.agent.limits.deadline_s:g} s: {left:.2f} s left, an iteration has "
                f"taken {per_iteration:.2f} s and the answer needs time too")

    async def _finish(self, stop: _Stop) -> RunFinished:
        """Write the run's end. Raises `StoreError` if the store cannot take it: no result
        claims an end the log does not have."""
        event = self._emit_end(stop)
        try:
            await self._flush()
        except Exception as exc:
            raise StoreError(
                f"run {self.run_id}: its end ({stop.reason}) could not be written to the event store "
                f"{self.store.describe()} ({type(exc).__name__}: {exc}); the log holds no end for it "
                f"({len(self.pending)} events unwritten): `agent.resume({self.run_id!r})` continues it once "
                "the store works again"
            ) from exc
        return event

    async def _finish_quietly(self, stop: _Stop) -> None:
        """`_finish` while another exception is on its way out: a store failure is logged, not raised."""
        try:
            await self._finish(stop)
        except StoreError as exc:
            _log.error("%s", exc)

    def _finish_now(self, stop: _Stop) -> None:
        """`_finish` without awaiting: for a store that writes at once (the SQLite and memory ones)."""
        self._emit_end(stop)
        try:
            waiter = self._write()
        except Exception as exc:  # noqa: BLE001 - the exit under way matters more
            _log.error("run %s: could not write its end to the event store (%s: %s)", self.run_id,
                       type(exc).__name__, exc)
            return
        if waiter is not None:  # a store that must be awaited: its end stays unwritten (a crash)
            close = getattr(waiter, "close", None)
            if close is not None:
                close()
            _log.error("run %s: its end is not in the event store (%s writes asynchronously, and the "
                       "process is leaving); it reads as crashed", self.run_id, self.store.describe())

    def _emit_end(self, stop: _Stop) -> RunFinished:
        usage = self.usage
        # (run_id, seq, ts, stop_reason, output, iterations, model_calls, usage, cost_usd,
        #  duration_s, reason, error)
        event = new_run_finished(
            self.run_id, self.seq, _wall(), stop.reason, self.output, self.iteration, self.model_calls,
            Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens),
            self.cost_usd, self.active_before + _mono() - self.started_mono, stop.detail, stop.error,
        )
        return self._emit(event)  # type: ignore[return-value]

    async def _loop(self) -> _Stop:
        agent = self.agent
        max_iterations = agent.limits.max_iterations
        specs = agent.tool_specs
        # A context that never folds sends the whole transcript: THINK without `_think`'s frame.
        folds = agent.context.folds
        if self.resumption is not None:
            plan, self.resumption = self.resumption, None
            if (stop := await self._resume_step(plan)) is not None:
                return stop
        while True:
            if self.killed is not None and self.kill_scope is not None:
                # The seed's rule: the kill switch is checked between iterations too.
                self.kill_scope.cancel()
                await anyio.lowlevel.checkpoint()
            if self.deadline is not None and (why := self._out_of_time(self.iteration + 1)) is not None:
                return await self._limit_stop(self.iteration, "deadline", why)
            self.iteration += 1
            iteration = self.iteration
            cost_before = self.cost_usd
            contents: list[str] = []
            self._emit(new_iteration_started(self.run_id, self.seq, _wall(), iteration))
            # THINK
            if folds:
                response = await self._think(iteration, specs, "think")
            else:  # (messages, tools, max_tokens)
                request = ModelRequest(list(self.transcript), specs, agent.max_tokens)
                response = (await self._call_model(iteration, request, "think", agent.models))[0]
            calls = response.tool_calls
            if not calls:
                text = response.text
                if response.finish_reason == "length":
                    if text:
                        self.transcript.append(Message("assistant", text))
                    self._nudge(iteration, LENGTH_NUDGE, "the answer was cut by max_tokens")
                elif text is None or not text.strip():
                    self._nudge(iteration, EMPTY_RESPONSE_NUDGE, "the model returned an empty response")
                else:
                    self.transcript.append(new_message("assistant", text))
                    self.output = text
                    return _Stop("done")
            else:
                calls = self._assign_ids(iteration, calls)
                self.transcript.append(new_message("assistant", response.text, tuple(calls)))
                if iteration >= max_iterations:
                    self._skip_tools(iteration, calls)
                    return await self._limit_stop(iteration, "max_iterations",
                                                  f"iteration limit of {max_iterations} reached with tool calls pending")
                # ACT + OBSERVE
                contents = await self._act(iteration, calls)
            # CHECK
            if iteration >= max_iterations:
                return await self._limit_stop(iteration, "max_iterations",
                                              f"iteration limit of {max_iterations} reached without a final answer")
            if self.monitor is not None:
                verdict = self.monitor.observe_iteration(calls, contents if calls else [], self.think_input_tokens,
                                                         self.cost_usd - cost_before)
                if verdict is not None:
                    if verdict.action == "stop":
                        return await self._limit_stop(iteration, "runaway", verdict.message)
                    self._nudge(iteration, verdict.nudge, f"runaway: {verdict.message}")

    async def _resume_step(self, plan: Resumption) -> _Stop | None:
        """Settle what the previous segment left in flight, then CHECK; None: go on with the loop."""
        max_iterations = self.agent.limits.max_iterations
        if plan.done:
            return _Stop("done")
        if plan.limit is not None:
            hit = plan.limit
            if not plan.final_answered and self.agent.limits.final_answer_on_limit:
                await self._best_effort(hit.iteration, hit.limit)
            return _Stop(hit.limit, hit.detail)
        iteration = self.iteration
        calls: list[ToolCall] = []
        contents: list[str] = []
        if plan.act_iteration:
            iteration = plan.act_iteration
            calls = plan.act_calls
            results = dict(plan.act_contents)
            rerun = [c for c, again in plan.interrupted if again]
            for call, again in plan.interrupted:
                if not again:
                    content = UNKNOWN_OUTCOME.format(name=call.name)
                    self._tool_finished(iteration, call, "unknown", content, 0.0,
                                        ErrorInfo(type="OutcomeUnknown", message=content))
                    results[call.id] = content  # type: ignore[index]
            if rerun:
                mark = len(self.transcript)
                for call, content in zip(rerun, await self._act(iteration, rerun)):
                    results[call.id] = content  # type: ignore[index]
                del self.transcript[mark:]  # re-added below, in the model's order
            contents = [results.get(c.id, "") for c in calls]  # type: ignore[arg-type]
            for call, content in zip(calls, contents):
                self.transcript.append(Message("tool", content, tool_call_id=call.id))
        if iteration >= max_iterations:
            return await self._limit_stop(iteration, "max_iterations",
                                          f"iteration limit of {max_iterations} reached without a final answer")
        if calls and self.monitor is not None:
            verdict = self.monitor.observe_iteration(calls, contents, self.think_input_tokens, 0.0)
            if verdict is not None:
                if verdict.action == "stop":
                    return await self._limit_stop(iteration, "runaway", verdict.message)
                self._nudge(iteration, verdict.nudge, f"runaway: {verdict.message}")
        return None

    def _nudge(self, iteration: int, content: str, reason: str) -> None:
        self.transcript.append(Message("user", content))
        self._emit(Nudge(run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration, content=content, reason=reason))

    async def _limit_stop(self, iteration: int, limit: StopReason, detail: str) -> _Stop:
        self._emit(LimitHit(run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration, limit=limit, detail=detail))
        if self.agent.limits.final_answer_on_limit:
            prompt = (FINAL_ANSWER_PROMPT.format(limit=self.agent.limits.max_iterations) if limit == "max_iterations"
                      else RUNAWAY_FINAL_PROMPT if limit == "runaway" else LIMIT_FINAL_PROMPT.format(limit=limit))
            self._nudge(iteration, prompt, "best-effort answer after a limit")
            await self._best_effort(iteration, limit)
        return _Stop(limit, detail)

    async def _best_effort(self, iteration: int, limit: str) -> None:
        """The tools-disabled call for a best-effort answer after `limit` (the prompt is in the transcript)."""
        try:
            response = await self._think(iteration, [], "final_answer")
        except _Stop:
            pass  # the failed call is in the log; the run still stops for the limit
        else:
            if response.text and response.text.strip():
                self.transcript.append(Message("assistant", response.text))
                self.output = response.text

    # -- THINK ---------------------------------------------------------------------

    async def _think(self, iteration: int, specs: list, purpose: str) -> ModelResponse:
        """REFINE (fold what leaves the context), then one model call with the context."""
        agent = self.agent
        policy = agent.context
        if policy.folds:
            plan = policy.plan(self.transcript, self.context)
            if plan.fold:
                await self._fold(iteration, plan.fold, plan.reason)
            messages = policy.messages(self.transcript, self.context)
        else:
            messages = list(self.transcript)
        request = ModelRequest(messages=messages, tools=specs, max_tokens=agent.max_tokens)
        response, _ = await self._call_model(iteration, request, purpose, agent.models)
        return response

    async def _fold(self, iteration: int, units: Any, reason: str | None) -> None:
        """Fold evicted iterations into the running summary with one small model call."""
        policy = self.agent.context
        result = None
        if policy.summarize:
            request = policy.summary_request(self.context.summary, units)
            models = [policy.summary_model] if policy.summary_model is not None else self.agent.models
            cost_before = self.cost_usd
            try:
                response, _ = await self._call_model(iteration, request, "summary", models)
            except _Stop as stop:  # no budget for it, or it failed: drop the units instead
                result = policy.apply_drop(self.context, units, f"summary call not made or failed: {stop.detail}")
            else:
                result = policy.apply_summary(self.context, response.text, units,
                                              cost_usd=self.cost_usd - cost_before, reason=reason)
        else:
            result = policy.apply_drop(self.context, units, reason)
        self._emit(ContextFolded(run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration,
                                 outcome=result.outcome, units=list(result.units), n_messages=result.n_messages,
                                 summary=result.summary, reason=result.reason or ""))

    async def _call_model(self, iteration: int, request: ModelRequest, purpose: str,
                          models: list[Model]) -> tuple[ModelResponse, Model]:
        """One model call under the budgets and the model policy, written to the log."""
        agent = self.agent
        model = models[0]
        held: CallReservation | None = None
        estimate = None
        if self.budgets and ((price := agent.worst_price_of(models)) is None or price.input_per_mtok
                             or price.output_per_mtok or self.counts_tokens):
            # Reserve the call's worst case on every budget before making it: the input
            # (an upper bound, for the costliest model that may answer) and max_tokens,
            # capped to what the budgets can still pay for. No fit, no call.
            estimate = max(agent.estimator(m).estimate(request) for m in models)
            try:
                held = reserve_call(self.budgets, input_tokens=int(estimate), price=price,
                                    max_tokens=request.max_tokens)
            except BudgetExceeded as exc:
                if purpose == "think":
                    self._emit(LimitHit(run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration,
                                        limit="budget", detail=str(exc)))
                raise _Stop("budget", str(exc)) from None
            if held.max_tokens != request.max_tokens:
                request = ModelRequest(messages=request.messages, tools=request.tools, max_tokens=held.max_tokens)
        specs = request.tools
        self.model_calls += 1
        self.current.model_calls = self.model_calls
        # What the call is shown, compactly: the transcript since the last call (`_seen`).
        at, added, self.shown = shown(agent.context, self.transcript, self.shown, purpose, request.messages)
        # (run_id, seq, ts, iteration, purpose, model, n_messages, n_tools, max_tokens,
        #  estimated_input_tokens, reserved_usd, input_at, input_added)
        self._emit(new_model_call_started(
            self.run_id, self.seq, _wall(), iteration, purpose, model.name, len(request.messages), len(specs),
            request.max_tokens, None if estimate is None else int(estimate), None if held is None else held.usd,
            at, added,
        ))
        error: ErrorInfo | None = None
        response: ModelResponse | None = None
        try:
            if (waiter := self._write()) is not None:  # the log is durable before every model call
                await waiter
        except BaseException as exc:
            if held is not None:
                held.release()
            if isinstance(exc, Exception):  # the store failed: the call is not made, and the log says so
                self._emit(ModelCallFinished(
                    run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration, purpose=purpose,  # type: ignore[arg-type]
                    error=ErrorInfo(type=type(exc).__name__, message=f"not made: the event log could not be "
                                                                     f"written ({exc})")))
            raise
        started = _mono()
        try:
            # (models, request, policy, on_attempt, check, report_ok): positionally, every call passes here
            response, model = await call_with_policy(
                models, request, agent.model_policy, _ModelAttemptReporter(self, iteration, purpose),
                self._check_response, False,
            )
            response, replaced = _loggable(response)
        except anyio.get_cancelled_exc_class():
            if held is not None:
                held.release()
            self._emit(
                ModelCallFinished(
                    run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration, purpose=purpose,  # type: ignore[arg-type]
                    latency_s=_mono() - started, error=ErrorInfo(type="Cancelled", message="the call was cancelled"),
                )
            )
            raise
        except Exception as exc:
            error = ErrorInfo.from_exception(exc)
            response = None
        except BaseException as exc:  # (not a cancellation) the run ends with it: the call's end first
            if held is not None:
                held.release()
            self._emit(ModelCallFinished(
                run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration, purpose=purpose,  # type: ignore[arg-type]
                latency_s=_mono() - started, error=ErrorInfo.from_exception(exc)))
            raise
        latency = _mono() - started
        if response is None:
            if held is not None:
                held.release()  # nothing reported as billed (see docs/budgets.md on timeouts)
            self._emit(
                ModelCallFinished(
                    run_id=self.run_id, seq=self.seq, ts=_wall(), iteration=iteration,
                    purpose=purpose, latency_s=latency, error=error,  # type: ignore[arg-type]
                )
            )
            raise _Stop("error", f"model call failed: {error.type}: {error.message}", error)  # type: ignore[union-attr]
        usage, estimated = self._usage_of(request, response)
        price = agent.price_of(model)
        cost = price.cost(usage) if price is not None else 0.0
        self.usage.add(usage)
        self.cost_usd += cost
        overrun_usd = 0.0
        if held is not None:
            overrun = held.settle(cost, usage.input_tokens + usage.output_tokens)
            if overrun is not None:
                overrun_usd = overrun.actual_usd - overrun.reserved_usd
                _log.error("run %s: %s billed more than its reservation: %s", self.run_id, model.name, overrun)
            if not estimated:
                low_by = agent.estimator(model).observe(int(estimate), usage.input_tokens)  # type: ignore[arg-type]
                if low_by > 0:
                    _log.error("run %s: the input estimate for %s was %d tokens low; later reservations "
                               "are widened", self.run_id, model.name, low_by)
        # (run_id, seq, ts, iteration, purpose, text, tool_calls, finish_reason, usage,
        #  usage_estimated, cost_usd, latency_s, error, model, overrun_usd)
        finished = new_model_call_finished(
            self.run_id, self.seq, _wall(), iteration, purpose, response.text, list(response.tool_calls),
            response.finish_reason, usage, estimated, cost, latency, None, model.name, overrun_usd,
        )
        if replaced is not None:
            finished.replaced = replaced
        self._emit(finished)
        if purpose == "think":
            self.think_input_tokens = usage.input_tokens
        return response, model

    @staticmethod
    def _check_response(response: Any) -> None:
        if not isinstance(response, ModelResponse):
            raise ModelBehaviorError(f"the model returned {type(response).__name__}, not a ModelResponse")
        if response.text is not None and not isinstance(response.text, str):
            raise ModelBehaviorError(f"ModelResponse.text is {type(response.text).__name__}, not a str")
        calls = response.tool_calls
        if not isinstance(calls, (list, tuple)):
            raise ModelBehaviorError(f"ModelResponse.tool_calls is {type(calls).__name__}, not a list")
        for call in calls:
            if not isinstance(call, ToolCall):
                raise ModelBehaviorError(f"ModelResponse.tool_calls holds a {type(call).__name__}, not a ToolCall")

    @staticmethod
    def _usage_of(request: ModelRequest, response: ModelResponse) -> tuple[Usage, bool]:
        usage = response.usage
        if usage is not None:
            i, o, c, r = usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens
            if (type(i) is int and type(o) is int and type(c) is int and type(r) is int
                    and i >= 0 and o >= 0 and c >= 0 and r >= 0):
                return usage, False
        # Missing or nonsensical usage: estimate from the text, and say so in the log.
        input_tokens = sum(estimate_tokens(m) for m in request.messages)
        output_tokens = max(1, estimate_tokens(Message("assistant", response.text, tuple(response.tool_calls))) - 4)
        return Usage(input_tokens, output_tokens), True

    # -- ACT + OBSERVE -------------------------------------------------------------

    def _assign_ids(self, iteration: int, calls: list[ToolCall]) -> list[ToolCall]:
        """Give every call an id unique in the run: tools use it as an idempotency key.

        Provider ids are kept unless missing or already used (some servers repeat ids
        across turns); replacements are deterministic, so a replay assigns the same.
        """
        seen = self.call_ids
        out = []
        for index, call in enumerate(calls):
            call_id = call.id if isinstance(call.id, str) and call.id else f"lw-{iteration}-{index}"
            if call_id in seen:
                base = f"{call_id}-{iteration}-{index}"
                call_id, n = base, 1
                while call_id in seen:
                    n += 1
                    call_id = f"{base}-{n}"
            seen.add(call_id)
            out.append(call if call_id == call.id else ToolCall(call.name, call.arguments, call_id))
        return out

    def _skip_tools(self, iteration: int, calls: list[ToolCall]) -> None:
        for call in calls:
            self._tool_started(iteration, call)
            self._tool_finished(iteration, call, "not_executed", NOT_EXECUTED, 0.0, None)
            self.transcript.append(Message("tool", NOT_EXECUTED, tool_call_id=call.id))

    def _tool_started(self, iteration: int, call: ToolCall) -> dict[str, Any] | str | None:
        """Log the call's start; return the arguments for the tool (less the model's expectation)."""
        arguments, expected = call.arguments, None
        if self.agent.expectations:
            expected, arguments = split_expectation(arguments)
        # (run_id, seq, ts, iteration, call_id, name, arguments, expected)
        self._emit(new_tool_call_started(self.run_id, self.seq, _wall(), iteration, call.id, str(call.name),
                                         arguments, expected))
        return arguments

    def _tool_finished(self, iteration: int, call: ToolCall, outcome: str, content: str,
                       latency: float, error: ErrorInfo | None, attempts: int = 0,
                       fallback: str | None = None, cost_usd: float = 0.0, value: Any = NO_VALUE) -> None:
        replaced = None
        if not content.isascii() or (error is not None and not _ascii_error(error)):
            replaced = []
            content = clean(content, "content", replaced)
            error = clean(error, "error", replaced)
        match = match_by = note = None
        if self.agent.expectations:  # did the result match the model's expectation?
            tool = self.agent.tools_by_name.get(call.name) if isinstance(call.name, str) else None
            match, match_by, note = judge(tool, split_expectation(call.arguments)[0], outcome, content,
                                          fallback, value)
        # (run_id, seq, ts, iteration, call_id, name, outcome, content, latency_s, error, attempts,
        #  fallback, cost_usd, match, match_by, match_note)
        event = new_tool_call_finished(self.run_id, self.seq, _wall(), iteration, call.id, str(call.name),
                                       outcome, content, latency, error, attempts, fallback, cost_usd,
                                       match, match_by, note)
        if replaced:
            event.replaced = replaced
        self._emit(event)

    async def _act(self, iteration: int, calls: list[ToolCall]) -> list[str]:
        tools = self.agent.tools_by_name
        contents: list[str] = [""] * len(calls)
        runnable: list[tuple[int, ToolCall, Tool, dict[str, Any]]] = []
        for index, call in enumerate(calls):
            arguments = self._tool_started(iteration, call)
            tool = tools.get(call.name) if isinstance(call.name, str) else None
            if tool is None:
                content = (f"error: unknown tool {call.name!r}; available tools: "
                           f"{', '.join(tools) or '(none)'}")
                self._tool_finished(iteration, call, "unknown_tool", content, 0.0, None)
                contents[index] = content
                continue
            try:
                kwargs = tool.validate(arguments)
            except ToolArgumentsError as exc:
                content = f"error: {tool.name}: {exc}"
                self._tool_finished(iteration, call, "invalid_arguments", content, 0.0,
                                    ErrorInfo(type="ToolArgumentsError", message=str(exc)))
                contents[index] = content
                continue
            runnable.append((index, call, tool, kwargs))
        if runnable:
            # The calls are durable before any tool runs: after a crash, resume knows
            # what may have happened (and never re-runs a non-idempotent call blindly).
            try:
                if (waiter := self._write()) is not None:
                    await waiter
            except Exception as exc:  # the store failed: no tool runs, and the log says so
                content = f"not executed: the event log could not be written ({exc})"
                for _, call, _, _ in runnable:
                    self._tool_finished(iteration, call, "not_executed", content, 0.0,
                                        ErrorInfo(type=type(exc).__name__, message=content))
                raise
        if len(runnable) == 1:
            await self._call_tool(iteration, contents, *runnable[0])
        elif runnable:
            bound = self.agent.max_parallel_tools
            limiter = anyio.CapacityLimiter(bound) if bound is not None and bound < len(runnable) else None
            loop = _asyncio_loop()
            if limiter is None and loop is not None:
                await self._call_tools_at_once(loop, iteration, contents, runnable)
            else:
                async with task_group() as tg:
                    if limiter is not None:
                        for item in runnable:
                            tg.start_soon(self._call_tool, iteration, contents, *item, limiter, name=_CALL_TOOL)
                    else:
                        for item in runnable[1:]:
                            tg.start_soon(self._call_tool, iteration, contents, *item, name=_CALL_TOOL)
                        await self._call_tool(iteration, contents, *runnable[0])
        for index, (call, content) in enumerate(zip(calls, contents)):
            if not content.isascii() and (fixed := clean_text(content)) is not None:  # as `_tool_finished` logged it
                content = contents[index] = fixed
            self.transcript.append(new_message("tool", content, (), call.id))
        return contents

    async def _call_tools_at_once(self, loop: asyncio.AbstractEventLoop, iteration: int, contents: list[str],
                                  runnable: list[tuple[int, ToolCall, Tool, dict[str, Any]]]) -> None:
        """ACT on asyncio: the first call in this task, the others in asyncio tasks of their own.

        What an anyio task group does here, without its per-task bookkeeping (a task
        handle with an event and a cancel scope of its own: ~2 KB and ~20 µs a spawned
        call). The first call still starts first and the others as soon as it first
        waits; each call's timeout scope is its own (`execute`). If this task is
        cancelled (a kill, the deadline) the other calls are cancelled too, and waited
        for, before the cancellation goes on. `_call_tool` turns every failure of a tool
        into an outcome: a call's task can only end in a cancellation or a runtime bug,
        which is raised here once the first call is done.
        """
        tasks = [loop.create_task(self._call_tool(iteration, contents, *item), name=_CALL_TOOL)
                 for item in runnable[1:]]
        try:
            await self._call_tool(iteration, contents, *runnable[0])
            for task in tasks:
                await task
        except BaseException:
            for task in tasks:
                task.cancel()
            with anyio.CancelScope(shield=True):  # (a cancelled scope would cancel this wait too)
                for task in tasks:
                    try:
                        await task
                    except BaseException:  # noqa: BLE001, S110 - its own end is in the log; ours is raised below
                        pass
            raise

    async def _call_tool(self, iteration: int, contents: list[str], index: int, call: ToolCall,
                         tool: Tool, kwargs: dict[str, Any], limiter: anyio.CapacityLimiter | None = None) -> None:
        policy = tool.policy
        # Only a tool that takes a RunContext reads it (or a fallback tool, or a `call` of a
        # subclass, that may): made for those only.
        ctx = (RunContext(run_id=self.run_id, call_id=call.id, iteration=iteration,  # type: ignore[arg-type]
                          tags=self.tags, deps=self.deps)
               if tool.context_param is not None or policy.fallback or type(tool).call is not _tool_call else None)
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
                    contents[index] = content
                    return
        started = _mono()
        try:
            if limiter is None:
                result = await execute(tool, kwargs, ctx, _CallReporter(self, iteration, call.id),  # type: ignore[arg-type]
                                       spend=spend)
            else:
                async with limiter:
                    started = _mono()
                    result = await execute(tool, kwargs, ctx, _CallReporter(self, iteration, call.id),  # type: ignore[arg-type]
                                           spend=spend)
        except BaseException as exc:
            spent = 0.0 if spend is None else spend.usd  # each attempt started may have been billed
            if held is not None:
                held.settle(spent, 0)
            if not isinstance(exc, anyio.get_cancelled_exc_class()):
                raise
            self.cost_usd += spent
            self._tool_finished(iteration, call, "cancelled", "cancelled", _mono() - started,
                                ErrorInfo(type="Cancelled", message="the call was cancelled"), cost_usd=spent)
            raise
        if held is not None:
            held.settle(result.cost_usd, 0)
        self.cost_usd += result.cost_usd
        outcome = result.outcome
        # (positionally: ..., attempts, fallback, cost_usd, value)
        self._tool_finished(iteration, call, outcome, result.content, _mono() - started, result.error,
                            result.attempts, result.fallback, result.cost_usd,
                            result.value if outcome == "ok" else NO_VALUE)
        contents[index] = result.content


_tool_call = Tool.call
# The name anyio gives a task of `_call_tool` (`module.qualname`), worked out once.
_CALL_TOOL = f"{Run._call_tool.__module__}.{Run._call_tool.__qualname__}"


class _CallReporter:
    """Writes what `execute` reports about one tool call to the run's log, as it happens."""

    __slots__ = ("call_id", "iteration", "run")

    def __init__(self, run: Run, iteration: int, call_id: str) -> None:
        self.run = run
        self.iteration = iteration
        self.call_id = call_id

    def attempt_failed(self, tool: str, attempt: int, error: ErrorInfo, latency_s: float,
                       retry_in_s: float | None) -> None:
        run = self.run
        run._emit(ToolAttemptFailed(run_id=run.run_id, seq=run.seq, ts=_wall(), iteration=self.iteration,
                                    call_id=self.call_id, name=tool, attempt=attempt, error=error,
                                    latency_s=latency_s, retry_in_s=retry_in_s))

    def fallback_tried(self, tool: str, fallback: str, ok: bool, reason: str) -> None:
        run = self.run
        run._emit(ToolFallback(run_id=run.run_id, seq=run.seq, ts=_wall(), iteration=self.iteration,
                               call_id=self.call_id, name=tool, fallback=fallback, ok=ok, reason=reason))

    def breaker_changed(self, change: BreakerChange) -> None:
        run = self.run
        run._emit(BreakerChanged(run_id=run.run_id, seq=run.seq, ts=_wall(), iteration=self.iteration,
                                 name=change.tool, old=change.old, new=change.new, reason=change.reason))

    def thread_abandoned(self, tool: str, thread: str) -> None:
        run = self.run
        run._emit(ThreadAbandoned(run_id=run.run_id, seq=run.seq, ts=_wall(), iteration=self.iteration,
                                  call_id=self.call_id, name=tool, thread=thread))


class _ModelAttemptReporter:
    """Writes each failed attempt of a model call to the run's log, as it happens."""

    __slots__ = ("iteration", "purpose", "run")

    def __init__(self, run: Run, iteration: int, purpose: str) -> None:
        self.run = run
        self.iteration = iteration
        self.purpose = purpose

    def __call__(self, record: AttemptRecord) -> None:
        if record.ok or record.error is None:
            return
        run = self.run
        run._emit(ModelAttemptFailed(run_id=run.run_id, seq=run.seq, ts=_wall(), iteration=self.iteration,
                                     purpose=self.purpose, model=record.model,  # type: ignore[arg-type]
                                     attempt=record.attempt, error=record.error, latency_s=record.latency_s,
                                     retry_in_s=record.retry_in_s, will_fallback=record.will_fallback,
                                     reason=record.reason))


def _loggable(response: ModelResponse) -> tuple[ModelResponse, list[str] | None]:
    """`response` in the types its event is read back with (a Python model may send anything),
    and storable; with the fields that had to be replaced, if any (`_storable`).

    A tool call's name that is not a str becomes one (None: the empty name), which the
    loop then answers as an unknown tool; arguments neither a dict nor a str, or a dict
    with keys that are not all str, become their JSON text (the loop parses it as it
    would a provider's, and answers what is wrong with it); an id that is not a str
    becomes one; so does a finish reason. Else the log would hold a model call whose
    event cannot be loaded: `show`, resume and every view of the run would fail.
    Text UTF-8 cannot encode (a lone surrogate), anywhere, becomes U+FFFD; arguments
    nested deeper than `MAX_DEPTH` (or that contain themselves) become `TOO_DEEP`,
    answered as invalid arguments. The fast path: ASCII text, and arguments that are
    raw text or a dict of plain values (`plain`), are taken as they are.
    """
    text = response.text
    if text is None or (type(text) is str and text.isascii()):
        for call in response.tool_calls:
            name, args, call_id = call.name, call.arguments, call.id
            if (type(name) is not str or not name.isascii()
                    or (call_id is not None and (type(call_id) is not str or not call_id.isascii()))
                    or not (args.isascii() if type(args) is str else type(args) is dict and plain(args))):
                break
        else:
            reason = response.finish_reason
            if reason is None or (type(reason) is str and reason.isascii()):
                return response, None
    return _normalized(response)


def _normalized(response: ModelResponse) -> tuple[ModelResponse, list[str] | None]:
    replaced: list[str] = []
    text = response.text
    if text is not None:
        text = clean(text, "text", replaced)
    fixed = []
    for i, call in enumerate(response.tool_calls):
        name, args, call_id = call.name, call.arguments, call.id
        where = f"tool_calls[{i}]"
        if not isinstance(name, str):
            name = "" if name is None else str(name)
        if call_id is not None and not isinstance(call_id, str):
            call_id = str(call_id)
        if isinstance(args, (dict, list, tuple)) and too_deep(args):
            args = TOO_DEEP
            replaced.append(f"{where}.arguments")
        elif isinstance(args, dict) and not all(map(_is_str, args)):
            args = _json_text(args)  # (keys as JSON writes them: None is "null", 1 is "1")
        elif not isinstance(args, (dict, str)):
            args = _json_text(args)
        try:
            args = clean(args, f"{where}.arguments", replaced)
        except TooDeep:  # (not reached: `too_deep` above)
            args = TOO_DEEP
            replaced.append(f"{where}.arguments")
        new = ToolCall(clean(name, f"{where}.name", replaced), args,
                       None if call_id is None else clean(call_id, f"{where}.id", replaced))
        fixed.append(call if (new.name is call.name and new.arguments is call.arguments
                              and new.id is call.id) else new)
    reason = response.finish_reason
    if reason is not None:
        reason = clean(reason if isinstance(reason, str) else str(reason), "finish_reason", replaced)
    if (text is response.text and reason is response.finish_reason
            and all(new is old for new, old in zip(fixed, response.tool_calls))):
        return response, replaced or None
    return (ModelResponse(text=text, tool_calls=fixed, usage=response.usage, finish_reason=reason),
            replaced or None)


def _storable_start(task: list[Message], instructions: str | None, tags: tuple[str, ...],
                    replaced: list[str]) -> tuple[list[Message], str | None, tuple[str, ...]]:
    """The task, instructions and tags, made storable (`_storable`); what was replaced goes in `replaced`.

    Raises `UserError` for a task whose tool calls nest deeper than the loop walks.
    """
    for m in task:
        content = m.content
        if m.tool_calls or m.tool_call_id is not None or not (content is None or content.isascii()):
            break
    else:
        if (instructions is None or instructions.isascii()) and all(t.isascii() for t in tags):
            return task, instructions, tags
    try:
        task = clean(list(task), "task", replaced)
    except TooDeep as exc:
        raise UserError(f"the task cannot be stored: {exc}; send flatter tool-call arguments") from None
    if instructions is not None:
        instructions = clean(instructions, "instructions", replaced)
    tags = tuple(clean(list(tags), "tags", replaced))
    return task, instructions, tags


def _ascii_error(error: ErrorInfo) -> bool:
    return error.message.isascii() and (error.traceback is None or error.traceback.isascii()) and error.type.isascii()


#: `isinstance(x, str)` as a function in C: `all(map(_is_str, keys))` makes no frame per key.
_is_str = str.__instancecheck__


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
