"""Budgets: reservations before spending, so that no run and no group of runs overspends."""

from __future__ import annotations

import asyncio
import random
import threading

import anyio
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loopwise._policies.budget import Budget, BudgetExceeded, CallReservation, Overrun, reserve, reserve_call
from loopwise._errors import LoopwiseError, UserError
from loopwise.models import Price, Usage

EPS = 1e-12


def within(budget: Budget) -> bool:
    """spent + reserved <= limit, for both limits, read at one instant."""
    s = budget.snapshot()
    ok = True
    if s.usd is not None:
        ok = s.spent_usd + s.reserved_usd <= s.usd * (1 + EPS) + EPS
    if s.tokens is not None:
        ok = ok and s.spent_tokens + s.reserved_tokens <= s.tokens
    return ok


# -- one budget --------------------------------------------------------------------------


def test_reserve_settle_release():
    budget = Budget(usd=1.00, tokens=1_000, name="b")
    assert (budget.spent_usd, budget.reserved_usd, budget.remaining_usd) == (0, 0, 1.0)
    held = budget.reserve(usd=0.25, tokens=100)
    assert (budget.reserved_usd, budget.reserved_tokens) == (0.25, 100)
    assert (budget.remaining_usd, budget.remaining_tokens) == (0.75, 900)
    assert held.settle(0.10, 40) is None
    assert (budget.spent_usd, budget.reserved_usd, budget.spent_tokens, budget.reserved_tokens) == (0.10, 0, 40, 0)
    assert not held.open

    other = budget.reserve(usd=0.5)
    other.release()
    assert (budget.spent_usd, budget.reserved_usd, budget.remaining_usd) == (0.10, 0, 0.9)
    assert budget.describe() == {"name": "b", "usd": 1.0, "tokens": 1000, "spent_usd": 0.1, "reserved_usd": 0.0,
                                 "spent_tokens": 40, "reserved_tokens": 0, "overruns": 0}


def test_a_reservation_closes_once():
    held = Budget(usd=1).reserve(usd=0.1)
    held.settle(0.1, 0)
    with pytest.raises(UserError, match="already settled or released"):
        held.release()
    with pytest.raises(UserError, match="already settled or released"):
        held.settle(0.1, 0)


def test_without_limits_a_budget_only_counts():
    budget = Budget()
    call = reserve_call([budget], input_tokens=1_000, price=None, max_tokens=None)
    assert call.max_tokens is None and call.usd == 0
    call.settle(0.0, 1_500)
    assert budget.spent_tokens == 1_500 and budget.remaining_usd is None and budget.remaining_tokens is None


def test_a_reservation_that_does_not_fit_is_refused_with_the_numbers():
    budget = Budget(usd=0.50)
    budget.reserve(usd=0.47).settle(0.47, 0)
    with pytest.raises(BudgetExceeded) as caught:
        budget.reserve(usd=0.05)
    assert str(caught.value) == "budget of $0.50 would be exceeded: spent $0.47, next call needs $0.05"
    assert isinstance(caught.value, LoopwiseError)
    assert (caught.value.limit, caught.value.limit_value, caught.value.needed) == ("usd", 0.5, 0.05)
    assert budget.reserved_usd == 0
    budget.reserve(usd=0.03)  # what is left still fits


def test_a_settled_actual_above_the_reservation_is_recorded_and_flagged():
    budget = Budget(usd=1.00)
    held = budget.reserve(usd=0.10, tokens=100)
    overrun = held.settle(0.15, 120)
    assert isinstance(overrun, Overrun)
    assert (overrun.reserved_usd, overrun.actual_usd, overrun.reserved_tokens, overrun.actual_tokens) == (
        0.10, 0.15, 100, 120)
    assert str(overrun) == "the call cost $0.15 (120 tokens) but only $0.10 (100 tokens) was reserved"
    assert budget.spent_usd == 0.15 and budget.spent_tokens == 120  # spent is spent
    assert budget.overruns == 1 and budget.overrun_usd == pytest.approx(0.05)


