"""Tool callers and wrappers: every tool call goes through `Agent(tool_caller=...)`.

A wrapper (`WrapperToolCaller`) sits inside what the run does around a call: the
arguments are validated and the worst case is reserved before it runs, its result is
logged like any call's and settles the reservation, a kill or the deadline cancels it,
and whatever it raises or returns wrong is a tool error the model reads, not the end of
the run. `WrapperModel` delegates a model's call and hooks (name, price, token
estimator, close), so a wrapped model is priced and budgeted as the one it wraps.
"""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

import loopwise as lw
import loopwise.events
from loopwise._policies.tokens import TokenEstimator
from loopwise.models import (
    FunctionModel,
    ModelRequest,
    ModelResponse,
    Price,
    ScriptedModel,
    ToolCall,
    Usage,
    WrapperModel,
)

from .test_budget_tools import log_spend
from .test_loop import assert_valid_log

NO_RUNAWAY = lw.RunawayDetector(enabled=False)
EPS = 1e-9


@pytest.fixture(params=["asyncio-tasks", "task-group"])
def act_path(request, monkeypatch):
    """Both implementations of ACT: asyncio tasks, and the anyio task group (the reference)."""
    if request.param == "task-group":
        monkeypatch.setattr("loopwise._runtime.act._asyncio_loop", lambda: None)
    return request.param


def finished(events: list[Any]) -> dict[str, Any]:
    """The tool_call_finished events by call id."""
    return {e.call_id: e for e in events if e.kind == "tool_call_finished"}


def tool_messages(request: ModelRequest) -> dict[str, str]:
    return {m.tool_call_id: m.content for m in request.messages if m.role == "tool"}


class Recorder(lw.WrapperToolCaller):
    """Sees every call: the tool, its arguments, its context, and what came back."""

    def __init__(self, wrapped: lw.ToolCaller | None = None) -> None:
        super().__init__(wrapped)
        self.seen: list[tuple[str, dict[str, Any], lw.RunContext]] = []
        self.results: list[lw.ToolResult] = []

    async def call_tool(self, tool, args, ctx):
        self.seen.append((tool.name, dict(args), ctx))
        result = await super().call_tool(tool, args, ctx)
        self.results.append(result)
        return result


class ApprovalGate(lw.WrapperToolCaller):
    """A person must approve calls to `guarded`: here, nobody does."""

    def __init__(self, guarded: str, wrapped: lw.ToolCaller | None = None) -> None:
        super().__init__(wrapped)
        self.guarded = guarded
        self.asked: list[str] = []

    async def call_tool(self, tool, args, ctx):
        if tool.name == self.guarded:
            self.asked.append(ctx.call_id)
            return lw.ToolResult.not_executed(f"a person declined {tool.name}({args})", error_type="Denied")
        return await super().call_tool(tool, args, ctx)


# -- an approval gate -----------------------------------------------------------------------


def test_a_gate_denies_one_tool_the_model_reads_it_and_the_others_of_the_response_run(act_path):
    ran: list[str] = []

    @lw.tool
    async def refund(order_id: str, amount: float) -> str:
        """Refund an order."""
        ran.append(f"refund {order_id}")
        return "refunded"

    @lw.tool
    def lookup(order_id: str) -> str:
        """Look an order up (sync: runs in a thread)."""
        ran.append(f"lookup {order_id}")
        return f"{order_id}: shipped"

    seen: list[ModelRequest] = []

    def fn(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        if len(seen) == 1:
            return ModelResponse(tool_calls=[ToolCall("lookup", {"order_id": "A"}, id="c1"),
                                             ToolCall("refund", {"order_id": "A", "amount": 5}, id="c2"),
                                             ToolCall("lookup", {"order_id": "B"}, id="c3")])
        return ModelResponse(text="done")

    gate = ApprovalGate("refund")
    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn), tools=[refund, lookup], store=store, runaway=NO_RUNAWAY, tool_caller=gate)
    result = agent.run_sync("refund A")
    assert result.stop_reason == "done"
    assert sorted(ran) == ["lookup A", "lookup B"]  # the refund never ran
    assert gate.asked == ["c2"]
    events = store.load(result.run_id)
    assert_valid_log(events)
    ends = finished(events)
    assert ends["c2"].outcome == "not_executed"
    assert ends["c2"].content == "not executed: a person declined refund({'order_id': 'A', 'amount': 5.0})"
    assert ends["c2"].error.type == "Denied" and ends["c2"].attempts == 0
    assert ends["c1"].outcome == ends["c3"].outcome == "ok"
    assert ends["c1"].content == "A: shipped" and ends["c3"].content == "B: shipped"
    # The model reads the denial as the refund's result, beside the lookups'.
    assert tool_messages(seen[1]) == {"c1": "A: shipped", "c2": ends["c2"].content, "c3": "B: shipped"}
    # The log records which caller made the calls.
    assert events[0].agent["tool_caller"] == {"class": "ApprovalGate", "wraps": {"class": "PolicyToolCaller"}}


