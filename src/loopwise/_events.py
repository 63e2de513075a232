"""The event log's types: every run is an append-only sequence of these.

Each event is a plain dataclass with a `kind` discriminator, the `run_id`, its
position `seq` in the run (0, 1, 2, ...) and `ts`, the runtime clock's wall time
(seconds since the epoch) when it happened. Results, the CLI and every other
view are computed from these events. Each has a last field, `replaced`: None, or
the fields whose value could not be stored as given and was replaced (`_stores.storable`).

```
run_started          task, instructions, agent, limits, tags
  iteration_started  iteration
    model_call_started / model_call_finished     (purpose: think | final_answer | summary;
                                                  the start records what the call was shown)
      model_attempt_failed                        (retries and fallback models)
    tool_call_started / tool_call_finished       (one pair per tool call)
      tool_attempt_failed, tool_fallback          (retries and fallbacks, as they happen)
      breaker_changed, thread_abandoned           (the runtime's own decisions)
    nudge                                         (a user message the runtime adds)
    context_folded                                (REFINE summarized or dropped old iterations)
  limit_hit          which limit stopped the run, and why
  kill_received      a kill request reached the run: who asked, why, when it was stored
run_resumed          a new segment: `agent.resume` continues the run from its log
  iteration_started  ...                          (the same events as in the first segment)
run_finished         stop reason, output, totals
```
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args

from ._hotpath import positional
from ._messages import Message, ToolCall, Usage

if TYPE_CHECKING:
    from pydantic import TypeAdapter

__all__ = [
    "ErrorInfo",
    "Event",
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
    "StopReason",
    "ThreadAbandoned",
    "ToolAttemptFailed",
    "ToolCallFinished",
    "ToolCallStarted",
    "ToolFallback",
    "BreakerChanged",
    "ContextFolded",
    "ToolOutcome",
    "dump_events",
    "dump_lines",
]

StopReason = Literal["done", "max_iterations", "budget", "deadline", "killed", "runaway", "error"]
STOP_REASONS: tuple[str, ...] = ("done", "max_iterations", "budget", "deadline", "killed", "runaway", "error")
ToolOutcome = Literal["ok", "fallback", "error", "invalid_arguments", "unknown_tool", "not_executed", "cancelled",
                      "unknown"]
BreakerState = Literal["closed", "open", "half_open"]
ModelCallPurpose = Literal["think", "final_answer", "summary"]


@dataclass(kw_only=True, slots=True, frozen=True)
class ErrorInfo:
    """An exception, as recorded in the log."""

    type: str
    message: str
    traceback: str | None = None

    @classmethod
    def from_exception(cls, exc: BaseException, *, with_traceback: bool = False) -> ErrorInfo:
        tb = None
        if with_traceback:
            import traceback

            tb = "".join(traceback.format_exception(exc))
        return cls(type=type(exc).__name__, message=str(exc), traceback=tb)


@dataclass(kw_only=True, slots=True)
class RunStarted:
    kind: Literal["run_started"] = "run_started"
    run_id: str
    seq: int
    ts: float
    task: list[Message]
    instructions: str | None = None
    agent: dict[str, Any] = field(default_factory=dict)
    limits: dict[str, Any] = field(default_factory=dict)
    tags: list[str] = field(default_factory=list)
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class IterationStarted:
    kind: Literal["iteration_started"] = "iteration_started"
    run_id: str
    seq: int
    ts: float
    iteration: int
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ModelCallStarted:
    kind: Literal["model_call_started"] = "model_call_started"
    run_id: str
    seq: int
    ts: float
    iteration: int
    purpose: ModelCallPurpose = "think"
    model: str
    n_messages: int
    n_tools: int
    #: The `max_tokens` sent: the agent's, capped to what the budgets can pay for.
    max_tokens: int | None = None
    #: The input-token estimate the budget reservation was made from (an upper bound).
    estimated_input_tokens: int | None = None
    #: Dollars reserved for this call's worst case before making it.
    reserved_usd: float | None = None
    #: What the call was shown, compactly (`_views.seen`; `loopwise.events.messages_seen` rebuilds
    #: it): the run's transcript gained `input_n` messages since the previous call, from
    #: position `input_at` (the first call: instructions and task). Those messages are already
    #: in the log (the events before this one), so they are referred to, not copied; folding
    #: the log rebuilds them. `input_at` None: `input_added` is the whole request (a `summary`
    #: call, or a context policy's own `messages()`). All None: recorded before inputs were
    #: logged (schema 1.0).
    input_at: int | None = None
    input_n: int | None = None
    input_added: list[Message] | None = None
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ModelCallFinished:
    kind: Literal["model_call_finished"] = "model_call_finished"
    run_id: str
    seq: int
    ts: float
    iteration: int
    purpose: ModelCallPurpose = "think"
    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    finish_reason: str | None = None
    usage: Usage = field(default_factory=Usage)
    usage_estimated: bool = False
    cost_usd: float = 0.0
    latency_s: float = 0.0
    error: ErrorInfo | None = None
    #: The model that answered (a fallback model, when the primary failed).
    model: str | None = None
    #: Dollars billed above the call's reservation (a provider that ignored max_tokens...).
    overrun_usd: float = 0.0
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ModelAttemptFailed:
    """One attempt of a model call failed; it is retried, or the next model is tried."""

    kind: Literal["model_attempt_failed"] = "model_attempt_failed"
    run_id: str
    seq: int
    ts: float
    iteration: int
    purpose: ModelCallPurpose = "think"
    model: str
    attempt: int
    error: ErrorInfo
    latency_s: float
    retry_in_s: float | None = None
    will_fallback: bool = False
    reason: str = ""
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ToolCallStarted:
    kind: Literal["tool_call_started"] = "tool_call_started"
    run_id: str
    seq: int
    ts: float
    iteration: int
    call_id: str
    name: str
    #: The arguments as the tool receives them: as the model sent them, less `loopwise_expect`.
    arguments: dict[str, Any] | str | None = None
    #: What the model expected the call to return (`Agent(expectations=True)`); None: no expectation.
    expected: Any = None
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ToolCallFinished:
    kind: Literal["tool_call_finished"] = "tool_call_finished"
    run_id: str
    seq: int
    ts: float
    iteration: int
    call_id: str
    name: str
    outcome: ToolOutcome
    #: The tool message the model reads next.
    content: str
    latency_s: float = 0.0
    error: ErrorInfo | None = None
    #: Attempts made (0 when the call never reached the tool: invalid, unknown, breaker open).
    attempts: int = 1
    #: The fallback that answered, when `outcome == "fallback"`.
    fallback: str | None = None
    cost_usd: float = 0.0
    #: Whether the result matched the model's expectation: True, False, or None (no
    #: expectation, or cannot tell). Decided by the tool's `check` or the default comparison.
    match: bool | None = None
    #: Who decided `match`: ``"check"`` (the tool's own), ``"default"``, or None (no expectation).
    match_by: Literal["check", "default"] | None = None
    #: Why `match` is unknown when a check failed ("check raised ValueError: ...").
    match_note: str | None = None
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ToolAttemptFailed:
    """One attempt of a tool call failed (it may be retried after `retry_in_s`)."""

    kind: Literal["tool_attempt_failed"] = "tool_attempt_failed"
    run_id: str
    seq: int
    ts: float
    iteration: int
    call_id: str
    name: str
    attempt: int
    error: ErrorInfo
    latency_s: float
    retry_in_s: float | None = None
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ToolFallback:
    """A fallback of a failed tool call was tried, and whether it answered."""

    kind: Literal["tool_fallback"] = "tool_fallback"
    run_id: str
    seq: int
    ts: float
    iteration: int
    call_id: str
    name: str
    fallback: str
    ok: bool
    reason: str
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class BreakerChanged:
    """A tool's circuit breaker changed state (shared by all runs in the process)."""

    kind: Literal["breaker_changed"] = "breaker_changed"
    run_id: str
    seq: int
    ts: float
    iteration: int
    name: str
    old: BreakerState
    new: BreakerState
    reason: str
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ThreadAbandoned:
    """A sync tool's thread was abandoned on timeout; it runs on detached until it ends."""

    kind: Literal["thread_abandoned"] = "thread_abandoned"
    run_id: str
    seq: int
    ts: float
    iteration: int
    call_id: str
    name: str
    thread: str
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class Nudge:
    """A user message the runtime adds to the conversation, and why."""

    kind: Literal["nudge"] = "nudge"
    run_id: str
    seq: int
    ts: float
    iteration: int
    content: str
    reason: str
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class ContextFolded:
    """REFINE moved iterations out of the context: summarized into the running summary, or dropped."""

    kind: Literal["context_folded"] = "context_folded"
    run_id: str
    seq: int
    ts: float
    iteration: int
    outcome: Literal["summarized", "dropped"]
    #: Which iterations (units of the transcript, 0-based) left the context.
    units: list[int] = field(default_factory=list)
    n_messages: int = 0
    #: The running summary after this fold.
    summary: str | None = None
    reason: str = ""
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class LimitHit:
    kind: Literal["limit_hit"] = "limit_hit"
    run_id: str
    seq: int
    ts: float
    iteration: int
    limit: StopReason
    detail: str
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class KillReceived:
    """A kill request reached the run: it stops now, cancelling what is in flight."""

    kind: Literal["kill_received"] = "kill_received"
    run_id: str
    seq: int
    ts: float
    iteration: int
    #: Who asked: ``user@host pid N``.
    by: str
    reason: str
    #: When the request was stored (wall-clock seconds): `ts - requested_ts` is the halt latency so far.
    requested_ts: float
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class RunResumed:
    """A new segment of a run: `agent.resume` continues it from its log after a crash, kill or interruption."""

    kind: Literal["run_resumed"] = "run_resumed"
    run_id: str
    seq: int
    ts: float
    #: 1 for the first resume, 2 for the next...
    segment: int
    #: How the previous segment ended: a stop reason (``killed``, ``error``) or ``crashed`` (no end in the log).
    previous_end: str
    #: The iteration the run continues from (the last one started before the resume).
    iteration: int
    #: Who resumed it: ``user@host pid N``.
    by: str
    #: Tool calls started but without a recorded outcome, and what resume did with each:
    #: ``{"call_id": ..., "name": ..., "action": "rerun" | "unknown"}``.
    interrupted_calls: list[dict[str, Any]] = field(default_factory=list)
    #: Spending carried over from the earlier segments (what the run's budget starts this one with).
    cost_usd: float = 0.0
    #: Of that, what was in flight when the previous segment died: a model call charged at its
    #: reservation, a paid tool call at its worst case (`ToolPolicy.max_cost_usd`).
    charged_usd: float = 0.0
    charged_tokens: int = 0
    #: Active time of the earlier segments (what the deadline counts).
    active_s: float = 0.0
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


