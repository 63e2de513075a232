"""isolation="process": the child is killed on timeout; results and errors round-trip."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import anyio
import pytest

from loopwise._isolation import ProcessCrashedError, run_in_subprocess

from . import isolation_helpers as helpers

ROOT = Path(__file__).resolve().parents[1]


def assert_gone(pid: int) -> None:
    """No process (not even a zombie) has this pid any more."""
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)


def read_pid(path: Path) -> int:
    assert path.exists(), "the child never started the function"
    return int(path.read_text())


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


async def test_sixty_second_call_is_killed_at_the_timeout(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match=r"'sleep_recording_pid' did not finish within 0\.5 s"):
        await run_in_subprocess(
            helpers.sleep_recording_pid, {"pid_file": str(pid_file), "seconds": 60}, timeout=0.5
        )
    elapsed = time.monotonic() - t0
    assert elapsed < 3, f"took {elapsed:.1f} s"
    assert_gone(read_pid(pid_file))


async def test_child_ignoring_sigterm_is_killed(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    t0 = time.monotonic()
    with pytest.raises(TimeoutError):
        await run_in_subprocess(
            helpers.ignore_sigterm_and_sleep, {"pid_file": str(pid_file), "seconds": 60}, timeout=0.5
        )
    assert time.monotonic() - t0 < 3
    assert_gone(read_pid(pid_file))


def dead(pid: int) -> bool:
    """Gone, or a zombie waiting for init (a grandchild is not ours to reap)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return True
    return stat.rsplit(")", 1)[1].split()[0] == "Z"


async def test_processes_the_child_started_are_killed_too(tmp_path: Path) -> None:
    pid_file = tmp_path / "pids"
    with pytest.raises(TimeoutError):
        await run_in_subprocess(
            helpers.start_grandchild_and_sleep, {"pid_file": str(pid_file), "seconds": 60}, timeout=1.5
        )
    assert pid_file.exists(), "the child never started the function"
    child, grandchild = map(int, pid_file.read_text().split())
    assert_gone(child)
    deadline = time.monotonic() + 5
    while not dead(grandchild):
        assert time.monotonic() < deadline, "the grandchild survived"
        await anyio.sleep(0.02)


async def test_cancellation_from_outside_kills_the_child(tmp_path: Path) -> None:
    pid_file = tmp_path / "pid"
    with anyio.move_on_after(0.5) as scope:
        await run_in_subprocess(
            helpers.sleep_recording_pid, {"pid_file": str(pid_file), "seconds": 60}, timeout=None
        )
    assert scope.cancelled_caught
    assert_gone(read_pid(pid_file))


async def test_waiting_does_not_block_the_event_loop() -> None:
    ticks = 0

    async def tick() -> None:
        nonlocal ticks
        while True:
            await anyio.sleep(0.02)
            ticks += 1

    async with anyio.create_task_group() as tg:
        tg.start_soon(tick)
        assert await run_in_subprocess(helpers.sleep_then_return, {"seconds": 1.0, "value": "done"}, timeout=30) == "done"
        tg.cancel_scope.cancel()
    assert ticks >= 10  # ~50 if nothing blocks; 0 if the wait blocked the loop


async def test_calls_run_in_parallel() -> None:
    t0 = time.monotonic()
    results: list[object] = []

    async def one(i: int) -> None:
        results.append(await run_in_subprocess(helpers.sleep_then_return, {"seconds": 1.0, "value": i}, timeout=30))

    async with anyio.create_task_group() as tg:
        for i in range(3):
            tg.start_soon(one, i)
    assert sorted(results) == [0, 1, 2]  # type: ignore[type-var]
    assert time.monotonic() - t0 < 2.9  # three 1 s calls, overlapping


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
            from loopwise._isolation import run_in_subprocess
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
