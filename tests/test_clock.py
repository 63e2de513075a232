"""`FakeClock`: loopwise's own timing decisions (deadline, backoff, breaker cool-down) under
fake time that jumps over waits, with seeded ids and jitter; threads keep real time.

No test here sleeps to wait for loopwise, and none asserts on a wall-clock duration: each
asserts on the fake clock's reading and on what the log says.
"""

from __future__ import annotations

import asyncio
import dataclasses
import email.utils
import random
import time
from datetime import datetime, timezone

import pytest

import loopwise as lw
from loopwise._runtime import clock as _clock
from loopwise.models import ModelRequest, ModelResponse, ModelPolicy, ToolCall
from loopwise.testing import FakeClock, FunctionModel, MemoryStore, ScriptedModel

START = 1_735_689_600.0  # FakeClock's default start: 2025-01-01T00:00:00Z



def of_kind(events, kind):
    return [e for e in events if e.kind == kind]


def assert_loop_is_its_own(loop: asyncio.AbstractEventLoop) -> None:
    """After a run, the loop reads its real clock again and nothing drives it."""
    assert "time" not in loop.__dict__ and "select" not in loop._selector.__dict__
    assert loop not in _clock.driven
    assert abs(loop.time() - time.monotonic()) < 60  # its own clock, not a fake one ahead by minutes


# -- deadline ---------------------------------------------------------------------------


@lw.tool
async def slow_search(query: str) -> str:
    """Searches for a minute."""
    await asyncio.sleep(60)
    return f"results for {query}"


def deadline_agent(clock: FakeClock, store: lw.EventStore) -> lw.Agent:
    model = ScriptedModel([ToolCall("slow_search", {"query": "refunds"}), "done"])
    return lw.Agent(model, tools=[slow_search], store=store, clock=clock,
                    limits=lw.Limits(deadline_s=30, final_answer_on_limit=False))


async def test_a_30s_deadline_over_a_60s_tool_fires_at_fake_30s():
    clock = FakeClock()
    store = MemoryStore()
    result = await deadline_agent(clock, store).run("look it up")
    assert result.stop_reason == "deadline"
    assert clock.monotonic() == pytest.approx(30, abs=1e-6)  # the deadline, not the tool's 60 s
    events = store.load(result.run_id)
    [finished] = of_kind(events, "tool_call_finished")
    assert finished.outcome != "ok"
    assert_loop_is_its_own(asyncio.get_running_loop())


async def test_the_log_shows_fake_time():
    clock = FakeClock()
    store = MemoryStore()
    result = await deadline_agent(clock, store).run("look it up")
    events = store.load(result.run_id)
    assert events[0].ts == START
    assert of_kind(events, "limit_hit")[0].ts == pytest.approx(START + 30)
    assert events[-1].ts == pytest.approx(START + 30)
    assert events[-1].duration_s == pytest.approx(30)


# -- backoff ----------------------------------------------------------------------------


def flaky_tool(failures: int, backoff: lw.Backoff):
    calls = []

    @lw.tool(retries=failures, backoff=backoff)
    async def fetch_invoice(invoice_id: str) -> str:
        """Fetches an invoice from a flaky service."""
        calls.append(invoice_id)
        if len(calls) <= failures:
            raise lw.ToolRetry("the invoice service is busy")
        return f"invoice {invoice_id}: $12"

    return fetch_invoice


def backoff_run(clock: FakeClock, backoff: lw.Backoff, failures: int = 2):
    store = MemoryStore()
    agent = lw.Agent(ScriptedModel([ToolCall("fetch_invoice", {"invoice_id": "A1"}), "done"]),
                     tools=[flaky_tool(failures, backoff)], store=store, clock=clock)
    result = agent.run_sync("fetch it")
    return result, store.load(result.run_id)


def test_tool_retry_backoff_of_10s_and_20s_takes_fake_time_only():
    clock = FakeClock()
    result, events = backoff_run(clock, lw.Backoff(initial_s=10, factor=2, max_s=60, jitter=False))
    assert result.output == "done"
    assert [e.retry_in_s for e in of_kind(events, "tool_attempt_failed")] == [10, 20]
    assert of_kind(events, "tool_call_finished")[0].outcome == "ok"
    assert clock.monotonic() == pytest.approx(30, abs=1e-6)


