"""Hot-path tricks, quarantined: each one beside the plain Python it stands for.

The rest of loopwise calls the names this module exports and never knows which version
it got. A trick lives here only while a benchmark shows it buys something worth its
complexity (numbers and commands: benchmarks/README.md, "Hot-path tricks"); the plain
versions are the reference, and the tests run the core test files under them too and
compare the event logs of the same runs under both (tests/test_hotpath.py).

| trick | fast version | plain version |
|---|---|---|
| `constructors` | event constructors generated with `exec` from the class's fields, storing them positionally | the dataclass's `__init__`, by keyword |
| `message` | the runtime's own `Message`s made with `object.__new__`, skipping `__post_init__`'s checks | `Message(...)` |
| `scopes` | `cancel_scope`/`task_group` make anyio's asyncio classes directly | `anyio.CancelScope(deadline=...)`, `anyio.create_task_group()` |
| `arm_on_wait` | `wait_within` drives the call's first step by hand and sets its deadline only if it waits | the deadline set at once: `move_on_after` |
| `sweeper` | a far deadline waits in a dict, armed by a per-loop sweeper once within `ARM_HORIZON_S` | set on the scope when the call first waits |
| `tool_tasks` | a response's tool calls in bare asyncio tasks (`Acting._call_tools_at_once` in `_runtime.act`) | an anyio task group |

Select the plain versions with the environment variable `LOOPWISE_PLAIN`, read once, at
import: `1` (or `all`) for all of them, or a comma-separated list of the names above
(`LOOPWISE_PLAIN=scopes,sweeper`). A name not in the table is an error at import.
"""

from __future__ import annotations

import math
import os
import weakref
from asyncio import _get_running_loop
from collections.abc import Callable, Generator
from dataclasses import fields
from types import CoroutineType
from typing import TYPE_CHECKING, Any, TypeVar

import anyio

if TYPE_CHECKING:
    from asyncio import AbstractEventLoop

try:  # what sniffio (anyio's way to tell the library) checks before it looks for asyncio
    from sniffio import current_async_library_cvar as _library_var
    from sniffio import thread_local as _library_thread
except ImportError:  # pragma: no cover - anyio without sniffio assumes asyncio, as here
    _library_var = _library_thread = None  # type: ignore[assignment]

__all__ = ["PLAIN", "TRICKS", "asyncio_loop", "cancel_scope", "message_constructor", "positional", "task_group",
           "wait_within"]

TRICKS = ("constructors", "message", "scopes", "arm_on_wait", "sweeper", "tool_tasks")


def plain_from(value: str | None) -> frozenset[str]:
    """The tricks `LOOPWISE_PLAIN=value` replaces by their plain versions."""
    value = (value or "").strip()
    if value in ("", "0"):
        return frozenset()
    if value in ("1", "all"):
        return frozenset(TRICKS)
    names = {name.strip() for name in value.split(",") if name.strip()}
    if unknown := sorted(names.difference(TRICKS)):
        from ._errors import UserError

        raise UserError(f"LOOPWISE_PLAIN={value!r} names no trick {', '.join(unknown)}: "
                        f"use 1 (all of them) or a comma-separated list of {', '.join(TRICKS)}")
    return frozenset(names)


#: The tricks replaced by their plain versions in this process.
PLAIN: frozenset[str] = plain_from(os.environ.get("LOOPWISE_PLAIN"))


# --- constructors: the events every run makes ----------------------------------------

_E = TypeVar("_E")


def positional(cls: type[_E]) -> Callable[..., _E]:
    """A positional constructor of the event class `cls`: its fields in order, less `kind` and `replaced`.

    It makes what ``cls(run_id=..., seq=..., ...)`` makes, with `replaced` None. Fast:
    generated from the fields, as `dataclass` makes `__init__`, storing each value
    without CPython's one-by-one matching of keyword arguments (the events' classes are
    keyword-only). Plain: the class's own `__init__`, by keyword.
    """
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    if (names[0] != "kind" or names[-1] != "replaced" or not all(f.init for f in fields(cls))  # type: ignore[arg-type]
            or hasattr(cls, "__post_init__")):
        raise TypeError(f"{cls.__name__}: an event's __init__ that does more than store its fields")
    names = names[1:-1]  # (`replaced` is None: the loop sets it on the rare event that needs it)
    name = f"new_{cls.__name__}"
    if "constructors" in PLAIN:
        def new(*values: Any) -> _E:
            return cls(**dict(zip(names, values, strict=True)))

        new.__name__ = new.__qualname__ = name
        return new
    source = (f"def {name}({', '.join(names)}):\n    e = _new(_cls)\n    e.kind = _kind\n"
              + "".join(f"    e.{n} = {n}\n" for n in names) + "    e.replaced = None\n    return e\n")
    namespace: dict[str, Any] = {"_new": object.__new__, "_cls": cls, "_kind": fields(cls)[0].default}  # type: ignore[arg-type]
    exec(source, namespace)  # noqa: S102 - source made above from the class's own field names
    return namespace[name]


# --- message: the runtime's own messages, without `Message.__post_init__`'s checks -------

_M = TypeVar("_M")


