"""The loop-stall watchdog: one warning per stall, none for a healthy loop."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

import anyio
import pytest

from loopwise._runtime.watchdog import start_watchdog


def stall_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        r for r in caplog.records
        if r.name == "loopwise" and r.levelno == logging.WARNING and "event loop blocked" in r.getMessage()
    ]


async def blocking_tool() -> None:
    time.sleep(1.5)  # noqa: ASYNC251 -- the bug the watchdog exists for


async def test_blocked_loop_logs_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loopwise")
    stalls: list[float] = []
    recovered = threading.Event()

    def on_stall(seconds: float) -> None:
        stalls.append(seconds)
        recovered.set()

    watchdog = start_watchdog(asyncio.get_running_loop(), threshold=1.0, interval=0.05, on_stall=on_stall)
    try:
        await anyio.sleep(0.1)
        await blocking_tool()
        with anyio.fail_after(5):
            while not recovered.is_set():
                await anyio.sleep(0.01)
        await anyio.sleep(0.3)  # room for a (wrong) second warning
    finally:
        watchdog.stop()
    [record] = stall_warnings(caplog)
    message = record.getMessage()
    assert "time.sleep in an async def?" in message
    assert "isolation='process'" in message
    assert "blocking_tool" in message  # names where the loop is stuck
    assert len(stalls) == 1
    assert 1.0 <= stalls[0] < 3.0
    assert watchdog.stalls == 1


async def test_two_stalls_log_two_warnings(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loopwise")
    watchdog = start_watchdog(threshold=0.3, interval=0.05)
    try:
        time.sleep(0.6)  # noqa: ASYNC251
        await anyio.sleep(0.3)
        time.sleep(0.6)  # noqa: ASYNC251
        await anyio.sleep(0.3)
    finally:
        watchdog.stop()
    assert len(stall_warnings(caplog)) == 2


async def test_healthy_loop_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loopwise")
    watchdog = start_watchdog(threshold=0.5, interval=0.05)
    try:
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            time.sleep(0.01)  # noqa: ASYNC251 - short blocking bits are fine
            await anyio.sleep(0.01)
    finally:
        watchdog.stop()
    assert stall_warnings(caplog) == []
    assert watchdog.stalls == 0


async def test_one_watchdog_per_loop() -> None:
    loop = asyncio.get_running_loop()
    first = start_watchdog(loop)
    try:
        assert start_watchdog(loop, threshold=5.0) is first
    finally:
        first.stop()  # from the loop's own thread: must not wait for a ping it blocks
        # Its thread ended within stop()'s join: had it waited for a ping (which this loop,
        # blocked in stop(), cannot answer), the join would have given up with it alive.
        assert not first._thread.is_alive()
    assert not first.running
    second = start_watchdog(loop)
    try:
        assert second is not first and second.running
    finally:
        second.stop()
        second.stop()  # stopping twice is fine


def test_watchdog_stops_when_its_loop_closes() -> None:
    loop = asyncio.new_event_loop()
    try:
        watchdog = start_watchdog(loop, interval=0.01)
        loop.run_until_complete(asyncio.sleep(0.05))
    finally:
        loop.close()
    watchdog._thread.join(timeout=5)
    assert not watchdog._thread.is_alive()


def test_idle_loop_between_runs_is_not_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="loopwise")
    loop = asyncio.new_event_loop()
    try:
        watchdog = start_watchdog(loop, threshold=0.2, interval=0.02)
        loop.run_until_complete(asyncio.sleep(0.05))
        time.sleep(0.5)  # the loop is not running: nothing is blocking it
        loop.run_until_complete(asyncio.sleep(0.05))
        watchdog.stop()
    finally:
        loop.close()
    assert stall_warnings(caplog) == []


def test_rejects_bad_settings() -> None:
    loop = asyncio.new_event_loop()
    try:
        with pytest.raises(ValueError):
            start_watchdog(loop, threshold=0)
    finally:
        loop.close()
