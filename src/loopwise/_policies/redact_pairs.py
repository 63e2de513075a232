r"""Secret key/value pairs: where the value a secret-named key governs ends, at any depth of escaping.

A model that calls a tool with raw JSON arguments puts ``{"password": "X"}`` inside a
JSON string; a tool result may carry a JSON document inside one of its strings, and
that one another. At each level the quotes are escaped once more: ``"`` at the top,
``\"`` one level in, ``\\\"`` two levels in (``2**d - 1`` backslashes at depth ``d``).
A regular expression cannot count them, so a pair is found in two steps: the key and its
separator by a pattern (`pair_pattern`), then the end of its value by a scan
(`value_span`). The value runs to the end of what the key governs:

- quoted (``"…"``, ``'…'``, backticks, ``&quot;…&quot;``, escaped to any depth): to its
  closing quote, the first with as many backslashes before it as the opening one had.
  A quote with more is part of the value (escaped deeper, or escaped by a wrapper that
  quotes with the other quote: ``repr`` of JSON writes ``\\"``); one with fewer closes
  the string around the value, and the value is cut there. A value that ends in a
  backslash of its own is ambiguous: it runs on to the next quote at its depth (more is
  replaced, never less);
- an object or a list (``{…}``, ``[…]``): to its closing bracket, the brackets inside its
  strings not counted;
- unquoted after a quoted key (JSON, YAML, a dict's repr): up to ``,``, ``;``, ``}``,
  ``]``, ``)``, a quote or the end of the line;
- unquoted after a bare key (``key=value``, ``key: value``: a header, a query string,
  logfmt, YAML, prose): the rest of the line, spaces included (a passphrase has them),
  up to a newline (raw or escaped), the end of the string around it, a comma or a
  semicolon followed by a space, or the start of the next pair or flag
  (``password=x user=bob``, ``--password=x --host h``, ``&user=``).

Dicts are redacted by key as well (`key_rule`): ``{"password": ...}`` as a dict holds its
secret in a string that, alone, looks like nothing.
"""

from __future__ import annotations

import re
from collections.abc import Callable

__all__ = ["PASSWORD_KEYS", "CREDENTIAL_KEYS", "boundary", "key_rule", "pair_pattern", "value_span"]

#: Key names whose value is a password (matched at the end of a key: ``db_password`` too;
#: ``pass`` as a word of its own: ``db_pass``, not ``bypass``).
PASSWORD_KEYS = r"password|passwd|passphrase|passcode|pwd|(?<![a-z])pass"
#: Key names whose value is a credential.
CREDENTIAL_KEYS = (r"api[_-]?key|secret(?:[_-]?access)?(?:[_-]?key)?|access[_-]?key|private[_-]?key"
                   r"|(?:access|auth|refresh|session|id)[_-]?token|token")

#: A quote, escaped to any depth (the backslashes before it are part of it).
QUOTE = r"""\\*(?:["'`]|&quot;)"""
#: An escaped control character (``\n`` in a JSON string): a word boundary, though ``n`` is a letter.
_AFTER_ESCAPE = r"(?<=\\[nrtbf])"


def boundary(before: str = r"\w") -> str:
    r"""A lookbehind for the start of a token: no character of `before` before it, or an escape (``\n``)."""
    return rf"(?:(?<![{before}])|{_AFTER_ESCAPE})"


def pair_pattern(keys: str, *, lowered: bool = False) -> re.Pattern[str]:
    """A key named by `keys`, its closing quote if it is quoted (group ``kq``), and the separator.

    `lowered`: for a lower-cased text, case-sensitive (`keys` are lower-case).
    """
    key = f"(?:{keys})" if lowered else f"(?i:{keys})"
    return re.compile(rf"{key}(?P<kq>{QUOTE})?\s*(?::=|=>|={{1,3}}|:)")


# Where an unquoted value ends. After a quoted key (JSON, YAML, a dict's repr): at a
# comma, a closing bracket, a quote or the line's end. After a bare key: at a quote, the
# line's end, a comma or semicolon and a space (``token=x, then``), or where the next
# pair or flag starts (``password=x user=bob``, ``--password=x --host h``, ``&user=bob``).
_SCALAR_END = re.compile(r"""\\*["'`]|&quot;|[,;}\])\r\n]|\\+[nr]""")
_UNQUOTED_END = re.compile(
    r"""\\*"|\\*['`](?!\w)|&quot;|[\r\n]|\\+[nr]"""
    r"""|[,;]\s|[\s,;&]+(?=-{1,2}[A-Za-z]|[A-Za-z_][\w.-]*(?:\\*["'])?\s*[:=])"""
)
_BRACKETS = {q: re.compile(r"[\[\]{}]|" + re.escape(q)) for q in ('"', "'", "`", "&quot;")}


def _backslashes_before(text: str, i: int) -> int:
    k = 0
    while i > k and text[i - k - 1] == "\\":
        k += 1
    return k


