"""Resume: which runs can continue, and how what was in flight is settled.

The log is the only input. Its events, folded through the loop's own `_core.evolve`
(`_core.fold`), give back everything the loop held in memory: the transcript the model
saw, the context policy's state, the runaway monitor's history, the counters, the call
ids already used, and the active time spent. There is no second set of rules here.

What was in flight when the previous segment ended is settled, never silently
(`settle`; the `run_resumed` event records it):

- a model call started but not finished (a crash) is charged at its reservation, and a
  paid tool call started but not finished at its worst case (`ToolPolicy.max_cost_usd`,
  what its reservation was);
- a tool call started without an outcome, or cancelled by a kill, is run again only if
  its tool is ``idempotent=True`` (with the same call id, its idempotency key);
  otherwise the model is told its outcome is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .._core.decide import UNKNOWN_OUTCOME
from .._errors import UserError
from .._events import Event, RunFinished, RunStarted
from .._messages import ToolCall

if TYPE_CHECKING:
    from .._core.state import State
    from .._tools.tool import Tool

__all__ = ["RESUMABLE", "UNKNOWN_OUTCOME", "Settlement", "check_resumable", "settle"]

#: Stop reasons after which a run may be resumed (besides a crash: no end in the log).
RESUMABLE = ("killed", "error")



@dataclass(slots=True)
class Settlement:
    """What a resume settles of what the previous segment left in flight."""

    #: The last iteration's tool calls without an outcome, in the model's order: (call, runs again?).
    interrupted: list[tuple[ToolCall, bool]] = field(default_factory=list)
    #: Charged at their reservation: a model call, and paid tool calls, that were in flight.
    carried_usd: float = 0.0
    carried_tokens: int = 0


def check_resumable(run_id: str, events: list[Event]) -> str:
    """How the run's last segment ended (``crashed`` if it has no end), or `UserError` if it cannot resume."""
    if not events or not isinstance(events[0], RunStarted):
        raise UserError(f"no run with id {run_id!r} in the store; `loopwise runs` lists the runs there")
    last = events[-1]
    if isinstance(last, RunFinished):
        if last.stop_reason not in RESUMABLE:
            raise UserError(
                f"run {run_id} finished with stop reason {last.stop_reason!r}; a completed run cannot be resumed "
                f"(only runs that crashed, were killed or ended in error can). Start a new run instead."
            )
        return last.stop_reason
    return "crashed"


def settle(state: State, tools: dict[str, Tool]) -> Settlement:
    """What the state folded from a log (`_core.fold`) left in flight, and how it is settled.

    A tool call without an outcome runs again if its tool is idempotent; the others are
    answered `UNKNOWN_OUTCOME` by the loop. One that never ended (the process died while
    it ran) may have been billed: charged at its worst case. A model call that never
    ended is charged at its reservation.
    """
    plan = Settlement()
    results = state.results or {}
    for call in state.calls:
        if results.get(call.id) is not None:  # type: ignore[arg-type]
            continue
        tool = tools.get(call.name) if isinstance(call.name, str) else None
        plan.interrupted.append((call, tool is not None and tool.policy.idempotent))
        if tool is not None and call.id not in results:
            plan.carried_usd += tool.policy.max_cost_usd()
    open_call = state.open_call
    if open_call is not None:
        plan.carried_usd += open_call.reserved_usd or 0.0
        if open_call.reserved_usd is not None:
            plan.carried_tokens = (open_call.estimated_input_tokens or 0) + (open_call.max_tokens or 0)
    return plan