def message_constructor(cls: type[_M]) -> Callable[..., _M]:
    """`cls(role, content, tool_calls=(), tool_call_id=None)`, for messages the runtime makes.

    Their role is valid and their calls a tuple, so the fast version skips the frozen
    dataclass's `__init__` and `__post_init__` (its checks, and a `object.__setattr__`
    call per field through the class's frozen machinery). Plain: `cls` itself.
    """
    if tuple(f.name for f in fields(cls)) != ("role", "content", "tool_calls", "tool_call_id"):  # type: ignore[arg-type]
        raise TypeError(f"{cls.__name__}: not the message class this constructor stores the fields of")
    if "message" in PLAIN:
        return cls
    new, store = object.__new__, object.__setattr__

    def new_message(role: str, content: str | None, tool_calls: tuple[Any, ...] = (),
                    tool_call_id: str | None = None) -> _M:
        message = new(cls)
        store(message, "role", role)
        store(message, "content", content)
        store(message, "tool_calls", tool_calls)
        store(message, "tool_call_id", tool_call_id)
        return message

    return new_message


# --- scopes: anyio's cancel scopes and task groups, without its library look-up ---------

# The asyncio backend's own classes, learnt from the first of each made on asyncio.
_asyncio_scope: Any = None
_asyncio_group: Any = None


def _running_asyncio_loop() -> AbstractEventLoop | None:
    """The running asyncio loop when anyio would pick its asyncio backend here, else None."""
    if _library_thread is not None:
        name = _library_thread.name
        if name is None:
            name = _library_var.get()
        if name is not None and name != "asyncio":
            return None  # trio, or another library named explicitly: anyio decides
    return _get_running_loop()


def _no_loop() -> None:
    return None


def _learn_scope_class() -> Any:
    global _asyncio_scope
    _asyncio_scope = type(anyio.CancelScope())
    return _asyncio_scope


def _learn_group_class() -> Any:
    global _asyncio_group
    _asyncio_group = type(anyio.create_task_group())
    return _asyncio_group


def _fast_cancel_scope(deadline: float = math.inf) -> anyio.CancelScope:
    """`anyio.CancelScope(deadline=deadline)`; `deadline` on the clock of `anyio.current_time()`."""
    if _running_asyncio_loop() is None:
        return anyio.CancelScope(deadline=deadline)
    return (_asyncio_scope or _learn_scope_class())(deadline=deadline)


def _fast_task_group() -> anyio.abc.TaskGroup:
    """`anyio.create_task_group()`."""
    if _running_asyncio_loop() is None:
        return anyio.create_task_group()
    return (_asyncio_group or _learn_group_class())()


def _plain_cancel_scope(deadline: float = math.inf) -> anyio.CancelScope:
    """`anyio.CancelScope(deadline=deadline)`; `deadline` on the clock of `anyio.current_time()`."""
    return anyio.CancelScope(deadline=deadline)


cancel_scope: Callable[..., anyio.CancelScope]
task_group: Callable[[], anyio.abc.TaskGroup]
if "scopes" in PLAIN:
    cancel_scope, task_group = _plain_cancel_scope, anyio.create_task_group
else:
    cancel_scope, task_group = _fast_cancel_scope, _fast_task_group

#: The running asyncio loop, for `Run` to start a response's tool calls in bare tasks on
#: it; None where they go in a task group (another async library, or `tool_tasks` plain).
asyncio_loop: Callable[[], AbstractEventLoop | None] = (
    _no_loop if "tool_tasks" in PLAIN else _running_asyncio_loop)


# --- arm_on_wait and sweeper: a call's timeout, armed only if it waits, and only when near --

#: A call's deadline further away than this when the call first waits is not armed then
#: but by its event loop's sweeper, once it comes this close. Most calls end long before
#: their timeout (60 s for a model call, 30 s for a tool, by default) and so never put a
#: timer in the event loop's heap: an entry in a dict instead of `call_at`, cancelling it
#: on the way out, and the heap's upkeep with thousands of calls in flight.
ARM_HORIZON_S = 1.0
#: How often the sweeper looks (while it holds any deadline). Less than `ARM_HORIZON_S`:
#: every deadline is armed, as a timer of its own, at least the difference before it falls due.
SWEEP_EVERY_S = 0.5


def _deadline_in(delay: float) -> float:
    loop = _running_asyncio_loop()
    return (loop.time() if loop is not None else anyio.current_time()) + delay  # (anyio's clock)


def _plain_wait_within(scope: anyio.CancelScope, delay: float, coro: Any) -> Any:
    """`coro` to await inside `scope` (entered without a deadline), given one `delay` s from now."""
    scope.deadline = _deadline_in(delay)
    return coro


def _fast_wait_within(scope: anyio.CancelScope, delay: float, coro: Any) -> Any:
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
    loop = _running_asyncio_loop()
    deadline = (loop.time() if loop is not None else anyio.current_time()) + delay  # (anyio's clock)
    if type(coro) is not CoroutineType:  # another awaitable: no first step to take apart
        scope.deadline = deadline
        return coro
    sweeper = None if loop is None or "sweeper" in PLAIN else _sweeper(loop)
    return _ArmOnWait(scope, deadline, coro, sweeper)


wait_within: Callable[[anyio.CancelScope, float, Any], Any] = (
    _plain_wait_within if "arm_on_wait" in PLAIN else _fast_wait_within)


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
