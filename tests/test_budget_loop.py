"""Budgets in the loop: a run never spends more than its budget, tried with hostile inputs.

The guarantee (docs/budgets.md): before every model call the worst case is reserved;
a run never spends more than its budget unless a provider bills more than the
reservation (which is then recorded as an overrun and logged loudly).
"""

from __future__ import annotations

import asyncio
import logging

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import loopwise as lw
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage

from .test_loop import assert_valid_log

# These models repeat one call on purpose: runaway detection would stop them first.
NO_RUNAWAY = lw.RunawayDetector(enabled=False)


def _request_bytes(request: ModelRequest) -> int:
    total = 0
    for m in request.messages:
        total += len((m.content or "").encode())
        for c in m.tool_calls:
            total += len(str(c.arguments).encode()) + len(str(c.name))
    return total


def greedy_model(price: Price, wants: int, result_size: int, honest: bool = True) -> FunctionModel:
    """Never done; always wants `wants` output tokens; bills like a real tokenizer (fewer tokens than bytes)."""

    def fn(request: ModelRequest) -> ModelResponse:
        input_tokens = max(1, _request_bytes(request) // 3)
        output = wants if not honest or request.max_tokens is None else min(wants, request.max_tokens)
        if not request.tools:
            return ModelResponse(text="best effort", usage=Usage(input_tokens, output))
        return ModelResponse(text="x" * 50, tool_calls=[ToolCall("fetch", {"n": result_size})],
                             usage=Usage(input_tokens, output))

    return FunctionModel(fn, price=price)


@lw.tool
async def fetch(n: int) -> str:
    """Returns n characters."""
    return "r" * n


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    input_rate=st.floats(0.01, 50), output_rate=st.floats(0.01, 200),
    budget=st.floats(0.0001, 0.5), wants=st.integers(1, 20_000), result_size=st.integers(0, 30_000),
    max_tokens=st.one_of(st.none(), st.integers(1, 8192)), instructions=st.text(max_size=300),
)
def test_a_run_never_spends_more_than_its_budget(input_rate, output_rate, budget, wants, result_size,
                                                 max_tokens, instructions):
    store = lw.MemoryStore()
    agent = lw.Agent(greedy_model(Price(input_rate, output_rate), wants, result_size), tools=[fetch],
                     instructions=instructions or None, store=store, max_tokens=max_tokens,
                     limits=lw.Limits(max_iterations=20, budget_usd=budget), runaway=NO_RUNAWAY)
    result = agent.run_sync("spend it all")
    assert result.cost_usd <= budget + 1e-9, (result.cost_usd, budget)
    assert result.stop_reason in ("budget", "max_iterations")
    events = store.load(result.run_id)
    assert_valid_log(events)
    started = [e for e in events if e.kind == "model_call_started"]
    finished = [e for e in events if e.kind == "model_call_finished"]
    for s, f in zip(started, finished):
        assert f.cost_usd <= s.reserved_usd + 1e-9  # every call fit its reservation
        assert f.overrun_usd == 0


def test_the_budget_stops_the_run_before_the_call_that_would_overspend():
    store = lw.MemoryStore()
    agent = lw.Agent(greedy_model(Price(2.5, 10), wants=1000, result_size=2000), tools=[fetch], store=store,
                     limits=lw.Limits(max_iterations=50, budget_usd=0.02), runaway=NO_RUNAWAY)
    result = agent.run_sync("go")
    assert result.stop_reason == "budget"
    assert "budget of $0.02 would be exceeded" in result.reason
    events = store.load(result.run_id)
    (limit,) = [e for e in events if e.kind == "limit_hit"]
    assert limit.limit == "budget"
    assert events[-2].kind == "limit_hit"  # no model call after the limit: not even a best-effort one
    # max_tokens sent was capped to what the budget could pay for, as it ran low
    sent = [e.max_tokens for e in events if e.kind == "model_call_started"]
    assert sent[0] == 1024 and min(sent) < 1024


async def test_concurrent_runs_on_a_shared_budget_never_overspend_together():
    shared = lw.Budget(usd=0.05, name="batch-42")
    store = lw.MemoryStore()

    async def slow_fn(request: ModelRequest) -> ModelResponse:
        await asyncio.sleep(0.001)
        return greedy_model(Price(2.5, 10), 800, 1500).fn(request)

    agent = lw.Agent(FunctionModel(slow_fn, price=Price(2.5, 10)), tools=[fetch], store=store,
                     limits=lw.Limits(max_iterations=30, budget_usd=None), runaway=NO_RUNAWAY)
    results = await asyncio.gather(*(agent.run(f"task {i}", budget=shared) for i in range(25)))
    total = sum(r.cost_usd for r in results)
    assert total <= 0.05 + 1e-9
    assert shared.spent_usd == pytest.approx(total, abs=1e-8)
    assert shared.reserved_usd == 0
    assert {r.stop_reason for r in results} <= {"budget", "max_iterations"}
    assert any(r.stop_reason == "budget" for r in results)


