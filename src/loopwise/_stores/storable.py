"""Values the event log can hold: text UTF-8 can encode, nesting it can walk.

Whatever a user, a model or a tool hands loopwise ends up in an event, and an event
must be storable, or the run's log is lost with it. Two kinds of value are not:

- text UTF-8 cannot encode: a lone surrogate (``"\\ud800"``), which a Python str
  allows. Each such character is replaced by U+FFFD (``"\\ufffd"``, the replacement
  character), and the event's `replaced` field names the fields where that happened
  (``"task[0].content"``, ``"tool_calls[0].arguments.query"``);
- arguments nested deeper than `MAX_DEPTH` levels, or that contain themselves: what
  the model sent is replaced by `TOO_DEEP`, which the tool call is answered for
  (`invalid_arguments`, `DEPTH_MESSAGE`).

The loop replaces at the edges where such values enter its state (the task, a model's
response, a tool's result), so the model, the budget's token estimates and the log
all see the same text; `clean_event` is the last resort for any other field, applied
to a batch of events that a store could not encode.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Any

__all__ = [
    "DEPTH_MESSAGE",
    "MAX_DEPTH",
    "REPLACEMENT",
    "TOO_DEEP",
    "TooDeep",
    "clean",
    "clean_event",
    "clean_text",
    "plain",
    "too_deep",
]

#: The deepest nesting of a tool call's arguments the loop takes (a dict of plain values is 1).
MAX_DEPTH = 100
REPLACEMENT = "\ufffd"
#: What arguments nested deeper than `MAX_DEPTH` (or containing themselves) are kept as.
TOO_DEEP = f"(arguments nested deeper than {MAX_DEPTH} levels: not kept by loopwise)"
DEPTH_MESSAGE = (f"arguments nest deeper than {MAX_DEPTH} levels (or contain themselves); "
                 "send a flatter JSON object matching the tool's schema")

# In a Python str, the only characters UTF-8 cannot encode are the surrogates.
_SURROGATE = re.compile("[\ud800-\udfff]")
_SCALARS = frozenset((int, float, bool, type(None)))
_CONTAINERS = (dict, list, tuple)


# Internal, not a LoopwiseError: its callers catch it (a task too deep is raised as a
# `UserError`), so it never reaches a caller (see `_errors`).
class TooDeep(ValueError):
    """A value nested deeper than the walk goes (or containing itself)."""


def clean_text(text: str) -> str | None:
    """`text` with each character UTF-8 cannot encode replaced by U+FFFD; None if it has none."""
    if text.isascii():
        return None
    try:
        text.encode()
    except UnicodeEncodeError:
        return _SURROGATE.sub(REPLACEMENT, text)
    return None


def plain(arguments: dict[Any, Any]) -> bool:
    """Whether `arguments` are str keys to str (ASCII), number, bool or None values: nothing to clean or check.

    The loop's fast path: most tool calls' arguments are this, and need no walk.
    """
    scalars = _SCALARS
    for key, value in arguments.items():
        if type(key) is not str or not key.isascii():
            return False
        kind = type(value)
        if kind is str:
            if not value.isascii():
                return False
        elif kind not in scalars:
            return False
    return True


def too_deep(value: Any, limit: int = MAX_DEPTH) -> bool:
    """Whether `value` nests dicts, lists and tuples deeper than `limit` levels (a cycle is infinitely deep).

    Walked without recursion; a shared container is walked again only when reached deeper.
    """
    if not isinstance(value, _CONTAINERS):
        return False
    seen: dict[int, int] = {}
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if depth > limit:
            return True
        if seen.get(id(item), 0) >= depth:
            continue
        seen[id(item)] = depth
        for child in (item.values() if isinstance(item, dict) else item):
            if isinstance(child, _CONTAINERS):
                stack.append((child, depth + 1))
    return False


def clean(value: Any, path: str, notes: list[str], depth: int = 0) -> Any:
    """`value` with its text made storable: a copy where anything changed, else `value` itself.

    Walks str, dicts (keys too), lists, tuples and dataclass instances (`Message`,
    `ToolCall`, `ErrorInfo`...); appends to `notes` the path of each str replaced.
    Raises `TooDeep` past 2 × `MAX_DEPTH` levels (the loop refuses deeper arguments
    before they get here).
    """
    kind = type(value)
    if kind is str:
        fixed = clean_text(value)
        if fixed is None:
            return value
        notes.append(path)
        return fixed
    if kind in _SCALARS:
        return value
    if depth > 2 * MAX_DEPTH:
        raise TooDeep(f"{path} nests deeper than {2 * MAX_DEPTH} levels")
    if isinstance(value, dict):
        changed = False
        out = {}
        for key, item in value.items():
            new_key = clean(key, f"{path}.<key>", notes, depth + 1) if type(key) is str else key
            new_item = clean(item, f"{path}.{new_key}", notes, depth + 1)
            changed = changed or new_key is not key or new_item is not item
            out[new_key] = new_item
        return out if changed else value
    if isinstance(value, (list, tuple)):
        items = [clean(item, f"{path}[{i}]", notes, depth + 1) for i, item in enumerate(value)]
        if all(new is old for new, old in zip(items, value)):
            return value
        return items if isinstance(value, list) else tuple(items)
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        changes = {}
        for f in dataclasses.fields(value):
            if not f.init:
                continue
            old = getattr(value, f.name)
            new = clean(old, f"{path}.{f.name}", notes, depth + 1)
            if new is not old:
                changes[f.name] = new
        return dataclasses.replace(value, **changes) if changes else value
    return value


def clean_event(event: Any) -> bool:
    """Make every field of `event` storable, in place, and name the fields in its `replaced`.

    True if anything was replaced. A field too deep to walk is left as it is (the
    store's error then stands).
    """
    notes: list[str] = []
    for f in dataclasses.fields(event):
        if f.name in ("kind", "replaced"):
            continue
        old = getattr(event, f.name)
        try:
            new = clean(old, f.name, notes)
        except (TooDeep, RecursionError):
            continue
        if new is not old:
            setattr(event, f.name, new)
    if not notes:
        return False
    event.replaced = sorted({*(event.replaced or ()), *notes})
    return True