@dataclass(kw_only=True, slots=True)
class RunFinished:
    kind: Literal["run_finished"] = "run_finished"
    run_id: str
    seq: int
    ts: float
    stop_reason: StopReason
    output: str | None = None
    iterations: int = 0
    model_calls: int = 0
    usage: Usage = field(default_factory=Usage)
    cost_usd: float = 0.0
    duration_s: float = 0.0
    reason: str | None = None
    error: ErrorInfo | None = None
    #: Fields whose value could not be stored as given and was replaced (`_stores.storable`): text UTF-8
    #: cannot encode (each such character became U+FFFD), arguments nested too deep. None: none.
    replaced: list[str] | None = None


Event = Union[
    RunStarted,
    IterationStarted,
    ModelCallStarted,
    ModelCallFinished,
    ModelAttemptFailed,
    ToolCallStarted,
    ToolCallFinished,
    ToolAttemptFailed,
    ToolFallback,
    BreakerChanged,
    ThreadAbandoned,
    Nudge,
    ContextFolded,
    LimitHit,
    KillReceived,
    RunResumed,
    RunFinished,
]


# The events every run makes, positionally: (run_id, seq, ts, <the other fields in order>), `replaced`
# None. Made by `_hotpath.positional`: generated (`exec`) or, plain, the class's `__init__` by keyword.
new_run_started: Callable[..., RunStarted] = positional(RunStarted)
new_iteration_started: Callable[..., IterationStarted] = positional(IterationStarted)
new_model_call_started: Callable[..., ModelCallStarted] = positional(ModelCallStarted)
new_model_call_finished: Callable[..., ModelCallFinished] = positional(ModelCallFinished)
new_tool_call_started: Callable[..., ToolCallStarted] = positional(ToolCallStarted)
new_tool_call_finished: Callable[..., ToolCallFinished] = positional(ToolCallFinished)
new_run_finished: Callable[..., RunFinished] = positional(RunFinished)


