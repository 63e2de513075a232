"""`Agent`: a model, instructions, tools and limits; `run` makes one run of the loop."""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import anyio

from .._errors import UserError
from .._tools.expect import EXPECT_PROMPT, augment_spec
from .._events import Event, RunResumed, RunStarted
from .._policies.budget import Budget
from .clock import SYSTEM_CLOCK, Clock
from .._policies.context import ContextPolicy, FullContext
from .._control.kill import plane_for_runs
from .._control.plane import ControlPlane, requester
from .._core.evolve import fold
from .resume import check_resumable, settle
from .._policies.limits import Limits
from .._policies.prices import price_for, worst_price
from .._policies.tokens import TokenEstimator, for_model
from .._messages import Message, ToolSpec, new_message
from .._views.result import RunResult
from .._policies.runaway import RunawayDetector
from .run import Run
from .._policies.redact import EventRedactor, Redactor
from .._stores.storable import clean_text
from .._stores.base import EventStore
from .._tools.caller import DEFAULT_TOOL_CALLER, ToolCaller
from .._tools.tool import Tool, tool
from .watchdog import start_watchdog
from ..models._base import Model, Price
from ..models._resilience import ModelPolicy
from ..models._resolve import resolve_model

__all__ = ["Agent"]

Task = str | Sequence[Message]
DEFAULT_MAX_TOKENS = 1024

# Run ids being executed in this process: a reused id is refused even before its
# first events are committed.
_active_run_ids: set[str] = set()


def new_run_id() -> str:
    """A unique, time-ordered run id (`Clock.new_run_id` of the system clock)."""
    return SYSTEM_CLOCK.new_run_id()


def _default_store() -> EventStore:
    from .._stores.sqlite import default_store

    return default_store()


def _task_messages(task: Task) -> list[Message]:
    if isinstance(task, str) and task:
        return [new_message("user", task)]
    if isinstance(task, Message):
        return [task]
    if isinstance(task, Sequence) and task:
        messages: list[Message] = []
        for i, m in enumerate(task):
            if not isinstance(m, Message):
                raise UserError(f"task[{i}] is a {type(m).__name__}; a task is a str or a list of loopwise.Message")
            messages.append(m)
        return messages
    raise UserError(f"task must be a non-empty str or list of loopwise.Message, got {task!r:.80}")


