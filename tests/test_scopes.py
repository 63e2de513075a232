"""`wait_within`: a call's timeout as `move_on_after` gives it; the scopes made without anyio's look-ups."""

from __future__ import annotations

import asyncio
import math
import time

import anyio
import pytest

from loopwise import _hotpath
from loopwise._runtime.scopes import cancel_scope, task_group, wait_within

# What the fast versions do beyond the plain ones (`_hotpath`): no timer for a call that does
# not wait, its deadline set at its first wait, far deadlines armed by the sweeper. The
# tests of what a timeout does run under both.
fast_arm_on_wait = pytest.mark.skipif("arm_on_wait" in _hotpath.PLAIN, reason="LOOPWISE_PLAIN: deadline set at once")
fast_sweeper = pytest.mark.skipif(bool({"arm_on_wait", "sweeper"} & _hotpath.PLAIN),
                                  reason="LOOPWISE_PLAIN: no sweeper")


@fast_arm_on_wait
async def test_a_call_that_does_not_wait_arms_no_timer():
    loop = asyncio.get_running_loop()
    seen: list[float] = []

    async def quick() -> str:
        seen.append(anyio.current_effective_deadline())
        return "done"

    timers = len(loop._scheduled)  # type: ignore[attr-defined]
    with cancel_scope() as scope:
        assert await wait_within(scope, 30.0, quick()) == "done"
        assert len(loop._scheduled) == timers  # type: ignore[attr-defined]
    assert not scope.cancelled_caught
    assert scope.deadline == math.inf and seen == [math.inf]  # never set: nothing to time out


@fast_arm_on_wait
async def test_a_call_that_waits_is_timed_out_at_its_deadline():
    seen: list[float] = []
    cleaned_up: list[bool] = []

    async def slow() -> str:
        seen.append(anyio.current_effective_deadline())
        await asyncio.sleep(0)
        seen.append(anyio.current_effective_deadline())  # set at the first wait
        try:
            await anyio.sleep(5)
        finally:
            cleaned_up.append(True)
        return "late"

    started = anyio.current_time()
    with cancel_scope() as scope:
        await wait_within(scope, 0.05, slow())
    took = anyio.current_time() - started
    assert scope.cancelled_caught and cleaned_up == [True]
    assert 0.04 <= took < 1.0
    # Counted from the call's start, not from its first wait.
    assert seen[0] == math.inf and seen[1] == scope.deadline and started + 0.05 <= scope.deadline < started + 0.1


@fast_arm_on_wait
async def test_a_call_that_runs_past_its_deadline_before_it_waits_is_cancelled_at_its_first_wait():
    steps: list[str] = []

    async def busy_then_waits() -> str:
        time.sleep(0.06)  # past the 0.05 s deadline without a single wait
        steps.append("busy")
        await asyncio.sleep(0)
        steps.append("resumed")
        return "late"

    with cancel_scope() as scope:
        await wait_within(scope, 0.05, busy_then_waits())
    assert scope.cancelled_caught and steps == ["busy"]


async def test_a_call_with_scopes_and_tasks_of_its_own_across_its_first_wait():
    """The call's own cancel scopes nest inside ours: its first step already runs inside it."""
    results: list[str] = []

    async def child(name: str) -> None:
        await anyio.sleep(0.01)
        results.append(name)

    async def structured() -> str:
        with anyio.move_on_after(5) as own:
            async with anyio.create_task_group() as tg:
                tg.start_soon(child, "a")
                tg.start_soon(child, "b")
                await anyio.sleep(0)
        assert not own.cancelled_caught
        with anyio.move_on_after(0.01) as short:
            await anyio.sleep(5)
        assert short.cancelled_caught
        return "ok"

    with cancel_scope() as scope:
        assert await wait_within(scope, 5.0, structured()) == "ok"
    assert not scope.cancelled_caught and sorted(results) == ["a", "b"]

    with cancel_scope() as scope:  # and our deadline reaches into them
        await wait_within(scope, 0.05, _sleeps_in_a_task_group())
    assert scope.cancelled_caught


async def _sleeps_in_a_task_group() -> None:
    async with anyio.create_task_group() as tg:
        tg.start_soon(anyio.sleep, 5)
        await anyio.sleep(5)


async def test_a_call_that_waits_and_answers_in_time_keeps_its_result_and_no_timer():
    loop = asyncio.get_running_loop()

    async def waits() -> int:
        await asyncio.sleep(0)
        await anyio.sleep(0.01)
        return 7

    with cancel_scope() as scope:
        assert await wait_within(scope, 5.0, waits()) == 7
    assert not scope.cancelled_caught
    timer = [h for h in loop._scheduled if not h.cancelled()]  # type: ignore[attr-defined]
    assert all(h.when() < scope.deadline - 1 for h in timer)  # ours was cancelled on the way out


async def test_errors_before_and_after_the_first_wait_propagate():
    async def fails_at_once() -> None:
        raise ValueError("now")

    async def fails_later() -> None:
        await asyncio.sleep(0)
        raise KeyError("later")

    for coro, error in ((fails_at_once(), ValueError), (fails_later(), KeyError)):
        with pytest.raises(error), cancel_scope() as scope:
            await wait_within(scope, 5.0, coro)
        assert not scope.cancelled_caught