def _skip_space(text: str, i: int) -> int:
    n = len(text)
    while i < n:
        c = text[i]
        if c in " \t\r\n":
            i += 1
        elif c == "\\":
            j = i
            while j < n and text[j] == "\\":
                j += 1
            if j < n and text[j] in "nrt":
                i = j + 1
            else:
                break
        else:
            break
    return i


def _quoted(text: str, start: int, depth: int, quote: str) -> int:
    """The end of a quoted value that starts at `start`, opened by `quote` after `depth` backslashes."""
    n = len(text)
    j = start
    while True:
        p = text.find(quote, j)
        line_end = text.find("\n", j, n if p < 0 else p)
        if line_end >= 0:  # a quoted value does not run past a raw newline: cut there
            return line_end
        if p < 0:
            return n
        k = _backslashes_before(text, p)
        if k < depth:  # the string around the value closes first
            return p - k
        if k == depth:
            return p - depth
        j = p + len(quote)


def _bracketed(text: str, start: int, key_quote: str | None) -> int:
    """The end of the object or list at `start`: its closing bracket, brackets in its strings not counted."""
    if key_quote:
        depth = len(key_quote) - len(key_quote.lstrip("\\"))
        quote = key_quote[depth:]
    else:
        depth, quote = 0, '"'
    nesting = 0
    in_string = False
    for m in _BRACKETS[quote].finditer(text, start):
        c = m.group()
        p = m.start()
        if c == quote:
            k = _backslashes_before(text, p)
            if k < depth:  # the string around the value closes first
                return p - k
            if k == depth:
                in_string = not in_string
        elif in_string:
            continue
        elif c in "[{":
            nesting += 1
        else:
            nesting -= 1
            if nesting <= 0:
                return p + 1
    return len(text)


def value_span(text: str, pos: int, key_quote: str | None) -> tuple[int, int, str]:
    """Where the value after a key's separator (ending at `pos`) starts and ends, and the quotes for its marker.

    The quote is ``""`` where the value's own quotes are kept around the marker (a quoted
    value), or where the value was unquoted after an unquoted key; after a quoted key, an
    unquoted value (a number, an object) is replaced by a marker in the key's quotes, so
    that JSON stays JSON at every depth.
    """
    n = len(text)
    i = _skip_space(text, pos)
    if i >= n:
        return i, i, ""
    j = i
    while j < n and text[j] == "\\":
        j += 1
    if j < n:
        c = text[j]
        if c in "\"'`":
            return j + 1, _quoted(text, j + 1, j - i, c), ""
        if c == "&" and text.startswith("&quot;", j):
            return j + 6, _quoted(text, j + 6, j - i, "&quot;"), ""
    c = text[i]
    if c in "{[":
        return i, _bracketed(text, i, key_quote), key_quote or ""
    m = (_SCALAR_END if key_quote else _UNQUOTED_END).search(text, i)
    end = n if m is None else m.start()
    while end > i and text[end - 1] in " \t":
        end -= 1
    return i, end, key_quote or ""


#: A marker a rule before this one wrote: a value that is only a marker is left alone.
MARKER = re.compile(r"\[redacted(?::[a-z_ ]+)?\]")

_KEY_RULES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("password", re.compile(rf"(?i:{PASSWORD_KEYS})\Z")),
    ("credential", re.compile(rf"(?i:{CREDENTIAL_KEYS})\Z")),
    ("authorization", re.compile(r"(?i:authorization)\Z")),
)


def key_rule(key: str) -> str | None:
    """The rule a dict's key names (``"password"``, ``"credential"``, ``"authorization"``), or None."""
    for name, regex in _KEY_RULES:
        if regex.search(key) is not None:
            return name
    return None


def keyed_value(name: str, value: object, check: Callable[[str], bool] | None, scheme: re.Pattern[str]) -> object:
    """A dict's value under a key that names a secret: the marker, whole, unless it cannot be one.

    ``None``, booleans, an empty string and a marker are kept; so are numbers and the plain
    values `check` refuses under a credential's name (``{"token": 5}`` counts tokens). An
    ``Authorization`` value keeps its scheme word; without one it must look like a
    credential (``"pending"`` is prose). A list or a dict is replaced whole.
    """
    if value is None or value is True or value is False:
        return value
    token = f"[redacted:{name}]"
    if isinstance(value, str):
        if not value or MARKER.fullmatch(value):
            return value
        if name == "authorization":
            m = scheme.match(value)
            if m is not None:
                rest = value[m.end():]
                return value if not rest or MARKER.fullmatch(rest) else value[:m.end()] + token
            return token if check is None or (check(value) and not any(c.isspace() for c in value)) else value
        if check is not None and not check(value):
            return value
        return token
    if isinstance(value, (int, float)) and name != "password":
        return value
    return token
