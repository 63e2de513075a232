"""What each model call was shown: recorded compactly in the log, rebuilt exactly from it.

Every THINK request is a view of the run's append-only transcript, which the context
policy (`_policies.context`) cuts: the head (instructions and task), then the running summary
or the note about dropped iterations, then the verbatim part from the window's start.
What the transcript gains between two calls (the assistant message with its tool
calls, the tool results, the nudges) is already in the log, in the events between
them, and the core's fold (`_core.evolve`) turns those events into transcript messages
by the very rules the live loop used. So a `model_call_started` records only where the
new messages go and how many there are, never their content again:

```
model_call_started.input_at     the transcript position the added messages start at
model_call_started.input_n      how many (the first call: instructions and task)
```

The window's start, the summary and the count of dropped iterations are in the log as
`context_folded` events; the head is the `run_started` task and instructions. The log
stays linear in size, and recording costs two integers a call. Rebuilding checks that
the fold's transcript has exactly `input_at + input_n` messages at each call: a log
written by other rules than the reader's says so instead of showing a wrong request.

A request that is not a view of the transcript is recorded whole in `input_added`, with
`input_at` None: a `summary` call (its prompt and the units it merges, each unit once in
a run), and any request of a context policy of your own that overrides `messages()`.
All None: the run was recorded before loopwise logged inputs (schema 1.0).

`shown` is what the loop calls, on its hot path, before each model call; `seen_calls`
and `messages_seen` rebuild the requests from the log, redacted as the log is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from .._policies.context import ContextPolicy, FullContext
from .._core.evolve import EVOLVE
from .._core.state import State
from .._errors import UserError
from .._events import Event, ModelCallStarted, RunStarted
from .._messages import Message

__all__ = ["SeenCall", "messages_seen", "seen_calls", "shown"]

_standard_messages = ContextPolicy.messages
#: Any policy whose `messages` is the standard one: the view reads only the context state.
_VIEW = FullContext()


def shown(policy: ContextPolicy, transcript: list[Message], cursor: int, purpose: str,
          messages: list[Message]) -> tuple[int | None, int | None, list[Message] | None, int]:
    """What a model call's start records: ``(input_at, input_n, input_added, cursor after it)``.

    `cursor` is how much of `transcript` earlier calls of this run have recorded (0
    for a new run, and for a resumed one: its first call refers to the whole transcript).
    `messages` is the request: recorded whole when it is not a view of the transcript.
    """
    if purpose == "summary" or (policy.folds and type(policy).messages is not _standard_messages):
        return None, None, list(messages), cursor
    n = len(transcript)
    if cursor > n:  # (the transcript never shrinks below what was shown; if it did, refer to it all)
        cursor = 0
    return cursor, n - cursor, None, n


@dataclass(frozen=True, slots=True)
class SeenCall:
    """One model call and the messages it was shown (None: not recorded, an older log)."""

    event: ModelCallStarted
    #: Its position among the run's model calls, from 1.
    number: int
    messages: list[Message] | None


def seen_calls(events: Iterable[Event]) -> list[SeenCall]:
    """Every model call of a run's events, in order, with the messages it was shown.

    One fold of the log through the core's `evolve` (the rules the live loop used); each
    call's messages are a new list (what the request held, redacted as the log is).

    Raises:
        UserError: the log's transcript disagrees with what a call recorded (written by
            other rules than this version of loopwise's).
    """
    out: list[SeenCall] = []
    it = iter(events)
    started = next(it, None)
    if type(started) is not RunStarted:
        return out
    state = State.start(started, _VIEW, None, 0)
    table = EVOLVE
    for e in it:
        if type(e) is ModelCallStarted:
            messages: list[Message] | None = None
            if e.input_at is None:
                messages = None if e.input_added is None else list(e.input_added)
            else:
                transcript = state.transcript
                expected = e.input_at + (e.input_n or 0)
                if len(transcript) != expected:
                    raise UserError(
                        f"run {e.run_id}: model call at seq {e.seq} recorded a transcript of {expected} "
                        f"messages, but folding the log gives {len(transcript)}: the log was written by "
                        "other rules than this version of loopwise's")
                messages = _standard_messages(_VIEW, transcript, state.context)
            out.append(SeenCall(e, len(out) + 1, messages))
        fn = table.get(type(e))
        if fn is not None:
            fn(state, e)
    return out


def messages_seen(events: Sequence[Event], call: int | ModelCallStarted) -> list[Message]:
    """The exact messages of one model call's request, rebuilt from the run's log.

    Args:
        events: the run's events (``store.load(run_id)``), at least up to that call.
        call: the call's `model_call_started` event, or its position among the run's
            model calls, from 1.

    Raises:
        UserError: no such call, or it was recorded before loopwise logged inputs.
    """
    calls = seen_calls(events)
    if isinstance(call, ModelCallStarted):
        found = next((c for c in calls if c.event.seq == call.seq), None)
        what = f"the model call at seq {call.seq}"
    else:
        found = calls[call - 1] if type(call) is int and 1 <= call <= len(calls) else None
        what = f"model call {call!r}"
    if found is None:
        raise UserError(f"{what} is not in these events: they hold {_calls(len(calls))}")
    if found.messages is None:
        raise UserError(f"{what} was recorded before loopwise logged what each model call was shown "
                        "(event schema 1.0); runs made since record it")
    return found.messages


def _calls(n: int) -> str:
    return "no model call" if n == 0 else "1 model call" if n == 1 else f"model calls 1 to {n}"


def message_dict(message: Message) -> dict[str, Any]:
    """A message as plain JSON data (what `--json` prints)."""
    out: dict[str, Any] = {"role": message.role, "content": message.content}
    if message.tool_calls:
        out["tool_calls"] = [{"id": c.id, "name": c.name, "arguments": c.arguments} for c in message.tool_calls]
    if message.tool_call_id is not None:
        out["tool_call_id"] = message.tool_call_id
    return out
