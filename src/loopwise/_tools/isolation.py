"""`isolation="process"`: run a tool in a child process that is killed on timeout.

A thread cannot be stopped, and an async tool that never yields cannot be
cancelled. A process can: on timeout or cancellation the child's process group
(the child and any processes it started) gets SIGTERM, then SIGKILL after a
short grace, and the child is reaped, so nothing keeps running and no zombie
remains.

```python
result = await run_in_subprocess(render_report, {"month": "2024-05"}, timeout=30)
```

The tool's `timeout` counts from when its function starts in the child (the child
says so over its pipe), not from when the child was spawned: a fresh interpreter
and the imports of the tool's module take ~0.1 s on an idle machine and close to a
second on a busy one, which a 0.5 s timeout must not pay for. The start-up has its
own bound, `START_TIMEOUT_S` (`ProcessStartError`: "its process did not start
within 30 s"), and a `total_timeout`, the call's wall-clock bound, counts it.

The price: the call crosses a process boundary. The function must be importable
by name from a module (not a lambda, closure, nested function, or a function
defined in the `__main__` script), and its arguments, result and exceptions
must be picklable. Each call starts a fresh interpreter (about 20 ms, plus the
imports of the tool's module), so this is for tools that must truly stop, not
for every tool.

How: the child is a fresh `python -c <bootstrap>` (never a fork: the parent
has threads). It reads the parent's `sys.path` and the pickled call from stdin,
writes `STARTED` to its stdout just before it calls the function, then one
length-prefixed pickled answer; the tool's own prints go to stderr. This is "spawn" without multiprocessing, whose spawn and
forkserver methods re-run the user's `__main__` script in every child (an agent
script without an `if __name__ == "__main__":` guard would start itself again).
All waiting happens on the event loop (anyio process streams).
"""

from __future__ import annotations

import functools
import importlib
import os
import pickle
import signal
import struct
import subprocess
import sys
from collections.abc import Callable
from typing import Any

import anyio
import anyio.abc

from .._errors import LoopwiseError

__all__ = ["ProcessCrashedError", "ProcessStartError", "ProcessTimeoutError", "run_in_subprocess"]

#: Seconds between SIGTERM and SIGKILL.
KILL_GRACE = 0.2
#: Seconds a child that has sent its answer gets to exit on its own before it is stopped.
EXIT_GRACE = 0.5
#: Seconds a child may take from its spawn to the start of the function (a Python
#: interpreter, then the imports of the tool's module): not part of the tool's timeout.
#: Generous: ~0.1 s on an idle machine, ~1 s at a load of 8 on 2 cores, more for heavy imports.
START_TIMEOUT_S = 30.0

_HEADER = struct.Struct("!Q")
#: The byte the child writes when the function starts (an answer's header, a length
#: below 2**56, begins with a zero byte: a child that fails to load sends that at once).
STARTED = b"S"

# Runs in the child. Self-contained, so the child imports only what the tool needs.
_BOOTSTRAP = r"""
import importlib, os, pickle, struct, sys, traceback

out = os.dup(1)
os.dup2(2, 1)  # the tool's own prints go to stderr: stdout carries the answer
stdin = sys.stdin.buffer
sys.path[:] = pickle.load(stdin)


def dump(message):
    return pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)


def dump_error(exc):
    tb = "".join(traceback.format_exception(exc))
    if isinstance(exc, Exception):
        try:
            data = dump(("error", exc, tb))
            pickle.loads(data)  # some exceptions pickle but cannot be rebuilt
            return data
        except Exception:
            pass
    name = type(exc).__module__ + "." + type(exc).__qualname__
    return dump(("error_text", name, str(exc), tb))


try:
    how, target, kwargs = pickle.load(stdin)
    if how == "attr_fn":  # a decorated function: the module holds a wrapper with .fn
        module, qualname = target
        fn = importlib.import_module(module)
        for part in qualname.split("."):
            fn = getattr(fn, part)
        fn = fn.fn
    else:
        fn = target
except BaseException as exc:
    data = dump(("load_error", type(exc).__name__ + ": " + str(exc)))
else:
    os.write(out, b"S")  # the function starts now: its timeout counts from here
    try:
        result = fn(**kwargs)
    except BaseException as exc:
        data = dump_error(exc)
    else:
        try:
            data = dump(("ok", result))
        except Exception as exc:
            data = dump(("bad_result", type(result).__qualname__, type(exc).__name__ + ": " + str(exc)))
view = memoryview(struct.pack("!Q", len(data)) + data)
while view:
    view = view[os.write(out, view):]
os.close(out)
"""


class ProcessCrashedError(LoopwiseError, RuntimeError):
    """The child process ended without sending back an answer (os._exit, a signal, ...)."""

    def __init__(self, message: str, *, exitcode: int | None) -> None:
        super().__init__(message)
        self.exitcode = exitcode


