"""The run a piece of code is executing in, as a context variable.

The loop sets it for the duration of a run; test models read it to replay their
script per run (`ScriptedModel`) without the model interface carrying run state.
"""

from __future__ import annotations

from contextvars import ContextVar
from dataclasses import dataclass

__all__ = ["CurrentRun", "current_run"]


@dataclass(slots=True)
class CurrentRun:
    run_id: str
    #: Model calls started so far in this run (THINK, summaries and best-effort answers).
    model_calls: int = 0


current_run: ContextVar[CurrentRun | None] = ContextVar("loopwise_current_run", default=None)