def test_float_noise_is_not_an_overrun():
    budget = Budget(usd=1.0)
    price = Price(0.1, 0.3)
    call = reserve_call([budget], input_tokens=3, price=price, max_tokens=7)
    # The loop prices the usage in floats; the budget reserved exact pico-dollars.
    assert call.settle(price.cost(Usage(3, 7)), 10) is None
    assert budget.overruns == 0 and budget.spent_usd <= call.usd


def test_bad_values_are_refused():
    for kwargs in ({"usd": -1}, {"usd": float("nan")}, {"usd": float("inf")}, {"usd": True}, {"usd": "5"},
                   {"tokens": -1}, {"tokens": 1.5}, {"name": 3}):
        with pytest.raises(UserError):
            Budget(**kwargs)
    budget = Budget(usd=1)
    with pytest.raises(UserError):
        budget.reserve(usd=-0.1)
    with pytest.raises(UserError):
        budget.reserve(tokens=-1)
    with pytest.raises(UserError):
        budget.reserve(usd=0.1).settle(-1, 0)
    with pytest.raises(UserError):
        reserve_call([budget], input_tokens=-1, price=Price(0, 0), max_tokens=1)
    with pytest.raises(UserError):
        reserve_call([budget], input_tokens=1, price=Price(0, 0), max_tokens=0)
    with pytest.raises(UserError):
        reserve([budget, "not a budget"], usd=0.1)  # type: ignore[list-item]


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1, True, "1"])
def test_a_price_or_tool_cost_that_is_not_a_finite_number_is_refused_where_it_is_given(value):
    """NaN or infinity made every cost NaN or inf: runs then ended in error at their first call."""
    import loopwise as lw

    for kwargs in ({"input_per_mtok": value, "output_per_mtok": 0}, {"input_per_mtok": 0, "output_per_mtok": value},
                   {"input_per_mtok": 0, "output_per_mtok": 0, "cached_input_per_mtok": value}):
        with pytest.raises(UserError, match="must be a finite number >= 0"):
            Price(**kwargs)
    with pytest.raises(UserError, match="must be a finite number >= 0"):
        lw.tool(name="priced", cost_usd=value)(lambda: "x")


# -- planning a model call ----------------------------------------------------------------


def test_max_tokens_is_capped_to_what_the_budget_can_pay_for():
    budget = Budget(usd=0.01)
    price = Price(1.0, 10.0)  # $1 / $10 per million tokens
    call = reserve_call([budget], input_tokens=1_000, price=price, max_tokens=4_096)
    # $0.001 of input leaves $0.009: 900 output tokens at $10 per million.
    assert isinstance(call, CallReservation)
    assert (call.max_tokens, call.input_tokens, call.tokens) == (900, 1_000, 1_900)
    assert call.usd == pytest.approx(0.01)
    assert budget.remaining_usd == pytest.approx(0)


def test_max_tokens_is_kept_when_it_fits():
    budget = Budget(usd=5.0)
    call = reserve_call([budget], input_tokens=1_000, price=Price(1.0, 10.0), max_tokens=1_024)
    assert call.max_tokens == 1_024
    assert call.usd == pytest.approx((1_000 * 1.0 + 1_024 * 10.0) / 1e6)


def test_a_token_budget_caps_max_tokens_too():
    budget = Budget(tokens=5_000)
    call = reserve_call([budget], input_tokens=4_000, price=Price(0, 0), max_tokens=None)
    assert call.max_tokens == 1_000 and budget.remaining_tokens == 0


def test_the_call_is_refused_when_not_even_a_minimal_answer_fits():
    budget = Budget(usd=0.50)
    budget.reserve(usd=0.47).settle(0.47, 0)
    with pytest.raises(BudgetExceeded) as caught:
        reserve_call([budget], input_tokens=3_000, price=Price(10.0, 30.0), max_tokens=1_024)
    assert str(caught.value) == (
        "budget of $0.50 would be exceeded: spent $0.47, next call needs at least $0.0305 "
        "(3,000 input tokens and a 16-token answer)"
    )
    assert budget.reserved_usd == 0
    # A smaller call still fits: 1,000 input tokens ($0.01) and a 16-token answer.
    assert reserve_call([budget], input_tokens=1_000, price=Price(10.0, 30.0), max_tokens=1_024).max_tokens == 666


