"""A tool's policy: how long one attempt may take, how often to retry, what answers
when the tool cannot, and when to stop calling it.

| knob | bounds | default | when it expires |
|---|---|---|---|
| `timeout` | one attempt | 30 s | the attempt is cancelled (async) or abandoned (sync, in a daemon thread) or killed (`isolation="process"`); it counts as a failure and may be retried |
| `retries` | extra attempts after a failure | 0 | after the last attempt, the fallback chain is tried |
| `retry_on` | which failures are retried | any exception or timeout | other failures go to the fallback at once |
| `backoff` | the wait between attempts | 0.2 s, doubling, at most 5 s, full jitter | - |
| `total_timeout` | all attempts, backoff and the fallback chain together | derived: attempts × timeout + backoff + fallbacks' own | whatever is still running is cancelled; a plain-value fallback still answers, else the model reads the error |
| `fallback` | what answers after the last failure | none | a value, a `Template`, a tool or callable taking the same arguments, or a list tried in order |
| `breaker` | calls to a tool whose infrastructure keeps failing | 5 timeouts, connection errors or transient errors in 60 s open it for 30 s (business errors do not count) | calls go straight to the fallback, or fail fast |
| `max_result_chars` | what the model reads from one result | 20,000 | the rest is cut, with a note saying so |

`cost_usd` is dollars per attempt. `max_cost_usd()` is the most one call may spend: each
attempt, and each paid fallback its chain can reach; the loop reserves it on the run's
budgets before the call runs (`docs/budgets.md`).

`check(expected, actual) -> bool | None` bounds nothing: with `Agent(expectations=True)` it
decides whether a call's result matched the model's expectation (`docs/decisions.md`).
"""

from __future__ import annotations

import math
import string
from collections.abc import Callable
from abc import ABC
from dataclasses import dataclass, field
from typing import Any, Literal

from .breaker import CircuitBreaker
from .._runtime.clock import current_clock
from .._errors import UserError
from .expect import check_option

__all__ = ["Backoff", "Fallback", "Template", "ToolPolicy"]

DEFAULT_TIMEOUT_S = 30.0
DEFAULT_MAX_RESULT_CHARS = 20_000
#: How deep fallback tools nest: a fallback tool's own fallback tools run, to this depth;
#: deeper ones are skipped (and cost nothing).
MAX_FALLBACK_DEPTH = 3
Isolation = Literal["thread", "process"]


class Template:
    """A fallback answer filled from the call's arguments: `Template("no history for {customer_id}")`."""

    __slots__ = ("fields", "text")

    def __init__(self, text: str) -> None:
        if not isinstance(text, str):
            raise UserError(f"Template needs a str, got {type(text).__name__}")
        self.text = text
        try:
            self.fields = {f for _, f, _, _ in string.Formatter().parse(text) if f}
        except ValueError as exc:
            raise UserError(f"Template {text!r} is not a valid format string: {exc}") from None

    def render(self, arguments: dict[str, Any]) -> str:
        return self.text.format_map(_Missing(arguments))

    def __repr__(self) -> str:
        return f"Template({self.text!r})"


class _Missing(dict):
    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


@dataclass(kw_only=True, slots=True, frozen=True)
class Backoff:
    """Exponential backoff with full jitter between attempts."""

    initial_s: float = 0.2
    factor: float = 2.0
    max_s: float = 5.0
    jitter: bool = True

    def __post_init__(self) -> None:
        if self.initial_s < 0 or self.max_s < 0 or self.factor < 1:
            raise UserError(f"{self!r}: delays must be >= 0 and factor >= 1")

    def ceiling(self, retry: int) -> float:
        """The longest wait before retry number `retry` (1-based)."""
        return min(self.max_s, self.initial_s * self.factor ** (retry - 1))

    def delay(self, retry: int, rng: Callable[[], float] | None = None) -> float:
        """The wait before retry number `retry`: a random fraction of its ceiling (with jitter).

        `rng` returns a float in [0, 1) (default: the `random()` of the clock driving the
        running event loop, a `FakeClock`'s under one, else the system's).
        """
        ceiling = self.ceiling(retry)
        if not self.jitter:
            return ceiling
        return (rng or current_clock().random)() * ceiling


class ToolLike(ABC):  # noqa: B024 - a marker: `_tools.tool.Tool` registers as one
    """What a fallback names as a tool: `_tools.tool.Tool` registers itself (this module is below it)."""


