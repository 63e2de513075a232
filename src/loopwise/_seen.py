"""What each model call was shown: recorded compactly in the log, rebuilt exactly from it.

Every THINK request is a view of the run's append-only transcript, which the context
policy (`_context`) cuts: the head (instructions and task), then the running summary
or the note about dropped iterations, then the verbatim part from the window's start.
So a `model_call_started` needs to record only what the transcript gained since the
previous call (the assistant message with its tool calls, the tool results, the
nudges: usually a handful of messages), and where it goes:

```
model_call_started.input_at     the transcript position the added messages start at
model_call_started.input_added  those messages (the first call: instructions and task)
```

The window's start, the summary and the count of dropped iterations are already in the
log, as `context_folded` events; the head is the `run_started` task and instructions.
The log stays linear in size: each transcript message is recorded once (once more
after each resume, whose first call records the whole transcript it rebuilt).

A request that is not a view of the transcript is recorded whole, with `input_at` None:
a `summary` call (its prompt and the units it merges, each unit once in a run), and any
request of a context policy of your own that overrides `messages()`. Both None: the
run was recorded before loopwise logged inputs (schema 1.0).

`shown` is what the loop calls, on its hot path, before each model call; `seen_calls`
and `messages_seen` rebuild the requests from the log, redacted as the log is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from ._context import ContextPolicy, ContextState, FullContext
from ._errors import UserError
from ._events import ContextFolded, Event, ModelCallStarted, RunStarted
from ._messages import Message

__all__ = ["SeenCall", "messages_seen", "seen_calls", "shown"]

_standard_messages = ContextPolicy.messages


def shown(policy: ContextPolicy, transcript: list[Message], cursor: int, purpose: str,
          messages: list[Message]) -> tuple[int | None, list[Message], int]:
    """What a model call's start records: ``(input_at, input_added, cursor after it)``.

    `cursor` is how much of `transcript` earlier calls of this run have recorded (0
    for a new run, and for a resumed one: its first call records the whole transcript).
    `messages` is the request: recorded whole when it is not a view of the transcript.
    """
    if purpose == "summary" or (policy.folds and type(policy).messages is not _standard_messages):
        return None, list(messages), cursor
    n = len(transcript)
    if cursor > n:  # (the transcript never shrinks below what was shown; if it did, record it all)
        cursor = 0
    return cursor, transcript[cursor:], n


@dataclass(frozen=True, slots=True)
class SeenCall:
    """One model call and the messages it was shown (None: not recorded, an older log)."""

    event: ModelCallStarted
    #: Its position among the run's model calls, from 1.
    number: int
    messages: list[Message] | None


class _Window:
    """The context state that `context_folded` events describe, and the view it gives."""

    __slots__ = ("state",)

    _policy = FullContext()  # (any policy whose `messages` is the standard one)

    def __init__(self, head: int) -> None:
        self.state = ContextState(head=head, start=head)

    def fold(self, e: ContextFolded) -> None:
        state, n = self.state, len(e.units)
        state.folded += n
        state.start += e.n_messages
        if e.outcome == "summarized":
            state.summary = e.summary
            state.summarized += n
        else:
            state.dropped += n

    def view(self, transcript: list[Message]) -> list[Message]:
        """What `ContextPolicy.messages` made of `transcript` in this state: the same code."""
        return _standard_messages(self._policy, transcript, self.state)


def seen_calls(events: Iterable[Event]) -> list[SeenCall]:
    """Every model call of a run's events, in order, with the messages it was shown.

    One walk of the log; each call's messages are a new list (what the request held,
    redacted as the log is).
    """
    out: list[SeenCall] = []
    transcript: list[Message] = []
    window = _Window(0)
    for e in events:
        if isinstance(e, RunStarted):
            window = _Window((1 if e.instructions else 0) + len(e.task))
        elif isinstance(e, ContextFolded):
            window.fold(e)
        elif isinstance(e, ModelCallStarted):
            added = e.input_added
            if added is None:
                messages = None
            elif e.input_at is None:
                messages = list(added)
            else:
                del transcript[e.input_at :]
                transcript.extend(added)
                messages = window.view(transcript)
            out.append(SeenCall(e, len(out) + 1, messages))
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
