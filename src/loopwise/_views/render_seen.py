"""What the model saw at one iteration, on a console (`loopwise show RUN_ID --iteration N`).

```
run 18eaf556…   iteration 2 of 3   2 model calls
model call 3 of 5   summary   openai:gpt-4o-mini   2 messages   no tools   max_tokens 300
system ─────────────────────────────────────────────────────────────────────────
You keep the running summary of an AI agent's earlier steps, …
model call 4 of 5   think   openai:gpt-4o-mini   5 messages   2 tools   max_tokens 1024
system ─────────────────────────────────────────────────────────────────────────
Be brief.
user ───────────────────────────────────────────────────────────────────────────
Where are my orders?
assistant ──────────────────────────────────────────────────────────────────────
Looking them up.
  calls lookup({"order_id": "1"})   id c1
tool · answers c1 ──────────────────────────────────────────────────────────────
{"order_id": "1", "status": "shipped"}
```

Every message is shown whole, as the model received it (the log's redacted text):
this view answers "what exactly did the model see?", so nothing is shortened. Text is
printed as plain text, never as rich markup.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.rule import Rule
from rich.text import Text

from .._errors import UserError
from .._events import Event, IterationStarted
from .._messages import Message, ToolCall
from .seen import SeenCall, message_dict, seen_calls

__all__ = ["NOT_RECORDED", "calls_at", "render_seen", "seen_json"]

NOT_RECORDED = ("was recorded before loopwise logged what each model call was shown (event schema 1.0); "
                "`loopwise show RUN_ID` still shows its trace, and runs made since record their inputs")
ROLE_STYLES = {"system": "magenta", "user": "cyan", "assistant": "green", "tool": "yellow"}


def calls_at(events: Sequence[Event], iteration: int) -> tuple[list[SeenCall], int, int]:
    """The model calls of `iteration`, with what each was shown; and the run's iterations and model calls.

    Raises `UserError` (one line, naming the range) for an iteration the run does not have,
    and for a run recorded before inputs were logged.
    """
    run_id = events[0].run_id if events else "?"
    last = max((e.iteration for e in events if isinstance(e, IterationStarted)), default=0)
    if type(iteration) is not int or not 1 <= iteration <= last:
        have = "has no iterations" if last == 0 else "has iteration 1" if last == 1 else f"has iterations 1 to {last}"
        raise UserError(f"run {run_id} {have}; --iteration {iteration} is not one of them")
    calls = seen_calls(events)
    if calls and all(c.messages is None for c in calls):
        raise UserError(f"run {run_id} {NOT_RECORDED}")
    return [c for c in calls if c.event.iteration == iteration], last, len(calls)


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, str):  # the raw (maybe malformed) JSON the provider sent
        return arguments
    try:
        return json.dumps(arguments, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(arguments)


def _call_line(call: ToolCall) -> Text:
    text = Text("  calls ", style="dim")
    text.append(f"{call.name}({_arguments(call.arguments)})")
    if call.id is not None:
        text.append(f"   id {call.id}", style="dim")
    return text


def _message(message: Message, console: Console) -> None:
    title = message.role if message.tool_call_id is None else f"{message.role} · answers {message.tool_call_id}"
    console.print(Rule(Text(title, style=ROLE_STYLES.get(message.role, "")), align="left", style="dim"))
    if message.content is not None:
        console.print(Text(message.content), soft_wrap=False)
    elif not message.tool_calls:
        console.print(Text("(no content)", style="dim"))
    for call in message.tool_calls:
        console.print(_call_line(call))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def render_seen(events: Sequence[Event], iteration: int, console: Console) -> None:
    """Print what the model saw at `iteration`: each model call, then its messages, role by role."""
    calls, last, total = calls_at(events, iteration)
    head = Text()
    head.append("run ", style="bold")
    head.append(events[0].run_id)
    head.append(f"   iteration {iteration} of {last}   {_plural(len(calls), 'model call')}", style="dim")
    console.print(head)
    if not calls:
        console.print(Text(f"iteration {iteration} made no model call (the run stopped before its THINK)",
                           style="dim"))
        return
    for call in calls:
        e = call.event
        line = Text()
        line.append(f"model call {call.number} of {total}", style="bold")
        line.append(f"   {e.purpose}   {e.model}   {_plural(e.n_messages, 'message')}   "
                    f"{_plural(e.n_tools, 'tool') if e.n_tools else 'no tools'}", style="dim")
        if e.max_tokens is not None:
            line.append(f"   max_tokens {e.max_tokens}", style="dim")
        console.print(line)
        if call.messages is None:
            console.print(Text(f"  this call {NOT_RECORDED}", style="yellow"))
            continue
        for message in call.messages:
            _message(message, console)


def seen_json(events: Sequence[Event], iteration: int) -> list[dict[str, Any]]:
    """`render_seen` as JSON data: per model call, its seq, purpose, model and messages."""
    calls, _, _ = calls_at(events, iteration)
    return [{"model_call": c.number, "seq": c.event.seq, "purpose": c.event.purpose, "model": c.event.model,
             "max_tokens": c.event.max_tokens, "n_tools": c.event.n_tools,
             "messages": None if c.messages is None else [message_dict(m) for m in c.messages]}
            for c in calls]