# -- a wrapper that edits arguments ---------------------------------------------------------


def test_a_wrapper_changes_the_arguments_the_tool_gets_the_log_keeps_the_models():
    got: list[int] = []

    @lw.tool
    async def search(query: str, limit: int = 10) -> str:
        """Search."""
        got.append(limit)
        return f"{limit} results for {query}"

    class CapLimit(lw.WrapperToolCaller):
        async def call_tool(self, tool, args, ctx):
            if args.get("limit", 0) > 3:
                args = {**args, "limit": 3}
            return await super().call_tool(tool, args, ctx)

    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel([[ToolCall("search", {"query": "q", "limit": 50}, id="s1")], "done"]),
                     tools=[search], store=store, runaway=NO_RUNAWAY, tool_caller=CapLimit())
    result = agent.run_sync("go")
    assert got == [3]
    events = store.load(result.run_id)
    started = next(e for e in events if e.kind == "tool_call_started")
    assert started.arguments == {"query": "q", "limit": 50}  # what the model asked for
    assert finished(events)["s1"].content == "3 results for q"  # what the tool did


# -- a recorder -----------------------------------------------------------------------------


def test_a_recorder_sees_every_call_with_its_id_and_context_and_nests_around_a_gate():
    @lw.tool
    async def echo(x: int) -> int:
        """Echo."""
        return x

    @lw.tool
    async def delete(x: int) -> str:
        """Delete."""
        raise AssertionError("the gate lets no delete through")

    script = [[ToolCall("echo", {"x": 1}, id="a"), ToolCall("delete", {"x": 2}, id="b")],
              [ToolCall("echo", {"x": 3}, id="c")],
              [ToolCall("nope", {}, id="d"), ToolCall("echo", {"x": "not an int"}, id="e")],
              "done"]
    recorder = Recorder(ApprovalGate("delete"))
    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel(script), tools=[echo, delete], store=store, runaway=NO_RUNAWAY,
                     tool_caller=recorder, deps={"db": "x"})
    result = agent.run_sync("go", tags=["nightly"])
    assert result.stop_reason == "done"
    # Every call that reached a caller, in order; an unknown tool and invalid arguments never do.
    assert [(name, args, ctx.call_id, ctx.iteration) for name, args, ctx in recorder.seen] == [
        ("echo", {"x": 1}, "a", 1), ("delete", {"x": 2}, "b", 1), ("echo", {"x": 3}, "c", 2)]
    for _, _, ctx in recorder.seen:
        assert ctx.run_id == result.run_id and ctx.tags == ("nightly",) and ctx.deps == {"db": "x"}
    assert [r.outcome for r in recorder.results] == ["ok", "not_executed", "ok"]
    ends = finished(store.load(result.run_id))
    assert {k: e.outcome for k, e in ends.items()} == {
        "a": "ok", "b": "not_executed", "c": "ok", "d": "unknown_tool", "e": "invalid_arguments"}
    # What the recorder saw is what the log holds.
    for (_, _, ctx), seen_result in zip(recorder.seen, recorder.results):
        assert ends[ctx.call_id].content == seen_result.content


