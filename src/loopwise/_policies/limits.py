"""Per-run limits. A run stopped by a limit has the limit's name as its stop reason."""

from __future__ import annotations

from typing import Any

from .._errors import UserError

__all__ = ["Limits"]

DEFAULT_BUDGET_USD = 0.50


class Limits:
    """The limits every run of an agent is held to.

    Args:
        max_iterations: The most THINK steps a run may take (the seed post's rule:
            a hard cap of 8). The THINK that returns the final answer counts.
        budget_usd: The most dollars one run may spend (the seed post's rule: $0.50),
            or `None` for no dollar limit. Checked before every model call: the call's
            worst case is reserved first, and a call that cannot fit is not made.
        budget_tokens: The most tokens (input + output) one run may use, or `None`.
        deadline_s: The most seconds one run may take, or `None`. Whatever is in flight
            when it expires is cancelled; when the time left cannot fit another
            iteration (judged from the ones so far), the run goes to its best-effort
            answer instead.
        final_answer_on_limit: When a limit stops the run, make one last call with
            tools disabled asking for a best-effort answer (if the budget allows).
            `stop_reason` still names the limit.
    """

    __slots__ = ("budget_tokens", "budget_usd", "deadline_s", "final_answer_on_limit", "max_iterations")

    def __init__(self, *, max_iterations: int = 8, budget_usd: float | None = DEFAULT_BUDGET_USD,
                 budget_tokens: int | None = None, deadline_s: float | None = None,
                 final_answer_on_limit: bool = True,
                 **unsupported: Any) -> None:
        if unsupported:
            raise UserError(
                f"Limits got unknown option(s) {', '.join(sorted(unsupported))}; "
                "options: max_iterations, budget_usd, budget_tokens, deadline_s, final_answer_on_limit"
            )
        if type(max_iterations) is not int or max_iterations < 1:
            raise UserError(
                f"Limits(max_iterations={max_iterations!r}) must be an int >= 1 "
                "(the default, 8, suits most single tasks)"
            )
        if type(final_answer_on_limit) is not bool:
            raise UserError(f"Limits(final_answer_on_limit={final_answer_on_limit!r}) must be True or False")
        if budget_usd is not None and (isinstance(budget_usd, bool) or not isinstance(budget_usd, (int, float))
                                       or not 0 <= budget_usd < float("inf")):
            raise UserError(f"Limits(budget_usd={budget_usd!r}) must be a number of dollars >= 0, or None for no limit")
        if budget_tokens is not None and (type(budget_tokens) is not int or budget_tokens < 1):
            raise UserError(f"Limits(budget_tokens={budget_tokens!r}) must be an int >= 1, or None for no limit")
        if deadline_s is not None and (isinstance(deadline_s, bool) or not isinstance(deadline_s, (int, float))
                                       or not 0 < deadline_s < float("inf")):
            raise UserError(f"Limits(deadline_s={deadline_s!r}) must be a number of seconds > 0, or None")
        self.deadline_s = None if deadline_s is None else float(deadline_s)
        self.max_iterations = max_iterations
        self.budget_usd = None if budget_usd is None else float(budget_usd)
        self.budget_tokens = budget_tokens
        self.final_answer_on_limit = final_answer_on_limit

    def __repr__(self) -> str:
        return (f"Limits(max_iterations={self.max_iterations}, budget_usd={self.budget_usd!r}, "
                f"budget_tokens={self.budget_tokens!r}, deadline_s={self.deadline_s!r}, "
                f"final_answer_on_limit={self.final_answer_on_limit})")

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Limits) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]

    def to_dict(self) -> dict[str, Any]:
        return {"max_iterations": self.max_iterations, "budget_usd": self.budget_usd,
                "budget_tokens": self.budget_tokens, "deadline_s": self.deadline_s,
                "final_answer_on_limit": self.final_answer_on_limit}
