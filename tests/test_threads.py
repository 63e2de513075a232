"""The daemon thread pool sync tools run in: abandoned on timeout, bounded, gone at exit."""

from __future__ import annotations

import contextvars
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator

import anyio
import pytest

from loopwise._tools.threads import (
    AbandonedThread,
    DaemonThreadPool,
    PoolExhaustedError,
    default_pool,
)


@pytest.fixture
def release() -> Iterator[threading.Event]:
    """Set at teardown, so no test leaves a blocked thread behind."""
    event = threading.Event()
    yield event
    event.set()


def blocker(release: threading.Event, started: threading.Event | None = None) -> Callable[[], str]:
    def fn() -> str:
        if started is not None:
            started.set()
        release.wait(60)
        return "finished"

    return fn


async def eventually(predicate: Callable[[], bool], *, within: float = 10.0) -> None:
    """Wait until `predicate()` holds: a thread's ending has no event to await."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await anyio.sleep(0.01)


async def test_returns_result_and_runs_in_a_daemon_thread() -> None:
    pool = DaemonThreadPool()

    def where() -> tuple[str, bool]:
        thread = threading.current_thread()
        return thread.name, thread.daemon

    name, daemon = await pool.run(where)
    assert name.startswith("loopwise-tool-")
    assert daemon
    assert pool.running == 0
    assert pool.idle == 1


async def test_exception_propagates_with_its_type() -> None:
    class Boom(Exception):
        pass

    def fail() -> None:
        raise Boom("no database")

    pool = DaemonThreadPool()
    with pytest.raises(Boom, match="no database"):
        await pool.run(fail)
    with pytest.raises(KeyError):
        await pool.run(lambda: {}["missing"])
    assert pool.running == 0
    assert await pool.run(lambda: 42) == 42  # the worker survived


async def test_context_variables_reach_the_thread() -> None:
    var: contextvars.ContextVar[str] = contextvars.ContextVar("var", default="unset")
    var.set("run-1")
    assert await DaemonThreadPool().run(var.get) == "run-1"


async def test_sixty_second_call_is_abandoned_at_the_timeout(release: threading.Event) -> None:
    pool = DaemonThreadPool()
    abandoned: list[AbandonedThread] = []
    before = time.time()
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.3):
            await pool.run(blocker(release), label="slow_db", on_abandon=abandoned.append)
    elapsed = time.monotonic() - t0
    # The blocker runs until the test ends (60 s): control back before that is the abandonment.
    assert elapsed < 30, f"control came back after {elapsed:.2f} s"
    [info] = abandoned
    assert info.label == "slow_db"
    assert info.thread_name.startswith("loopwise-tool-")
    assert before <= info.started_at <= info.abandoned_at <= time.time()
    assert pool.abandoned == 1
    assert pool.running == 0
    assert any(t.name == info.thread_name and t.is_alive() for t in threading.enumerate())


async def test_abandoned_count_falls_when_the_thread_finishes(release: threading.Event) -> None:
    pool = DaemonThreadPool()
    started = threading.Event()
    with anyio.move_on_after(0.2):
        await pool.run(blocker(release, started))
    assert started.is_set()
    assert pool.abandoned == 1
    release.set()
    await eventually(lambda: pool.abandoned == 0)
    assert pool.running == 0


async def test_label_defaults_to_the_function_name(release: threading.Event) -> None:
    abandoned: list[AbandonedThread] = []

    def fetch_report() -> None:
        release.wait(60)

    with anyio.move_on_after(0.1):
        await DaemonThreadPool().run(fetch_report, on_abandon=abandoned.append)
    assert abandoned[0].label == "fetch_report"


async def test_failing_on_abandon_hook_does_not_swallow_the_cancellation(
    release: threading.Event, caplog: pytest.LogCaptureFixture
) -> None:
    def hook(info: AbandonedThread) -> None:
        raise RuntimeError("hook bug")

    with pytest.raises(TimeoutError):
        with anyio.fail_after(0.1):
            await DaemonThreadPool().run(blocker(release), on_abandon=hook)
    assert "on_abandon hook failed" in caplog.text


async def test_abandoned_thread_frees_its_worker_slot(release: threading.Event) -> None:
    pool = DaemonThreadPool(max_workers=1)
    with anyio.move_on_after(0.1):
        await pool.run(blocker(release))
    assert pool.abandoned == 1
    # The only worker slot is free again: a replacement thread runs the next call.
    with anyio.fail_after(5):
        assert await pool.run(lambda: "replacement") == "replacement"


async def test_exhausted_pool_fails_at_once(release: threading.Event) -> None:
    pool = DaemonThreadPool(max_workers=4, max_abandoned=2)
    for _ in range(2):
        with anyio.move_on_after(0.1):
            await pool.run(blocker(release))
    assert pool.abandoned == 2
    ran = threading.Event()
    t0 = time.monotonic()
    with pytest.raises(PoolExhaustedError) as excinfo:
        await pool.run(ran.set, label="lookup")
    assert time.monotonic() - t0 < 30  # not after a worker frees up: none does until the test ends
    assert not ran.is_set()
    message = str(excinfo.value)
    assert "'lookup'" in message
    assert "2 sync tool calls are still running after being abandoned" in message
    assert "make the tool async" in message and "isolation='process'" in message
    assert isinstance(excinfo.value, RuntimeError)
    # Once the stuck threads finish, the pool works again.
    release.set()
    await eventually(lambda: pool.abandoned == 0)
    assert await pool.run(lambda: "ok") == "ok"


async def test_max_workers_bounds_concurrency() -> None:
    pool = DaemonThreadPool(max_workers=2)
    intervals: list[tuple[float, float]] = []
    lock = threading.Lock()

    def work() -> None:
        start = time.monotonic()
        time.sleep(0.1)
        with lock:
            intervals.append((start, time.monotonic()))

    async with anyio.create_task_group() as tg:
        for _ in range(6):
            tg.start_soon(pool.run, work)
    assert len(intervals) == 6
    # Most intervals alive at any start instant.
    most = max(sum(1 for s, e in intervals if s <= t < e) for t, _ in intervals)
    assert most == 2
    assert pool.running == 0
    assert pool.idle <= 2


async def test_waiting_for_a_slot_is_cancellable(release: threading.Event) -> None:
    pool = DaemonThreadPool(max_workers=1)
    started = threading.Event()
    second_ran = threading.Event()
    results: list[str] = []

    async def first() -> None:
        results.append(await pool.run(blocker(release, started)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(first)
        await eventually(started.is_set)
        with pytest.raises(TimeoutError):
            with anyio.fail_after(0.2):
                await pool.run(second_ran.set)
        assert not second_ran.is_set()
        assert pool.abandoned == 0  # it never ran, so nothing was abandoned
        release.set()
    assert results == ["finished"]
    assert pool.running == 0  # the cancelled waiter did not keep a slot
    assert await pool.run(lambda: "next") == "next"


async def test_idle_workers_exit() -> None:
    pool = DaemonThreadPool(idle_timeout=0.1, name="loopwise-idle-test")
    await pool.run(lambda: None)
    await eventually(lambda: pool.idle == 0)
    await eventually(
        lambda: not any(t.name.startswith("loopwise-idle-test") for t in threading.enumerate())
    )
    assert await pool.run(lambda: "again") == "again"


async def test_idle_worker_is_reused() -> None:
    pool = DaemonThreadPool()
    first = await pool.run(lambda: threading.current_thread().name)
    second = await pool.run(lambda: threading.current_thread().name)
    assert first == second


def test_needs_a_running_asyncio_loop() -> None:
    coro = DaemonThreadPool().run(lambda: None)
    with pytest.raises(RuntimeError, match="asyncio event loop"):
        coro.send(None)


def test_default_pool_is_a_singleton() -> None:
    assert default_pool() is default_pool()
    assert default_pool().max_workers == 32


def test_rejects_bad_limits() -> None:
    with pytest.raises(ValueError, match="max_workers"):
        DaemonThreadPool(max_workers=0)
    with pytest.raises(ValueError, match="max_abandoned"):
        DaemonThreadPool(max_abandoned=0)


def test_process_exits_promptly_with_an_abandoned_sixty_second_call() -> None:
    code = textwrap.dedent(
        """
        import time, anyio
        from loopwise._tools.threads import default_pool

        async def main():
            t0 = time.monotonic()
            try:
                with anyio.fail_after(0.3):
                    await default_pool().run(lambda: time.sleep(60))
            except TimeoutError:
                print("timed out after", round(time.monotonic() - t0, 2), "abandoned", default_pool().abandoned)

        anyio.run(main)
        """
    )
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-c", code], check=False, capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - t0
    assert done.returncode == 0, done.stderr
    assert "timed out after" in done.stdout and "abandoned 1" in done.stdout
    assert elapsed < 10, f"the process took {elapsed:.1f} s to exit"