@cache
def _one_adapter() -> TypeAdapter[Event]:
    from pydantic import Field, TypeAdapter

    return TypeAdapter(Annotated[Event, Field(discriminator="kind")])


# Per event class, its own pydantic serializer's `to_json`: byte for byte what the
# discriminated union writes (the discriminator only picks the class; errors and
# warnings are the same too), at about a third of the cost per event. Anything else
# (a subclass, a foreign object) goes through the union, which says what is wrong.
_serializers: dict[type, Callable[[Any], bytes]] | None = None


def _event_serializers() -> dict[type, Callable[[Any], bytes]]:
    global _serializers
    if _serializers is None:
        from pydantic import TypeAdapter

        _serializers = {cls: TypeAdapter(cls).serializer.to_json for cls in get_args(Event)}
    return _serializers


def dump_events(events: list[Event]) -> list[bytes]:
    """Each event as JSON bytes (what the stores persist)."""
    get = (_serializers or _event_serializers()).get
    out = []
    for e in events:
        to_json = get(type(e))
        out.append(to_json(e) if to_json is not None else _one_adapter().dump_json(e))
    return out


# msgspec's encoder of dataclasses, for batches of the events above: the same bytes as
# pydantic's serializers (a test holds them to it) at about half the cost, written in
# one call per batch. pydantic's own JSON for anything msgspec has no rule for.
_lines_encoder: Any = None
_known: frozenset[type] = frozenset(get_args(Event))


