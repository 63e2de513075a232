"""Values from a model or a caller, made into what the log can store and read back.

A Python model may return anything, and a task may hold text UTF-8 cannot encode: the
driver passes both through here before they become events (`_stores.storable` does the
cleaning; this knows which fields of a response and a task to look at, and takes the
common all-ASCII case without copying).
"""

from __future__ import annotations

import json
from typing import Any

from .._errors import UserError
from .._events import ErrorInfo
from .._messages import Message, ToolCall
from .._stores.storable import TOO_DEEP, TooDeep, clean, plain, too_deep
from ..models._base import ModelResponse

__all__ = ["ascii_error", "loggable", "storable_start"]


def loggable(response: ModelResponse) -> tuple[ModelResponse, list[str] | None]:
    """`response` in the types its event is read back with (a Python model may send anything),
    and storable; with the fields that had to be replaced, if any (`_stores.storable`).

    A tool call's name that is not a str becomes one (None: the empty name), which the
    loop then answers as an unknown tool; arguments neither a dict nor a str, or a dict
    with keys that are not all str, become their JSON text (the loop parses it as it
    would a provider's, and answers what is wrong with it); an id that is not a str
    becomes one; so does a finish reason. Else the log would hold a model call whose
    event cannot be loaded: `show`, resume and every view of the run would fail.
    Text UTF-8 cannot encode (a lone surrogate), anywhere, becomes U+FFFD; arguments
    nested deeper than `MAX_DEPTH` (or that contain themselves) become `TOO_DEEP`,
    answered as invalid arguments. The fast path: ASCII text, and arguments that are
    raw text or a dict of plain values (`plain`), are taken as they are.
    """
    text = response.text
    if text is None or (type(text) is str and text.isascii()):
        for call in response.tool_calls:
            name, args, call_id = call.name, call.arguments, call.id
            if (type(name) is not str or not name.isascii()
                    or (call_id is not None and (type(call_id) is not str or not call_id.isascii()))
                    or not (args.isascii() if type(args) is str else type(args) is dict and plain(args))):
                break
        else:
            reason = response.finish_reason
            if reason is None or (type(reason) is str and reason.isascii()):
                return response, None
    return _normalized(response)


def _normalized(response: ModelResponse) -> tuple[ModelResponse, list[str] | None]:
    replaced: list[str] = []
    text = response.text
    if text is not None:
        text = clean(text, "text", replaced)
    fixed = []
    for i, call in enumerate(response.tool_calls):
        name, args, call_id = call.name, call.arguments, call.id
        where = f"tool_calls[{i}]"
        if not isinstance(name, str):
            name = "" if name is None else str(name)
        if call_id is not None and not isinstance(call_id, str):
            call_id = str(call_id)
        if isinstance(args, (dict, list, tuple)) and too_deep(args):
            args = TOO_DEEP
            replaced.append(f"{where}.arguments")
        elif isinstance(args, dict) and not all(map(_is_str, args)):
            args = _json_text(args)  # (keys as JSON writes them: None is "null", 1 is "1")
        elif not isinstance(args, (dict, str)):
            args = _json_text(args)
        try:
            args = clean(args, f"{where}.arguments", replaced)
        except TooDeep:  # (not reached: `too_deep` above)
            args = TOO_DEEP
            replaced.append(f"{where}.arguments")
        new = ToolCall(clean(name, f"{where}.name", replaced), args,
                       None if call_id is None else clean(call_id, f"{where}.id", replaced))
        fixed.append(call if (new.name is call.name and new.arguments is call.arguments
                              and new.id is call.id) else new)
    reason = response.finish_reason
    if reason is not None:
        reason = clean(reason if isinstance(reason, str) else str(reason), "finish_reason", replaced)
    if (text is response.text and reason is response.finish_reason
            and all(new is old for new, old in zip(fixed, response.tool_calls))):
        return response, replaced or None
    return (ModelResponse(text=text, tool_calls=fixed, usage=response.usage, finish_reason=reason),
            replaced or None)


def storable_start(task: list[Message], instructions: str | None, tags: tuple[str, ...],
                    replaced: list[str]) -> tuple[list[Message], str | None, tuple[str, ...]]:
    """The task, instructions and tags, made storable (`_stores.storable`); what was replaced goes in `replaced`.

    Raises `UserError` for a task whose tool calls nest deeper than the loop walks.
    """
    for m in task:
        content = m.content
        if m.tool_calls or m.tool_call_id is not None or not (content is None or content.isascii()):
            break
    else:
        if (instructions is None or instructions.isascii()) and all(t.isascii() for t in tags):
            return task, instructions, tags
    try:
        task = clean(list(task), "task", replaced)
    except TooDeep as exc:
        raise UserError(f"the task cannot be stored: {exc}; send flatter tool-call arguments") from None
    if instructions is not None:
        instructions = clean(instructions, "instructions", replaced)
    tags = tuple(clean(list(tags), "tags", replaced))
    return task, instructions, tags


def ascii_error(error: ErrorInfo) -> bool:
    return error.message.isascii() and (error.traceback is None or error.traceback.isascii()) and error.type.isascii()


#: `isinstance(x, str)` as a function in C: `all(map(_is_str, keys))` makes no frame per key.
_is_str = str.__instancecheck__


def _json_text(value: Any) -> str:
    try:
        return json.dumps(value)
    except (TypeError, ValueError, RecursionError):
        return repr(value)