async def test_a_cancellation_from_outside_reaches_the_call_and_is_not_taken_for_a_timeout():
    seen: list[str] = []

    async def sleeper() -> None:
        try:
            await anyio.sleep(5)
        except anyio.get_cancelled_exc_class():
            seen.append("cancelled")
            raise

    inner = None
    with anyio.move_on_after(0.05) as outer:
        with cancel_scope() as inner:
            await wait_within(inner, 10.0, sleeper())
    assert outer.cancelled_caught and not inner.cancelled_caught and seen == ["cancelled"]


async def test_a_call_that_ignores_its_timeout_is_cancelled_again_at_its_next_wait():
    attempts: list[int] = []

    async def stubborn() -> None:
        for i in range(3):
            try:
                attempts.append(i)
                await anyio.sleep(5)
            except anyio.get_cancelled_exc_class():
                continue  # swallowed: anyio cancels the next wait too

    started = anyio.current_time()
    with cancel_scope() as scope:
        await wait_within(scope, 0.02, stubborn())
    assert scope.cancel_called and attempts == [0, 1, 2] and anyio.current_time() - started < 1.0


async def test_an_awaitable_that_is_not_a_coroutine_gets_the_deadline_at_once():
    loop = asyncio.get_running_loop()
    future = loop.create_future()
    with cancel_scope() as scope:
        await wait_within(scope, 0.02, future)
    assert scope.cancelled_caught and future.cancelled()
    done = loop.create_future()
    done.set_result(3)
    with cancel_scope() as scope:
        assert await wait_within(scope, 1.0, done) == 3


async def test_no_time_left_cancels_at_the_first_wait_as_move_on_after_does():
    async def waits() -> str:
        await asyncio.sleep(0)
        return "late"

    async def quick() -> str:
        return "in time"

    with cancel_scope() as scope:
        await wait_within(scope, 0.0, waits())
    assert scope.cancelled_caught
    with cancel_scope() as scope:
        assert await wait_within(scope, 0.0, quick()) == "in time"
    assert not scope.cancelled_caught


async def test_the_scopes_and_groups_are_anyios_own():
    with cancel_scope() as scope, anyio.CancelScope() as reference:
        assert type(scope) is type(reference)
    async with task_group() as tg, anyio.create_task_group() as reference_tg:
        assert type(tg) is type(reference_tg)


# -- far deadlines: armed by the loop's sweeper once near ----------------------------


@pytest.fixture
def short_horizon(monkeypatch):
    """Deadlines further than 0.2 s are held by the sweeper, which looks every 0.1 s."""
    monkeypatch.setattr(_hotpath, "ARM_HORIZON_S", 0.2)
    monkeypatch.setattr(_hotpath, "SWEEP_EVERY_S", 0.1)


async def test_a_far_deadline_is_armed_in_time_and_falls_due_exactly(short_horizon, fake_clock):
    loop = asyncio.get_running_loop()
    started = anyio.current_time()
    with cancel_scope() as scope:
        await wait_within(scope, 0.5, anyio.sleep(5))
    took = anyio.current_time() - started
    assert scope.cancelled_caught and scope.deadline == pytest.approx(started + 0.5)
    assert took == pytest.approx(0.5)  # the timer was armed ahead of the deadline, not a sweep late (fake time)
    assert not _hotpath._sweeper(loop).held


@fast_sweeper
async def test_a_call_that_ends_long_before_its_deadline_never_arms_a_timer(short_horizon):
    loop = asyncio.get_running_loop()
    sweeper = _hotpath._sweeper(loop)
    seen: list[tuple] = []

    async def brief() -> str:
        await anyio.sleep(0.01)  # it waits: its deadline (30 s away) is held, not armed
        timers = [h for h in loop._scheduled if abs(h.when() - (loop.time() + 30)) < 1]  # type: ignore[attr-defined]
        seen.append((len(sweeper.held), scope.deadline, timers))
        await anyio.sleep(0.04)
        return "done"

    with cancel_scope() as scope:
        assert await wait_within(scope, 30.0, brief()) == "done"
    assert seen == [(1, math.inf, [])]
    assert not scope.cancelled_caught and not sweeper.held
    await anyio.sleep(0.25)  # the sweeper's own timer stops once it holds nothing
    assert sweeper.handle is None


async def test_a_held_call_cancelled_from_outside_is_released(short_horizon):
    sweeper = _hotpath._sweeper(asyncio.get_running_loop())
    with anyio.move_on_after(0.05) as outer:
        with cancel_scope() as inner:
            await wait_within(inner, 30.0, anyio.sleep(5))
    assert outer.cancelled_caught and not inner.cancelled_caught
    assert not sweeper.held


async def test_many_calls_each_time_out_at_their_own_deadline(short_horizon, fake_clock):
    took: dict[float, float] = {}

    async def one(delay: float) -> None:
        started = anyio.current_time()
        with cancel_scope() as scope:
            await wait_within(scope, delay, anyio.sleep(5))
        assert scope.cancelled_caught
        took[delay] = anyio.current_time() - started

    delays = [0.1 + 0.02 * i for i in range(30)]  # near and far, mixed
    async with anyio.create_task_group() as tg:
        for delay in delays:
            tg.start_soon(one, delay)
    for delay in delays:
        assert took[delay] == pytest.approx(delay), (delay, took[delay])  # fake time: exactly, not a sweep late