def dump_lines(events: list[Event]) -> bytes:
    """The events as JSON lines, each ended by a newline (what the SQLite store journals).

    The same bytes as `dump_events` joined, for events of the classes above with plain
    JSON values (what a run holds: models send JSON). A batch msgspec cannot encode
    (a dict keyed by None, an object without a rule) is made by `dump_events`, whose
    error, if it has one, is the one raised. Not byte for byte the same as pydantic
    for a few values no model sends: bytes (base64 here, UTF-8 text there),
    timedelta (``PT90S`` against ``PT1M30S``), and a float's exponent (``1e308``
    against ``1e+308``, the same number).
    """
    global _lines_encoder
    encoder = _lines_encoder
    if encoder is None:
        encoder = _lines_encoder = _make_lines_encoder()
    known = _known
    for e in events:
        if type(e) not in known:  # a subclass or a foreign object: the union says what is wrong
            break
    else:
        try:
            return encoder.encode_lines(events)
        except Exception:  # noqa: BLE001, S110 - pydantic below makes it, or raises its own error
            pass
    datas = dump_events(events)
    datas.append(b"")
    return b"\n".join(datas)


def _make_lines_encoder() -> Any:
    import msgspec
    from pydantic_core import to_jsonable_python

    # What msgspec has no rule for (a pydantic model in a tool's arguments, say) as pydantic makes it.
    return msgspec.json.Encoder(enc_hook=to_jsonable_python)


def load_event(data: str | bytes) -> Event:
    """One event from its JSON form; raises pydantic's ValidationError if it is not one."""
    return _one_adapter().validate_json(data)


@cache
def _list_adapter() -> TypeAdapter[list[Event]]:
    from pydantic import Field, TypeAdapter

    return TypeAdapter(list[Annotated[Event, Field(discriminator="kind")]])


def load_events(data: str | bytes) -> list[Event]:
    """Events from a JSON array of them (a row of the SQLite store); raises pydantic's ValidationError."""
    return _list_adapter().validate_json(data)


def event_to_dict(event: Event) -> dict[str, Any]:
    """An event as plain JSON-compatible data (for `--json` output and exports)."""
    return _one_adapter().dump_python(event, mode="json")


def first_error(exc: ValueError) -> str:
    """The first thing pydantic (or JSON) found wrong in an event, in one short line."""
    errors = getattr(exc, "errors", None)
    if callable(errors):
        try:
            first = errors()[0]
            if first.get("type") == "union_tag_invalid":
                return f"an event of unknown kind {first.get('ctx', {}).get('tag')!r}"
            # (the position in a row's array says nothing to a reader: the field path does)
            where = ".".join(str(part) for part in first.get("loc", ()) if not isinstance(part, int))
            return f"{where + ': ' if where else ''}{first.get('msg', '')}"[:200]
        except Exception:  # noqa: BLE001 - the message below does
            pass
    return str(exc).splitlines()[0][:200]