@dataclass(kw_only=True, slots=True, frozen=True)
class Fallback:
    """One step of a fallback chain."""

    kind: Literal["value", "template", "tool", "callable"]
    label: str
    target: Any

    @classmethod
    def of(cls, spec: Any, owner: str) -> Fallback:
        if isinstance(spec, Template):
            return cls(kind="template", label="a template", target=spec)
        if isinstance(spec, ToolLike):
            return cls(kind="tool", label=spec.name, target=spec)  # type: ignore[attr-defined]
        if callable(spec) and not isinstance(spec, type):
            return cls(kind="callable", label=getattr(spec, "__name__", type(spec).__name__), target=spec)
        try:
            from pydantic_core import to_json

            to_json(spec)
        except Exception:
            raise UserError(
                f"tool {owner!r}: fallback {spec!r} is neither a JSON-able value, a Template, a tool "
                "nor a callable"
            ) from None
        return cls(kind="value", label="a default value", target=spec)


def _positive(owner: str, name: str, value: Any, *, allow_none: bool = True) -> float | None:
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise UserError(f"tool {owner!r}: {name}={value!r} must be a number of seconds > 0"
                        + (" or None" if allow_none else ""))
    return float(value)


@dataclass(kw_only=True, slots=True, frozen=True)
class ToolPolicy:
    timeout: float | None = DEFAULT_TIMEOUT_S
    total_timeout: float | None = None
    retries: int = 0
    retry_on: tuple[type[BaseException], ...] = (Exception,)
    backoff: Backoff = field(default_factory=Backoff)
    fallback: tuple[Fallback, ...] = ()
    idempotent: bool = False
    cost_usd: float = 0.0
    max_result_chars: int | None = DEFAULT_MAX_RESULT_CHARS
    isolation: Isolation | None = None
    alternatives: tuple[str, ...] = ()
    secret: tuple[str, ...] = ()
    breaker: CircuitBreaker | None = None
    #: Decides `match` in the decision log: check(expected, actual) -> bool | None.
    check: Callable[[Any, Any], bool | None] | None = None
    #: True when `total_timeout` was given, not derived.
    total_timeout_explicit: bool = False

    @property
    def attempts(self) -> int:
        return self.retries + 1

    @classmethod
    def build(cls, owner: str, *, timeout: Any = DEFAULT_TIMEOUT_S, total_timeout: Any = None,
              retries: Any = 0, retry_on: Any = None, backoff: Any = None, fallback: Any = None,
              idempotent: Any = False, cost_usd: Any = 0.0, max_result_chars: Any = DEFAULT_MAX_RESULT_CHARS,
              isolation: Any = None, alternatives: Any = (), secret: Any = (), breaker: Any = True,
              check: Any = None) -> ToolPolicy:
        timeout = _positive(owner, "timeout", timeout)
        total = _positive(owner, "total_timeout", total_timeout)
        if type(retries) is not int or retries < 0:
            raise UserError(f"tool {owner!r}: retries={retries!r} must be an int >= 0 (retries=1 means up to two attempts)")
        if retry_on is None:
            retry_on_t: tuple[type[BaseException], ...] = (Exception,)
        else:
            items = retry_on if isinstance(retry_on, (tuple, list)) else (retry_on,)
            if not items or not all(isinstance(t, type) and issubclass(t, Exception) for t in items):
                raise UserError(f"tool {owner!r}: retry_on={retry_on!r} must be exception types")
            retry_on_t = tuple(items)
        if backoff is None:
            backoff = Backoff()
        elif not isinstance(backoff, Backoff):
            raise UserError(f"tool {owner!r}: backoff= must be a loopwise.Backoff, got {type(backoff).__name__}")
        if fallback is None:
            chain: tuple[Fallback, ...] = ()
        elif isinstance(fallback, list):
            if not fallback:
                raise UserError(f"tool {owner!r}: fallback=[] is empty; leave it out for no fallback")
            chain = tuple(Fallback.of(f, owner) for f in fallback)
        else:
            chain = (Fallback.of(fallback, owner),)
        if type(idempotent) is not bool:
            raise UserError(f"tool {owner!r}: idempotent={idempotent!r} must be True or False")
        if (isinstance(cost_usd, bool) or not isinstance(cost_usd, (int, float)) or not math.isfinite(cost_usd)
                or cost_usd < 0):  # (a NaN or infinite cost no budget can weigh)
            raise UserError(f"tool {owner!r}: cost_usd={cost_usd!r} must be a finite number >= 0")
        if max_result_chars is not None and (type(max_result_chars) is not int or max_result_chars < 100):
            raise UserError(f"tool {owner!r}: max_result_chars={max_result_chars!r} must be an int >= 100 or None")
        if isolation not in (None, "thread", "process"):
            raise UserError(f"tool {owner!r}: isolation={isolation!r} must be 'thread', 'process' or None")
        alternatives = _names(owner, "alternatives", alternatives)
        secret = _names(owner, "secret", secret)
        if breaker is True:
            breaker_obj: CircuitBreaker | None = CircuitBreaker()
        elif breaker is False or breaker is None:
            breaker_obj = None
        elif isinstance(breaker, CircuitBreaker):
            breaker_obj = breaker
        else:
            raise UserError(f"tool {owner!r}: breaker= must be True, False or a loopwise.CircuitBreaker")
        check_fn = check_option(owner, check)
        policy = cls(timeout=timeout, total_timeout=total, retries=retries, retry_on=retry_on_t, backoff=backoff,
                     fallback=chain, idempotent=idempotent, cost_usd=float(cost_usd),
                     max_result_chars=max_result_chars, isolation=isolation, alternatives=alternatives,
                     secret=secret, breaker=breaker_obj, check=check_fn,
                     total_timeout_explicit=total is not None)
        if total is None:
            object.__setattr__(policy, "total_timeout", policy.derived_total_timeout())
        return policy

    def attempts_budget(self) -> float | None:
        """Worst-case time of all attempts and the waits between them."""
        if self.timeout is None:
            return None
        waits = sum(self.backoff.ceiling(r) for r in range(1, self.retries + 1))
        start_up = 0.0
        if self.isolation == "process":  # its start-up is not in its timeout (`_tools.isolation`): its bound is
            from .isolation import START_TIMEOUT_S  # (imported here: pickle and subprocess are not free)

            start_up = START_TIMEOUT_S
        return self.attempts * (self.timeout + start_up) + waits

    def fallback_reserve(self) -> float | None:
        """Time kept for the callable fallbacks of the chain (values and templates are free)."""
        reserve = 0.0
        for step in self.fallback:
            if step.kind == "tool":
                t = step.target.policy.total_timeout
                if t is None:
                    return None
                reserve += t
            elif step.kind == "callable":
                if self.timeout is None:
                    return None
                reserve += self.timeout
        return reserve

    def max_cost_usd(self, depth: int = 0) -> float:
        """The most one call may spend, in dollars: what its budgets reserve before it runs.

        Every attempt (`cost_usd` × attempts), plus what the fallback chain can spend as it
        runs: the steps are tried in order until one answers, so a fallback tool may fail
        after spending its own worst case (its attempts and its own fallbacks, nested down
        to `MAX_FALLBACK_DEPTH`, below which `execute` skips them) and the chain goes on; a
        callable costs nothing but may fail too, and so may a `Template` (a field the
        argument does not fit); a plain value always answers, so nothing after it is
        reached. `depth` is how deep this tool itself runs as a fallback.
        """
        worst = self.cost_usd * (self.retries + 1)
        for step in self.fallback:
            if step.kind == "value":
                break
            if step.kind == "tool" and depth < MAX_FALLBACK_DEPTH:
                worst += step.target.policy.max_cost_usd(depth + 1)
        return worst

    def cost_note(self, name: str) -> str:
        """What `max_cost_usd` is made of, for the message of a call it did not fit:
        ``"search: 2 attempts of $0.10 + up to $0.40 for fallback premium_search"``."""
        from .._policies.budget import _usd

        parts = [f"{_plural(self.attempts, 'attempt')} of {_usd(self.cost_usd)}" if self.cost_usd else "$0 itself"]
        for step in self.fallback:
            if step.kind == "value":
                break
            if step.kind == "tool" and (cost := step.target.policy.max_cost_usd(1)):
                parts.append(f"up to {_usd(cost)} for fallback {step.label}")
        return f"{name}: {' + '.join(parts)}"

    def derived_total_timeout(self) -> float | None:
        attempts, reserve = self.attempts_budget(), self.fallback_reserve()
        if attempts is None or reserve is None:
            return None
        return attempts + reserve

    def describe(self) -> dict[str, Any]:
        return {
            "timeout": self.timeout, "total_timeout": self.total_timeout, "retries": self.retries,
            "fallback": [f.label for f in self.fallback], "idempotent": self.idempotent,
            "cost_usd": self.cost_usd, "max_result_chars": self.max_result_chars, "isolation": self.isolation,
            "breaker": None if self.breaker is None else {
                "failures": self.breaker.failures, "window_s": self.breaker.window_s,
                "cooldown_s": self.breaker.cooldown_s},
            "check": None if self.check is None else getattr(self.check, "__qualname__", type(self.check).__name__),
        }


def _plural(n: int, word: str) -> str:
    return f"{n} {word}{'' if n == 1 else 's'}"


def _names(owner: str, option: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str):
        value = (value,)
    if not isinstance(value, (tuple, list)) or not all(isinstance(v, str) and v for v in value):
        raise UserError(f"tool {owner!r}: {option}= must be a list of names")
    return tuple(value)