def test_a_provider_that_ignores_max_tokens_is_logged_as_an_overrun(caplog):
    store = lw.MemoryStore()
    agent = lw.Agent(greedy_model(Price(1, 100), wants=50_000, result_size=10, honest=False), tools=[fetch],
                     store=store, max_tokens=100, limits=lw.Limits(max_iterations=3, budget_usd=10), runaway=NO_RUNAWAY)
    with caplog.at_level(logging.ERROR, logger="loopwise"):
        result = agent.run_sync("go")
    finished = [e for e in store.load(result.run_id) if e.kind == "model_call_finished"]
    assert finished[0].overrun_usd > 0
    assert "billed more than its reservation" in caplog.text


def test_paid_tools_are_reserved_before_they_run():
    calls = []

    @lw.tool(cost_usd=0.2)
    async def paid_search(q: str) -> str:
        """A search API that costs 20 cents a call."""
        calls.append(q)
        return "hits"

    model = FunctionModel(lambda r: ModelResponse(tool_calls=[ToolCall("paid_search", {"q": "x"})])
                          if r.tools else "done", price=Price(0, 0))
    store = lw.MemoryStore()
    result = lw.Agent(model, tools=[paid_search], store=store,
                      limits=lw.Limits(max_iterations=5, budget_usd=0.5), runaway=NO_RUNAWAY).run_sync("go")
    assert len(calls) == 2 and result.cost_usd == pytest.approx(0.4)
    skipped = [e for e in store.load(result.run_id) if e.kind == "tool_call_finished" and e.outcome == "not_executed"]
    assert skipped and "budget of $0.50 would be exceeded" in skipped[0].content


def test_token_budget():
    store = lw.MemoryStore()
    agent = lw.Agent(greedy_model(Price(0, 0), wants=500, result_size=100), tools=[fetch], store=store,
                     limits=lw.Limits(max_iterations=50, budget_usd=None, budget_tokens=5_000), runaway=NO_RUNAWAY)
    result = agent.run_sync("go")
    assert result.stop_reason == "budget"
    assert result.usage.input_tokens + result.usage.output_tokens <= 5_000


def test_the_deadline_stops_a_run_that_would_not_fit_another_iteration():
    from loopwise.testing import FakeClock

    async def slow(request: ModelRequest) -> ModelResponse:
        await asyncio.sleep(0.15)
        if not request.tools:
            return ModelResponse(text="best effort in time", usage=Usage(10, 5))
        return ModelResponse(tool_calls=[ToolCall("fetch", {"n": len(request.messages)})], usage=Usage(10, 5))

    store = lw.MemoryStore()
    clock = FakeClock()
    agent = lw.Agent(FunctionModel(slow), tools=[fetch], store=store,
                     limits=lw.Limits(max_iterations=100, deadline_s=1.0), clock=clock)
    result = agent.run_sync("go")
    assert result.stop_reason == "deadline"
    assert clock.monotonic() < 1.0  # the point: within its 1 s (fake), not 100 iterations
    assert result.output == "best effort in time"  # it stopped early enough to answer
    events = store.load(result.run_id)
    (limit,) = [e for e in events if e.kind == "limit_hit"]
    assert limit.limit == "deadline" and "left, an iteration has taken" in limit.detail
    assert_valid_log(events)


def test_the_deadline_cancels_what_is_in_flight():
    @lw.tool(timeout=60)
    async def hang() -> str:
        """Hangs for a minute."""
        await asyncio.sleep(60)
        return "late"

    store = lw.MemoryStore()
    model = FunctionModel(lambda r: ModelResponse(tool_calls=[ToolCall("hang", {})]) if r.tools else "never")
    from loopwise.testing import FakeClock

    clock = FakeClock()
    result = lw.Agent(model, tools=[hang], store=store, limits=lw.Limits(deadline_s=0.5), clock=clock).run_sync("go")
    assert result.stop_reason == "deadline" and clock.monotonic() == pytest.approx(0.5)
    events = store.load(result.run_id)
    assert [e.outcome for e in events if e.kind == "tool_call_finished"] == ["cancelled"]
    assert_valid_log(events)


# -- every way a tool call spends, fuzzed --------------------------------------------------
#
# Tools with prices, retries and failing attempts, fallback chains of values, Templates
# and callables that may fail and tools with fallbacks of their own (nested past the depth
# limit), called several at once per response, by concurrent runs on a shared budget.
# What each tool's function was actually invoked for is what a provider would bill; the
# spend summed from the log must equal it, and neither may pass any budget.

_PRICES = st.sampled_from([0.0, 0.01, 0.05, 0.1, 0.2, 0.35])


def _tool_spec(fallback: st.SearchStrategy, fails: st.SearchStrategy | None = None) -> st.SearchStrategy:
    return st.fixed_dictionaries({
        "cost": _PRICES,
        "retries": st.integers(0, 2),
        # cycled, one per invocation: True fails
        "fails": st.lists(st.booleans(), min_size=1, max_size=4) if fails is None else fails,
        "sync": st.booleans(),
        "breaker": st.booleans(),
        "fallback": fallback,
    })