class ProcessStartError(LoopwiseError, RuntimeError):
    """The child process did not start the function within its start-up bound; it was killed."""

    def __init__(self, message: str, *, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


class ProcessTimeoutError(LoopwiseError, TimeoutError):
    """The function ran past its timeout in the child process; the process was killed."""

    def __init__(self, message: str, *, pid: int) -> None:
        super().__init__(message)
        self.pid = pid


def _label(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", None) or type(fn).__name__


def _not_picklable(label: str, reason: str) -> TypeError:
    return TypeError(
        f"tool {label!r} uses isolation='process', so its function must be importable by name "
        "from a module: define it at module level (not a lambda, closure or nested function, "
        f"and not in the __main__ script) ({reason})"
    )


def _payload(fn: Callable[..., Any], kwargs: dict[str, Any], label: str) -> bytes:
    """The parent's sys.path, then the pickled call; or a TypeError naming the fix."""
    module = getattr(fn, "__module__", None)
    qualname = getattr(fn, "__qualname__", "")
    if module == "__main__":
        raise _not_picklable(label, "it is defined in __main__, which the child process does not run")
    if "<locals>" in qualname or "<lambda>" in qualname:
        raise _not_picklable(label, f"{qualname} cannot be imported by name")
    call: tuple[str, Any, dict[str, Any]] = ("object", fn, kwargs)
    # `@tool def f` leaves a wrapper at module.f: send where to find it instead.
    try:
        found: Any = importlib.import_module(module) if isinstance(module, str) else None
        for part in qualname.split("."):
            found = getattr(found, part)
    except Exception:  # noqa: BLE001 - not found by name: pickle will say why
        found = None
    if found is not fn and getattr(found, "fn", None) is fn:
        call = ("attr_fn", (module, qualname), kwargs)
    try:
        pickle.dumps(call[1], protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - pickling fails with many types: report any
        raise _not_picklable(label, f"{type(exc).__name__}: {exc}") from None
    try:
        data = pickle.dumps(call, protocol=pickle.HIGHEST_PROTOCOL)
    except Exception as exc:  # noqa: BLE001 - pickling fails with many types: report any
        raise TypeError(
            f"tool {label!r} uses isolation='process', so its arguments must be picklable "
            f"({type(exc).__name__}: {exc})"
        ) from None
    return pickle.dumps(list(sys.path), protocol=pickle.HIGHEST_PROTOCOL) + data


def _frame(buffer: bytearray) -> bytes | None:
    if len(buffer) < _HEADER.size:
        return None
    (size,) = _HEADER.unpack_from(buffer)
    if len(buffer) < _HEADER.size + size:
        return None
    return bytes(buffer[_HEADER.size : _HEADER.size + size])


async def _send(process: anyio.abc.Process, payload: bytes) -> None:
    assert process.stdin is not None
    try:
        await process.stdin.send(payload)
        await process.stdin.aclose()
    except (anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass  # the child is gone already; its exit code tells why


async def _read_until(process: anyio.abc.Process, buffer: bytearray, enough: Callable[[], bool]) -> None:
    """Read the child's stdout into `buffer` until `enough()`, its end, or the child's exit.

    Once the child has exited, what it wrote is in the pipe, and EOF follows unless a
    process it started holds the pipe open: that is not waited for past `EXIT_GRACE`.
    """
    stdout = process.stdout
    assert stdout is not None
    if enough():
        return
    async with anyio.create_task_group() as tg:

        async def read() -> None:
            try:
                while not enough():
                    buffer.extend(await stdout.receive())
            except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError):
                pass
            tg.cancel_scope.cancel()

        tg.start_soon(read)
        await process.wait()
        await anyio.sleep(EXIT_GRACE)
        tg.cancel_scope.cancel()


def _signal(process: anyio.abc.Process, signum: int) -> None:
    """Signal the child's process group: the child and whatever it started."""
    # Not process.terminate(): through subprocess.Popen that polls, and so can reap
    # the child behind the event loop's child watcher, which then reports exit code 255.
    try:
        os.killpg(process.pid, signum)
    except (ProcessLookupError, PermissionError):
        try:
            os.kill(process.pid, signum)
        except ProcessLookupError:
            pass


async def _stop(process: anyio.abc.Process) -> None:
    """SIGTERM, SIGKILL after a grace, reap, close the pipes. Call shielded."""
    if process.returncode is None:
        _signal(process, signal.SIGTERM)
        with anyio.move_on_after(KILL_GRACE):
            await process.wait()
    if process.returncode is None:
        _signal(process, signal.SIGKILL)
        with anyio.move_on_after(5):
            await process.wait()
    with anyio.move_on_after(1):
        await process.aclose()


def _describe_exit(exitcode: int | None) -> str:
    if exitcode is None:
        return "did not exit"
    if exitcode < 0:
        try:
            name = signal.Signals(-exitcode).name
        except ValueError:
            name = f"signal {-exitcode}"
        return f"was killed by {name} (exit code {exitcode})"
    return f"exited with code {exitcode}"


def _outcome(frame: bytes | None, label: str, exitcode: int | None) -> Any:
    if frame is None:
        raise ProcessCrashedError(
            f"tool {label!r} (isolation='process'): its process {_describe_exit(exitcode)} "
            "without returning a result",
            exitcode=exitcode,
        )
    try:
        message = pickle.loads(frame)
    except Exception as exc:  # noqa: BLE001 - unpickling runs arbitrary __reduce__ code
        raise RuntimeError(
            f"tool {label!r} (isolation='process'): its answer could not be unpickled "
            f"({type(exc).__name__}: {exc})"
        ) from None
    kind = message[0]
    if kind == "ok":
        return message[1]
    if kind == "error":
        _, error, tb = message
        error.add_note(f"raised in the process of tool {label!r} (isolation='process'):\n{tb.rstrip()}")
        raise error
    if kind == "error_text":
        _, name, text, tb = message
        error = RuntimeError(
            f"tool {label!r} (isolation='process') raised {name}: {text} "
            "(the exception could not be sent back from its process)"
        )
        error.add_note(tb.rstrip())
        raise error
    if kind == "bad_result":
        _, type_name, reason = message
        raise TypeError(
            f"tool {label!r} (isolation='process') returned a {type_name} that cannot be "
            f"pickled back from its process ({reason}); return plain data"
        )
    if kind == "load_error":
        raise TypeError(
            f"tool {label!r} (isolation='process') could not be loaded in its process "
            f"({message[1]}); define it at module level in an importable module"
        )
    raise RuntimeError(f"tool {label!r} (isolation='process'): unexpected answer {kind!r}")


async def run_in_subprocess(
    fn: Callable[..., Any],
    kwargs: dict[str, Any],
    *,
    timeout: float | None,
    label: str | None = None,
    start_timeout: float = START_TIMEOUT_S,
) -> Any:
    """Run `fn(**kwargs)` in a child process and return its result.

    The child's exception is re-raised here with its type (and the child's
    traceback as a note); one that cannot be pickled becomes a `RuntimeError`
    naming its type and message.

    Args:
        fn: A function defined at module level in an importable module.
        kwargs: Its keyword arguments; picklable.
        timeout: Seconds the function may run, counted from when it starts in the
            child, before the child is killed and `ProcessTimeoutError` raised; None
            for no limit. Stopping the child adds at most `KILL_GRACE` s.
        label: The tool's name, for messages (default: the function's name).
        start_timeout: Seconds from the spawn to the start of the function.

    Raises:
        TypeError: `fn` cannot be sent to a child process, or its arguments or
            result cannot be pickled.
        ProcessTimeoutError: `timeout` expired; the child was killed.
        ProcessStartError: the function did not start within `start_timeout`; the
            child was killed.
        ProcessCrashedError: the child ended without an answer (`os._exit`, a signal).
    """
    label = label or _label(fn)
    payload = _payload(fn, kwargs, label)
    process: anyio.abc.Process | None = None
    buffer = bytearray()
    frame: bytes | None = None
    spawned = anyio.current_time()
    try:
        with anyio.move_on_after(start_timeout) as starting:
            process = await anyio.open_process(
                [sys.executable, "-c", _BOOTSTRAP],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                stderr=None,
                # Its own process group, so stopping it also stops the processes it
                # started (and a Ctrl-C meant for the parent does not reach it).
                start_new_session=True,
            )
            await _send(process, payload)
            await _read_until(process, buffer, lambda: len(buffer) > 0)
        if starting.cancelled_caught:
            raise _start_error(label, start_timeout, process)
        started = buffer[:1] == STARTED
        if started:
            del buffer[:1]
        # Started: the function has its timeout from now. Not started (it could not load the
        # function, or died): its answer, if any, is on its way, within the start-up bound.
        limit = timeout if started else max(0.0, spawned + start_timeout - anyio.current_time())
        assert process is not None
        with anyio.move_on_after(limit) as running:
            await _read_until(process, buffer, lambda: _frame(buffer) is not None)
            frame = _frame(buffer)
            # Answered, or closed its stdout: it is on its way out. Let it exit on its own
            # (and so report its real exit code) before it is stopped.
            with anyio.move_on_after(EXIT_GRACE):
                await process.wait()
    finally:
        if process is not None:
            with anyio.CancelScope(shield=True):
                await _stop(process)
    if frame is None and running.cancelled_caught:
        if started:
            raise ProcessTimeoutError(f"tool {label!r} did not finish within {timeout:g} s; its process was killed",
                                      pid=process.pid)
        raise _start_error(label, start_timeout, process)
    return _outcome(frame, label, process.returncode)


def _start_error(label: str, start_timeout: float, process: anyio.abc.Process | None) -> ProcessStartError:
    return ProcessStartError(
        f"tool {label!r} (isolation='process'): its process did not start within {start_timeout:g} s "
        "(a Python interpreter, then the imports of the tool's module), and was killed; the machine "
        "may be overloaded, or the module's imports too slow",
        pid=process.pid if process is not None else 0,
    )
