"""Module-level (so picklable) functions for tests/test_isolation.py to run in a child process."""

from __future__ import annotations

import os
import threading
import time
from pathlib import Path

import loopwise as lw


class CustomError(Exception):
    """An exception that pickles like any other."""


class StubbornError(Exception):
    """Pickles, but cannot be rebuilt: its __init__ needs two arguments."""

    def __init__(self, a: str, b: str) -> None:
        super().__init__(f"{a}/{b}")


def add(a: int, b: int) -> int:
    return a + b


def echo(**kwargs: object) -> dict[str, object]:
    return {"kwargs": kwargs, "pid": os.getpid()}


def raise_value_error(message: str) -> None:
    raise ValueError(message)


def raise_custom(message: str) -> None:
    raise CustomError(message)


def raise_stubborn() -> None:
    raise StubbornError("left", "right")


def raise_system_exit() -> None:
    raise SystemExit(4)


def exit_hard(code: int) -> None:
    os._exit(code)


def segfault() -> None:
    import ctypes

    ctypes.string_at(0)


def return_lock() -> object:
    return threading.Lock()


def sleep_recording_pid(pid_file: str, seconds: float) -> None:
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def ignore_sigterm_and_sleep(pid_file: str, seconds: float) -> None:
    import signal

    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    Path(pid_file).write_text(str(os.getpid()))
    time.sleep(seconds)


def big_result(size: int) -> bytes:
    return b"x" * size


def sleep_then_return(seconds: float, value: object) -> object:
    time.sleep(seconds)
    return value


@lw.tool
def multiply(a: int, b: int) -> int:
    """Multiply two numbers: a tool whose module attribute is the `Tool`, not the function."""
    return a * b


def start_grandchild_and_sleep(pid_file: str, seconds: float) -> None:
    import subprocess
    import sys

    grandchild = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    Path(pid_file).write_text(f"{os.getpid()} {grandchild.pid}")
    time.sleep(seconds)


def rendezvous(directory: str, n: int, value: object) -> object:
    """Return `value` once `n` calls are in this function at once (each leaves a file in `directory`)."""
    Path(directory, str(os.getpid())).touch()
    give_up = time.monotonic() + 60
    while len(os.listdir(directory)) < n:
        if time.monotonic() > give_up:
            raise TimeoutError(f"only {len(os.listdir(directory))} of {n} calls ran at once")
        time.sleep(0.01)
    return value


def return_once_file_exists(path: str, value: object) -> object:
    """Return `value` once `path` exists (the test's event loop makes it)."""
    give_up = time.monotonic() + 60
    while not Path(path).exists():
        if time.monotonic() > give_up:
            raise TimeoutError(f"{path} never appeared")
        time.sleep(0.01)
    return value