def _failing_chain(depth: int) -> st.SearchStrategy:
    """Fallback tools nested `depth` deep, all failing but the last: past the depth limit."""
    spec = _tool_spec(st.just([]))
    for _ in range(depth - 1):
        spec = _tool_spec(st.tuples(spec.map(lambda s: ("tool", s))).map(list), fails=st.just([True]))
    return spec.map(lambda s: ("tool", s))


_steps = st.one_of(
    st.recursive(
        st.one_of(st.just(("value",)), st.tuples(st.just("template"), st.booleans()),
                  st.tuples(st.just("callable"), st.booleans()),
                  _tool_spec(st.just([])).map(lambda spec: ("tool", spec))),
        lambda inner: _tool_spec(st.lists(inner, min_size=1, max_size=3)).map(lambda spec: ("tool", spec)),
        max_leaves=10,
    ),
    st.integers(2, 5).flatmap(_failing_chain),
)
_top_tools = st.lists(_tool_spec(st.lists(_steps, max_size=3)), min_size=1, max_size=4)


class _Flaky(Exception):
    pass


def _build(specs: list[dict], billed: list[float]) -> list[lw.Tool]:
    made = iter(range(10_000))

    def make(spec: dict) -> lw.Tool:
        name, cost, pattern = f"t{next(made)}", spec["cost"], spec["fails"]
        calls = iter(range(10**9))

        def attempt(q: str) -> str:
            billed.append(cost)
            if pattern[next(calls) % len(pattern)]:
                raise _Flaky(f"{name} failed")
            return f"{name}: {q}"

        async def attempt_async(q: str) -> str:
            return attempt(q)

        fn = attempt if spec["sync"] else attempt_async
        fn.__name__ = name
        fn.__doc__ = "A fuzzed tool."
        chain = []
        for step in spec["fallback"]:
            if step[0] == "value":
                chain.append({"cached": True})
            elif step[0] == "template":  # one that cannot be filled ("{q:d}" given a str) fails
                chain.append(lw.Template("nothing for {q}" if step[1] else "nothing for {q:d}"))
            elif step[0] == "callable":
                chain.append(_callable(step[1]))
            else:
                chain.append(make(step[1]))
        return lw.tool(fn, name=name, cost_usd=cost, retries=spec["retries"], fallback=chain or None,
                       backoff=lw.Backoff(initial_s=0, jitter=False), breaker=spec["breaker"])

    return [make(spec) for spec in specs]


def _callable(ok: bool):
    def local_copy(q: str) -> str:
        if not ok:
            raise _Flaky("no local copy")
        return f"local copy of {q}"

    return local_copy


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    specs=_top_tools,
    turns=st.lists(st.lists(st.integers(0, 3), min_size=1, max_size=5), min_size=1, max_size=4),
    run_usd=st.one_of(st.none(), st.floats(0.0, 1.5)),
    shared_usd=st.one_of(st.none(), st.floats(0.0, 3.0)),
    runs=st.integers(1, 4),
    parallel=st.sampled_from([None, 1, 2]),
)
def test_no_way_a_tool_call_spends_passes_a_budget(specs, turns, run_usd, shared_usd, runs, parallel):
    billed: list[float] = []
    tools = _build(specs, billed)

    def fn(request: ModelRequest) -> ModelResponse:
        made = sum(1 for m in request.messages if m.role == "assistant")
        usage = Usage(40, 10)
        if not request.tools or made >= len(turns):
            return ModelResponse(text="done", usage=usage)
        names = [tools[i % len(tools)].name for i in turns[made]]
        return ModelResponse(tool_calls=[ToolCall(n, {"q": f"{made}-{i}"}) for i, n in enumerate(names)],
                             usage=usage)

    store = lw.MemoryStore()
    shared = lw.Budget(usd=shared_usd, name="shared")
    agent = lw.Agent(FunctionModel(fn, price=Price(1, 4)), tools=tools, store=store, runaway=NO_RUNAWAY,
                     max_parallel_tools=parallel, limits=lw.Limits(max_iterations=6, budget_usd=run_usd))

    async def all_runs() -> list[lw.RunResult]:
        return await asyncio.gather(*(agent.run(f"task {i}", budget=shared) for i in range(runs)))

    results = asyncio.run(all_runs())
    total = tool_total = 0.0
    for result in results:
        events = store.load(result.run_id)
        assert_valid_log(events)
        assert result.stop_reason in ("done", "budget", "max_iterations"), result.reason
        tools_spent = sum(e.cost_usd for e in events if e.kind == "tool_call_finished")
        spent = tools_spent + sum(e.cost_usd for e in events if e.kind == "model_call_finished")
        if run_usd is not None:
            assert spent <= run_usd + 1e-9, (spent, run_usd)
        total += spent
        tool_total += tools_spent
    assert tool_total == pytest.approx(sum(billed), abs=1e-9)  # the log says what was billed
    if shared_usd is not None:
        assert total <= shared_usd + 1e-9, (total, shared_usd)
    assert shared.spent_usd == pytest.approx(total, abs=1e-9)
    assert shared.reserved_usd == 0 and shared.overruns == 0
