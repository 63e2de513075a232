"""Redaction: what the event log keeps of secrets and personal data.

Every prompt, tool argument and tool result of a run goes into the event log, and the
log goes to disk, to exports and to support tickets. So every event passes through
the agent's `Redactor` *before* it is persisted, streamed or logged: the log, and
every view read from it, holds ``[redacted:openai_key]`` where the run held a key.
The model itself still sees the real content; only the record is redacted.

What a `Redactor` replaces, in every string of an event (task, instructions, model
text, tool call arguments at any depth, tool results, errors and tracebacks,
summaries, nudges):

- secrets, always (unless ``secrets=False``): API keys of OpenAI, Anthropic, Google,
  AWS, GitHub, Slack and Stripe, ``Bearer`` tokens, ``Authorization:`` headers,
  ``api_key=``/``password=``/``token:`` pairs, passwords in URLs, JWTs and PEM private
  keys (`SECRET_RULES`), at every depth of escaping (JSON in a JSON string: a pair's
  value is found by `_policies.redact_pairs`, and replaced whole), and the values of dict keys
  named like a secret (``{"password": ...}``);
- the user's patterns: presets (``"email"``, ``"card"`` with a Luhn check,
  ``"phone"``) and regular expressions;
- the values of tool arguments declared ``@tool(secret=(...))``, replaced whole
  wherever the call is recorded, and their literal values anywhere later in the run;
- whatever a user ``hook(text) -> text`` replaces.

Cost: a string shorter than the shortest pattern is skipped, and one scan with a
combined pattern decides whether a string needs any work; only strings that match
are rewritten, and only events that changed are copied.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import UserError
from .._events import ErrorInfo, Event
from .._messages import Message, ToolCall
from .redact_pairs import (
    CREDENTIAL_KEYS,
    MARKER,
    PASSWORD_KEYS,
    QUOTE,
    boundary,
    key_rule,
    keyed_value,
    pair_pattern,
    value_span,
)

if TYPE_CHECKING:
    from .._tools.tool import Tool

__all__ = ["PRESETS", "SECRET_RULES", "EventRedactor", "Redactor"]

_log = logging.getLogger("loopwise")


def _luhn(text: str) -> bool:
    """Whether the digits of `text` (13 to 19 of them) pass the Luhn check of card numbers."""
    digits = [ord(c) - 48 for c in text if "0" <= c <= "9"]
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def _phone_digits(text: str) -> bool:
    return 9 <= sum(c.isdigit() for c in text) <= 15


#: Values of a "token: ..." pair that are not credentials: numbers, booleans, nulls.
_PLAIN = re.compile(r"-?\d+(?:\.\d+)?|true|false|null|none|yes|no", re.IGNORECASE)


def _looks_like_token(text: str) -> bool:
    """A credential rather than a word: it has a digit or a symbol, or is very long."""
    return len(text) >= 32 or not text.isalpha()


@dataclass(frozen=True, slots=True)
class _Rule:
    """One pattern: what it matches, the part replaced (group ``s``, or all), a check on that part.

    `triggers` are literals one of which is in any text the pattern matches (`itriggers`:
    in the lower-cased text); a text with none of them skips the regular expression,
    which is what keeps the common case cheap. A rule without triggers always searches.
    A pair rule's pattern matches a key and its separator (`lowered`: the same for the
    lower-cased text); the value it governs is found by a scan (`_policies.redact_pairs.value_span`)
    and replaced whole.
    """

    name: str
    regex: re.Pattern[str]
    check: Callable[[str], bool] | None = None
    triggers: tuple[str, ...] = ()
    itriggers: tuple[str, ...] = ()
    #: A pair rule's pattern for the lower-cased text (case-sensitive: several times faster).
    lowered: re.Pattern[str] | None = None
    triggers_set: frozenset[str] = dataclasses.field(init=False)
    itriggers_set: frozenset[str] = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "triggers_set", frozenset(self.triggers))
        object.__setattr__(self, "itriggers_set", frozenset(self.itriggers))

    def sub(self, text: str, lower: str | None = None) -> str:
        """`text` with what this rule matches replaced (`lower`: the text lower-cased, if at hand)."""
        regex, check = self.regex, self.check
        token = f"[redacted:{self.name}]" if self.name else "[redacted]"
        if self.lowered is not None:
            if lower is None:
                lower = text.lower()
            # Lower-casing keeps positions unless a character changes length ("İ"): then the
            # case-insensitive pattern reads the text itself.
            matches = self.lowered.finditer(lower) if len(lower) == len(text) else regex.finditer(text)
            return self._sub_pairs(text, matches, token)
        if "s" not in regex.groupindex:
            def whole(m: re.Match[str]) -> str:
                found = m.group(0)
                if not found or (check is not None and not check(found)):
                    return found
                # Never split an escape of the text around it: a match that starts with the
                # ``n`` of ``\n`` or ends with a backslash keeps those characters.
                head = 1 if found[0] in "nrtbf" and _escaped(text, m.start()) else 0
                tail = len(found) - len(found.rstrip("\\"))
                if head + tail >= len(found):
                    return found
                return found[:head] + token + found[len(found) - tail:]

            return regex.sub(whole, text)

        def replace(m: re.Match[str]) -> str:
            secret = m.group("s")
            if secret is None or (check is not None and not check(secret)):
                return m.group(0)
            whole, start, end = m.group(0), m.start("s") - m.start(), m.end("s") - m.start()
            return whole[:start] + token + whole[end:]

        return regex.sub(replace, text)

    def _sub_pairs(self, text: str, matches: Iterable[re.Match[str]], token: str) -> str:
        check = self.check
        parts: list[str] = []
        pos = 0
        for m in matches:
            if m.start() < pos:  # a key inside a value already replaced
                continue
            start, end, quote = value_span(text, m.end(), m.group("kq"))
            value = text[start:end]
            if not value or MARKER.fullmatch(value) or (check is not None and not check(value)):
                continue
            parts.append(text[pos:start])
            parts.append(f"{quote}{token}{quote}" if quote else token)
            pos = end
        if not parts:
            return text
        parts.append(text[pos:])
        return "".join(parts)


def _escaped(text: str, i: int) -> bool:
    """Whether the character at `i` is escaped: an odd number of backslashes before it."""
    k = 0
    while i > k and text[i - k - 1] == "\\":
        k += 1
    return k % 2 == 1


def _rule(name: str, pattern: str, check: Callable[[str], bool] | None = None, *,
          triggers: tuple[str, ...] = (), itriggers: tuple[str, ...] = ()) -> _Rule:
    return _Rule(name, re.compile(pattern), check, triggers, itriggers)


def _pair_rule(name: str, keys: str, check: Callable[[str], bool], itriggers: tuple[str, ...]) -> _Rule:
    return _Rule(name, pair_pattern(keys), check, (), itriggers, pair_pattern(keys, lowered=True))


def _not_boolish(value: str) -> bool:
    return _BOOLISH.fullmatch(value) is None


def _not_plain(value: str) -> bool:
    return _PLAIN.fullmatch(value) is None


#: Values of a "password: ..." pair that are not passwords.
_BOOLISH = re.compile(r"true|false|null|none", re.IGNORECASE)
# A token starts where no word character is before it, or after an escape (``\nsk-...``).
_B = boundary()
# A credential after an Authorization key or a scheme word: up to a space, a quote or a
# separator, never taking the backslashes of an escaped quote or newline after it.
_TOKEN_CHAR = r"""(?:[^\s"'`,;}\\]|\\(?!\\*["'`nrt]))"""
_AUTH_KEY = rf"(?i:{_B}authorization\b(?:{QUOTE})?\s*[:=]\s*(?:{QUOTE})?)"
_SCHEMES = r"(?:basic|bearer|digest|token|negotiate|apikey)"

# The secrets redacted by default. Each follows the provider's documented key format and
# anchors on a literal prefix or key word, so ordinary text, ids and hashes do not match.
SECRET_RULES: tuple[_Rule, ...] = (
    _rule("private_key",
          r"-----BEGIN (?:[A-Z0-9]+ )*PRIVATE KEY-----[\s\S]*?(?:-----END (?:[A-Z0-9]+ )*PRIVATE KEY-----|\Z)",
          triggers=("PRIVATE KEY-----",)),
    _rule("jwt", rf"{_B}eyJ[A-Za-z0-9_-]{{8,}}\.eyJ[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]*", triggers=("eyJ",)),
    _rule("anthropic_key", rf"{_B}sk-ant-[A-Za-z0-9_-]{{20,}}", triggers=("sk-ant-",)),
    _rule("openai_key", rf"{_B}sk-(?:proj-|svcacct-|admin-|None-)?[A-Za-z0-9_-]{{20,}}", triggers=("sk-",)),
    _rule("stripe_key", rf"{_B}[rsp]k_(?:live|test)_[A-Za-z0-9]{{16,}}", triggers=("k_live_", "k_test_")),
    _rule("google_key", rf"{_B}AIza[0-9A-Za-z_-]{{35}}", triggers=("AIza",)),
    _rule("aws_key", rf"{_B}(?:AKIA|ASIA|ABIA|ACCA)[0-9A-Z]{{16}}\b", triggers=("AKIA", "ASIA", "ABIA", "ACCA")),
    _rule("github_token", rf"{_B}(?:gh[pousr]_[A-Za-z0-9]{{36,255}}|github_pat_[A-Za-z0-9_]{{22,255}})",
          triggers=("ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_")),
    _rule("slack_token", rf"{_B}xox[abposre]-[A-Za-z0-9-]{{10,}}", triggers=("xox",)),
    _rule("slack_webhook", r"hooks\.slack\.com/services/[A-Za-z0-9/_-]{16,}", triggers=("hooks.slack.com/",)),
    # A header: the scheme word is kept, the credential replaced. Without a scheme word,
    # the value must look like a credential ("Authorization: required" is prose).
    _rule("authorization", rf"{_AUTH_KEY}(?i:{_SCHEMES}\s+)(?!\[redacted)(?P<s>{_TOKEN_CHAR}+)",
          itriggers=("authorization",)),
    _rule("authorization", rf"{_AUTH_KEY}(?!(?i:{_SCHEMES})\s)(?!\[redacted)(?P<s>{_TOKEN_CHAR}{{6,}})",
          _looks_like_token, itriggers=("authorization",)),
    _rule("bearer", rf"(?i:{_B}bearer\s+)(?!\[redacted)(?P<s>[A-Za-z0-9\-._~+/]{{16,}}=*)", _looks_like_token,
          itriggers=("bearer",)),
    # key=value, key: value and "key": "value" pairs whose key names a secret, quoted or
    # escaped to any depth: the key is kept, the value it governs replaced whole.
    _pair_rule("password", PASSWORD_KEYS, _not_boolish, ("pass", "pwd")),
    _pair_rule("credential", CREDENTIAL_KEYS, _not_plain, ("key", "secret", "token")),
    _rule("url_password", r"(?i:\b[a-z][a-z0-9+.-]*://[^\s:/@\"']+:)(?!\[redacted)(?P<s>[^\s/@\"']+)(?=@)",
          triggers=("://",)),
)

#: The check on a value under a dict key that names a secret, by the rule the key names.
_KEY_CHECKS: dict[str, Callable[[str], bool]] = {"password": _not_boolish, "credential": _not_plain,
                                                 "authorization": _looks_like_token}
_SCHEME = re.compile(rf"(?i:{_SCHEMES})\s+")

_CARD_START = boundary(r"\w-")
_PHONE_START = boundary(r"\w+-")
#: Patterns a `Redactor` can name in `patterns=`; each replaced with ``[redacted:NAME]``.
PRESETS: dict[str, _Rule] = {
    "email": _rule("email", r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}\b",
                   triggers=("@",)),
    # 13 to 19 digits, in groups separated by single spaces or dashes, passing the Luhn check.
    "card": _rule("card", rf"{_CARD_START}\d(?:[ -]?\d){{12,18}}(?![\w-])", _luhn),
    # +country, (area), then groups; 9 to 15 digits in all, at least one separator.
    "phone": _rule("phone", rf"{_PHONE_START}(?:\+\d{{1,3}}[ .-]?)?(?:\(\d{{1,4}}\)[ .-]?)?\d{{2,4}}[ .-]\d{{2,4}}"
                            r"(?:[ .-]?\d{2,4}){0,2}(?![\w-])", _phone_digits),
}

_IDENTIFIER = re.compile(r"[a-z][a-z0-9_]*")
#: Event fields never redacted: the identity of the record, and names the runtime or the
#: provider sets (the model's name, `finish_reason`, a fallback's name, the limits), not content.
_KEEP_FIELDS = frozenset(("kind", "run_id", "seq", "ts", "call_id", "model", "finish_reason", "fallback", "limits"))
_NON_TEXT = frozenset(("int", "float", "bool", "Usage", "int | None", "float | None", "bool | None",
                       "StopReason", "ToolOutcome", "BreakerState", "ModelCallPurpose", "list[int]"))
# The string memo: strings up to this long, this many of them; and long objects kept by identity.
_MEMO_CHARS = 256
_MEMO_ENTRIES = 4096
_MEMO_OBJECTS = 64
# The string memo's value for a string with nothing to redact (an object no redaction returns).
_UNCHANGED: Any = object()
# The key memo's value for a dict key that names no secret and holds none.
_PLAIN_KEY: Any = object()
#: How a secret tool argument's value is written in the log.
SECRET_ARGUMENT = "[redacted:secret]"


def _min_width(pattern: re.Pattern[str]) -> int:
    try:
        import re._parser as parser  # type: ignore[import-not-found]
    except ImportError:  # pragma: no cover - Python < 3.11
        import sre_parse as parser
    try:
        return int(parser.parse(pattern.pattern, pattern.flags).getwidth()[0])
    except Exception:  # noqa: BLE001 - a pattern sre cannot size: no shortcut
        return 0


class Redactor:
    """What the event log keeps: secrets and the patterns you name are replaced before it is written.

    The agent's redactor runs on every event before it is persisted, streamed by
    `agent.stream()`, or logged; exports and every view read the redacted log. The
    model still sees the real content.

    Args:
        patterns: More to redact: preset names (``"email"``, ``"card"``, ``"phone"``),
            regular expressions (strings or compiled), or a mapping of a name to a
            regular expression (replaced with ``[redacted:NAME]``; an unnamed
            expression is replaced with ``[redacted]``).
        secrets: The built-in secret patterns (API keys, bearer tokens, passwords in
            pairs and URLs, JWTs, private keys). On by default; ``False`` turns them
            off, and the run's ``run_started`` event records that it did.
        hook: A function ``text -> text`` applied to every string after the patterns.
            If it raises or returns something other than a str, the whole string is
            replaced with ``[redacted:hook_error]`` (fails closed).

    Raises:
        UserError: an unknown preset, a bad regular expression, or a hook that is not callable.
    """

    __slots__ = ("_always", "_itriggers", "_min_width", "_rules", "_triggered", "_triggers", "hook",
                 "pattern_names", "secrets")

    def __init__(
        self,
        *,
        patterns: Sequence[str | re.Pattern[str]] | Mapping[str, str | re.Pattern[str]] = (),
        secrets: bool = True,
        hook: Callable[[str], str] | None = None,
    ) -> None:
        if type(secrets) is not bool:
            raise UserError(f"Redactor(secrets={secrets!r}) must be True or False")
        if hook is not None and not callable(hook):
            raise UserError(f"Redactor(hook=...) must be a function text -> text, got {type(hook).__name__}")
        self.secrets = secrets
        self.hook = hook
        user = _user_rules(patterns)
        self._rules: tuple[_Rule, ...] = (*(SECRET_RULES if secrets else ()), *user)
        #: The names of the active user patterns, as recorded in the log (never the secrets).
        self.pattern_names: tuple[str, ...] = tuple(r.name or "regex" for r in user)
        # The fast path: a text holding none of the triggers skips every triggered rule.
        self._triggers = tuple(dict.fromkeys(t for r in self._rules for t in r.triggers))
        self._itriggers = tuple(dict.fromkeys(t for r in self._rules for t in r.itriggers))
        self._triggered = tuple(r for r in self._rules if r.triggers or r.itriggers)
        self._always = tuple(r for r in self._rules if not (r.triggers or r.itriggers))
        widths = [_min_width(r.regex) for r in self._rules]
        self._min_width = min(widths) if widths and hook is None else 0

    @property
    def enabled(self) -> bool:
        """Whether it replaces anything at all (a redactor with nothing to do is skipped)."""
        return bool(self._rules) or self.hook is not None

    def describe(self) -> dict[str, Any]:
        """What the run-started event records: which redaction was active (names only)."""
        return {"secrets": self.secrets, "patterns": list(self.pattern_names), "hook": _name_of(self.hook)}

    def __repr__(self) -> str:
        return f"Redactor(patterns={list(self.pattern_names)!r}, secrets={self.secrets!r})"

    def redact(self, text: str) -> str:
        """`text` with every secret and pattern replaced (the same object when nothing matched)."""
        if len(text) < self._min_width:
            return text
        if self._triggered:
            # Which triggers the text holds, once: each rule then runs only if one of its own is there.
            found = [t for t in self._triggers if t in text]
            lower = text.lower()
            ifound = [t for t in self._itriggers if t in lower]
            if found or ifound:
                for rule in self._triggered:
                    if (found and not rule.triggers_set.isdisjoint(found)) or (
                            ifound and not rule.itriggers_set.isdisjoint(ifound)):
                        new = rule.sub(text, lower)
                        if new is not text and new != text:
                            text, lower = new, new.lower()
        for rule in self._always:
            if rule.regex.search(text) is not None:
                text = rule.sub(text)
        hook = self.hook
        if hook is not None:
            try:
                out = hook(text)
            except Exception as exc:  # noqa: BLE001 - fail closed, say so
                _log.warning("the redaction hook %s raised %s: %s; the string is replaced whole",
                             _name_of(hook), type(exc).__name__, exc)
                return "[redacted:hook_error]"
            if not isinstance(out, str):
                _log.warning("the redaction hook %s returned a %s, not a str; the string is replaced whole",
                             _name_of(hook), type(out).__name__)
                return "[redacted:hook_error]"
            text = out
        return text

    def for_tools(self, tools: Iterable[Tool]) -> EventRedactor:
        """The redactor of an agent's events: this one, plus the tools' secret arguments."""
        secret_args = {t.name: frozenset(t.policy.secret) for t in tools if t.policy.secret}
        return EventRedactor(self, secret_args)


def _name_of(fn: Any) -> str | None:
    if fn is None:
        return None
    return getattr(fn, "__qualname__", None) or type(fn).__name__


def _user_rules(patterns: Any) -> list[_Rule]:
    if isinstance(patterns, (str, re.Pattern)):
        raise UserError(f"Redactor(patterns=...) takes a list; write patterns=[{patterns!r}]")
    if isinstance(patterns, Mapping):
        items: list[tuple[str | None, Any]] = []
        for name, pattern in patterns.items():
            if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
                raise UserError(f"Redactor(patterns={{{name!r}: ...}}): a pattern's name must be a lowercase "
                                "identifier such as 'account', used in [redacted:NAME]")
            items.append((name, pattern))
    elif isinstance(patterns, Sequence):
        items = [(None, p) for p in patterns]
    else:
        raise UserError(f"Redactor(patterns=...) must be a list or a dict, got {type(patterns).__name__}")
    rules: list[_Rule] = []
    for name, pattern in items:
        if name is None and isinstance(pattern, str) and _IDENTIFIER.fullmatch(pattern):
            if pattern not in PRESETS:
                raise UserError(
                    f"Redactor(patterns=[{pattern!r}]): no preset is named {pattern!r} (presets: "
                    f"{', '.join(sorted(PRESETS))}); for a regular expression matching that word, "
                    f"pass re.compile({pattern!r})"
                )
            rules.append(PRESETS[pattern])
            continue
        if isinstance(pattern, str):
            try:
                regex = re.compile(pattern)
            except re.error as exc:
                raise UserError(f"Redactor(patterns=...): {pattern!r} is not a valid regular expression: {exc}") from None
        elif isinstance(pattern, re.Pattern) and isinstance(pattern.pattern, str):
            regex = pattern
        else:
            raise UserError(f"Redactor(patterns=...): each pattern is a preset name, a regular expression "
                            f"(str or re.compile(...)), got {pattern!r:.60}")
        if regex.search("") is not None:
            raise UserError(f"Redactor(patterns=...): {regex.pattern!r} matches the empty string; it would "
                            "redact between every character")
        rules.append(_Rule(name or "", regex))
    return rules


class EventRedactor:
    """An agent's events, redacted: a `Redactor` plus its tools' secret arguments.

    Called with an event, it returns the event to keep: the same object when nothing
    needed redacting, else a copy (the run's own objects are never changed).
    It remembers, per run until `end_run`, the values of secret arguments it
    replaced, and replaces them wherever they appear later in the run.

    Every event of every run passes here, nearly always with nothing to redact: the
    common path is a few look-ups in the memos, with no object made.
    """

    __slots__ = ("_fields", "_keys", "_memo", "_objects", "_run_secrets", "_text", "redactor", "secret_args")

    def __init__(self, redactor: Redactor, secret_args: Mapping[str, frozenset[str]]) -> None:
        self.redactor = redactor
        self.secret_args = dict(secret_args)
        self._fields: dict[type, tuple[str, ...]] = {}
        self._run_secrets: dict[str, tuple[str, ...]] = {}
        # Strings seen again (names, models, short arguments) are redacted once: short
        # ones by value, long ones by identity (the instructions, the agent description).
        self._memo: dict[str, str] = {}
        self._objects: dict[int, tuple[Any, Any]] = {}
        # Dict keys: what each needs (nearly always nothing: `_PLAIN_KEY`).
        self._keys: dict[str, Any] = {}
        #: A string, redacted (through the memos): made once, called for every string.
        self._text: Callable[[str], str] = self._make_text()

    def __call__(self, event: Event) -> Event:
        fields = self._fields.get(type(event))
        if fields is None:
            fields = self._fields_of(type(event))
        if not fields:
            return event
        secret_args = self.secret_args
        text = self._text
        memo_get = None
        if secret_args:
            run_secrets = self._run_secrets.get(event.run_id)
            found = self._secret_values(event)
            if found:
                run_secrets = self._run_secrets[event.run_id] = tuple(
                    sorted({*(run_secrets or ()), *found}, key=len, reverse=True))
            if run_secrets is not None:
                text = _with_values(text, run_secrets)
        else:
            # The common path: short strings straight from the memo, without a call each.
            memo_get = self._memo.get
        changes: dict[str, Any] | None = None
        for name in fields:
            value = getattr(event, name)
            if value is None:
                continue
            cls = type(value)
            if name == "arguments" and secret_args:  # tool_call_started: the call's own arguments
                new = self._arguments(value, secret_args.get(getattr(event, "name", "")), text)
            elif cls is str:
                if memo_get is not None and len(value) <= _MEMO_CHARS and memo_get(value) is _UNCHANGED:
                    continue
                new = text(value)
            elif memo_get is not None and cls is dict and name == "arguments":  # as in the response
                new = self._plain_dict(value)
            elif memo_get is not None and cls is list and name == "tool_calls":  # model_call_finished
                new = self._calls(value)
            else:
                new = self._walk(value, text, name)
            if new is not value:
                if changes is None:
                    changes = {}
                changes[name] = new
        if changes is None:
            return event
        return dataclasses.replace(event, **changes)

    @property
    def active(self) -> bool:
        """Whether it can change anything (else the agent skips it: no cost at all)."""
        return self.redactor.enabled or bool(self.secret_args)

    def end_run(self, run_id: str) -> None:
        """Forget the secret argument values of a run that has ended."""
        if self._run_secrets:
            self._run_secrets.pop(run_id, None)

    def _fields_of(self, cls: type) -> tuple[str, ...]:
        names = tuple(f.name for f in dataclasses.fields(cls)
                      if f.name not in _KEEP_FIELDS and str(f.type) not in _NON_TEXT
                      and not str(f.type).startswith("Literal"))
        self._fields[cls] = names
        return names

    def _make_text(self) -> Callable[[str], str]:
        memo = self._memo
        get = memo.get
        redact = self.redactor.redact
        same = self._same

        def text(value: str) -> str:
            if len(value) <= _MEMO_CHARS:
                out = get(value)
                if out is None:
                    if len(memo) >= _MEMO_ENTRIES:
                        memo.clear()
                    out = redact(value)
                    # Nothing to redact is remembered as such: an equal string made anew (a
                    # tool's result, each run) comes back as itself, so its event is not copied.
                    out = memo[value] = _UNCHANGED if out is value or out == value else out
                return value if out is _UNCHANGED else out
            return same(value, redact)

        return text

    def _same(self, value: Any, compute: Callable[[Any], Any]) -> Any:
        """`compute(value)`, once per object for objects that come back (kept while they do)."""
        hit = self._objects.get(id(value))
        if hit is not None and hit[0] is value:
            return hit[1]
        out = compute(value)
        if len(self._objects) >= _MEMO_OBJECTS:
            self._objects.clear()
        self._objects[id(value)] = (value, out)
        return out

    def _walk(self, value: Any, text: Callable[[str], str], field: str | None = None) -> Any:
        cls = type(value)
        if cls is str:
            return text(value)
        if value is None or cls is int or cls is float or cls is bool:
            return value
        if cls is list or cls is tuple:
            out = None
            for i, item in enumerate(value):
                item_cls = type(item)
                new: Any
                if item_cls is str:
                    new = text(item)
                elif item_cls is ToolCall:  # a response's calls, a message's calls
                    new = self._call(item, text)
                else:
                    new = self._walk(item, text)
                if new is not item:
                    if out is None:
                        out = list(value)
                    out[i] = new
            if out is None:
                return value
            return out if cls is list else tuple(out)
        if cls is dict:
            if field == "agent":  # the agent's description: the same dict for every run
                return self._same(value, lambda d: self._walk_dict(d, text))
            return self._walk_dict(value, text)
        if cls is Message:
            content = value.content
            new_content = content if content is None else text(content)
            calls = value.tool_calls
            new_calls = self._walk(calls, text) if calls else calls
            if new_content is content and new_calls is calls:
                return value
            return Message(value.role, new_content, new_calls, value.tool_call_id)
        if cls is ToolCall:
            return self._call(value, text)
        if cls is ErrorInfo:
            message = text(value.message)
            tb = value.traceback
            new_tb = tb if tb is None else text(tb)
            if message is value.message and new_tb is tb:
                return value
            return ErrorInfo(type=value.type, message=message, traceback=new_tb)
        return value  # numbers, usage, anything without text

    def _walk_dict(self, value: dict[str, Any], text: Callable[[str], str]) -> dict[str, Any]:
        out = None
        memo_get = self._memo.get if text is self._text else None
        keys_get = self._keys.get
        for k, item in value.items():
            if type(k) is str and (keys_get(k) or self._key(k)) is not _PLAIN_KEY:
                return self._walk_keyed_dict(value, text)  # a key that names a secret, or holds one
            cls = type(item)
            if cls is str:
                if memo_get is not None and len(item) <= _MEMO_CHARS and memo_get(item) is _UNCHANGED:
                    continue  # known to hold nothing to redact: no call
                new = text(item)
            elif item is None or cls is int or cls is float or cls is bool:
                continue
            else:
                new = self._walk(item, text)
            if new is not item:
                if out is None:
                    out = dict(value)
                out[k] = new
        return value if out is None else out

    def _key(self, key: str) -> Any:
        """What a dict key needs: `_PLAIN_KEY` (nearly always), else (the key redacted, the rule its name is)."""
        keys = self._keys
        if len(keys) >= _MEMO_ENTRIES:
            keys.clear()
        redactor = self.redactor
        new = redactor.redact(key)
        rule = key_rule(key) if redactor.secrets else None
        how = keys[key] = _PLAIN_KEY if rule is None and (new is key or new == key) else (new, rule)
        return how

    def _walk_keyed_dict(self, value: dict[str, Any], text: Callable[[str], str]) -> dict[str, Any]:
        """A dict with a key that names a secret (its value replaced whole) or holds one (the key redacted)."""
        out: dict[Any, Any] = {}
        for k, item in value.items():
            how = (self._keys.get(k) or self._key(k)) if type(k) is str else _PLAIN_KEY
            if how is not _PLAIN_KEY:
                k, rule = how
                if rule is not None:
                    new = keyed_value(rule, item, _KEY_CHECKS[rule], _SCHEME)
                    if new is not item:
                        out[k] = new
                        continue
            cls = type(item)
            out[k] = (text(item) if cls is str else item if item is None or cls in (int, float, bool)
                      else self._walk(item, text))
        return out

    def _call(self, call: ToolCall, text: Callable[[str], str]) -> ToolCall:
        args = call.arguments
        secret_args = self.secret_args
        if not secret_args and type(args) is dict and text is self._text:
            new_args = self._plain_dict(args)
        else:
            secret = secret_args.get(call.name) if secret_args and isinstance(call.name, str) else None
            new_args = self._arguments(args, secret, text)
        if new_args is args:
            return call
        return ToolCall(call.name, new_args, call.id)

    def _calls(self, calls: list[Any]) -> list[Any]:
        """A response's tool calls (no secret arguments): `_walk` of the list, a call or two fewer each."""
        out = None
        for i, call in enumerate(calls):
            if type(call) is ToolCall and type(args := call.arguments) is dict:
                new_args = self._plain_dict(args)
                new = call if new_args is args else ToolCall(call.name, new_args, call.id)
            else:
                new = self._walk(call, self._text)
            if new is not call:
                if out is None:
                    out = list(calls)
                out[i] = new
        return calls if out is None else out

    def _plain_dict(self, args: dict[str, Any]) -> dict[str, Any]:
        """Arguments without secret ones, redacted: once per dict object while it comes back.

        The same dict is in the model's response and in the call's start: walked once.
        """
        objects = self._objects
        hit = objects.get(id(args))
        if hit is not None and hit[0] is args:
            return hit[1]
        out = self._walk_dict(args, self._text)
        if len(objects) >= _MEMO_OBJECTS:
            objects.clear()
        objects[id(args)] = (args, out)
        return out

    def _arguments(self, args: Any, secret: frozenset[str] | None, text: Callable[[str], str]) -> Any:
        if secret:
            args = _replace_secret_arguments(args, secret)
        elif type(args) is dict and text is self._text:
            return self._plain_dict(args)
        return self._walk(args, text)

    def _secret_values(self, event: Event) -> list[str]:
        """The values of secret arguments in the tool calls this event records."""
        calls: Sequence[ToolCall]
        if event.kind == "tool_call_started":
            calls = [ToolCall(event.name, {} if event.arguments is None else event.arguments)]
        elif event.kind == "model_call_finished":
            calls = event.tool_calls
        elif event.kind == "run_started":
            calls = [c for m in event.task for c in m.tool_calls]
        else:
            return []
        found: list[str] = []
        for call in calls:
            names = self.secret_args.get(call.name) if isinstance(call.name, str) else None
            if names:
                found.extend(_secret_values(call.arguments, names))
        return found


def _with_values(text: Callable[[str], str], values: tuple[str, ...]) -> Callable[[str], str]:
    def redact(s: str) -> str:
        for v in values:
            if v in s:
                s = s.replace(v, SECRET_ARGUMENT)
        return text(s)

    return redact


def _parsed(args: Any) -> Any:
    if isinstance(args, str):
        try:
            return json.loads(args)
        except ValueError:
            return None
    return args


def _secret_values(args: Any, names: frozenset[str]) -> list[str]:
    parsed = _parsed(args)
    if not isinstance(parsed, dict):
        return []
    out = []
    for name in names:
        value = parsed.get(name)
        if value is None or isinstance(value, bool):
            continue
        s = value if isinstance(value, str) else json.dumps(value)
        if len(s) >= 4:  # shorter values would redact ordinary text
            out.append(s)
    return out


def _replace_secret_arguments(args: Any, names: frozenset[str]) -> Any:
    """The arguments with the values of `names` replaced whole (a raw JSON string stays a string)."""
    if isinstance(args, dict):
        if not any(n in args for n in names):
            return args
        return {k: (SECRET_ARGUMENT if k in names else v) for k, v in args.items()}
    if isinstance(args, str):
        parsed = _parsed(args)
        if isinstance(parsed, dict):
            if not any(n in parsed for n in names):
                return args
            return json.dumps({k: (SECRET_ARGUMENT if k in names else v) for k, v in parsed.items()})
        # Malformed JSON that may hold a secret argument: keep nothing of it (fails closed).
        if any(n in args for n in names):
            return "[redacted:malformed arguments with a secret argument]"
    return args