def test_what_a_wrapper_returns_is_logged_like_a_call_and_its_value_reaches_the_check():
    class Elsewhere(lw.WrapperToolCaller):
        """Runs the call somewhere else (a durable engine's activity) and reports what happened there."""

        async def call_tool(self, tool, args, ctx):
            return lw.ToolResult("fallback", "cached: 42", attempts=2, fallback="cache", cost_usd=0.0,
                                 error=loopwise.events.ErrorInfo(type="TimeoutError", message="slow"))

    @lw.tool
    async def price(sku: str) -> int:
        """A price."""
        raise AssertionError("it ran elsewhere")

    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel([[ToolCall("price", {"sku": "x"}, id="p")], "done"]), tools=[price],
                     store=store, runaway=NO_RUNAWAY, tool_caller=Elsewhere())
    result = agent.run_sync("go")
    end = finished(store.load(result.run_id))["p"]
    assert (end.outcome, end.content, end.attempts, end.fallback) == ("fallback", "cached: 42", 2, "cache")
    assert end.error.type == "TimeoutError"


# -- a wrapper that fails -------------------------------------------------------------------


@pytest.mark.parametrize("how", ["raises", "returns junk", "returns a bad outcome", "returns a bad cost"])
def test_a_wrapper_that_fails_is_a_tool_error_the_model_reads(how, act_path):
    class Broken(lw.WrapperToolCaller):
        async def call_tool(self, tool, args, ctx):
            if tool.name == "fine":
                return await super().call_tool(tool, args, ctx)
            if how == "raises":
                raise ValueError(f"no route for {args['token']}")
            if how == "returns junk":
                return "a string"
            if how == "returns a bad outcome":
                return lw.ToolResult("cancelled", "x")
            return lw.ToolResult("ok", "x", cost_usd=float("nan"))

    @lw.tool(secret="token")
    async def broken(token: str) -> str:
        """Never reached."""
        raise AssertionError("the wrapper does not call it")

    @lw.tool
    async def fine() -> str:
        """Works."""
        return "fine"

    seen: list[ModelRequest] = []

    def fn(request: ModelRequest) -> ModelResponse:
        seen.append(request)
        if len(seen) == 1:
            return ModelResponse(tool_calls=[ToolCall("broken", {"token": "s3cr3t-value"}, id="b"),
                                             ToolCall("fine", {}, id="f")])
        return ModelResponse(text="recovered")

    store = lw.MemoryStore()
    agent = lw.Agent(FunctionModel(fn), tools=[broken, fine], store=store, runaway=NO_RUNAWAY, tool_caller=Broken())
    result = agent.run_sync("go")
    assert result.stop_reason == "done" and result.output == "recovered"
    events = store.load(result.run_id)
    assert_valid_log(events)
    ends = finished(events)
    assert ends["f"].outcome == "ok"
    end = ends["b"]
    assert end.outcome == "error"
    assert "s3cr3t-value" not in end.content and "s3cr3t-value" not in end.error.message
    expected = {
        "raises": ("ValueError", "the tool caller Broken raised ValueError: no route for [redacted]"),
        "returns junk": ("ToolCallerError", "the tool caller Broken returned str, not a loopwise.ToolResult"),
        "returns a bad outcome": ("ToolCallerError", "the tool caller Broken returned a ToolResult with outcome "
                                                     "'cancelled' (one of error, fallback, not_executed, ok)"),
        "returns a bad cost": ("ToolCallerError", "the tool caller Broken returned a ToolResult with cost_usd=nan "
                                                  "(a number of dollars >= 0)"),
    }[how]
    assert (end.error.type, end.error.message) == expected
    assert expected[1] in end.content
    assert tool_messages(seen[1])["b"] == end.content  # the model reads it


# -- budgets ----------------------------------------------------------------------------------


