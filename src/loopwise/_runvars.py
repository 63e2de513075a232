"""The run a piece of code is executing in, as a context variable; and its cancel scopes.

The loop sets `current_run` for the duration of a run; test models read it to replay
their script per run (`ScriptedModel`) without the model interface carrying run state.

`cancel_scope` and `task_group` make the same anyio objects as `anyio.CancelScope` and
`anyio.create_task_group`. On asyncio they skip anyio's look-up of the running async
library (a few frames deep; `anyio.move_on_after` makes two): every run, model call and
tool call makes a scope. `wait_within` gives a call its timeout, as `move_on_after`
would, arming the event loop's timer only once the call waits, and a far deadline only
once it comes near.
"""

from __future__ import annotations

import math
import weakref
from asyncio import _get_running_loop
from collections.abc import Generator
from types import CoroutineType
from contextvars import ContextVar
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import anyio

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

try:  # what sniffio (anyio's way to tell the library) checks before it looks for asyncio
    from sniffio import current_async_library_cvar as _library_var
    from sniffio import thread_local as _library_thread
except ImportError:  # pragma: no cover - anyio without sniffio assumes asyncio, as here
    _library_var = _library_thread = None  # type: ignore[assignment]

__all__ = ["CurrentRun", "cancel_scope", "current_run", "task_group", "wait_within"]


@dataclass(slots=True)
class CurrentRun:
    run_id: str
    #: Model calls started so far in this run (THINK, summaries and best-effort answers).
    model_calls: int = 0


current_run: ContextVar[CurrentRun | None] = ContextVar("loopwise_current_run", default=None)

# The asyncio backend's own classes, learnt from the first of each made on asyncio.
_asyncio_scope: Any = None
_asyncio_group: Any = None


def _asyncio_loop() -> AbstractEventLoop | None:
    """The running asyncio loop when anyio would pick its asyncio backend here, else None."""
    if _library_thread is not None:
        name = _library_thread.name
        if name is None:
            name = _library_var.get()
        if name is not None and name != "asyncio":
            return None  # trio, or another library named explicitly: anyio decides
    return _get_running_loop()


def _learn_scope_class() -> Any:
    global _asyncio_scope
    _asyncio_scope = type(anyio.CancelScope())
    return _asyncio_scope


def _learn_group_class() -> Any:
    global _asyncio_group
    _asyncio_group = type(anyio.create_task_group())
    return _asyncio_group


def cancel_scope(deadline: float = math.inf) -> anyio.CancelScope:
    """`anyio.CancelScope(deadline=deadline)`; `deadline` on the clock of `anyio.current_time()`."""
    if _asyncio_loop() is None:
        return anyio.CancelScope(deadline=deadline)
    return (_asyncio_scope or _learn_scope_class())(deadline=deadline)  # type: ignore[no-any-return]


def task_group() -> anyio.abc.TaskGroup:
    """`anyio.create_task_group()`."""
    if _asyncio_loop() is None:
        return anyio.create_task_group()
    return (_asyncio_group or _learn_group_class())()  # type: ignore[no-any-return]


#: A call's deadline further away than this when the call first waits is not armed then
#: but by its event loop's sweeper, once it comes this close. Most calls end long before
#: their timeout (60 s for a model call, 30 s for a tool, by default) and so never put a
#: timer in the event loop's heap: an entry in a dict instead of `call_at`, cancelling it
#: on the way out, and the heap's upkeep with thousands of calls in flight.
ARM_HORIZON_S = 1.0
#: How often the sweeper looks (while it holds any deadline). Less than `ARM_HORIZON_S`:
#: every deadline is armed, as a timer of its own, at least the difference before it falls due.
SWEEP_EVERY_S = 0.5


def wait_within(scope: anyio.CancelScope, delay: float, coro: Any) -> Any:
    """`coro` to await inside `scope` (entered without a deadline), given one `delay` s from now.

    What `with move_on_after(delay): await coro` does, with the scope made once by the
    caller (which also needs it to tell a timeout from other cancellations). The
    deadline is counted from now but set on the scope only when the call first waits,
    and then only once it is `ARM_HORIZON_S` away: a call that answers without waiting
    (a cache hit, a scripted model), or long before its deadline, never arms a timer in
    the event loop, which costs ~9 µs a call (`call_at`, cancelling it, the heap's
    upkeep). A call that runs past its deadline before it first waits is cancelled at
    that first wait, as with the timer.
    """
    loop = _asyncio_loop()
    deadline = (loop.time() if loop is not None else anyio.current_time()) + delay  # (anyio's clock)
    if type(coro) is not CoroutineType:  # another awaitable: no first step to take apart
        scope.deadline = deadline
        return coro
    return _ArmOnWait(scope, deadline, coro, None if loop is None else _sweeper(loop))