def test_tool_backoff_jitter_is_drawn_from_the_clock_seed():
    clock = FakeClock(seed=11)
    _, events = backoff_run(clock, lw.Backoff(initial_s=10, factor=2, max_s=60))
    rng = random.Random(11)
    expected = [rng.random() * 10, rng.random() * 20]
    assert [e.retry_in_s for e in of_kind(events, "tool_attempt_failed")] == expected
    assert clock.monotonic() == pytest.approx(sum(expected), abs=1e-6)


def http_error(status: int, **kw) -> lw.ModelHTTPError:
    return lw.ModelHTTPError(f"HTTP {status} from the stand-in", status_code=status, **kw)


def flaky_model(*outcomes):
    calls = []

    async def answer(request: ModelRequest) -> ModelResponse:
        outcome = outcomes[min(len(calls), len(outcomes) - 1)]
        calls.append(outcome)
        if callable(outcome):
            outcome = outcome()
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome if isinstance(outcome, ModelResponse) else ModelResponse(text=outcome)

    return FunctionModel(answer, name="flaky")


def test_model_retry_backoff_jitter_comes_from_the_clock_and_takes_fake_time():
    clock = FakeClock(seed=5)
    store = MemoryStore()
    policy = ModelPolicy(retries=2, backoff_initial_s=10, backoff_factor=2, backoff_max_s=100)
    agent = lw.Agent(flaky_model(http_error(503), http_error(503), "hello"), store=store, clock=clock,
                     model_policy=policy)
    result = agent.run_sync("hi")
    assert result.output == "hello"
    rng = random.Random(5)
    expected = [rng.random() * 10, rng.random() * 20]
    assert [e.retry_in_s for e in of_kind(store.load(result.run_id), "model_attempt_failed")] == expected
    assert clock.monotonic() == pytest.approx(sum(expected), abs=1e-6)


def test_a_retry_after_date_is_read_against_the_fake_wall_clock():
    clock = FakeClock(seed=5)
    store = MemoryStore()

    def busy() -> lw.ModelHTTPError:  # "come back in 45 s", as a date on the clock the run reads
        return http_error(429, headers={"retry-after": email.utils.formatdate(clock.time() + 45, usegmt=True)})

    agent = lw.Agent(flaky_model(busy, "hello"), store=store, clock=clock, model_policy=ModelPolicy(retries=1))
    result = agent.run_sync("hi")
    assert result.output == "hello"
    [failed] = of_kind(store.load(result.run_id), "model_attempt_failed")
    assert failed.retry_in_s == pytest.approx(45, abs=1)  # (an HTTP date has whole seconds)
    assert "Retry-After" in failed.reason
    assert clock.monotonic() == pytest.approx(failed.retry_in_s, abs=1e-6)


# -- circuit breaker --------------------------------------------------------------------


def breaker_setup(clock: FakeClock):
    service = {"up": False, "calls": 0}

    @lw.tool(breaker=lw.CircuitBreaker(failures=2, window_s=60, cooldown_s=30))
    async def crm_lookup(customer_id: str) -> str:
        """Looks a customer up in the CRM."""
        service["calls"] += 1
        if not service["up"]:
            raise ConnectionError("CRM unreachable")
        return f"customer {customer_id}: gold"

    store = MemoryStore()

    def agent(*script) -> lw.Agent:
        return lw.Agent(ScriptedModel([*script, "done"]), tools=[crm_lookup], store=store, clock=clock,
                        limits=lw.Limits(max_iterations=10))

    return agent, store, service


def test_breaker_cooldown_passes_with_advance_between_runs_then_a_probe_closes_it():
    clock = FakeClock()
    call = ToolCall("crm_lookup", {"customer_id": "c7"})
    agent, store, service = breaker_setup(clock)
    first = agent(call, call, call).run_sync("look them up")
    events = store.load(first.run_id)
    assert [(c.old, c.new) for c in of_kind(events, "breaker_changed")] == [("closed", "open")]
    assert service["calls"] == 2  # the third call was not made: the breaker is open
    assert "will be tried again in 30.0 s" in of_kind(events, "tool_call_finished")[2].content

    clock.advance(29)  # not yet
    service["up"] = True
    second = agent(call).run_sync("again")
    assert service["calls"] == 2
    assert "will be tried again in 1.0 s" in of_kind(store.load(second.run_id), "tool_call_finished")[0].content

    clock.advance(1)  # the cool-down is over: one probe goes through, and closes it
    third = agent(call).run_sync("once more")
    events = store.load(third.run_id)
    assert [(c.old, c.new) for c in of_kind(events, "breaker_changed")] == [
        ("open", "half_open"), ("half_open", "closed")]
    assert of_kind(events, "tool_call_finished")[0].outcome == "ok"
    assert service["calls"] == 3


