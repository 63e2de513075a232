"""isolation="process": the child is killed on timeout; results and errors round-trip.

No test here depends on how fast a child starts (0.1 s idle, ~1 s on a busy machine):
a tool's timeout counts from when its function starts in the child, and a test that
must act once the function runs waits for the function to say so (over a FIFO).
"""

from __future__ import annotations

import errno
import os
import select
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import anyio
import pytest

import loopwise as lw
from loopwise._tools.isolation import (
    ProcessCrashedError,
    ProcessStartError,
    ProcessTimeoutError,
    run_in_subprocess,
)
from loopwise.models import ScriptedModel, ToolCall

from . import isolation_helpers as helpers
from . import isolation_slow_import as slow

ROOT = Path(__file__).resolve().parents[1]


def assert_gone(pid: int) -> None:
    """No process (not even a zombie) has this pid any more."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def _release(fifo: Path) -> None:
    """Give a reader still blocked on `fifo` its end of file (nothing if none is)."""
    try:
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
    except OSError as exc:
        if exc.errno != errno.ENXIO:  # (no reader has it open)
            raise


async def run_until_it_reports(fn, kwargs: dict, fifo: Path) -> str:
    """Run `fn` in a child (no timeout), and cancel the call once it has written to `fifo`.

    Returns what it wrote (its pid...): the function runs, past any start-up, when it does.
    """
    os.mkfifo(fifo)
    kwargs = {**kwargs, "pid_file": str(fifo)}

    async def call() -> None:
        await run_in_subprocess(fn, kwargs, timeout=None)
        raise AssertionError(f"{fn.__name__} returned; it was to block until cancelled")

    async with anyio.create_task_group() as tg:
        tg.start_soon(call)
        try:
            report = await anyio.to_thread.run_sync(fifo.read_text, abandon_on_cancel=True)
        finally:
            _release(fifo)
        tg.cancel_scope.cancel()
    return report


def wait_until_dead(pid: int) -> None:
    """Wait (on its pidfd, for up to 60 s) for a process that is not our child to end."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        poller = select.poll()  # (not select.select: a descriptor past 1024 is out of its range)
        poller.register(fd, select.POLLIN)
        poller.poll(60_000)
    finally:
        os.close(fd)


async def test_result_round_trips() -> None:
    assert await run_in_subprocess(helpers.add, {"a": 2, "b": 3}, timeout=30) == 5
    answer = await run_in_subprocess(
        helpers.echo, {"rows": [1, 2.5, None], "name": "héllo", "nested": {"k": (1, 2)}}, timeout=30
    )
    assert answer["kwargs"] == {"rows": [1, 2.5, None], "name": "héllo", "nested": {"k": (1, 2)}}
    assert answer["pid"] != os.getpid()


async def test_large_result_round_trips() -> None:
    size = 5_000_000  # far more than a pipe buffer
    assert await run_in_subprocess(helpers.big_result, {"size": size}, timeout=60) == b"x" * size


async def test_exception_round_trips_with_its_type() -> None:
    with pytest.raises(ValueError, match="bad month") as excinfo:
        await run_in_subprocess(helpers.raise_value_error, {"message": "bad month"}, timeout=30)
    notes = "\n".join(excinfo.value.__notes__)
    assert "raise_value_error" in notes and "isolation='process'" in notes
    with pytest.raises(helpers.CustomError, match="custom"):
        await run_in_subprocess(helpers.raise_custom, {"message": "custom"}, timeout=30)


async def test_exception_that_cannot_travel_becomes_runtime_error() -> None:
    with pytest.raises(RuntimeError, match=r"raised tests\.isolation_helpers\.StubbornError: left/right"):
        await run_in_subprocess(helpers.raise_stubborn, {}, timeout=30)
    # SystemExit in the child is reported, never re-raised in the parent.
    with pytest.raises(RuntimeError, match="SystemExit: 4"):
        await run_in_subprocess(helpers.raise_system_exit, {}, timeout=30)


async def test_an_hour_long_call_is_killed_at_the_timeout() -> None:
    with pytest.raises(ProcessTimeoutError, match=r"'sleep_then_return' did not finish within 0\.5 s") as info:
        await run_in_subprocess(helpers.sleep_then_return, {"seconds": 3600, "value": "late"}, timeout=0.5)
    assert_gone(info.value.pid)  # (and the call returned: not after the hour)


