"""Expectations: what the model predicts a tool call will return, and whether it did.

With `Agent(expectations=True)` every tool schema the model sees gains one reserved,
nullable property, ``loopwise_expect``, and the instructions say how to fill it. The
model states its prediction *in the tool call it makes anyway*: no extra model call,
no extra round trip. The runtime takes the property out of the arguments before they
are validated and before the tool is called (`split_expectation`), so tools never see
it, and records it on `tool_call_started.expected`.

When the call ends, `judge` decides `match`: the tool's own ``@tool(check=fn)`` on the
value it returned, else `default_match` — a documented, deterministic comparison of the
expectation with the text the model reads, which the log alone is enough to recompute —
else ``None`` (unknown), never a guess presented as fact. The verdict goes on
`tool_call_finished.match` / `match_by` / `match_note`; the decision log
(`loopwise._views.decisions`) reads it from there.

None of this runs with `expectations` off: the loop checks one flag per response.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Literal

from .._errors import UserError
from .._messages import ToolSpec

if TYPE_CHECKING:
    from .tool import Tool

__all__ = [
    "EXPECT_KEY",
    "EXPECT_PROMPT",
    "NO_VALUE",
    "MatchBy",
    "augment_spec",
    "default_match",
    "judge",
    "split_expectation",
]

#: The reserved property added to every tool's schema when expectations are on.
EXPECT_KEY = "loopwise_expect"
EXPECT_DESCRIPTION = (
    "What you expect this call to return: a JSON value that should be part of the result "
    '(for example {"status": "shipped"}), or a few words you expect to appear in it; null if you '
    "have no expectation. It is logged for debugging and not passed to the tool."
)
#: Added to the instructions (the first system message) when expectations are on.
EXPECT_PROMPT = (
    f"Every tool has an extra parameter, {EXPECT_KEY}. In each tool call, set it to what you expect "
    "the call to return: a JSON value that should be part of the result, or a few words you expect "
    "to appear in it; null if you have no expectation. It is not passed to the tool: it is logged, "
    "so that whoever debugs this run can see where reality differed from your expectation."
)

MatchBy = Literal["check", "default"]
#: Outcomes where the tool produced nothing to compare with: the call did not run, or its end is unknown.
_NO_RESULT = frozenset(("not_executed", "cancelled", "unknown"))
#: Outcomes where the model reads an error instead of a result.
_ERRORS = frozenset(("error", "invalid_arguments", "unknown_tool"))
#: `judge`'s `value` when the call returned none (its check is not called then).
NO_VALUE: Any = object()


# -- the schema the model sees ---------------------------------------------------------


def augment_spec(spec: ToolSpec) -> ToolSpec:
    """`spec` with the reserved `loopwise_expect` property; the tool's own spec is not changed.

    The property is nullable. It joins ``required`` only when the schema is
    strict-style (``additionalProperties: false`` and every property required, as
    OpenAI's strict mode demands), so a strict schema stays valid and a lax one keeps
    the property optional.

    Raises:
        UserError: the tool has a parameter of its own named `loopwise_expect`.
    """
    parameters = spec.parameters if isinstance(spec.parameters, dict) else {}
    properties = parameters.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    if EXPECT_KEY in properties:
        raise UserError(
            f"tool {spec.name!r} has a parameter named {EXPECT_KEY!r}, which Agent(expectations=True) reserves "
            "for the model's expectation; rename the tool's parameter, or leave expectations off"
        )
    required = parameters.get("required")
    required = list(required) if isinstance(required, list) else []
    strict = parameters.get("additionalProperties") is False and set(required) >= set(properties)
    out = dict(parameters)
    out.setdefault("type", "object")
    out["properties"] = {**properties, EXPECT_KEY: {"type": ["string", "null"], "description": EXPECT_DESCRIPTION}}
    if strict:
        out["required"] = [*required, EXPECT_KEY]
    return ToolSpec(name=spec.name, description=spec.description, parameters=out)


# -- taking the expectation out of the arguments -------------------------------------------


def split_expectation(arguments: dict[str, Any] | str | None) -> tuple[Any, dict[str, Any] | str | None]:
    """(the expectation, the arguments without it), from the arguments as the model sent them.

    A raw JSON string is parsed only to look for the key: when it holds an object with
    it, the rest comes back as a dict; otherwise (no key, malformed JSON, not an object)
    the arguments come back untouched, so the tool's validation reports exactly what it
    reported before. A missing key or a null is no expectation (None).
    """
    if isinstance(arguments, dict):
        if EXPECT_KEY not in arguments:
            return None, arguments
        rest = dict(arguments)
        return rest.pop(EXPECT_KEY), rest
    if isinstance(arguments, str) and EXPECT_KEY in arguments:
        try:
            parsed = json.loads(arguments)
        except (ValueError, RecursionError):
            return None, arguments  # malformed stays malformed
        if isinstance(parsed, dict) and EXPECT_KEY in parsed:
            return parsed.pop(EXPECT_KEY), parsed
    return None, arguments


# -- the verdict -------------------------------------------------------------------------


def judge(tool: Tool | None, expected: Any, outcome: str, content: str, fallback: str | None = None,
          value: Any = NO_VALUE) -> tuple[bool | None, MatchBy | None, str | None]:
    """(match, match_by, note) for one finished call.

    The tool's `check` decides when the call returned a value (`outcome == "ok"`); a
    check that raises, or returns something other than a bool or None, gives an
    unknown match with a note saying so. It never fails the run. Otherwise
    `default_match` decides. No expectation: (None, None, None).
    """
    if _no_expectation(expected):
        return None, None, None
    check = tool.policy.check if tool is not None else None
    if check is not None and outcome == "ok" and value is not NO_VALUE:
        try:
            verdict = check(expected, value)
        except Exception as exc:  # the user's code: noted, never the run's end
            return None, "check", f"check raised {type(exc).__name__}: {exc}"
        if verdict is None or type(verdict) is bool:
            return verdict, "check", None
        return None, "check", f"check returned {type(verdict).__name__}, not True, False or None"
    return default_match(expected, outcome, content, fallback), "default", None


def _no_expectation(expected: Any) -> bool:
    return expected is None or (isinstance(expected, str) and expected.strip() in ("", "null"))


def default_match(expected: Any, outcome: str, content: str, fallback: str | None = None) -> bool | None:
    """The default verdict: does what the call returned agree with the expectation?

    Deterministic, and computed from what the log holds (the expectation, the outcome,
    the content the model read, the fallback that answered), so any view can recompute it.

    1. No expectation (null, missing, blank or the string ``"null"``): None.
    2. The call has no result (``not_executed``, ``cancelled``, ``unknown``): None.
    3. The actual value is the text the model reads; after a fallback, the fallback's
       answer (what follows "answered from <fallback>: ").
    4. An expectation given as a string holding JSON (``'{"count": 3}'``, ``'3'``,
       ``'true'``) is read as that JSON value; any other string is text.
    5. An object or array expected, a JSON actual: the expected is a subset of the
       actual — every expected key present with a matching value, every expected item
       matched by its own item of the actual list, in any order. Leaves: numbers equal as
       numbers (``3 == 3.0``; a numeric string counts as its number), strings equal
       casefolded with whitespace collapsed, booleans and null exactly.
    6. An object or array expected, an actual that is not JSON: False after an error
       outcome (a value was expected, an error came back), else None (a structure
       cannot be compared with prose).
    7. A number or boolean expected, a JSON number or boolean actual: equal as in 5.
    8. Otherwise (text, or a number against text or a structure): the expectation's words appear, in
       order and next to each other, among the actual's words (casefolded, split on
       anything that is not a letter or digit): ``"in transit"`` matches
       ``{"status": "In transit"}``, ``"3"`` does not match ``"13"``.
    """
    if _no_expectation(expected) or outcome in _NO_RESULT:
        return None
    actual_text = content
    if outcome == "fallback" and fallback:
        _, sep, answer = content.partition(f"; answered from {fallback}: ")
        if sep:
            actual_text = answer
    want = _as_json(expected)
    found = _json_or_missing(actual_text)
    if isinstance(want, (dict, list)):
        if found is NO_VALUE:
            return False if outcome in _ERRORS else None
        return _subset(want, found)
    if _is_scalar(want) and _is_scalar(found):
        return _leaf_equal(want, found)
    words = _words(want if isinstance(want, str) else json.dumps(want))
    if not words:
        return None  # an expectation of punctuation only: nothing to look for
    return _contains(_words(actual_text), words)


def _as_json(expected: Any) -> Any:
    if isinstance(expected, str):
        text = expected.strip()
        if text[:1] in '{["-0123456789tfn':
            try:
                return json.loads(text)
            except (ValueError, RecursionError):
                pass
        return expected
    return expected


def _json_or_missing(text: str) -> Any:
    stripped = text.strip()
    if not stripped or stripped[:1] not in '{["-0123456789tfn':
        return NO_VALUE
    try:
        return json.loads(stripped)
    except (ValueError, RecursionError):
        return NO_VALUE


def _is_scalar(value: Any) -> bool:
    return value is not NO_VALUE and (isinstance(value, (bool, int, float)) or value is None)


def _number(value: Any) -> float | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            number = float(value.strip())
        except ValueError:
            return None
        return number if math.isfinite(number) else None
    return None


def _norm(text: str) -> str:
    return " ".join(text.casefold().split())


def _leaf_equal(want: Any, got: Any) -> bool:
    if isinstance(want, bool) or isinstance(got, bool) or want is None or got is None:
        return want is got or (type(want) is bool and type(got) is bool and want == got)
    a, b = _number(want), _number(got)
    if a is not None and b is not None and (isinstance(want, (int, float)) or isinstance(got, (int, float))):
        return a == b
    if isinstance(want, str) and isinstance(got, str):
        return _norm(want) == _norm(got)
    return False


def _subset(want: Any, got: Any) -> bool:
    if isinstance(want, dict):
        return isinstance(got, dict) and all(k in got and _subset(v, got[k]) for k, v in want.items())
    if isinstance(want, list):
        if not isinstance(got, list):
            return False
        free = list(got)
        for item in want:
            for i, candidate in enumerate(free):
                if _subset(item, candidate):
                    del free[i]
                    break
            else:
                return False
        return True
    if isinstance(got, (dict, list)):
        return False
    return _leaf_equal(want, got)


_WORD = re.compile(r"[^\W_]+")


def _words(text: str) -> list[str]:
    return _WORD.findall(text.casefold())


def _contains(haystack: list[str], needle: list[str]) -> bool:
    n = len(needle)
    first = needle[0]
    return any(haystack[i] == first and haystack[i: i + n] == needle for i in range(len(haystack) - n + 1))


def check_option(owner: str, check: Any) -> Callable[[Any, Any], bool | None] | None:
    """`@tool(check=...)`, validated: a plain function of (expected, actual)."""
    if check is None:
        return None
    import inspect

    if not callable(check) or isinstance(check, type):
        raise UserError(f"tool {owner!r}: check= must be a function check(expected, actual) -> bool | None, "
                        f"got {check!r:.60}")
    if inspect.iscoroutinefunction(check) or inspect.iscoroutinefunction(getattr(check, "__call__", None)):
        raise UserError(f"tool {owner!r}: check= must be a plain (sync) function: it runs in the loop as each "
                        "call ends, so keep it quick and make it a def, not an async def")
    try:
        inspect.signature(check).bind(None, None)
    except TypeError:
        raise UserError(f"tool {owner!r}: check= must take two arguments, (expected, actual)") from None
    except ValueError:
        pass  # a builtin without a signature: trust it
    return check
