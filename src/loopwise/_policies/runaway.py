"""Runaway detection: the CHECK that catches a loop which will not end on its own.

The seed post's Saturday night: "each loop concluded there was more work to do", the
context grew, and $47 went before anyone noticed. The iteration cap and the budget stop
such a run eventually; this stops it as soon as it is recognisable, from three signals:

- `repeated_call`: the same tool with the same arguments (canonical JSON) called
  `repeat_calls` times in the run (default 3).
- `no_new_information`: `stale_iterations` iterations in a row (default 3) whose tool
  results were all seen before in the run (compared by a hash of their text); an
  iteration without tool results brings nothing new either.
- `context_growth`: `growth_iterations` iterations in a row (default 3) whose input
  tokens grew at least `growth_factor` times (default 1.5x) over the previous
  iteration's, once past `growth_min_tokens` (default 1,000); or whose cost grew that
  fast, once past `growth_min_cost_usd` (default $0.01). An agent appending results of
  about the same size grows linearly and never trips it: the ratio decays towards 1.

The first time a signal fires the verdict's action is ``"nudge"``: the loop adds a user
message telling the model what it is repeating and to answer or change approach. The
next time any signal fires (from the very next iteration on) the action is ``"stop"``:
the loop ends the run with stop reason `runaway`. The seed's loop (the same call, the
same result, every iteration) is nudged at iteration 3 and stopped at iteration 4.

`RunawayDetector` is configuration an agent shares across its runs; each run gets its
own `RunawayMonitor` from `detector.start()`. The monitor is a deterministic function of
what it was shown, so a resumed run rebuilds it by replaying its logged iterations.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

from .._errors import UserError
from .._messages import ToolCall

__all__ = ["RunawayDetector", "RunawayMonitor", "RunawaySignal", "RunawayVerdict", "canonical_call"]

RunawaySignal = Literal["repeated_call", "no_new_information", "context_growth"]

_CLOSING = (
    "Give your final answer now from what you already know, or take a clearly different approach. "
    "If this happens again, the run will be stopped."
)


def canonical_call(call: ToolCall) -> str:
    """A tool call as canonical JSON: its name and its arguments with sorted keys.

    Arguments sent as a JSON string are parsed first, so ``'{"b": 1, "a": 2}'`` and
    ``{"a": 2, "b": 1}`` are the same call; a string that is not JSON is kept as is.
    """
    arguments: Any = call.arguments
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except (ValueError, RecursionError):  # (not JSON; nested too deep to parse)
            pass
    # (Arguments are a str or a dict with str keys: the loop puts a response in the log's
    # types before anything reads it, `_runtime.loggable.loggable`.)
    return _canonical_json([str(call.name), arguments])


def _make_canonical_json() -> Callable[[Any], str]:
    """`json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)`.

    Every tool call is encoded once, so this skips `json.dumps`'s Python layers: the
    stdlib's C encoder, made once with the arguments `JSONEncoder.iterencode` gives it.
    Where that encoder is missing or does not write the same bytes as `JSONEncoder` for
    a probe, the `JSONEncoder` itself (made once).
    """
    encoder = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str).encode
    from json.encoder import (  # type: ignore[attr-defined]  # (typeshed omits the C encoder; None without _json)
        c_make_encoder,
        encode_basestring,
    )

    if c_make_encoder is None:  # pragma: no cover - a Python without the _json accelerator
        return encoder

    # Made once, with no memo of the containers being encoded (`markers=None`): a memo
    # shared by every call would keep the ids of a failed encoding's containers. A value
    # that contains itself fails with RecursionError instead of "Circular reference".
    encode = c_make_encoder(None, str, encode_basestring, None, ":", ",", True, False, True)

    def canonical(value: Any, _encode: Any = encode, _join: Callable[[Any], str] = "".join) -> str:
        return _join(_encode(value, 0))

    probe = ["tool", {"b": [1, 2.5, None, True, "é\n\"x\""], "a": float("nan"), "c": {"z": 1, "y": object()}}]
    try:
        if canonical(probe) != encoder(probe):  # pragma: no cover - another Python's encoder
            return encoder
    except Exception:  # noqa: BLE001  # pragma: no cover - its signature changed
        return encoder
    return canonical


_canonical_json = _make_canonical_json()


#: Texts up to this long are their own key in the monitor's memory; longer ones (a tool's
#: 20,000-character result) are kept as a 16-byte digest.
_KEY_AS_IS = 64


def _digest(text: str, _blake2b: Any = hashlib.blake2b) -> bytes:
    return _blake2b(text.encode("utf-8", "surrogatepass"), digest_size=16).digest()


def _key(text: str) -> str | bytes:
    """What the monitor remembers of `text`: itself when short, else its digest (never equal across the two)."""
    return text if len(text) <= _KEY_AS_IS else _digest(text)


def _short(text: str, limit: int = 120) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


@dataclass(kw_only=True, slots=True, frozen=True)
class RunawayVerdict:
    """What the monitor concluded after an iteration.

    Attributes:
        signal: Which signal fired (the first in the order repeated_call,
            no_new_information, context_growth when several do).
        action: ``"nudge"`` the first time (add `nudge` as a user message), ``"stop"``
            after that (end the run with stop reason `runaway`, `message` as its detail).
        message: One sentence for the log and the stop detail.
        nudge: The user message for the model, naming what it repeats.
        iteration: The monitor's count of observed iterations when it fired.
        details: The signal's data, for the event (tool and arguments and count;
            streak; the series of input tokens or costs).
    """

    signal: RunawaySignal
    action: Literal["nudge", "stop"]
    message: str
    nudge: str
    iteration: int
    details: dict[str, Any] = field(default_factory=dict)

    @property
    def first_warning(self) -> bool:
        """True for the nudge, False for the stop."""
        return self.action == "nudge"


class RunawayDetector:
    """Settings of runaway detection; `Agent(runaway=RunawayDetector(...))`.

    Args:
        repeat_calls: Flag the same tool called with the same arguments this many
            times in a run (>= 2; None: off). Raise it, or turn it off, for an agent
            that legitimately polls a tool.
        stale_iterations: Flag this many iterations in a row that brought no tool
            result not seen before in the run (>= 1; None: off).
        growth_factor: Flag input tokens (or cost) per iteration growing at least this
            many times per iteration (> 1; None: off) ...
        growth_iterations: ... for this many iterations in a row (>= 1).
        growth_min_tokens: Token growth counts only once an iteration's input reaches
            this many tokens (small contexts grow fast in ratio and cost nothing).
        growth_min_cost_usd: Cost growth counts only once an iteration costs this much.
        enabled: False: never flag anything.
    """

    __slots__ = ("enabled", "growth_factor", "growth_iterations", "growth_min_cost_usd", "growth_min_tokens",
                 "repeat_calls", "stale_iterations")

    def __init__(
        self,
        *,
        repeat_calls: int | None = 3,
        stale_iterations: int | None = 3,
        growth_factor: float | None = 1.5,
        growth_iterations: int = 3,
        growth_min_tokens: int = 1_000,
        growth_min_cost_usd: float = 0.01,
        enabled: bool = True,
    ) -> None:
        if repeat_calls is not None and (type(repeat_calls) is not int or repeat_calls < 2):
            raise UserError(f"RunawayDetector(repeat_calls={repeat_calls!r}) must be an int >= 2 "
                            "(the same call this many times is flagged) or None to turn the signal off")
        if stale_iterations is not None and (type(stale_iterations) is not int or stale_iterations < 1):
            raise UserError(f"RunawayDetector(stale_iterations={stale_iterations!r}) must be an int >= 1 "
                            "or None to turn the signal off")
        if growth_factor is not None and (
            isinstance(growth_factor, bool) or not isinstance(growth_factor, (int, float))
            or not growth_factor > 1
            or growth_factor == float("inf")
        ):
            raise UserError(f"RunawayDetector(growth_factor={growth_factor!r}) must be a number > 1 "
                            "(1.5: each iteration at least 1.5x the previous) or None to turn the signal off")
        if type(growth_iterations) is not int or growth_iterations < 1:
            raise UserError(f"RunawayDetector(growth_iterations={growth_iterations!r}) must be an int >= 1")
        if type(growth_min_tokens) is not int or growth_min_tokens < 0:
            raise UserError(f"RunawayDetector(growth_min_tokens={growth_min_tokens!r}) must be an int >= 0")
        if (isinstance(growth_min_cost_usd, bool) or not isinstance(growth_min_cost_usd, (int, float))
                or not growth_min_cost_usd >= 0):
            raise UserError(f"RunawayDetector(growth_min_cost_usd={growth_min_cost_usd!r}) must be a number >= 0")
        if type(enabled) is not bool:
            raise UserError(f"RunawayDetector(enabled={enabled!r}) must be True or False")
        self.repeat_calls = repeat_calls
        self.stale_iterations = stale_iterations
        self.growth_factor = None if growth_factor is None else float(growth_factor)
        self.growth_iterations = growth_iterations
        self.growth_min_tokens = growth_min_tokens
        self.growth_min_cost_usd = float(growth_min_cost_usd)
        self.enabled = enabled

    def start(self) -> RunawayMonitor:
        """A fresh monitor for one run."""
        return RunawayMonitor(self)

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in (
            "repeat_calls", "stale_iterations", "growth_factor", "growth_iterations", "growth_min_tokens",
            "growth_min_cost_usd", "enabled")}

    def __repr__(self) -> str:
        return "RunawayDetector(" + ", ".join(f"{k}={v!r}" for k, v in self.to_dict().items()) + ")"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, RunawayDetector) and self.to_dict() == other.to_dict()

    __hash__ = None  # type: ignore[assignment]


class RunawayMonitor:
    """One run's runaway detection: feed it every iteration that did not end the run."""

    __slots__ = ("_call_counts", "_cost_streak", "_costs", "_seen", "_stale_streak", "_token_streak", "_tokens",
                 "detector", "iterations", "warned_at", "stopped")

    def __init__(self, detector: RunawayDetector) -> None:
        self.detector = detector
        self.iterations = 0
        #: The observed iteration that got the nudge, or None.
        self.warned_at: int | None = None
        self.stopped = False
        self._call_counts: dict[str | bytes, int] = {}
        self._seen: set[str | bytes] = set()
        self._stale_streak = 0
        self._tokens: list[int] = []
        self._costs: list[float] = []
        self._token_streak = 0
        self._cost_streak = 0

    def observe_iteration(self, calls: Sequence[ToolCall], results: Sequence[str], input_tokens: int,
                          cost_usd: float) -> RunawayVerdict | None:
        """Record one iteration; a verdict when a signal fires, else None.

        Args:
            calls: The tool calls the model asked for (empty for an iteration without).
            results: The tool messages' contents (results, errors, fallback notes).
            input_tokens: The input tokens of the iteration's THINK call.
            cost_usd: What the iteration cost in all (model calls and tools).
        """
        self.iterations += 1
        d = self.detector
        if not d.enabled:
            return None
        repeated = self._repeated(calls)
        stale = self._stale(results)
        growth = self._growth(input_tokens, cost_usd)
        if repeated is None and stale is None and growth is None:
            return None  # nearly every iteration: no list made
        fired = [f for f in (repeated, stale, growth) if f is not None]
        signal, message, nudge, details = fired[0]
        if len(fired) > 1:
            details = {**details, "also": [f[0] for f in fired[1:]]}
        if self.warned_at is None:
            self.warned_at = self.iterations
            action: Literal["nudge", "stop"] = "nudge"
        else:
            self.stopped = True
            action = "stop"
            message = f"{message}, after a warning at iteration {self.warned_at}"
        return RunawayVerdict(signal=signal, action=action, message=message, nudge=nudge,
                              iteration=self.iterations, details=details)

    # -- the signals -----------------------------------------------------------------

    def _repeated(self, calls: Sequence[ToolCall]) -> tuple[RunawaySignal, str, str, dict[str, Any]] | None:
        counts = self._call_counts
        worst = 0
        worst_call: ToolCall | None = None
        worst_text = ""
        for call in calls:
            text = canonical_call(call)
            key = _key(text)
            count = counts.get(key, 0) + 1
            counts[key] = count
            if count > worst:
                worst, worst_call, worst_text = count, call, text
        k = self.detector.repeat_calls
        if k is None or worst_call is None or worst < k:
            return None
        count, call, text = worst, worst_call, worst_text
        arguments = _short(_arguments_of(text))
        message = f"{call.name} was called {count} times with the same arguments {arguments}"
        nudge = (f"Runtime check: you have called {call.name} with the same arguments {arguments} {count} times "
                 f"in this run, and repeating it will not tell you anything new. {_CLOSING}")
        return "repeated_call", message, nudge, {"tool": str(call.name), "arguments": arguments, "count": count}

    def _stale(self, results: Sequence[str]) -> tuple[RunawaySignal, str, str, dict[str, Any]] | None:
        new = False
        seen = self._seen
        for content in results:
            key = _key(content if isinstance(content, str) else str(content))
            if key not in seen:
                seen.add(key)
                new = True
        self._stale_streak = 0 if new else self._stale_streak + 1
        k = self.detector.stale_iterations
        if k is None or self._stale_streak < k:
            return None
        n = self._stale_streak
        message = (f"{n} iterations in a row brought no new information "
                   "(every tool result repeated an earlier one, or there was none)")
        nudge = (f"Runtime check: your last {n} iterations brought no new information: every tool result "
                 f"repeated one you had already seen. {_CLOSING}")
        return "no_new_information", message, nudge, {"streak": n}

    def _growth(self, input_tokens: int, cost_usd: float) -> tuple[RunawaySignal, str, str, dict[str, Any]] | None:
        d = self.detector
        factor = d.growth_factor
        tokens, costs = self._tokens, self._costs
        if factor is not None:
            if tokens:
                grew = input_tokens >= d.growth_min_tokens and input_tokens >= factor * tokens[-1] > 0
                self._token_streak = self._token_streak + 1 if grew else 0
            if costs:
                grew = cost_usd >= d.growth_min_cost_usd and cost_usd > 0 and cost_usd >= factor * costs[-1] > 0
                self._cost_streak = self._cost_streak + 1 if grew else 0
        tokens.append(input_tokens)
        costs.append(cost_usd)
        keep = d.growth_iterations + 1
        del tokens[:-keep], costs[:-keep]
        if factor is None:
            return None
        k = d.growth_iterations
        if self._token_streak >= k:
            series = tokens[-(k + 1):]
            shown = " -> ".join(f"{t:,}" for t in series)
            what = f"input tokens ({shown})"
            details = {"measure": "input_tokens", "series": series, "streak": self._token_streak}
        elif self._cost_streak >= k:
            series_c = costs[-(k + 1):]
            shown = " -> ".join(f"${c:.4f}" for c in series_c)
            what = f"cost per iteration ({shown})"
            details = {"measure": "cost_usd", "series": series_c, "streak": self._cost_streak}
        else:
            return None
        n = details["streak"]
        message = f"{what} grew at least {factor:g}x per iteration for {n} iterations in a row"
        nudge = (f"Runtime check: the work per iteration has grown at least {factor:g}x each time for {n} "
                 f"iterations in a row, and gathering more context is not converging. {_CLOSING}")
        return "context_growth", message, nudge, {**details, "factor": factor}


def _arguments_of(canonical: str) -> str:
    """The arguments part of `canonical_call`'s JSON, as compact JSON."""
    arguments = json.loads(canonical)[1]
    return arguments if isinstance(arguments, str) else json.dumps(arguments, sort_keys=True, ensure_ascii=False)