def test_a_wrapper_cannot_bypass_a_paid_tools_reservation():
    billed: list[str] = []

    @lw.tool(cost_usd=0.40)
    async def premium(q: str) -> str:
        """A paid lookup."""
        billed.append(q)
        return f"premium {q}"

    recorder = Recorder()
    store = lw.MemoryStore()
    model = FunctionModel(lambda r: ModelResponse(text="done") if any(m.role == "tool" for m in r.messages)
                          else ModelResponse(tool_calls=[ToolCall("premium", {"q": str(i)}, id=f"p{i}")
                                                         for i in range(3)]), price=Price(0, 0))
    agent = lw.Agent(model, tools=[premium], store=store, runaway=NO_RUNAWAY, tool_caller=recorder,
                     limits=lw.Limits(budget_usd=1.00))
    result = agent.run_sync("go")
    events = store.load(result.run_id)
    ends = finished(events)
    # Two fit in $1.00; the third is refused before any caller sees it.
    assert sorted(e.outcome for e in ends.values()) == ["not_executed", "ok", "ok"]
    refused = next(k for k, e in ends.items() if e.outcome == "not_executed")
    assert refused not in [ctx.call_id for _, _, ctx in recorder.seen] and len(recorder.seen) == 2
    assert ends[refused].error.type == "BudgetExceeded"
    assert len(billed) == 2
    assert abs(result.cost_usd - 0.80) < EPS and abs(log_spend(events) - 0.80) < EPS


def test_a_wrapper_that_raises_after_the_tool_ran_still_counts_what_it_cost():
    @lw.tool(cost_usd=0.25, breaker=False)
    async def paid(q: str) -> str:
        """A paid lookup."""
        return "answer"

    class FailsAfter(lw.WrapperToolCaller):
        async def call_tool(self, tool, args, ctx):
            await super().call_tool(tool, args, ctx)
            raise RuntimeError("the recorder's disk is full")

    shared = lw.Budget(usd=1.00)
    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel([[ToolCall("paid", {"q": "x"}, id="p")], "done"]), tools=[paid], store=store,
                     runaway=NO_RUNAWAY, tool_caller=FailsAfter())
    result = agent.run_sync("go", budget=shared)
    end = finished(store.load(result.run_id))["p"]
    assert end.outcome == "error" and end.error.type == "RuntimeError"
    assert abs(end.cost_usd - 0.25) < EPS  # the attempt started: it may have been billed
    assert abs(shared.spent_usd - 0.25) < EPS and shared.reserved_usd == 0


# -- cancellation --------------------------------------------------------------------------------


@pytest.mark.parametrize("by", ["kill", "deadline"])
async def test_a_kill_or_the_deadline_cancels_a_call_waiting_in_a_wrapper(by):
    waiting = asyncio.Event()
    released: list[str] = []

    class WaitsForAPerson(lw.WrapperToolCaller):
        async def call_tool(self, tool, args, ctx):
            waiting.set()
            try:
                await asyncio.Event().wait()  # nobody ever approves
            finally:
                released.append(ctx.call_id)
            return await super().call_tool(tool, args, ctx)

    @lw.tool(cost_usd=0.10)
    async def transfer(amount: int) -> str:
        """Move money."""
        raise AssertionError("never approved")

    shared = lw.Budget(usd=1.00)
    store = lw.MemoryStore()
    limits = lw.Limits(deadline_s=1.0) if by == "deadline" else None
    agent = lw.Agent(ScriptedModel([[ToolCall("transfer", {"amount": 5}, id="t")], "done"]), tools=[transfer],
                     store=store, runaway=NO_RUNAWAY, tool_caller=WaitsForAPerson(), limits=limits)
    task = asyncio.ensure_future(agent.run("go", run_id=f"wait-{by}", budget=shared))
    await asyncio.wait_for(waiting.wait(), 60)
    if by == "kill":
        lw.kill(f"wait-{by}", reason="enough", store=store)
    result = await asyncio.wait_for(task, 60)
    assert result.stop_reason == ("killed" if by == "kill" else "deadline")
    assert released == ["t"]
    end = finished(store.load(result.run_id))["t"]
    assert end.outcome == "cancelled" and end.cost_usd == 0
    assert shared.reserved_usd == 0 and shared.spent_usd == 0  # the reservation was given back