async def test_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    pid = await run_until_it_reports(helpers.ignore_sigterm_and_sleep, {"seconds": 3600}, tmp_path / "pid")
    assert_gone(int(pid))  # SIGTERM was ignored (it wrote its pid after): SIGKILL ended it


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init (a grandchild is not ours to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_processes_the_child_started_are_killed_too(tmp_path: Path) -> None:
    pids = await run_until_it_reports(helpers.start_grandchild_and_sleep, {"seconds": 3600}, tmp_path / "pids")
    child, grandchild = map(int, pids.split())
    assert_gone(child)
    await anyio.to_thread.run_sync(wait_until_dead, grandchild)
    assert dead(grandchild), "the grandchild survived"


async def test_cancellation_from_outside_kills_the_child(tmp_path: Path) -> None:
    pid = await run_until_it_reports(helpers.sleep_recording_pid, {"seconds": 3600}, tmp_path / "pid")
    assert_gone(int(pid))


async def test_waiting_does_not_block_the_event_loop(tmp_path: Path) -> None:
    go = tmp_path / "go"

    async def tick() -> None:  # the child returns once this has run 5 times
        for _ in range(5):
            await anyio.sleep(0.02)
        go.touch()

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        answer = await run_in_subprocess(helpers.return_once_file_exists, {"path": str(go), "value": "done"},
                                         timeout=90)
    assert answer == "done"  # (a blocked loop never ticks: the child would give up after 60 s)


async def test_calls_run_in_parallel(tmp_path: Path) -> None:
    results: list[object] = []

    async def one(i: int) -> None:
        results.append(await run_in_subprocess(helpers.rendezvous, {"directory": str(tmp_path), "n": 3, "value": i},
                                               timeout=90))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert sorted(results) == [0, 1, 2]  # type: ignore[type-var]  # all three were in the function at once


# -- the start-up is not the tool's time -----------------------------------------------


@pytest.fixture
def slow_start(monkeypatch):
    """Children take `delay` s to import the tool's module (`isolation_slow_import`)."""

    def set_delay(seconds: float) -> None:
        monkeypatch.setenv("LOOPWISE_TEST_IMPORT_DELAY", str(seconds))

    return set_delay


async def test_the_timeout_counts_from_when_the_function_starts(slow_start) -> None:
    slow_start(2.0)  # four times the timeout, before the function starts
    assert await run_in_subprocess(slow.quick, {"value": 7}, timeout=0.5) == 7


async def test_a_slow_start_then_a_hang_is_a_timeout_of_the_function(slow_start) -> None:
    slow_start(1.0)
    with pytest.raises(ProcessTimeoutError, match=r"'forever' did not finish within 0\.5 s") as info:
        await run_in_subprocess(slow.forever, {}, timeout=0.5)
    assert_gone(info.value.pid)


async def test_the_start_up_has_its_own_bound_and_message(slow_start) -> None:
    slow_start(3600)
    with pytest.raises(ProcessStartError, match=r"'quick' \(isolation='process'\): its process did not start "
                                                r"within 0\.5 s .*imports of the tool's module") as info:
        await run_in_subprocess(slow.quick, {"value": 1}, timeout=30, start_timeout=0.5)
    assert_gone(info.value.pid)


def _one_tool_call(tool: lw.Tool, arguments: dict):
    store = lw.MemoryStore()
    agent = lw.Agent(ScriptedModel([[ToolCall(tool.name, arguments)], "done"]), tools=[tool], store=store)
    result = agent.run_sync("go")
    (done,) = [e for e in store.load(result.run_id) if e.kind == "tool_call_finished"]
    return done


def test_a_tool_whose_process_starts_slowly_still_gets_its_timeout(slow_start) -> None:
    slow_start(2.0)
    quick = lw.tool(isolation="process", timeout=0.5)(slow.quick)
    done = _one_tool_call(quick, {"value": "answered"})
    assert (done.outcome, done.content) == ("ok", "answered")


def test_a_total_timeout_counts_the_start_up(slow_start) -> None:
    slow_start(3600)
    quick = lw.tool(isolation="process", timeout=0.5, total_timeout=1.0)(slow.quick)
    done = _one_tool_call(quick, {"value": "never"})
    assert done.outcome == "error" and "quick ran out of its total_timeout of 1 s" in done.content


async def test_hard_exit_is_a_clear_error() -> None:
    with pytest.raises(ProcessCrashedError, match="exited with code 3 without returning a result") as excinfo:
        await run_in_subprocess(helpers.exit_hard, {"code": 3}, timeout=30)
    assert excinfo.value.exitcode == 3
    assert "'exit_hard'" in str(excinfo.value)


async def test_segfault_is_a_clear_error() -> None:
    with pytest.raises(ProcessCrashedError, match="killed by SIGSEGV") as excinfo:
        await run_in_subprocess(helpers.segfault, {}, timeout=30)
    assert excinfo.value.exitcode == -11


async def test_lambda_is_a_type_error_naming_the_fix() -> None:
    with pytest.raises(TypeError, match="define it at module level") as excinfo:
        await run_in_subprocess(lambda: 1, {}, timeout=30, label="quick")
    assert "'quick'" in str(excinfo.value)
    assert "isolation='process'" in str(excinfo.value)


async def test_nested_function_is_a_type_error() -> None:
    def nested() -> int:
        return 1

    with pytest.raises(TypeError, match="'nested' uses isolation='process'.*module level"):
        await run_in_subprocess(nested, {}, timeout=30)


async def test_unpicklable_arguments_and_results_are_type_errors() -> None:
    with pytest.raises(TypeError, match="its arguments must be picklable"):
        await run_in_subprocess(helpers.echo, {"lock": threading.Lock()}, timeout=30)
    with pytest.raises(TypeError, match="returned a lock that cannot be pickled"):
        await run_in_subprocess(helpers.return_lock, {}, timeout=30)


async def test_decorated_tool_function_runs() -> None:
    # The module attribute is a Tool; the function is found through it.
    assert await run_in_subprocess(helpers.multiply.fn, {"a": 6, "b": 7}, timeout=30) == 42


def test_unguarded_main_script_is_not_rerun_and_main_functions_are_refused(tmp_path: Path) -> None:
    # multiprocessing's spawn would re-run this script (no __main__ guard) in the child.
    script = tmp_path / "agent.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import sys
            sys.path.insert(0, {str(ROOT)!r})
            import anyio
            from loopwise._tools.isolation import run_in_subprocess
            from tests import isolation_helpers

            print("script started", flush=True)

            def local_tool():
                return 1

            async def main():
                print("result", await run_in_subprocess(isolation_helpers.add, {{"a": 1, "b": 1}}, timeout=30))
                try:
                    await run_in_subprocess(local_tool, {{}}, timeout=30)
                except TypeError as exc:
                    print("refused:", exc)

            anyio.run(main)
            """
        )
    )
    done = subprocess.run([sys.executable, str(script)], check=False, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("script started") == 1
    assert "result 2" in done.stdout
    assert "refused: tool 'local_tool'" in done.stdout and "__main__" in done.stdout
