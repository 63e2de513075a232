"""The scopes code runs in: the run (a context variable) and cancel scopes with timeouts.

The loop sets `current_run` for the duration of a run; test models read it to replay
their script per run (`ScriptedModel`) without the model interface carrying run state.

`cancel_scope` and `task_group` make the same anyio objects as `anyio.CancelScope` and
`anyio.create_task_group`: every run, model call and tool call makes a scope.
`wait_within(scope, delay, coro)` gives a call its timeout, as `move_on_after(delay)`
would. Their implementations are in `_hotpath`, where each hot-path trick (skipping
anyio's library look-up, arming a call's timer only once it waits, a sweeper for far
deadlines) sits beside its plain version (`LOOPWISE_PLAIN=1` selects those).
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

from .._hotpath import asyncio_loop as _asyncio_loop  # noqa: F401 - `Run`: bare tool tasks or a task group
from .._hotpath import cancel_scope, task_group, wait_within

__all__ = ["CurrentRun", "cancel_scope", "current_run", "task_group", "wait_within"]


@dataclass(slots=True)
class CurrentRun:
    run_id: str
    #: Model calls started so far in this run (THINK, summaries and best-effort answers).
    model_calls: int = 0


current_run: ContextVar[CurrentRun | None] = ContextVar("loopwise_current_run", default=None)
