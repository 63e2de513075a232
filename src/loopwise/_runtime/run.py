"""The asyncio driver of one run: THINK → ACT → OBSERVE → REFINE → CHECK, until a stop reason.

`Run` performs what the loop needs done and is the only writer of the log for that
run. Each pass of the loop:

1. REFINE: the context policy folds old iterations out of what THINK is shown (a
   summary model call, or a drop), when it says so.
2. THINK: one model call with the context and the tool specs, under the budgets'
   reservation and the model policy.
3. ACT: the response's tool calls run concurrently (at most `max_parallel_tools` at
   once), each under its reservation and its tool policy.
4. OBSERVE: results and errors become tool messages, in the order the model asked.
5. CHECK: the iteration cap, the runaway monitor's verdict, the deadline (another
   iteration must fit), the budgets (no reservation, no call), and kills.

The rules (what comes next, and the events they produce: nudges, limits, calls not
executed) are `_core.decide`'s, pure; `Run` performs its commands (`CallModel`,
`RunTools` in `_runtime.act.Acting`, `Stop`) under the budgets, the model and tool policies, the
kill and deadline scope and the store, and feeds back what happened. The run's state
(transcript, context and runaway state, counters) lives in a `_core.State` and changes
only through `_core.evolve`: every event `_emit` logs passes through it first, with its
real content (the log, the stream and `logging` get it redacted). Resume folds the
logged events through the same function (`_core.fold`), so a resumed `Run` starts from
the state the live one had; it is given that state and never emits a `run_started`.

Events are buffered in memory and handed to the store before every model call, before
tools run, and at the end, so an iteration's events are durable before the next model
call starts. Time is read only through the agent's `Clock`.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import anyio

from .._errors import ModelBehaviorError, StoreError
from .._policies.context import estimate_tokens
from .._policies.budget import Budget, BudgetExceeded, CallReservation, reserve_call
from .._events import (
    ContextFolded,
    ErrorInfo,
    ModelAttemptFailed,
    Event,
    ModelCallFinished,
    RunFinished,
    RunStarted,
    StopReason,
    new_model_call_finished,
    new_model_call_started,
    new_run_finished,
    new_run_started,
)
from .act import Acting
from .._control.plane import call_in_loop
from .._core import decide as core
from .._core.decide import NOT_EXECUTED
from .._core.evolve import EVOLVE
from .._core.refine import fold_outcome
from .._core.state import State
from .loggable import loggable, storable_start
from .._views.logging import LOGGED_KINDS, log_event
from .._messages import Message, ToolCall, Usage
from .._views.seen import shown
from .._stores.storable import clean_event
from .scopes import CurrentRun, cancel_scope, current_run
from ..models._base import Model, ModelRequest, ModelResponse
from ..models._resilience import AttemptRecord, call_with_policy

if TYPE_CHECKING:
    from .agent import Agent
    from .._control.plane import KillRequest
    from .._stores.base import EventStore

__all__ = ["NOT_EXECUTED", "Run"]

_log = logging.getLogger("loopwise")

# How long a stopping run may take to write its last events when shielded from cancellation.
FINISH_TIMEOUT_S = 5.0


# Internal, not a LoopwiseError: caught in `Run`, never reaches a caller (see `_errors`).
class _Stop(Exception):
    """Internal: the loop has decided to stop."""

    def __init__(self, reason: StopReason, detail: str | None = None, error: ErrorInfo | None = None) -> None:
        self.reason = reason
        self.detail = detail
        self.error = error


class Run(Acting):
    """One run's driver: performs what the loop decides, emits and writes its events.

    Made by `Run.start` (a new run: it emits `run_started`) or by resume (given the
    state folded from the log, with `resuming` set: what was in flight to settle).
    """

    __slots__ = (
        "active_before",
        "agent",
        "budgets",
        "clock",
        "counts_tokens",
        "deadline",
        "delivered",
        "current",
        "deps",
        "kill_scope",
        "killed",
        "loop",
        "pending",
        "redact",
        "resuming",
        "run_id",
        "seq",
        "shown",
        "since",
        "sink",
        "started",
        "started_mono",
        "state",
        "store",
        "tags",
    )

    def __init__(self, agent: Agent, run_id: str, started: RunStarted, state: State, deps: Any,
                 store: EventStore, sink: Callable[[Event], None] | None = None,
                 budgets: tuple[Budget, ...] = (), seq: int = 0) -> None:
        self.agent = agent
        self.clock = agent.clock
        self.run_id = run_id
        self.deps = deps
        self.store = store
        self.sink = sink
        #: What every event passes through before the log, the stream and `logging` see it.
        self.redact = agent.redact_event
        self.pending: list[Event] = []
        self.seq = seq
        #: The run's state: changed only by `_core.evolve`, through `_emit`.
        self.state = state
        self.budgets = budgets
        # A free model under dollar budgets only cannot overspend: no estimate, no reservation.
        self.counts_tokens = any(b.tokens is not None for b in budgets)
        #: How much of the transcript the log has recorded as shown to the model (`_views.seen`).
        self.shown = 0
        self.deadline: float | None = None
        self.current = CurrentRun(run_id)
        self.current.model_calls = state.model_calls
        self.started_mono = 0.0
        self.killed: KillRequest | None = None
        self.kill_scope: anyio.CancelScope | None = None
        #: The event loop the run executes on (set when it starts): where kills are delivered.
        self.loop: asyncio.AbstractEventLoop | None = None
        self.delivered = False
        #: Set by resume: the calls the previous segment left without an outcome, each with
        #: whether it runs again (None: a new run, or nothing to settle).
        self.resuming: list[tuple[ToolCall, bool]] | None = None
        #: Set by resume: the active time of the earlier segments, and when this one began.
        self.active_before = 0.0
        self.since = 0.0
        # RunResult reads it: as logged (redacted).
        self.started = started
        # Tags as logged (redacted), for the control plane's leases and kills, and for tools:
        # what a resumed run reads from the log too.
        self.tags = tuple(started.tags)

    @classmethod
    def start(cls, agent: Agent, run_id: str, task: list[Message], tags: tuple[str, ...], deps: Any,
              store: EventStore, sink: Callable[[Event], None] | None = None,
              budgets: tuple[Budget, ...] = ()) -> Run:
        """A new run: its state from the task and the instructions, and its `run_started` emitted."""
        # The first system message: the instructions, plus how to state expectations when on.
        instructions = agent.system_prompt
        replaced: list[str] = []
        task, instructions, tags = storable_start(task, instructions, tags, replaced)
        # (run_id, seq, ts, task, instructions, agent, limits, tags)
        started = new_run_started(run_id, 0, agent.clock.time(), task, instructions, agent.describe(),
                                  agent.limits.to_dict(), list(tags))
        if replaced:
            started.replaced = replaced
        state = State.start(started, agent.context, agent.runaway, agent.limits.max_iterations)
        run = cls(agent, run_id, started, state, deps, store, sink, budgets)
        run.started = run._emit(started)  # type: ignore[assignment]
        run.tags = tuple(run.started.tags)
        return run

    # -- the log -------------------------------------------------------------------

    def _emit(self, event: Event) -> Event:
        """Apply `event` to the run's state; append it to the log (and the stream, and
        `logging`); return it as logged."""
        evolve = _EVOLVE_get(type(event))
        if evolve is not None:
            evolve(self.state, event)
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
        self.started_mono = self.clock.monotonic()
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

    async def _guarded_loop(self) -> core.Stop | _Stop:
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
            events, stop = core.deadline_reached(self.state, self.agent)
        else:
            events, stop = core.kill_received(self.state, request.by, request.reason, request.ts)
        self._emit_core(events)
        return stop  # type: ignore[return-value]

    async def _finish(self, stop: core.Stop | _Stop) -> RunFinished:
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

    async def _finish_quietly(self, stop: core.Stop | _Stop) -> None:
        """`_finish` while another exception is on its way out: a store failure is logged, not raised."""
        try:
            await self._finish(stop)
        except StoreError as exc:
            _log.error("%s", exc)

    def _finish_now(self, stop: core.Stop | _Stop) -> None:
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

    def _emit_end(self, stop: core.Stop | _Stop) -> RunFinished:
        state = self.state
        usage = state.usage
        # (run_id, seq, ts, stop_reason, output, iterations, model_calls, usage, cost_usd,
        #  duration_s, reason, error)
        event = new_run_finished(
            self.run_id, self.seq, self.clock.time(), stop.reason, state.output, state.iteration, state.model_calls,
            Usage(usage.input_tokens, usage.output_tokens, usage.cached_input_tokens, usage.reasoning_tokens),
            state.cost_usd, self.active_before + self.clock.monotonic() - self.started_mono, stop.detail, stop.error,
        )
        return self._emit(event)  # type: ignore[return-value]

    async def _loop(self) -> core.Stop:
        """Perform what the core decides, and feed it what happened, until it says stop.

        The commands are performed here, inline (an `is` test each, most frequent first),
        not through a method per command: a coroutine frame per command and iteration is
        a cost every run pays (`benchmarks/instructions.py`).
        """
        agent = self.agent
        state = self.state
        specs = agent.tool_specs
        # A context that never folds sends the whole transcript: THINK without `_think`'s frame.
        folds = agent.context.folds
        step = core.begin(state, agent, self.resuming)
        self.resuming = None
        CallModel, RunTools, CONTINUE = core.CallModel, core.RunTools, core.CONTINUE  # noqa: N806
        while True:
            events, command = step
            if events:
                self._emit_core(events)
            kind = type(command)
            if kind is CallModel:  # THINK (after REFINE), or the best-effort answer without tools
                iteration = command.iteration  # type: ignore[union-attr]
                purpose = command.purpose  # type: ignore[union-attr]
                try:
                    if purpose != "think":
                        response = await self._think(iteration, [], purpose)
                    elif folds:
                        response = await self._think(iteration, specs, "think")
                    else:  # (messages, tools, max_tokens)
                        request = ModelRequest(list(state.transcript), specs, agent.max_tokens)
                        response = (await self._call_model(iteration, request, "think", agent.models))[0]
                except _Stop as stop:  # it failed, or no budget could pay for it
                    step = core.model_failed(state, agent, command, stop.reason, stop.detail or "",  # type: ignore[arg-type]
                                             stop.error)
                else:
                    step = core.answered(state, agent, command, response.finish_reason)  # type: ignore[arg-type]
            elif command is CONTINUE:  # CHECK passed: the next iteration, given the active time spent
                if self.killed is not None and self.kill_scope is not None:
                    # The seed's rule: the kill switch is checked between iterations too.
                    self.kill_scope.cancel()
                    await anyio.lowlevel.checkpoint()
                spent = None
                if self.deadline is not None:
                    spent = anyio.current_time() - (self.deadline - agent.limits.deadline_s)  # type: ignore[operator]
                step = core.start_iteration(state, agent, spent)
            elif kind is RunTools:  # ACT + OBSERVE, then CHECK
                await self._act(command.iteration, command.calls)  # type: ignore[union-attr]
                step = core.check(state, agent, command.iteration)  # type: ignore[union-attr]
            elif kind is core.Check:
                step = core.check(state, agent, command.iteration)  # type: ignore[union-attr]
            else:
                return command  # type: ignore[return-value]

    def _emit_core(self, events: Any) -> None:
        """Emit the events the core made: stamped with their `seq` and the clock's time here."""
        clock = self.clock
        for event in events:
            event.seq = self.seq
            event.ts = clock.time()
            self._emit(event)

    # -- THINK ---------------------------------------------------------------------

    async def _think(self, iteration: int, specs: list, purpose: str) -> ModelResponse:
        """REFINE (fold what leaves the context), then one model call with the context."""
        agent = self.agent
        policy = agent.context
        state = self.state
        if policy.folds:
            plan = policy.plan(state.transcript, state.context)
            if plan.fold:
                await self._fold(iteration, plan.fold, plan.reason)
            messages = policy.messages(state.transcript, state.context)
        else:
            messages = list(state.transcript)
        request = ModelRequest(messages=messages, tools=specs, max_tokens=agent.max_tokens)
        response, _ = await self._call_model(iteration, request, purpose, agent.models)
        return response

    async def _fold(self, iteration: int, units: Any, reason: str | None) -> None:
        """Fold evicted iterations into the running summary with one small model call (or drop them)."""
        policy = self.agent.context
        context = self.state.context
        text = failed = None
        if policy.summarize:
            request = policy.summary_request(context.summary, units)
            models = [policy.summary_model] if policy.summary_model is not None else self.agent.models
            try:
                response, _ = await self._call_model(iteration, request, "summary", models)
            except _Stop as stop:  # no budget for it, or it failed: drop the units instead
                failed = stop.detail or stop.reason
            else:
                text = response.text
        outcome, indexes, n_messages, summary, why = fold_outcome(context, units, reason, summarize=policy.summarize,
                                                                  text=text, failed=failed)
        self._emit(ContextFolded(run_id=self.run_id, seq=self.seq, ts=self.clock.time(), iteration=iteration,
                                 outcome=outcome, units=indexes, n_messages=n_messages, summary=summary, reason=why))

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
            except BudgetExceeded as exc:  # (the core says what it means for the run)
                raise _Stop("budget", str(exc)) from None
            if held.max_tokens != request.max_tokens:
                request = ModelRequest(messages=request.messages, tools=request.tools, max_tokens=held.max_tokens)
        specs = request.tools
        # What the call is shown, compactly: the transcript since the last call (`_views.seen`).
        at, n_added, added, self.shown = shown(agent.context, self.state.transcript, self.shown, purpose,
                                                request.messages)
        # (run_id, seq, ts, iteration, purpose, model, n_messages, n_tools, max_tokens,
        #  estimated_input_tokens, reserved_usd, input_at, input_n, input_added)
        self._emit(new_model_call_started(
            self.run_id, self.seq, self.clock.time(), iteration, purpose, model.name, len(request.messages), len(specs),
            request.max_tokens, None if estimate is None else int(estimate), None if held is None else held.usd,
            at, n_added, added,
        ))
        self.current.model_calls = self.state.model_calls
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
                    run_id=self.run_id, seq=self.seq, ts=self.clock.time(), iteration=iteration, purpose=purpose,  # type: ignore[arg-type]
                    error=ErrorInfo(type=type(exc).__name__, message=f"not made: the event log could not be "
                                                                     f"written ({exc})")))
            raise
        started = self.clock.monotonic()
        try:
            # (models, request, policy, on_attempt, check, report_ok): positionally, every call passes here
            response, model = await call_with_policy(
                models, request, agent.model_policy, _ModelAttemptReporter(self, iteration, purpose),
                self._check_response, False,
            )
            response, replaced = loggable(response)
        except anyio.get_cancelled_exc_class():
            if held is not None:
                held.release()
            self._emit(
                ModelCallFinished(
                    run_id=self.run_id, seq=self.seq, ts=self.clock.time(), iteration=iteration, purpose=purpose,  # type: ignore[arg-type]
                    latency_s=self.clock.monotonic() - started, error=ErrorInfo(type="Cancelled", message="the call was cancelled"),
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
                run_id=self.run_id, seq=self.seq, ts=self.clock.time(), iteration=iteration, purpose=purpose,  # type: ignore[arg-type]
                latency_s=self.clock.monotonic() - started, error=ErrorInfo.from_exception(exc)))
            raise
        latency = self.clock.monotonic() - started
        if response is None:
            if held is not None:
                held.release()  # nothing reported as billed (see docs/budgets.md on timeouts)
            self._emit(
                ModelCallFinished(
                    run_id=self.run_id, seq=self.seq, ts=self.clock.time(), iteration=iteration,
                    purpose=purpose, latency_s=latency, error=error,  # type: ignore[arg-type]
                )
            )
            raise _Stop("error", f"model call failed: {error.type}: {error.message}", error)  # type: ignore[union-attr]
        usage, estimated = self._usage_of(request, response)
        price = agent.price_of(model)
        cost = price.cost(usage) if price is not None else 0.0
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
            self.run_id, self.seq, self.clock.time(), iteration, purpose, response.text, list(response.tool_calls),
            response.finish_reason, usage, estimated, cost, latency, None, model.name, overrun_usd,
        )
        if replaced is not None:
            finished.replaced = replaced
        self._emit(finished)
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


_EVOLVE_get = EVOLVE.get


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
        run._emit(ModelAttemptFailed(run_id=run.run_id, seq=run.seq, ts=run.clock.time(), iteration=self.iteration,
                                     purpose=self.purpose, model=record.model,  # type: ignore[arg-type]
                                     attempt=record.attempt, error=record.error, latency_s=record.latency_s,
                                     retry_in_s=record.retry_in_s, will_fallback=record.will_fallback,
                                     reason=record.reason))