class Agent:
    """A model with instructions, tools and limits. Each `run` is one run of the loop.

    Args:
        model: A `Model` instance, or a string such as ``"openai:gpt-4o-mini"``.
        instructions: The system prompt (the first message of every request).
        tools: Tools made with `@loopwise.tool` (plain functions are wrapped).
        limits: The limits each run is held to (default: `Limits()`, 8 iterations).
        store: Where the event log goes (default: `SQLiteStore` at ``$LOOPWISE_DB`` or
            ``.loopwise/loopwise.db``).
        name: A name for logs and `loopwise runs` (default: ``"agent"``).
        max_tokens: The `max_tokens` sent with every model call.
        deps: Passed to tools as `RunContext.deps` (a run's own `deps` overrides it).
        max_parallel_tools: The most tool calls of one response that run at once
            (default: all of them; the others wait their turn, in the model's order).
        fallback_models: Models tried in order when a model call fails on the
            primary model after its retries.
        model_policy: Timeout per attempt, retries and backoff of every model call
            (default: `ModelPolicy()`: 60 s, 2 retries on 408/409/429/5xx, timeouts and
            connection errors, honouring Retry-After).
        context: What the model is shown of the transcript at each call (REFINE):
            `SlidingWindow(keep_last=...)` keeps the last iterations and folds or drops
            older ones (default: `FullContext()`, the whole transcript every time).
        runaway: Runaway detection (CHECK): a `RunawayDetector` that nudges, then stops
            with reason ``runaway``, a run that repeats a call, learns nothing new or
            grows its context too fast (default: `RunawayDetector()`;
            ``RunawayDetector(enabled=False)`` turns it off).
        control: Where kill requests reach this agent's runs: a ``redis://`` URL, or
            a control plane (default: ``$LOOPWISE_REDIS_URL`` if set, else the store's
            own: the SQLite database, or this process for a `MemoryStore`).
        redact: What the event log keeps: a `Redactor`, applied to every event before it
            is persisted, streamed or logged (the model still sees the real content).
            Default: `Redactor()`, the built-in secret patterns (API keys, tokens,
            passwords, private keys). ``None`` means that default too;
            ``Redactor(secrets=False)`` turns the secret patterns off, and the log records it.
        expectations: Ask the model, in each tool call, what it expects the call to
            return, and record whether reality matched (the decision log:
            ``loopwise show RUN_ID --decisions``). No extra model call: every tool's
            schema gains a reserved, nullable ``loopwise_expect`` property that the
            runtime strips before the tool is called, and the instructions say how to
            fill it. Default False: the loop does no extra work.
        clock: What runs read the time, ids and random numbers from (default: the
            system's). Tests pass `loopwise.testing.FakeClock()`, which also drives the
            event loop's time while a run is on it: waits jump ahead when nothing else
            can happen (sync tools in threads keep real time).
        tool_caller: What makes each tool call of a run: a `ToolCaller`, usually a
            `WrapperToolCaller` subclass around the default (an approval gate, a recorder,
            a durable engine's activity). Default: `PolicyToolCaller()`, the tool under its
            policy. The run validates the arguments, reserves the call's worst case and
            logs the result around it (docs/tools.md, "Wrapping tool calls").
    """

    def __init__(
        self,
        model: Model | str,
        *,
        instructions: str | None = None,
        tools: Sequence[Tool | Callable[..., Any]] = (),
        limits: Limits | None = None,
        store: EventStore | None = None,
        name: str = "agent",
        max_tokens: int | None = DEFAULT_MAX_TOKENS,
        deps: Any = None,
        max_parallel_tools: int | None = None,
        fallback_models: Sequence[Model | str] = (),
        model_policy: ModelPolicy | None = None,
        context: ContextPolicy | None = None,
        runaway: RunawayDetector | None = None,
        control: ControlPlane | str | None = None,
        redact: Redactor | None = None,
        expectations: bool = False,
        clock: Clock | None = None,
        tool_caller: ToolCaller | None = None,
        **unsupported: Any,
    ) -> None:
        if unsupported:
            raise UserError(f"Agent got unknown option(s) {', '.join(sorted(unsupported))}")
        # The policy owns retries: models made from strings get no SDK-level retries of
        # their own, which would multiply the attempts the log shows.
        self.model: Model = resolve_model(model, max_retries=0)
        if isinstance(fallback_models, (str, Model)) or not isinstance(fallback_models, Sequence):
            raise UserError("fallback_models must be a list of models (Model instances or 'provider:name' strings)")
        self.fallback_models: list[Model] = [resolve_model(m, max_retries=0) for m in fallback_models]
        #: The primary model, then the fallbacks: what each model call tries, in order.
        self.models: list[Model] = [self.model, *self.fallback_models]
        if model_policy is None:
            model_policy = ModelPolicy()
        elif not isinstance(model_policy, ModelPolicy):
            raise UserError(f"model_policy must be a loopwise.models.ModelPolicy, got {type(model_policy).__name__}")
        self.model_policy = model_policy
        if context is None:
            context = FullContext()
        elif not isinstance(context, ContextPolicy):
            raise UserError(f"context must be a loopwise.SlidingWindow (or FullContext), got {type(context).__name__}")
        self.context = context
        if runaway is None:
            runaway = RunawayDetector()
        elif not isinstance(runaway, RunawayDetector):
            raise UserError(f"runaway must be a loopwise.RunawayDetector, got {type(runaway).__name__}")
        self.runaway: RunawayDetector | None = runaway if runaway.enabled else None
        #: Every model a call may reach: the models, then the context's summary model.
        self.all_models: list[Model] = [*self.models]
        if context.summary_model is not None and context.summary_model not in self.all_models:
            self.all_models.append(context.summary_model)
        if instructions is not None and not isinstance(instructions, str):
            raise UserError(f"instructions must be a str, got {type(instructions).__name__}")
        self.instructions = instructions or None
        if limits is None:
            limits = Limits()
        elif not isinstance(limits, Limits):
            raise UserError(f"limits must be a loopwise.Limits, got {type(limits).__name__}")
        self.limits = limits
        if store is not None and not isinstance(store, EventStore):
            raise UserError(
                f"store must be an EventStore such as loopwise.SQLiteStore(path) or loopwise.MemoryStore(), "
                f"got {type(store).__name__}"
            )
        self._store = store
        if control is not None and not isinstance(control, (str, ControlPlane)):
            raise UserError(f"control must be a redis:// URL (or a control plane), got {type(control).__name__}")
        self._control = control
        if redact is None:
            redact = Redactor()
        elif not isinstance(redact, Redactor):
            hint = (" (to keep secrets in the log, pass redact=loopwise.Redactor(secrets=False))"
                    if redact is False else "")
            raise UserError(f"redact must be a loopwise.Redactor, got {redact!r:.60}{hint}")
        self.redactor = redact
        self._control_plane: ControlPlane | None = None
        self._control_store: EventStore | None = None
        if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
            raise UserError(f"max_tokens must be an int >= 1 or None, got {max_tokens!r}")
        self.max_tokens = max_tokens
        if max_parallel_tools is not None and (type(max_parallel_tools) is not int or max_parallel_tools < 1):
            raise UserError(f"max_parallel_tools must be an int >= 1 or None (no bound), got {max_parallel_tools!r}")
        self.max_parallel_tools = max_parallel_tools
        self.name = name
        self.deps = deps
        if isinstance(tools, (str, bytes)) or not isinstance(tools, Sequence):
            raise UserError("tools must be a list of tools (functions decorated with @loopwise.tool)")
        self.tools: list[Tool] = [t if isinstance(t, Tool) else tool(t) for t in tools]
        self.tools_by_name: dict[str, Tool] = {}
        for t in self.tools:
            if t.name in self.tools_by_name:
                raise UserError(f"two tools are named {t.name!r}; give one another name with @tool(name=...)")
            self.tools_by_name[t.name] = t
        if type(expectations) is not bool:
            raise UserError(f"expectations must be True or False, got {expectations!r}")
        self.expectations = expectations
        if clock is None:
            clock = SYSTEM_CLOCK
        elif not isinstance(clock, Clock):
            raise UserError(f"clock must be a loopwise.testing.FakeClock (or another Clock), got {type(clock).__name__}")
        #: Where runs read wall time, monotonic time, ids and random numbers.
        self.clock: Clock = clock
        if tool_caller is None:
            tool_caller = DEFAULT_TOOL_CALLER
        elif not isinstance(tool_caller, ToolCaller):
            raise UserError(f"tool_caller must be a loopwise.ToolCaller (subclass loopwise.WrapperToolCaller), "
                            f"got {type(tool_caller).__name__}")
        #: What makes each tool call (`ToolCaller.call_tool`), inside the run's reservation and log.
        self.tool_caller: ToolCaller = tool_caller
        #: What the model is told about the tools (with `loopwise_expect` when expectations are on).
        self.tool_specs: list[ToolSpec] = (
            [augment_spec(t.spec) for t in self.tools] if expectations else [t.spec for t in self.tools]
        )
        #: The first system message of every run: the instructions, plus how to state expectations.
        self.system_prompt: str | None = (
            f"{self.instructions}\n\n{EXPECT_PROMPT}" if expectations and self.instructions
            else EXPECT_PROMPT if expectations else self.instructions
        )
        #: Every event of a run passes through it before the log, the stream and `logging` see it.
        self.redact_event: EventRedactor | None = self.redactor.for_tools(self.tools)
        if not self.redact_event.active:
            self.redact_event = None
        self._description: dict[str, Any] | None = None
        self._prices: list[Price | None] | None = None
        # Each model's price by the model's id (the first of `all_models` that is it): every
        # model call looks its price up.
        self._price_by_id: dict[int, Price | None] | None = None
        # Whether every model's price is known (a dollar budget needs them all): checked once.
        self._all_priced: bool | None = None
        self._estimators: list[TokenEstimator] = []

    def _budgets(self, shared: Budget | None) -> tuple[Budget, ...]:
        """The budgets a run draws from: its own (from `limits`), then a shared one.

        A dollar limit needs every model's price: an unknown one is refused here,
        before the run, rather than spending money that cannot be counted.
        """
        limits = self.limits
        budgets: list[Budget] = []
        if limits.budget_usd is not None or limits.budget_tokens is not None:
            budgets.append(Budget(limits.budget_usd, tokens=limits.budget_tokens))  # "budget of $0.50"
        if shared is not None:
            budgets.append(shared)
        if self._all_priced is not True and any(b.usd is not None for b in budgets):
            for model, price in zip(self.all_models, self.prices):
                if price is None:
                    raise UserError(
                        f"the price of {model.name} is unknown, so the run's dollar budget cannot be kept: pass "
                        f"price=lw.models.Price(input_per_mtok=..., output_per_mtok=...) to the model "
                        "(Price(0, 0) for a self-hosted server), or Limits(budget_usd=None) for no dollar limit"
                    )
            self._all_priced = True
        return tuple(budgets)

    @property
    def prices(self) -> list[Price | None]:
        """Each model's price (`self.all_models` order), looked up once: its own, or genai-prices."""
        if self._prices is None:
            self._prices = [price_for(m) for m in self.all_models]
        return self._prices

    def _index(self, model: Model) -> int:
        return next(i for i, m in enumerate(self.all_models) if m is model)

    def price_of(self, model: Model) -> Price | None:
        by_id = self._price_by_id
        if by_id is None:
            by_id = {}
            for m, price in zip(self.all_models, self.prices):
                by_id.setdefault(id(m), price)
            self._price_by_id = by_id
        return by_id[id(model)]

    def worst_price_of(self, models: Sequence[Model]) -> Price | None:
        """The highest rates among `models`: what a call that may reach any of them reserves."""
        if len(models) == 1:
            return self.price_of(models[0])
        return worst_price(self.price_of(m) for m in models)

    def estimator(self, model: Model) -> TokenEstimator:
        """The input-token estimator of `model` (kept: it caches and calibrates)."""
        estimators = self._estimators
        index = self._index(model)
        while len(estimators) <= index:
            estimators.append(for_model(self.all_models[len(estimators)]))
        return estimators[index]

    @property
    def control(self) -> ControlPlane:
        """Where kills reach this agent's runs: `control`, `$LOOPWISE_REDIS_URL`, or the store's own."""
        store = self.store
        if self._control_plane is None or self._control_store is not store:
            self._control_plane = plane_for_runs(store, self._control)
            self._control_store = store
        return self._control_plane

    @property
    def store(self) -> EventStore:
        """The event store runs are written to."""
        if self._store is None:
            self._store = _default_store()
        return self._store

    def describe(self) -> dict[str, Any]:
        """What the run-started event records about this agent (computed once; shared)."""
        if self._description is None:
            self._description = self._describe()
        return self._description

    def _describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "model": self.model.describe(),
            "fallback_models": [m.describe() for m in self.fallback_models],
            "model_policy": self.model_policy.describe(),
            "context": self.context.describe(),
            "runaway": None if self.runaway is None else self.runaway.to_dict(),
            "tools": [t.name for t in self.tools],
            "tool_policies": {t.name: t.policy.describe() for t in self.tools},
            "max_parallel_tools": self.max_parallel_tools,
            "max_tokens": self.max_tokens,
            "redact": self.redactor.describe(),
            "expectations": self.expectations,
            # (only when not the default: the logs of runs with none stay as they were)
            **({} if self.tool_caller is DEFAULT_TOOL_CALLER else {"tool_caller": self.tool_caller.describe()}),
        }

    def __repr__(self) -> str:
        return f"Agent(name={self.name!r}, model={self.model.name!r}, tools={[t.name for t in self.tools]})"

    # -- running -------------------------------------------------------------------

    def _prepare(self, task: Task, run_id: str | None, tags: Sequence[str], deps: Any,
                 sink: Callable[[Event], None] | None, budget: Budget | None = None) -> Run:
        messages = _task_messages(task)
        if isinstance(tags, str):
            raise UserError(f"tags must be a list of str, got the str {tags!r}; write tags=[{tags!r}]")
        tags = tuple(tags)
        for t in tags:
            if not isinstance(t, str) or not t:
                raise UserError(f"each tag must be a non-empty str, got {t!r}")
        store = self.store
        if run_id is None:
            run_id = self.clock.new_run_id()
        else:
            if not isinstance(run_id, str) or not run_id:
                raise UserError(f"run_id must be a non-empty str, got {run_id!r}")
            if not run_id.isascii() and clean_text(run_id) is not None:
                raise UserError(f"run_id {run_id!r} holds characters UTF-8 cannot encode (lone surrogates); "
                                "choose an id the log can store")
            if run_id in _active_run_ids or store.has_run(run_id):
                raise UserError(f"a run with id {run_id!r} already exists; use agent.resume({run_id!r}) "
                                "to continue it, or choose another id")
        if budget is not None and not isinstance(budget, Budget):
            raise UserError(f"budget must be a loopwise.Budget, got {type(budget).__name__}")
        budgets = self._budgets(budget)
        # (agent, run_id, task, tags, deps, store, sink, budgets)
        return Run.start(self, run_id, messages, tags, self.deps if deps is None else deps, store, sink, budgets)

    async def _execute(self, run: Run) -> RunResult:
        # A tool that blocks the event loop cannot be timed out; the watchdog says so.
        start_watchdog()
        control = self.control  # (first: a control plane that cannot be opened leaves no trace)
        run.loop = loop = asyncio.get_running_loop()
        clock = self.clock
        drives = clock.drives_loop  # a FakeClock drives the loop's time while its runs are on it
        if drives:
            clock.install(loop)  # (a loop it cannot drive is refused here, before the run is attached)
        try:
            _active_run_ids.add(run.run_id)
            # A Run is its own `Attachable` (run_id, tags, deliver): one object fewer per run.
            control.attach(run)
            try:
                finished = await run.execute()  # as logged: the result is read from the log, redacted as it is
            finally:
                control.detach(run.run_id)
                _active_run_ids.discard(run.run_id)
                if self.redact_event is not None:
                    self.redact_event.end_run(run.run_id)
        finally:
            if drives:
                clock.uninstall(loop)
        return RunResult.of(run.started, finished)

    async def run(self, task: Task, *, run_id: str | None = None, tags: Sequence[str] = (), deps: Any = None,
                  budget: Budget | None = None) -> RunResult:
        """Run the loop on `task` until a stop reason; return the result.

        Limits, model failures and tool errors end the run with a stop reason; they
        are not raised. Only configuration mistakes raise `UserError`, before the run
        starts. Cancelling the caller writes the run's end as `killed` and propagates.
        """
        return await self._execute(self._prepare(task, run_id, tags, deps, None, budget))

    def run_sync(self, task: Task, *, run_id: str | None = None, tags: Sequence[str] = (), deps: Any = None,
                 budget: Budget | None = None) -> RunResult:
        """`run`, for code without an event loop. Ctrl-C ends the run as `killed`."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise UserError("run_sync() was called inside a running event loop; use `await agent.run(...)` there")
        return asyncio.run(self.run(task, run_id=run_id, tags=tags, deps=deps, budget=budget))

    async def resume(self, run_id: str, *, deps: Any = None, budget: Budget | None = None) -> RunResult:
        """Continue a crashed, killed or interrupted run from its log, as a new segment of it.

        Completed steps are not done again: their results come from the log. A tool
        call in flight when the run stopped runs again only if its tool is
        ``idempotent=True`` (same call id); otherwise the model is told its outcome is
        unknown. Cost, iterations and limits continue from where they were, and the
        deadline counts active time only.

        Raises:
            UserError: no such run; it completed (stop reason ``done``, or a limit); or
                another live process is executing it (it holds the run's lease).
        """
        # Taking the lease may be a network round trip (Redis): off the event loop.
        run = await anyio.to_thread.run_sync(self._prepare_resume, run_id, deps, budget)
        return await self._execute(run)

    def resume_sync(self, run_id: str, *, deps: Any = None, budget: Budget | None = None) -> RunResult:
        """`resume`, for code without an event loop."""
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            pass
        else:
            raise UserError("resume_sync() was called inside a running event loop; use `await agent.resume(...)` there")
        return asyncio.run(self.resume(run_id, deps=deps, budget=budget))

    def _prepare_resume(self, run_id: str, deps: Any, budget: Budget | None) -> Run:
        if not isinstance(run_id, str) or not run_id:
            raise UserError(f"run_id must be a non-empty str, got {run_id!r}")
        if budget is not None and not isinstance(budget, Budget):
            raise UserError(f"budget must be a loopwise.Budget, got {type(budget).__name__}")
        if run_id in _active_run_ids:
            raise UserError(f"run {run_id} is being executed in this process; it cannot be resumed until it stops")
        store = self.store
        if not store.has_run(run_id):
            raise UserError(f"no run with id {run_id!r} in {store.describe()}; `loopwise runs` lists the runs there")
        events = store.load(run_id)
        previous_end = check_resumable(run_id, events)  # a clear error before taking the lease
        control = self.control
        started = events[0]
        assert isinstance(started, RunStarted)
        if (previous_end == "crashed" and run_id not in control.leases([run_id])
                and store.written_elsewhere(run_id)):
            # A run that started in another process a moment ago: its lease comes a poll or
            # two in (the local control plane). Resuming it now would execute it twice.
            raise UserError(
                f"run {run_id} is being executed by another process (it has no end, no lease yet, and a live "
                f"process journaled its last events); stop it with `loopwise kill {run_id}` or wait for it to end"
            )
        since = self.clock.time()
        control.acquire(run_id, started.tags)
        try:
            events = store.load(run_id)  # what the last holder of the lease wrote, all of it
            previous_end = check_resumable(run_id, events)
            budgets = self._budgets(budget)
            limits = self.limits
            own = budgets[0] if limits.budget_usd is not None or limits.budget_tokens is not None else None
            # The run's state: its log folded through the loop's own rules.
            state = fold(events, self.context, self.runaway, limits.max_iterations)
            plan = settle(state, self.tools_by_name)
            run = Run(self, run_id, started, state, self.deps if deps is None else deps, store, None, budgets,
                      seq=events[-1].seq + 1)
            run.resuming = plan.interrupted
            run.active_before = state.active_s
            run.since = since
            run._emit(RunResumed(
                run_id=run_id, seq=run.seq, ts=self.clock.time(), segment=state.segment + 1,
                previous_end=previous_end, iteration=state.iteration, by=requester(),
                interrupted_calls=[{"call_id": c.id, "name": str(c.name), "action": "rerun" if again else "unknown"}
                                   for c, again in plan.interrupted],
                cost_usd=state.cost_usd + plan.carried_usd, charged_usd=plan.carried_usd,
                charged_tokens=plan.carried_tokens, active_s=state.active_s,
            ))
            if own is not None:  # what the earlier segments spent: a crash never buys a fresh budget
                own._charge(state.cost_usd, state.tokens)
        except BaseException:
            control.detach(run_id)
            raise
        return run

    async def stream(self, task: Task, *, run_id: str | None = None, tags: Sequence[str] = (), deps: Any = None,
                     budget: Budget | None = None) -> AsyncIterator[Event]:
        """Yield the run's events as they happen; the last one is `run_finished`.

        Use it with `contextlib.aclosing` if you may stop iterating early: closing the
        stream cancels the run, which ends as `killed`.
        """
        send, receive = anyio.create_memory_object_stream[Event](math.inf)

        def sink(event: Event) -> None:
            try:
                send.send_nowait(event)
            except (anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass  # the consumer stopped listening; the log still gets every event

        run = self._prepare(task, run_id, tags, deps, sink, budget)

        async def execute() -> None:
            with send:
                await self._execute(run)

        async with anyio.create_task_group() as tg, receive:
            tg.start_soon(execute)
            try:
                async for event in receive:
                    yield event
            except GeneratorExit:
                # The consumer closed the stream: stop the run (it ends as `killed`),
                # then finish quietly rather than raise through the task group.
                tg.cancel_scope.cancel()

