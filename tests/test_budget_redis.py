"""Shared budgets' ledgers, one process: the Lua scripts on a real `redis-server`, and the SQLite tables.

The edge cases of each step (a limit exactly reached, an overrun, a double settle,
an unknown budget, limits declared twice), reservations across in-process and shared
budgets that roll back when one refuses, and a Redis that goes away. Many processes
are in `test_budget_shared.py`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator

import pytest
import redis

import loopwise as lw
from loopwise._policies import budget_redis as _budget_redis
from loopwise._policies.budget import reserve, reserve_call
from loopwise._policies.budget_redis import keys_of
from loopwise.models import Price

from .redis_server import RedisServer


@pytest.fixture
def server(tmp_path) -> Iterator[RedisServer]:
    s = RedisServer.start_new(tmp_path / "redis")
    yield s
    s.close()


@pytest.fixture
def raw(server) -> Iterator[redis.Redis]:
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()


@pytest.fixture(params=["redis", "sqlite"])
def backend(request, tmp_path) -> str:
    if request.param == "redis":
        return request.getfixturevalue("server").url
    return str(tmp_path / "loopwise.db")


def wait_until(condition, timeout: float = 60.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not hold within {timeout} s"
        time.sleep(0.02)


# -- each step's edge cases, on both backends ---------------------------------------------


def test_a_limit_exactly_reached_is_allowed_and_not_a_picodollar_more(backend):
    b = lw.Budget(usd=1.0, name="exact", backend=backend)
    first, second = b.reserve(usd=0.4), b.reserve(usd=0.6)
    assert b.reserved_usd == pytest.approx(1.0) and b.remaining_usd == 0
    with pytest.raises(lw.BudgetExceeded, match=r"budget 'exact' of \$1.00 would be exceeded: spent \$0, \$1.00 "
                                                r"reserved by calls in flight, next call needs \$1.0e-12"):
        b.reserve(usd=1e-12)
    first.settle(0.4, 0)
    second.settle(0.6, 0)
    s = b.snapshot()
    assert (s.spent_usd, s.reserved_usd, s.overruns) == (pytest.approx(1.0), 0, 0)
    b.reserve(usd=0).release()  # nothing more fits, but nothing is nothing
    with pytest.raises(lw.BudgetExceeded) as info:
        b.reserve(usd=0.01)
    assert (info.value.spent, info.value.reserved, info.value.needed) == (pytest.approx(1.0), 0, 0.01)


def test_a_settle_above_its_reservation_is_recorded_as_an_overrun(backend):
    b = lw.Budget(usd=1.0, tokens=1000, name="over", backend=backend)
    r = b.reserve(usd=0.25, tokens=100)
    overrun = r.settle(0.75, 150)
    assert overrun is not None and overrun.actual_usd == pytest.approx(0.75)
    s = b.snapshot()
    assert (s.spent_usd, s.spent_tokens, s.reserved_usd, s.reserved_tokens, s.overruns) == (
        pytest.approx(0.75), 150, 0, 0, 1)
    assert b.overrun_usd == pytest.approx(0.5)
    # The money is spent: a later reservation sees it.
    with pytest.raises(lw.BudgetExceeded, match="spent \\$0.75"):
        b.reserve(usd=0.3)


def test_a_double_settle_is_refused_and_changes_nothing(backend):
    b = lw.Budget(usd=1.0, name="twice", backend=backend)
    r = b.reserve(usd=0.5)
    r.settle(0.5, 0)
    with pytest.raises(lw.UserError, match="already settled or released"):
        r.settle(0.5, 0)
    with pytest.raises(lw.UserError, match="already settled or released"):
        r.release()
    assert b.spent_usd == pytest.approx(0.5) and b.reserved_usd == 0


def test_other_limits_under_the_same_name_are_refused(backend):
    lw.Budget(usd=5.0, name="batch-42", backend=backend).reserve(usd=1.0).release()
    other = lw.Budget(usd=3.0, name="batch-42", backend=backend)
    with pytest.raises(lw.UserError, match=r"shared budget 'batch-42' .* was declared with usd=5, tokens=None; this "
                                           r"process declares usd=3, tokens=None: give every process the same "
                                           "limits, or use another name"):
        other.reserve(usd=0.1)
    same = lw.Budget(usd=5.0, name="batch-42", backend=backend)  # another process's view: the same numbers
    assert same.snapshot().spent_usd == 0 and same.remaining_usd == 5.0


def test_an_unknown_budget_reads_as_empty_and_is_not_created(backend):
    b = lw.Budget(usd=1.0, name="never-used", backend=backend)
    s = b.snapshot()
    assert (s.spent_usd, s.reserved_usd, s.remaining_usd) == (0, 0, 1.0)


def test_a_backend_needs_a_name_and_a_known_kind(tmp_path):
    with pytest.raises(lw.UserError, match="shared by its name"):
        lw.Budget(usd=1.0, backend=str(tmp_path / "x.db"))
    with pytest.raises(lw.UserError, match=r"must be a redis:// URL .* or the path of the loopwise SQLite"):
        lw.Budget(usd=1.0, name="x", backend="http://example.com")
    with pytest.raises(lw.UserError, match="must be a redis:// URL"):
        lw.Budget(usd=1.0, name="x", backend=42)


# -- several budgets at once: on all of them or on none ------------------------------------


def test_a_shared_budget_that_refuses_gives_back_the_run_budget(backend):
    shared = lw.Budget(usd=0.10, name="small", backend=backend)
    run = lw.Budget(usd=1.0)
    with pytest.raises(lw.BudgetExceeded, match="budget 'small' of \\$0.10"):
        reserve([run, shared], usd=0.2)
    assert run.reserved_usd == 0 and shared.reserved_usd == 0
    # ... and a run budget that refuses never touches the shared one.
    with pytest.raises(lw.BudgetExceeded, match="^budget of \\$1.00"):
        reserve([run, shared], usd=1.5)
    assert shared.reserved_usd == 0


def test_the_second_shared_budget_refusing_gives_back_the_first(backend, tmp_path):
    first = lw.Budget(usd=1.0, name="first", backend=backend)
    second = lw.Budget(usd=0.1, name="second", backend=str(tmp_path / "other.db"))
    with pytest.raises(lw.BudgetExceeded, match="'second'"):
        reserve([first, second], usd=0.5)
    assert first.reserved_usd == 0 and second.reserved_usd == 0


def test_a_call_is_capped_to_what_every_budget_can_pay_and_held_alike_on_all(backend, tmp_path):
    price = Price(input_per_mtok=1.0, output_per_mtok=10.0)  # 1e6 and 1e7 pico-dollars a token
    run = lw.Budget(usd=0.5)
    a = lw.Budget(usd=0.02, name="a", backend=backend)       # 1,000 input + 1,900 output at most
    b = lw.Budget(usd=0.011, name="b", backend=str(tmp_path / "b.db"))  # ... + 1,000 output at most
    held = reserve_call([run, a, b], input_tokens=1000, price=price, max_tokens=None)
    assert held.max_tokens == 1000
    assert held.usd == pytest.approx(0.011)
    for budget in (run, a, b):
        assert budget.reserved_usd == pytest.approx(0.011) and budget.reserved_tokens == 2000
    assert held.settle(0.005, 1500) is None
    for budget in (run, a, b):
        assert (budget.reserved_usd, budget.spent_usd, budget.spent_tokens) == (0, pytest.approx(0.005), 1500)
    # A shared token limit caps what neither a dollar limit nor max_tokens did.
    t = lw.Budget(tokens=1200, name="t", backend=backend)
    free = reserve_call([lw.Budget(usd=None), t], input_tokens=1000, price=Price(0, 0), max_tokens=None)
    assert free.max_tokens == 200 and t.reserved_tokens == 1200
    free.release()
    with pytest.raises(lw.BudgetExceeded, match=r"token budget 't' of 1,200 would be exceeded: spent 0, next call "
                                                r"needs at least 1,216 \(1,200 input and a 16-token answer\)"):
        reserve_call([t], input_tokens=1200, price=Price(0, 0), max_tokens=None)


# -- the Lua scripts themselves --------------------------------------------------------------


def test_the_scripts_refuse_a_second_settle_and_ignore_unknown_budgets(server, raw):
    ledger = _budget_redis.RedisLedger(server.url, "scripts", 10**12, None)
    srv = ledger._server
    assert ledger.reserve("tok-1", 4 * 10**11, 0, 0, 0, 0) == 0
    keys = list(keys_of("scripts"))
    assert raw.hgetall(keys[0]) == {"usd_p": "1000000000000", "tokens": "", "spent_p": "0", "spent_t": "0",
                                    "reserved_p": "400000000000", "reserved_t": "0", "overruns": "0",
                                    "overrun_p": "0"}
    assert raw.hget(keys[1], "tok-1").startswith("400000000000 0 ") and raw.zscore(keys[2], "tok-1")
    assert srv.settle(keys=keys, args=["tok-1", 5 * 10**11, 0, 1]) == "ok"
    after = raw.hgetall(keys[0])
    assert srv.settle(keys=keys, args=["tok-1", 5 * 10**11, 0, 1]) == "unknown"
    assert srv.release(keys=keys, args=["tok-1"]) == "unknown"
    assert raw.hgetall(keys[0]) == after
    assert (after["spent_p"], after["reserved_p"], after["overruns"], after["overrun_p"]) == (
        "500000000000", "0", "1", "100000000000")
    assert not raw.exists(keys[1]) and not raw.exists(keys[2])
    # An unknown budget: settle and release say so and create nothing; its state is empty.
    unknown = list(keys_of("nobody"))
    assert srv.settle(keys=unknown, args=["tok-9", 1, 1, 0]) == "unknown"
    assert srv.release(keys=unknown, args=["tok-9"]) == "unknown"
    assert srv.state(keys=unknown, args=[]) == []
    assert raw.keys("loopwise:budget:nobody*") == []
    # A token reserved twice is refused.
    ledger.reserve("tok-2", 1, 0, 0, 0, 0)
    with pytest.raises(lw.UserError, match="already held"):
        ledger.reserve("tok-2", 1, 0, 0, 0, 0)


def test_an_expired_reservation_returns_to_the_pool(server, raw, monkeypatch):
    ledger = _budget_redis.RedisLedger(server.url, "expiry", 10**12, None)
    ledger.reserve("held", 10**12, 0, 0, 0, 0)
    ledger._server.keeper.drop(ledger, "held")  # as if its process were gone: nobody refreshes it
    b = lw.Budget(usd=1.0, name="expiry", backend=server.url)
    with pytest.raises(lw.BudgetExceeded):
        b.reserve(usd=0.5)
    raw.zadd(keys_of("expiry")[2], {"held": 0})  # its expiry has passed (the server's clock decides)
    b.reserve(usd=1.0).settle(1.0, 0)
    assert raw.hget(keys_of("expiry")[1], "held") is None and b.spent_usd == pytest.approx(1.0)


# -- Redis away ------------------------------------------------------------------------------


def test_a_reservation_fails_fast_and_clearly_when_redis_is_down(server):
    b = lw.Budget(usd=1.0, name="down", backend=server.url)
    server.stop()
    started = time.monotonic()
    for _ in range(20):
        with pytest.raises(lw.BudgetUnavailable, match=r"shared budget 'down' at redis://127.0.0.1:\d+/0 is "
                                                       r"unreachable \(ConnectionError: .*\): the call was not made"):
            b.reserve(usd=0.1)
    assert time.monotonic() - started < 30
    with pytest.raises(lw.BudgetUnavailable, match="its numbers could not be read"):
        b.spent_usd  # noqa: B018


def test_a_run_whose_shared_budget_is_unreachable_makes_no_call(server):
    from loopwise.models import FunctionModel

    calls = []
    model = FunctionModel(lambda r: calls.append(r) or "hello", price=Price(1, 1))
    shared = lw.Budget(usd=1.0, name="down", backend=server.url)
    server.stop()
    store = lw.MemoryStore()
    result = lw.Agent(model, store=store).run_sync("hi", budget=shared)
    assert result.stop_reason == "budget" and calls == []
    assert "unreachable" in result.reason and "the call was not made" in result.reason


def test_a_settle_during_an_outage_is_written_once_redis_is_back(server, caplog):
    b = lw.Budget(usd=1.0, name="later", backend=server.url)
    r = b.reserve(usd=0.5)
    server.stop()
    with caplog.at_level(logging.WARNING, logger="loopwise"):
        assert r.settle(0.3, 0) is None  # spent: never raised, kept for later
        server.start()  # without persistence: the budget is gone, its spend is counted again
        wait_until(lambda: _spent(b) == pytest.approx(0.3), what="the settle being written")
    assert "counted now" in caplog.text


def _spent(b: lw.Budget) -> float | None:
    try:
        return b.spent_usd
    except lw.BudgetUnavailable:
        return None