def test_breaker_cooldown_passes_while_a_fake_model_sleeps():
    clock = FakeClock()
    call = ToolCall("crm_lookup", {"customer_id": "c7"})
    agent, store, service = breaker_setup(clock)
    answers = [call, call]

    async def think(request: ModelRequest) -> ModelResponse:
        n = sum(m.role == "assistant" for m in request.messages)
        if n == 2:  # the breaker is open now: think for 31 s, while the service recovers
            service["up"] = True
            await asyncio.sleep(31)
        if n < 3:
            return ModelResponse(tool_calls=[answers[0] if n < 2 else call])
        return ModelResponse(text="done")

    store2 = MemoryStore()
    run_agent = lw.Agent(FunctionModel(think), tools=agent().tools, store=store2, clock=clock,
                         limits=lw.Limits(max_iterations=10))
    result = run_agent.run_sync("look them up")
    events = store2.load(result.run_id)
    assert [(c.old, c.new) for c in of_kind(events, "breaker_changed")] == [
        ("closed", "open"), ("open", "half_open"), ("half_open", "closed")]
    assert [e.outcome for e in of_kind(events, "tool_call_finished")][-1] == "ok"
    assert clock.monotonic() == pytest.approx(31, abs=1e-6)


# -- determinism ------------------------------------------------------------------------


def seeded_run(seed: int):
    store = MemoryStore()
    model = flaky_model(http_error(503), ModelResponse(tool_calls=[ToolCall("fetch_invoice", {"invoice_id": "A1"},
                                                                            id="call_1")]),
                        "done")
    agent = lw.Agent(model, tools=[flaky_tool(2, lw.Backoff(initial_s=1, max_s=8))], store=store,
                     clock=FakeClock(seed=seed), model_policy=ModelPolicy(retries=2))
    result = agent.run_sync("fetch it")
    return store.load(result.run_id)


def comparable(events, drop=frozenset()):
    out = []
    for e in events:
        d = dataclasses.asdict(e)
        if e.kind in ("model_call_finished", "tool_call_finished"):  # stamped by the run driver
            d.pop("latency_s")
        out.append({k: v for k, v in d.items() if k not in drop})
    return out


def test_the_same_seed_gives_the_same_ids_and_waits():
    a, b = seeded_run(3), seeded_run(3)
    assert a[0].run_id == b[0].run_id
    # (less what the run driver stamps from the real clock until it reads agent.clock)
    driver_stamps = {"ts", "active_s", "duration_s"}
    assert comparable(a, drop=driver_stamps) == comparable(b, drop=driver_stamps)
    waits = [e.retry_in_s for e in a if e.kind in ("model_attempt_failed", "tool_attempt_failed")]
    assert len(waits) == 3 and len(set(waits)) == 3
    c = seeded_run(4)
    assert c[0].run_id != a[0].run_id
    assert waits != [e.retry_in_s for e in c if e.kind in ("model_attempt_failed", "tool_attempt_failed")]


def test_the_same_seed_gives_the_same_log():
    assert [dataclasses.asdict(e) for e in seeded_run(3)] == [dataclasses.asdict(e) for e in seeded_run(3)]


def test_run_ids_are_time_ordered_on_the_fake_clock():
    clock = FakeClock(datetime(2030, 5, 1, tzinfo=timezone.utc))
    first = clock.new_run_id()
    clock.advance(0.001)
    second = clock.new_run_id()
    assert first < second and len(first) == len(second) == 32
    assert int(first[:16], 16) == int(datetime(2030, 5, 1, tzinfo=timezone.utc).timestamp() * 1e9)


# -- threads keep real time -------------------------------------------------------------


def test_a_sync_tool_in_a_thread_is_not_timed_out_by_a_jump():
    clock = FakeClock()
    store = MemoryStore()

    @lw.tool(timeout=30)
    def export_report(month: str) -> str:
        """Real work in a worker thread, well within its timeout."""
        time.sleep(0.1)
        return f"report for {month}"

    agent = lw.Agent(ScriptedModel([ToolCall("export_report", {"month": "May"}), "done"]),
                     tools=[export_report], store=store, clock=clock)
    result = agent.run_sync("export it")
    events = store.load(result.run_id)
    assert of_kind(events, "tool_attempt_failed") == []
    assert of_kind(events, "tool_call_finished")[0].outcome == "ok"
    # The loop waited for the thread in real time: the fake clock moved by that, not by 30 s.
    assert 0 < clock.monotonic() < 30


