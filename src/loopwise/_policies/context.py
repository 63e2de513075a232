"""Context policies: what each THINK is shown (the loop's REFINE step).

The transcript a run keeps is append-only. A policy never edits it; it decides which
part of it the next model request shows:

```
transcript:  [instructions, task...] [unit 0] [unit 1] ... [unit n-2] [unit n-1]
             └──────── head ───────┘ └── folded ──┘        └─ last keep_last ─┘
request:     [instructions, task...] [summary]             [unit n-2] [unit n-1]
```

The *head* (the instructions and the task's messages) always stays. After it the
transcript is cut into *units*, one per iteration: an assistant message with all of its
tool messages, plus the nudges that follow. A unit is never split, since providers
reject a tool result whose call is missing. The last `keep_last` units stay verbatim;
older ones are *folded*: merged into a running summary, one model call per fold, each
unit exactly once, or dropped with a note when `summarize=False`.

A policy is configuration shared by every run of an agent; a run's part lives in a
`ContextState`. The loop stays in control of model calls (budget, retries, events):

```python
state = policy.start(head=len(transcript))
...
plan = policy.plan(transcript, state)           # pure: which units leave now, and why
if plan.fold:
    request = policy.summary_request(state.summary, plan.fold)  # tools=[]
    response = ...                              # the loop's own call, under its budget
    result = policy.apply_summary(state, response.text, plan.fold, usage=..., cost_usd=...)
messages = policy.messages(transcript, state)   # what THINK is shown
```

`fold(units, model, state)` does the middle three steps in one await, for code
without a budget of its own (tests, scripts).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import UserError
from .._messages import Message, Usage
from ..models._base import Model, ModelRequest

__all__ = [
    "ContextPlan",
    "ContextPolicy",
    "ContextState",
    "FullContext",
    "SlidingWindow",
    "SummaryResult",
    "Unit",
    "estimate_tokens",
    "split_units",
]

SUMMARY_PREFIX = "Summary of earlier iterations: "
SUMMARY_SYSTEM_PROMPT = (
    "You keep the running summary of an AI agent's earlier steps, which are being removed from "
    "its context window. Merge the new steps below into the previous summary. Keep every fact, "
    "identifier, number, decision and failure (with its cause) that the agent may still need; "
    "drop pleasantries and repetition. Write terse plain text, under {words} words. "
    "Answer with the updated summary only."
)


def estimate_tokens(message: Message) -> int:
    """A rough token count of one message: UTF-8 bytes / 4, plus 4 for its framing."""
    size = len(message.content.encode()) if message.content else 0
    for call in message.tool_calls:
        size += len(str(call.name).encode()) + len(_arguments_text(call.arguments).encode())
    return 4 + size // 4


def _arguments_text(arguments: Any) -> str:
    if isinstance(arguments, str):
        return arguments
    import json

    try:
        return json.dumps(arguments, ensure_ascii=False, sort_keys=True, default=str)
    except (TypeError, ValueError):
        return str(arguments)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


@dataclass(frozen=True, slots=True)
class Unit:
    """One iteration's part of the transcript: an assistant message, its tool messages and
    the nudges after them (or, before the first assistant message, the nudges alone).

    `index` counts units from 0 after the head; `start` is the position of its first
    message in the transcript.
    """

    index: int
    start: int
    messages: tuple[Message, ...]

    @property
    def end(self) -> int:
        """The transcript position just after this unit."""
        return self.start + len(self.messages)

    @property
    def tool_call_ids(self) -> tuple[str, ...]:
        return tuple(c.id for m in self.messages for c in m.tool_calls if c.id is not None)

    def render(self) -> str:
        """The unit as plain text, for the summary model."""
        names: dict[str | None, str] = {}
        lines = [f"Step {self.index + 1}:"]
        for m in self.messages:
            if m.role == "assistant":
                if m.content:
                    lines.append(f"assistant: {m.content}")
                for call in m.tool_calls:
                    names[call.id] = str(call.name)
                    lines.append(f"assistant called {call.name}({_arguments_text(call.arguments)}) [id {call.id}]")
            elif m.role == "tool":
                name = names.get(m.tool_call_id, "tool")
                lines.append(f"result of {name} [id {m.tool_call_id}]: {m.content or ''}")
            else:
                lines.append(f"{m.role}: {m.content or ''}")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class ContextPlan:
    """What REFINE must do before the next model call: `fold` these units (oldest first;
    empty most of the time), for `reason`."""

    fold: tuple[Unit, ...] = ()
    reason: str | None = None


@dataclass(kw_only=True, slots=True)
class ContextState:
    """A run's side of a context policy; plain data, rebuilt from `to_dict()` on resume.

    Attributes:
        head: How many messages at the start of the transcript always stay.
        start: The transcript position where the verbatim part begins (after the head
            and every folded unit).
        folded: Units folded so far (summarized or dropped).
        summarized: Of those, how many the running summary covers.
        dropped: Of those, how many were dropped without a summary.
        summary: The running summary, or None before the first one.
        summary_calls: Summary model calls made (each folds one batch of units).
        usage: Tokens of the summary calls, added up.
        cost_usd: Their cost.
    """

    head: int
    start: int
    folded: int = 0
    summarized: int = 0
    dropped: int = 0
    summary: str | None = None
    summary_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "head": self.head, "start": self.start, "folded": self.folded, "summarized": self.summarized,
            "dropped": self.dropped, "summary": self.summary, "summary_calls": self.summary_calls,
            "usage": {"input_tokens": self.usage.input_tokens, "output_tokens": self.usage.output_tokens,
                      "cached_input_tokens": self.usage.cached_input_tokens,
                      "reasoning_tokens": self.usage.reasoning_tokens},
            "cost_usd": self.cost_usd,
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ContextState:
        data = dict(data)
        data["usage"] = Usage(**data.get("usage", {}))
        return cls(**data)


@dataclass(kw_only=True, slots=True, frozen=True)
class SummaryResult:
    """What one fold did; the loop records it as the `summary` event.

    Attributes:
        outcome: ``"summarized"`` (merged into the running summary) or ``"dropped"``
            (removed with a note: `summarize=False`, or the summary model gave no text).
        units: The indexes of the units that left the context.
        n_messages: How many transcript messages they hold.
        tool_call_ids: The tool calls among them.
        summary: The running summary after this fold (None if there is none yet).
        reason: Why they left.
        usage: The summary call's tokens (None: no call, or the loop counts them itself).
        cost_usd: The summary call's cost.
        folded: Units folded in the run so far, this fold included.
        start: The transcript position where the verbatim part now begins.
    """

    outcome: Literal["summarized", "dropped"]
    units: tuple[int, ...]
    n_messages: int
    tool_call_ids: tuple[str, ...]
    summary: str | None
    reason: str
    usage: Usage | None = None
    cost_usd: float = 0.0
    folded: int
    start: int


class ContextPolicy(ABC):
    """The interface the loop drives at REFINE. `FullContext` and `SlidingWindow` implement it."""

    __slots__ = ()

    summarize: bool = False
    summary_model: Model | None = None
    summary_max_tokens: int = 300
    #: Whether the policy may ever drop messages (False: the loop skips REFINE entirely).
    folds: bool = True

    def start(self, *, head: int) -> ContextState:
        """A fresh state for a run whose first `head` transcript messages always stay."""
        if type(head) is not int or head < 0:
            raise ValueError(f"head must be an int >= 0, got {head!r}")
        return ContextState(head=head, start=head)

    @abstractmethod
    def plan(self, transcript: Sequence[Message], state: ContextState) -> ContextPlan:
        """Which units must leave the context before the next model call. Pure."""

    def messages(self, transcript: Sequence[Message], state: ContextState) -> list[Message]:
        """The messages of the next model request: head, summary or note, verbatim units."""
        head = list(transcript[: state.head])
        note = self._note(state)
        if note is not None:
            head.append(Message("system", note))
        head.extend(transcript[state.start :])
        return head

    def describe(self) -> dict[str, Any]:
        """What the run-started event records about this policy."""
        return {"class": type(self).__name__}

    # -- folding ---------------------------------------------------------------------

    def summary_request(self, previous_summary: str | None, units: Sequence[Unit]) -> ModelRequest:
        """The one model call that merges `units` into `previous_summary` (no tools)."""
        if not units:
            raise ValueError("summary_request needs at least one unit")
        words = max(20, self.summary_max_tokens * 2 // 3)
        steps = "\n\n".join(u.render() for u in units)
        content = (
            f"Previous summary:\n{previous_summary or '(none yet)'}\n\n"
            f"New steps to merge into it:\n{steps}"
        )
        return ModelRequest(
            messages=[Message("system", SUMMARY_SYSTEM_PROMPT.format(words=words)), Message("user", content)],
            tools=[],
            max_tokens=self.summary_max_tokens,
        )

    def apply_summary(self, state: ContextState, text: str | None, units: Sequence[Unit], *,
                      usage: Usage | None = None, cost_usd: float = 0.0,
                      reason: str | None = None) -> SummaryResult:
        """Record the summary model's answer `text` for `units`: it becomes the running summary.

        `usage` and `cost_usd` (the call's, if known) are added to the state. A blank
        `text` keeps the previous summary and drops the units with a note instead.
        """
        self._check_next(state, units)
        state.summary_calls += 1
        if usage is not None:
            state.usage.add(usage)
        state.cost_usd += cost_usd
        if text is None or not text.strip():
            return self._drop(state, units, "the summary model returned no text", usage, cost_usd)
        n = len(units)
        state.summary = text.strip()
        state.summarized += n
        return self._advance(state, units, "summarized", reason or "folded into the running summary",
                             usage, cost_usd)

    def apply_drop(self, state: ContextState, units: Sequence[Unit], reason: str | None = None) -> SummaryResult:
        """Drop `units` without a summary (the summary call failed or could not be paid for)."""
        self._check_next(state, units)
        return self._drop(state, units, reason or "dropped without a summary", None, 0.0)

    async def fold(self, units: Sequence[Unit], model: Model, state: ContextState, *,
                   reason: str | None = None) -> SummaryResult:
        """Fold `units` in one step: call `summary_model` (or `model`) and apply its answer.

        The loop makes the call itself (`summary_request` + `apply_summary`) to hold it
        to the run's budget and policy; this is for code that has neither. Model errors
        propagate; the state is unchanged then.
        """
        if not self.summarize:
            return self.apply_drop(state, units, reason)
        self._check_next(state, units)
        model = self.summary_model or model
        request = self.summary_request(state.summary, units)
        response = await model.request(request)
        usage = response.usage
        if usage is None:
            usage = Usage(sum(estimate_tokens(m) for m in request.messages),
                          estimate_tokens(Message("assistant", response.text)))
        cost = model.price.cost(usage) if model.price is not None else 0.0
        return self.apply_summary(state, response.text, units, usage=usage, cost_usd=cost, reason=reason)

    # -- internals -------------------------------------------------------------------

    def _note(self, state: ContextState) -> str | None:
        if state.folded == 0:
            return None
        parts = []
        if state.summary is not None:
            parts.append(SUMMARY_PREFIX + state.summary)
        if state.dropped:
            verb = "was" if state.dropped == 1 else "were"
            parts.append(f"{_plural(state.dropped, 'earlier iteration')} {verb} dropped from the context "
                         "to keep it small; their details are no longer available.")
        return "\n\n".join(parts)

    @staticmethod
    def _check_next(state: ContextState, units: Sequence[Unit]) -> None:
        if not units:
            raise ValueError("there are no units to fold")
        expected_index, expected_start = state.folded, state.start
        for u in units:
            if u.index != expected_index or u.start != expected_start:
                raise ValueError(
                    f"unit {u.index} (at {u.start}) is not the next one to fold (unit {expected_index} "
                    f"at {expected_start}): units are folded once each, oldest first"
                )
            expected_index, expected_start = u.index + 1, u.end

    def _drop(self, state: ContextState, units: Sequence[Unit], reason: str,
              usage: Usage | None, cost_usd: float) -> SummaryResult:
        state.dropped += len(units)
        return self._advance(state, units, "dropped", reason, usage, cost_usd)

    @staticmethod
    def _advance(state: ContextState, units: Sequence[Unit], outcome: Literal["summarized", "dropped"],
                 reason: str, usage: Usage | None, cost_usd: float) -> SummaryResult:
        state.folded += len(units)
        state.start = units[-1].end
        return SummaryResult(
            outcome=outcome,
            units=tuple(u.index for u in units),
            n_messages=sum(len(u.messages) for u in units),
            tool_call_ids=tuple(i for u in units for i in u.tool_call_ids),
            summary=state.summary,
            reason=reason,
            usage=usage,
            cost_usd=cost_usd,
            folded=state.folded,
            start=state.start,
        )


def split_units(transcript: Sequence[Message], start: int, first_index: int = 0) -> list[Unit]:
    """Cut `transcript[start:]` into units: a new one begins at each assistant message."""
    if not 0 <= start <= len(transcript):
        raise ValueError(f"start {start} is outside the transcript of {len(transcript)} messages")
    units: list[Unit] = []
    begin = start
    for i in range(start + 1, len(transcript)):
        if transcript[i].role == "assistant":
            units.append(Unit(first_index + len(units), begin, tuple(transcript[begin:i])))
            begin = i
    if begin < len(transcript):
        units.append(Unit(first_index + len(units), begin, tuple(transcript[begin:])))
    return units


class FullContext(ContextPolicy):
    """Show the model the whole transcript, every time (the naive append).

    The default policy: the loop always asks a policy, and this one never folds.
    """

    __slots__ = ()
    folds = False

    def plan(self, transcript: Sequence[Message], state: ContextState) -> ContextPlan:
        return ContextPlan()

    def __repr__(self) -> str:
        return "FullContext()"

    def __eq__(self, other: object) -> bool:
        return type(other) is FullContext

    __hash__ = object.__hash__


class SlidingWindow(ContextPolicy):
    """Keep the last `keep_last` iterations verbatim; fold older ones into a running summary.

    The seed post's rule 03: "keep only the last 2 iterations in full, summarize the
    rest" — incrementally, so each iteration is summarized once, by one small call that
    merges it into the previous summary. The instructions and the task always stay; an
    assistant message and its tool results always stay or go together.

    Args:
        keep_last: Iterations shown verbatim (>= 1: the model always sees the results of
            its last tool calls).
        summarize: True: fold evicted iterations into a running summary (a system
            message after the task). False: drop them, with a note saying how many.
        summary_model: The model that writes summaries (a `Model` or a string such as
            ``"openai:gpt-4o-mini"``); default: the agent's model. A small, cheap one fits.
        max_context_tokens: Also evict older iterations while the context's estimate is
            above this (down to the last iteration, which always stays). The estimate
            counts the messages (not the tool specs), with the summary at
            `summary_max_tokens`.
        summary_max_tokens: The `max_tokens` of each summary call; the prompt asks for
            about two thirds of it in words.
        token_estimator: Tokens of one message for `max_context_tokens` (default:
            UTF-8 bytes / 4 + 4).
    """

    __slots__ = ("keep_last", "max_context_tokens", "summarize", "summary_max_tokens", "summary_model",
                 "token_estimator")

    def __init__(
        self,
        keep_last: int = 2,
        *,
        summarize: bool = True,
        summary_model: Model | str | None = None,
        max_context_tokens: int | None = None,
        summary_max_tokens: int = 300,
        token_estimator: Callable[[Message], int] | None = None,
    ) -> None:
        if type(keep_last) is not int or keep_last < 1:
            raise UserError(
                f"SlidingWindow(keep_last={keep_last!r}) must be an int >= 1: the model must see "
                "the results of its last iteration (default: 2)"
            )
        if type(summarize) is not bool:
            raise UserError(f"SlidingWindow(summarize={summarize!r}) must be True or False")
        if summary_model is not None and not isinstance(summary_model, Model):
            if not isinstance(summary_model, str):
                raise UserError(
                    f"SlidingWindow(summary_model=...) must be a Model instance, a string like "
                    f"'openai:gpt-4o-mini', or None (the agent's model), got {type(summary_model).__name__}"
                )
            from ..models._resolve import resolve_model

            summary_model = resolve_model(summary_model, max_retries=0)
        if summary_model is not None and not summarize:
            raise UserError("SlidingWindow(summary_model=...) was given with summarize=False, which makes "
                            "no summary calls; remove one of them")
        if max_context_tokens is not None and (type(max_context_tokens) is not int or max_context_tokens < 1):
            raise UserError(f"SlidingWindow(max_context_tokens={max_context_tokens!r}) must be an int >= 1 "
                            "or None (no token cap: only keep_last applies)")
        if type(summary_max_tokens) is not int or summary_max_tokens < 16:
            raise UserError(f"SlidingWindow(summary_max_tokens={summary_max_tokens!r}) must be an int >= 16 "
                            "(a useful summary takes ~200 tokens; default 300)")
        if token_estimator is not None and not callable(token_estimator):
            raise UserError(f"SlidingWindow(token_estimator=...) must be a function Message -> int, "
                            f"got {type(token_estimator).__name__}")
        self.keep_last = keep_last
        self.summarize = summarize
        self.summary_model = summary_model
        self.max_context_tokens = max_context_tokens
        self.summary_max_tokens = summary_max_tokens
        self.token_estimator = token_estimator or estimate_tokens

    def plan(self, transcript: Sequence[Message], state: ContextState) -> ContextPlan:
        units = split_units(transcript, state.start, state.folded)
        n = max(0, len(units) - self.keep_last)
        reason = f"older than the last {_plural(self.keep_last, 'iteration')}" if n else None
        cap = self.max_context_tokens
        if cap is not None:
            estimate = self._estimate(transcript, state, units, n)
            if estimate > cap and n < len(units) - 1:
                reason = f"the context estimate of {estimate:,} tokens is over max_context_tokens={cap:,}"
                while estimate > cap and n < len(units) - 1:
                    n += 1
                    estimate = self._estimate(transcript, state, units, n)
        return ContextPlan(tuple(units[:n]), reason)

    def _estimate(self, transcript: Sequence[Message], state: ContextState, units: list[Unit], n: int) -> int:
        estimator = self.token_estimator
        total = sum(estimator(m) for m in transcript[: state.head])
        if state.folded or n:
            # The note after the head: a summary of up to summary_max_tokens, or a short line.
            total += self.summary_max_tokens if self.summarize else 40
        return total + sum(estimator(m) for u in units[n:] for m in u.messages)

    def describe(self) -> dict[str, Any]:
        return {
            "class": "SlidingWindow",
            "keep_last": self.keep_last,
            "summarize": self.summarize,
            "summary_model": None if self.summary_model is None else self.summary_model.name,
            "max_context_tokens": self.max_context_tokens,
            "summary_max_tokens": self.summary_max_tokens,
        }

    def __repr__(self) -> str:
        d = self.describe()
        return "SlidingWindow(" + ", ".join(f"{k}={d[k]!r}" for k in list(d)[1:]) + ")"

    def __eq__(self, other: object) -> bool:
        return (type(other) is SlidingWindow and self.describe() == other.describe()
                and self.summary_model is other.summary_model and self.token_estimator == other.token_estimator)

    __hash__ = None  # type: ignore[assignment]