def test_the_refusal_names_calls_in_flight_and_token_limits():
    budget = Budget(tokens=10_000, name="batch-42")
    reserve_call([budget], input_tokens=2_000, price=None, max_tokens=1_000)
    with pytest.raises(BudgetExceeded) as caught:
        reserve_call([budget], input_tokens=7_000, price=None, max_tokens=1_000, min_output_tokens=32)
    assert str(caught.value) == (
        "token budget 'batch-42' of 10,000 would be exceeded: spent 0, 3,000 reserved by calls in flight, "
        "next call needs at least 7,032 (7,000 input and a 32-token answer)"
    )


def test_a_wanted_max_tokens_below_the_minimum_is_the_minimum():
    budget = Budget(tokens=1_010)
    assert reserve_call([budget], input_tokens=1_000, price=None, max_tokens=8).max_tokens == 8


def test_an_unknown_price_under_a_dollar_limit_is_a_mistake():
    with pytest.raises(UserError, match=r"price=Price\(\.\.\.\) \(Price\(0, 0\) for a self-hosted server\)"):
        reserve_call([Budget(usd=1.0)], input_tokens=10, price=None, max_tokens=100)


def test_a_free_model_is_not_capped_by_money():
    call = reserve_call([Budget(usd=0.0)], input_tokens=10_000, price=Price(0, 0), max_tokens=2_048)
    assert call.max_tokens == 2_048 and call.usd == 0


# -- several budgets together -------------------------------------------------------------


def test_a_run_budget_and_a_shared_budget_are_reserved_together():
    run, shared = Budget(usd=1.0), Budget(usd=0.02, name="tenant")
    price = Price(1.0, 10.0)
    call = reserve_call([run, shared], input_tokens=1_000, price=price, max_tokens=4_096)
    assert call.max_tokens == 1_900  # what the tighter (shared) budget pays for
    assert run.reserved_usd == shared.reserved_usd == pytest.approx(0.02)
    call.settle(0.005, 1_200)
    assert run.spent_usd == shared.spent_usd == 0.005 and run.reserved_usd == shared.reserved_usd == 0


def test_several_budgets_reserve_all_or_nothing():
    run, shared = Budget(usd=1.0), Budget(usd=0.05, name="tenant")
    shared.reserve(usd=0.049)
    with pytest.raises(BudgetExceeded) as caught:
        reserve_call([run, shared], input_tokens=1_000, price=Price(1.0, 10.0), max_tokens=100)
    assert caught.value.budget is shared
    assert str(caught.value).startswith("budget 'tenant' of $0.05 would be exceeded: spent $0, $0.049 reserved")
    assert run.reserved_usd == 0  # the run's budget, which had room, holds nothing either
    with pytest.raises(BudgetExceeded):
        reserve([run, shared], usd=0.01)
    assert run.reserved_usd == 0
    held = reserve([run, shared], usd=0.001)
    assert run.reserved_usd == 0.001 and shared.reserved_usd == pytest.approx(0.05)
    held.release()
    assert run.reserved_usd == 0


def test_the_same_budget_twice_is_reserved_once():
    budget = Budget(usd=1.0)
    held = reserve([budget, budget], usd=0.6)
    assert budget.reserved_usd == 0.6
    held.settle(0.6, 0)
    assert budget.spent_usd == 0.6


# -- trying to break it ------------------------------------------------------------------