def test_a_sync_fake_model_in_a_thread_is_not_timed_out_by_a_jump():
    clock = FakeClock()

    def slow_answer(request: ModelRequest) -> str:
        time.sleep(0.1)
        return "fine"

    agent = lw.Agent(FunctionModel(slow_answer), store=MemoryStore(), clock=clock,
                     model_policy=ModelPolicy(timeout=30, retries=0), limits=lw.Limits(deadline_s=60))
    assert agent.run_sync("hi").output == "fine"
    assert 0 < clock.monotonic() < 30


def test_asyncio_to_thread_keeps_real_time_too():
    clock = FakeClock()

    @lw.tool(timeout=30)
    async def checksum(path: str) -> str:
        """Hashes a file in the loop's executor."""
        await asyncio.to_thread(time.sleep, 0.1)
        return "ok"

    store = MemoryStore()
    agent = lw.Agent(ScriptedModel([ToolCall("checksum", {"path": "a"}), "done"]), tools=[checksum],
                     store=store, clock=clock)
    result = agent.run_sync("hash it")
    assert of_kind(store.load(result.run_id), "tool_call_finished")[0].outcome == "ok"
    assert 0 < clock.monotonic() < 30


# -- the clock itself -------------------------------------------------------------------


async def test_concurrent_runs_share_one_install_and_the_loop_gets_its_time_back():
    clock = FakeClock()
    agent = deadline_agent(clock, MemoryStore())
    loop = asyncio.get_running_loop()
    results = await asyncio.gather(agent.run("a"), agent.run("b"), agent.run("c"))
    assert [r.stop_reason for r in results] == ["deadline"] * 3
    assert clock.monotonic() == pytest.approx(30, abs=1e-6)  # three runs, one fake timeline
    assert_loop_is_its_own(loop)


async def test_timers_pending_across_a_run_keep_the_time_they_had_left():
    loop = asyncio.get_running_loop()
    fired = asyncio.Event()
    handle = loop.call_later(3600, fired.set)  # a real-time timer set before the run
    clock = FakeClock()
    clock.advance(1000)
    await deadline_agent(clock, MemoryStore()).run("go")  # 30 fake seconds pass on the loop
    assert handle.when() - loop.time() == pytest.approx(3600 - 30, abs=30)  # not 1000 s off either way
    assert not fired.is_set()
    handle.cancel()


async def test_advance_fires_timers_on_a_driven_loop():
    clock = FakeClock()
    loop = asyncio.get_running_loop()
    clock.install(loop)
    try:
        woke = []
        task = asyncio.ensure_future(asyncio.sleep(3600))
        task.add_done_callback(lambda _: woke.append(clock.monotonic()))
        await asyncio.sleep(0)
        clock.advance(3600)
        for _ in range(10):  # the loop never waits meanwhile, so it cannot jump: only advance moved time
            await asyncio.sleep(0)
            if woke:
                break
        assert woke == [3600]
    finally:
        clock.uninstall(loop)
    assert_loop_is_its_own(loop)


async def test_two_fake_clocks_cannot_drive_one_loop():
    loop = asyncio.get_running_loop()
    first = FakeClock()
    first.install(loop)
    try:
        agent = lw.Agent(ScriptedModel(["done"]), store=MemoryStore(), clock=FakeClock())
        with pytest.raises(lw.UserError, match="another FakeClock .* drives this event loop"):
            await agent.run("hi")
    finally:
        first.uninstall(loop)
    assert_loop_is_its_own(loop)


def test_bad_arguments_are_refused_clearly():
    with pytest.raises(lw.UserError, match="naive datetime"):
        FakeClock(datetime(2025, 1, 1))
    with pytest.raises(lw.UserError, match=r"advance\(-1\).*does not go back"):
        FakeClock().advance(-1)
    with pytest.raises(lw.UserError, match="seed"):
        FakeClock(seed="x")  # type: ignore[arg-type]


def test_wall_time_and_monotonic_move_together():
    clock = FakeClock(100.0)
    assert (clock.time(), clock.monotonic(), clock.time_ns()) == (100.0, 0.0, 100_000_000_000)
    clock.advance(2.5)
    assert (clock.time(), clock.monotonic()) == (102.5, 2.5)
    assert FakeClock(seed=9).random() == random.Random(9).random()
