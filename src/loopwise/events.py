"""The event log's public types and codec: read, write and inspect runs from Python.

Every run is an append-only sequence of the event classes below (see
``docs/event-log.md`` for what each holds). `dumps` writes one event as one line of
JSON, byte for byte what the stores write; `loads` reads it back. `dumps_lines` and
`loads_lines` do the same for JSON lines, one event a line.

```python
from loopwise import events

line = events.dumps(events.IterationStarted(run_id="r", seq=1, ts=0.5, iteration=1))
assert isinstance(events.loads(line), events.IterationStarted)
```

`messages_seen(events, n)` rebuilds the messages the run's `n`-th model call was
shown, from what each `model_call_started` records (schema 1.1 on).

`SCHEMA_VERSION` (``"major.minor"``) versions the events' JSON: which kinds there
are and the fields of each. A minor version adds a kind, or a field with a default
(a reader of an older minor ignores the fields it does not know, and names a kind it
does not know in its error); a major version removes, renames or changes a field.
It is not the SQLite database's schema: that one is an integer (``PRAGMA
user_version``, "schema 5" in `loopwise`'s messages), versions the tables the events
are stored in, and is checked when a database is opened. The event JSON carries no
version of its own (that would cost every event its bytes): a reader of JSON lines
kept elsewhere passes the version they were written under, ``loads(line,
schema="1.0")``, and one written under a newer major version is refused with
`EventSchemaError`, as is anything that is not an event this loopwise knows.
"""

from __future__ import annotations

from ._errors import LoopwiseError
from ._events import (
    BreakerChanged,
    ContextFolded,
    ErrorInfo,
    Event,
    IterationStarted,
    KillReceived,
    LimitHit,
    ModelAttemptFailed,
    ModelCallFinished,
    ModelCallStarted,
    Nudge,
    RunFinished,
    RunResumed,
    RunStarted,
    ThreadAbandoned,
    ToolAttemptFailed,
    ToolCallFinished,
    ToolCallStarted,
    ToolFallback,
    dump_lines,
    first_error,
    load_event,
)
from ._views.seen import messages_seen

__all__ = [
    "BreakerChanged",
    "ContextFolded",
    "ErrorInfo",
    "Event",
    "EventSchemaError",
    "IterationStarted",
    "KillReceived",
    "LimitHit",
    "ModelAttemptFailed",
    "ModelCallFinished",
    "ModelCallStarted",
    "Nudge",
    "RunFinished",
    "RunResumed",
    "RunStarted",
    "SCHEMA_VERSION",
    "ThreadAbandoned",
    "ToolAttemptFailed",
    "ToolCallFinished",
    "ToolCallStarted",
    "ToolFallback",
    "dumps",
    "dumps_lines",
    "loads",
    "loads_lines",
    "messages_seen",
]

#: The version of the events' JSON shape, ``"major.minor"`` (not the SQLite database's schema).
SCHEMA_VERSION = "1.1"
_MAJOR = 1


class EventSchemaError(LoopwiseError, ValueError):
    """Text that is not an event this loopwise can read: an unknown kind, a missing or
    mistyped field, JSON that is not, or events of a newer major schema version."""


def dumps(event: Event) -> str:
    """One event as one line of JSON (no newline): the bytes the stores write, as text."""
    return dump_lines([event])[:-1].decode()


def dumps_lines(events: list[Event]) -> str:
    """Events as JSON lines, each ended by a newline: what the SQLite store journals."""
    return dump_lines(list(events)).decode()


def loads(data: str | bytes, *, schema: str | None = None) -> Event:
    """One event from its line of JSON.

    Args:
        data: what `dumps` made (or a store wrote).
        schema: the `SCHEMA_VERSION` it was written under, when it was kept outside a store;
            a newer major version than this loopwise's is refused.

    Raises:
        EventSchemaError: one line saying what is wrong (``an event of unknown kind 'x'``).
    """
    if schema is not None:
        _check_schema(schema)
    try:
        return load_event(data)
    except ValueError as exc:  # pydantic's ValidationError, JSON that is not included
        raise EventSchemaError(f"not an event this loopwise can read ({first_error(exc)}): written by a "
                               "newer loopwise, or edited") from None


def loads_lines(data: str | bytes, *, schema: str | None = None) -> list[Event]:
    """Events from JSON lines, one event a line (blank lines are skipped); see `loads`.

    Raises:
        EventSchemaError: one line naming the first line that is not an event, and why.
    """
    if schema is not None:
        _check_schema(schema)
    text = data.decode() if isinstance(data, bytes) else data
    out = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            out.append(load_event(line))
        except ValueError as exc:
            raise EventSchemaError(f"line {number} is not an event this loopwise can read "
                                   f"({first_error(exc)}): written by a newer loopwise, or edited") from None
    return out


def _check_schema(schema: str) -> None:
    major, dot, minor = schema.partition(".") if isinstance(schema, str) else ("", "", "")
    if not (dot and major.isdigit() and minor.isdigit()):
        raise EventSchemaError(f"schema={schema!r} is not an event schema version: pass \"major.minor\", "
                               f"as loopwise.events.SCHEMA_VERSION ({SCHEMA_VERSION!r}) is")
    if int(major) > _MAJOR:
        raise EventSchemaError(f"events of schema {schema} are newer than this loopwise reads "
                               f"({SCHEMA_VERSION}): upgrade loopwise to read them")
    if int(major) < _MAJOR:
        raise EventSchemaError(f"there is no event schema {schema}: this loopwise reads {_MAJOR}.x "
                               f"(its own is {SCHEMA_VERSION})")