# -- outside a run, and bad input ------------------------------------------------------------


async def test_the_default_caller_runs_a_tool_under_its_policy_outside_a_run():
    # What a durable engine's worker does: the call, with a RunContext it made, no log.
    tries: list[int] = []

    @lw.tool(retries=2, backoff=lw.Backoff(initial_s=0.001, max_s=0.001), breaker=False)
    async def flaky(n: int) -> int:
        """Fails twice."""
        tries.append(n)
        if len(tries) < 3:
            raise ConnectionError("reset")
        return n * 2

    ctx = lw.RunContext(run_id="r", call_id="c", iteration=1)
    result = await lw.PolicyToolCaller().call_tool(flaky, {"n": 21}, ctx)
    assert (result.outcome, result.content, result.value, result.attempts) == ("ok", "42", 42, 3)
    assert await lw.WrapperToolCaller().call_tool(flaky, {"n": 1}, ctx) == lw.ToolResult("ok", "2", 1, value=2)


def test_bad_tool_callers_are_refused_with_a_clear_message():
    with pytest.raises(lw.UserError, match=r"tool_caller must be a loopwise.ToolCaller .*got function"):
        lw.Agent(ScriptedModel(["x"]), tool_caller=lambda *a: None)
    with pytest.raises(lw.UserError, match=r"ApprovalGate\(wrapped\) must be a loopwise.ToolCaller, got str"):
        ApprovalGate("x", wrapped="PolicyToolCaller")  # type: ignore[arg-type]
    with pytest.raises(lw.UserError, match=r"WrapperModel\(wrapped\) must be a loopwise.models.Model, got str"):
        WrapperModel("openai:gpt-4o")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="non-empty str"):
        lw.ToolResult.not_executed("")


# -- WrapperModel -----------------------------------------------------------------------------


class CountingModel(WrapperModel):
    def __init__(self, wrapped):
        super().__init__(wrapped)
        self.requests = 0

    async def request(self, request):
        self.requests += 1
        return await super().request(request)


class _Estimator(TokenEstimator):
    made = 0

    def __init__(self) -> None:
        super().__init__()
        type(self).made += 1


class PricedModel(FunctionModel):
    """A model with a price list of its own (`default_price`) and its own token estimator."""

    def default_price(self, *, input_tokens: int = 0, at=None):
        return Price(input_per_mtok=1_000, output_per_mtok=1_000)  # $0.001 a token: easy sums

    def token_estimator(self):
        return _Estimator()

    closed = 0

    async def aclose(self):
        type(self).closed += 1


def test_a_wrapper_model_counts_requests_and_passes_the_hooks_through():
    def fn(request: ModelRequest) -> ModelResponse:
        if any(m.role == "tool" for m in request.messages):
            return ModelResponse(text="done", usage=Usage(input_tokens=2, output_tokens=1))
        return ModelResponse(tool_calls=[ToolCall("noop", {})], usage=Usage(input_tokens=1, output_tokens=1))

    @lw.tool
    async def noop() -> str:
        """Nothing."""
        return "ok"

    inner = PricedModel(fn, name="priced")
    inner.price = None  # (FunctionModel's own $0 off: the price comes from default_price)
    model = CountingModel(inner)
    assert model.name == "priced" and model.price is None
    store = lw.MemoryStore()
    # Under a dollar budget a model must be priced: the wrapper is, through the one it wraps.
    agent = lw.Agent(model, tools=[noop], store=store, runaway=NO_RUNAWAY, limits=lw.Limits(budget_usd=100.0))
    before = _Estimator.made
    result = agent.run_sync("go")
    assert result.stop_reason == "done"
    assert model.requests == 2
    assert _Estimator.made == before + 1  # the run's estimator is the wrapped model's
    assert abs(result.cost_usd - 0.005) < EPS  # (1+1) + (2+1) tokens at $0.001 each
    events = store.load(result.run_id)
    assert {e.model for e in events if e.kind == "model_call_finished"} == {"priced"}
    assert events[0].agent["model"] == {"name": "priced", "class": "CountingModel",
                                        "wraps": {"name": "priced", "class": "PricedModel"}}

    async def close() -> None:
        async with model:
            pass

    closed = PricedModel.closed
    asyncio.run(close())
    assert PricedModel.closed == closed + 1
    # A price or a name given to the wrapper overrides the wrapped model's.
    model.price = Price(0, 0)
    model.name = "counted"
    assert (model.price, model.name, inner.name) == (Price(0, 0), "counted", "priced")


