"""REFINE's decision on one fold: what the `context_folded` event says, from what happened.

The context policy says which units leave (`ContextPolicy.plan`, pure); the driver makes
the summary call, if any; this decides the outcome. `evolve` then applies the event to
the run's `ContextState` (the policy's `apply_summary`/`apply_drop` do the same for code
that drives a policy by hand).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .._policies.context import ContextState, Unit

__all__ = ["fold_outcome"]


def fold_outcome(context: ContextState, units: Sequence[Unit], reason: str | None, *, summarize: bool,
                 text: str | None = None, failed: str | None = None,
                 ) -> tuple[Literal["summarized", "dropped"], list[int], int, str | None, str]:
    """(outcome, unit indexes, messages, summary after the fold, reason) of folding `units`.

    `summarize`: the policy summarizes; `text`: the summary model's answer; `failed`:
    why the summary call was not made or failed (the units are dropped instead).
    """
    indexes = [u.index for u in units]
    n_messages = sum(len(u.messages) for u in units)
    if not summarize:
        return "dropped", indexes, n_messages, context.summary, reason or "dropped without a summary"
    if failed is not None:
        return "dropped", indexes, n_messages, context.summary, f"summary call not made or failed: {failed}"
    if text is None or not text.strip():
        return "dropped", indexes, n_messages, context.summary, "the summary model returned no text"
    return "summarized", indexes, n_messages, text.strip(), reason or "folded into the running summary"