class _Sweeper:
    """Sets far deadlines on their scopes once they come near, for one event loop."""

    __slots__ = ("__weakref__", "handle", "held", "loop")

    def __init__(self, loop: AbstractEventLoop) -> None:
        self.loop = loop
        self.held: dict[object, tuple[anyio.CancelScope, float]] = {}
        self.handle: Any = None

    def hold(self, key: object, scope: anyio.CancelScope, deadline: float) -> bool:
        """Arm `scope` at `deadline`, now if it is near (False), else when it comes near (True: `release` it)."""
        now = self.loop.time()
        if deadline - now <= ARM_HORIZON_S:
            scope.deadline = deadline
            return False
        self.held[key] = (scope, deadline)
        if self.handle is None:
            self.handle = self.loop.call_at(now + SWEEP_EVERY_S, self._sweep)
        return True

    def release(self, key: object) -> None:
        """The call is over: its deadline, if not armed yet, never will be."""
        self.held.pop(key, None)

    def _sweep(self) -> None:
        self.handle = None
        held = self.held
        near = self.loop.time() + ARM_HORIZON_S
        for key in [k for k, (_, deadline) in held.items() if deadline <= near]:
            scope, deadline = held.pop(key)
            scope.deadline = deadline  # a timer of its own now (or cancelled at once, if past)
        if held:
            self.handle = self.loop.call_at(self.loop.time() + SWEEP_EVERY_S, self._sweep)


_sweepers: weakref.WeakKeyDictionary[AbstractEventLoop, _Sweeper] = weakref.WeakKeyDictionary()
_last_sweeper: _Sweeper | None = None


def _sweeper(loop: AbstractEventLoop) -> _Sweeper:
    """The sweeper of `loop` (made on first use; it goes with the loop)."""
    global _last_sweeper
    last = _last_sweeper
    if last is not None and last.loop is loop:
        return last
    sweeper = _sweepers.get(loop)
    if sweeper is None:
        sweeper = _sweepers[loop] = _Sweeper(loop)
    _last_sweeper = sweeper
    return sweeper


class _ArmOnWait:
    """Awaits a coroutine; its first step runs with no deadline, the rest under `deadline`."""

    __slots__ = ("coro", "deadline", "scope", "sweeper")

    def __init__(self, scope: anyio.CancelScope, deadline: float, coro: CoroutineType[Any, Any, Any],
                 sweeper: _Sweeper | None) -> None:
        self.scope = scope
        self.deadline = deadline
        self.coro = coro
        self.sweeper = sweeper

    def __await__(self) -> Generator[Any, Any, Any]:
        coro = self.coro
        try:
            signal = coro.send(None)
        except StopIteration as stop:
            return stop.value
        # It waits: its deadline is armed now, or by the sweeper once near (public API either way).
        sweeper = self.sweeper
        if sweeper is None:
            self.scope.deadline = self.deadline
            held = False
        else:
            held = sweeper.hold(self, self.scope, self.deadline)
        try:
            # Hand what it waits on to the event loop, and what comes back to it. Once the
            # loop resumes it plainly (asyncio sends None), `yield from` forwards the rest in C.
            while True:
                try:
                    value = yield signal
                except GeneratorExit:
                    coro.close()
                    raise
                except BaseException as exc:  # a cancellation (the deadline's, a kill's) or an error thrown in
                    try:
                        signal = coro.throw(exc)
                    except StopIteration as stop:
                        return stop.value
                    continue
                if value is None:
                    return (yield from coro.__await__())
                try:  # (a library that resumes tasks with values: trio)
                    signal = coro.send(value)
                except StopIteration as stop:
                    return stop.value
        finally:
            if held:
                sweeper.release(self)  # type: ignore[union-attr]