operations = st.lists(
    st.tuples(
        st.sampled_from(["call", "settle", "settle_over", "release", "tool"]),
        st.integers(0, 50_000),  # input tokens
        st.one_of(st.none(), st.integers(1, 8_000)),  # max_tokens wanted
        st.floats(0.0, 1.0),  # how much of the reservation is used
    ),
    max_size=60,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    ops=operations,
    run_usd=st.floats(0.0, 0.5),
    shared_usd=st.floats(0.0, 2.0),
    shared_tokens=st.one_of(st.none(), st.integers(0, 200_000)),
    rates=st.tuples(st.floats(0.0, 30.0), st.floats(0.0, 120.0)),
)
def test_random_operations_never_break_the_invariant(ops, run_usd, shared_usd, shared_tokens, rates):
    run, shared = Budget(usd=run_usd), Budget(usd=shared_usd, tokens=shared_tokens, name="shared")
    price = Price(*rates)
    held: list = []
    over = 0
    for kind, input_tokens, wanted, used in ops:
        if kind in ("call", "tool"):
            try:
                if kind == "call":
                    held.append(reserve_call([run, shared], input_tokens=input_tokens, price=price, max_tokens=wanted))
                else:
                    held.append(reserve([run, shared], usd=used * 0.01))
            except BudgetExceeded:
                pass
        elif held:
            r = held.pop(0)
            if kind == "release":
                r.release()
            elif kind == "settle":
                assert r.settle(r.usd * used, int(r.tokens * used)) is None
            else:
                over += r.settle(r.usd * (1 + used) + 0.001, r.tokens + 1) is not None
        if not over:
            assert within(run) and within(shared)
    for r in held:
        r.settle(r.usd, r.tokens)
    if not over:
        assert run.spent_usd <= run_usd * (1 + EPS) + EPS and shared.spent_usd <= shared_usd * (1 + EPS) + EPS
    assert run.reserved_usd == shared.reserved_usd == 0 and shared.reserved_tokens == 0
    assert shared.overruns == over


def _hammer(shared: Budget, rng: random.Random, n: int, violations: list) -> None:
    run = Budget(usd=rng.uniform(0.01, 0.2))
    price = Price(rng.uniform(0.1, 10), rng.uniform(0.5, 40))
    for _ in range(n):
        try:
            call = reserve_call([run, shared], input_tokens=rng.randint(0, 20_000), price=price,
                                max_tokens=rng.choice([None, 256, 4_096]))
        except BudgetExceeded:
            continue
        if not within(shared):
            violations.append(shared.snapshot())
        if rng.random() < 0.2:
            call.release()
        else:
            used = rng.random()
            call.settle(call.usd * used, int(call.tokens * used))


def test_many_threads_never_overspend_a_shared_budget():
    shared = Budget(usd=1.0, tokens=2_000_000, name="batch")
    violations: list = []
    stop = threading.Event()

    def watch() -> None:
        while not stop.is_set():
            if not within(shared):
                violations.append(shared.snapshot())

    watcher = threading.Thread(target=watch)
    watcher.start()
    threads = [threading.Thread(target=_hammer, args=(shared, random.Random(i), 400, violations)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    stop.set()
    watcher.join()
    assert not violations
    assert shared.reserved_usd == 0 and shared.reserved_tokens == 0
    assert shared.spent_usd <= 1.0
    assert shared.spent_usd > 0  # the hammering did spend


async def test_many_tasks_on_many_event_loops_never_overspend_a_shared_budget():
    shared = Budget(usd=1.0, name="tenant")
    violations: list = []

    async def one_run(rng: random.Random) -> None:
        run = Budget(usd=rng.uniform(0.01, 0.1))
        price = Price(rng.uniform(0.1, 5), rng.uniform(0.5, 20))
        for _ in range(30):
            try:
                call = reserve_call([run, shared], input_tokens=rng.randint(0, 8_000), price=price, max_tokens=2_048)
            except BudgetExceeded:
                await asyncio.sleep(0)
                continue
            await asyncio.sleep(0)  # the call is in flight; other tasks reserve meanwhile
            if not within(shared) or not within(run):
                violations.append(shared.snapshot())
            used = rng.random()
            call.settle(call.usd * used, int(call.tokens * used))

    async def many(seed: int) -> None:
        await asyncio.gather(*(one_run(random.Random(seed * 1000 + i)) for i in range(50)))

    # Four threads run 50 tasks each on event loops of their own, while this loop runs 50 more.
    threads = _start_loops(many, 4)
    await many(99)
    await anyio.to_thread.run_sync(lambda: [t.join() for t in threads])
    assert not violations
    assert shared.reserved_usd == 0 and shared.spent_usd <= 1.0


def _start_loops(main, n: int) -> list[threading.Thread]:
    threads = [threading.Thread(target=asyncio.run, args=(main(i),)) for i in range(n)]
    for t in threads:
        t.start()
    return threads