def test_a_wrapper_model_of_an_unpriced_model_is_refused_under_a_dollar_budget():
    class Unpriced(lw.models.Model):
        name = "mystery"

        async def request(self, request):
            return ModelResponse(text="x")

    with pytest.raises(lw.UserError, match="the price of mystery is unknown"):
        lw.Agent(CountingModel(Unpriced()), limits=lw.Limits(budget_usd=1.0)).run_sync("go")


# -- the default, called directly or through a wrapper -----------------------------------------


def test_a_run_through_a_plain_wrapper_logs_what_a_run_through_the_default_logs(act_path):
    # The driver calls the default caller's `execute` directly (no RunContext for a tool
    # that reads none): through a wrapper that only delegates, every event is the same.
    def tools() -> list[lw.Tool]:
        tries: list[int] = []

        @lw.tool(cost_usd=0.05, breaker=False)
        async def cached(q: str) -> str:
            """The cache."""
            return f"cached {q}"

        @lw.tool(retries=1, backoff=lw.Backoff(initial_s=0.001, max_s=0.001), fallback=cached, cost_usd=0.10,
                 breaker=False)
        async def live(q: str) -> str:
            """Down."""
            raise ConnectionError("reset")

        @lw.tool(retries=1, backoff=lw.Backoff(initial_s=0.001, max_s=0.001), breaker=False)
        def flaky(n: int) -> int:
            """Fails once (sync)."""
            tries.append(n)
            if len(tries) == 1:
                raise ValueError("once")
            return n + 1

        @lw.tool
        async def who(ctx: lw.RunContext) -> str:
            """Reads its context."""
            return f"{ctx.run_id} {ctx.call_id} {ctx.iteration} {ctx.tags}"

        return [live, cached, flaky, who]

    script = [[ToolCall("live", {"q": "a"}, id="l"), ToolCall("flaky", {"n": 1}, id="f"), ToolCall("who", {}, id="w"),
               ToolCall("live", {"q": 7}, id="bad")], "done"]

    def run(caller: lw.ToolCaller | None) -> list[tuple[Any, ...]]:
        store = lw.MemoryStore()
        agent = lw.Agent(ScriptedModel(script, price=Price(0, 0)), tools=tools(), store=store, runaway=NO_RUNAWAY,
                         tool_caller=caller, limits=lw.Limits(budget_usd=1.0))
        result = agent.run_sync("go", run_id="same", tags=["t"])
        assert result.stop_reason == "done"
        rows = [(e.kind, getattr(e, "call_id", None), getattr(e, "outcome", None), getattr(e, "content", None),
                 getattr(e, "attempt", None), getattr(e, "attempts", None), getattr(e, "fallback", None),
                 getattr(e, "cost_usd", None), getattr(getattr(e, "error", None), "type", None))
                for e in store.load(result.run_id)]
        # The calls run concurrently (one in a thread): how their events interleave is not
        # fixed. Each call's own events, in their order, are (a stable sort by call id).
        return sorted(rows, key=lambda row: (row[1] is not None, str(row[1])))

    direct, wrapped = run(None), run(lw.WrapperToolCaller())
    assert direct == wrapped
    contents = {row[1]: row[3] for row in direct if row[0] == "tool_call_finished"}
    assert contents["w"] == "same w 1 ('t',)"
    assert contents["l"].endswith("answered from cached: cached a")
