"""The conversation types shared by the loop, the models and the event log.

They follow the OpenAI chat protocol: a `Message` has a role among
`system | user | assistant | tool`; an assistant message may carry `ToolCall`s and a
tool message answers one of them by `tool_call_id`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from ._hotpath import message_constructor

__all__ = ["Message", "Role", "ToolCall", "ToolSpec", "Usage"]

Role = Literal["system", "user", "assistant", "tool"]
_ROLES = frozenset(("system", "user", "assistant", "tool"))


@dataclass(slots=True, frozen=True)
class ToolCall:
    """A tool call requested by the model.

    `arguments` is a dict, or the raw JSON string the provider sent (possibly
    malformed: the loop turns a parse failure into an error the model can correct).
    """

    name: str
    arguments: dict[str, Any] | str = field(default_factory=dict)
    id: str | None = None


@dataclass(slots=True, frozen=True)
class Message:
    """One message of the conversation, as in the OpenAI chat protocol."""

    role: Role
    content: str | None = None
    tool_calls: tuple[ToolCall, ...] = ()
    tool_call_id: str | None = None

    def __post_init__(self) -> None:
        if self.role not in _ROLES:
            from ._errors import UserError

            raise UserError(
                f"Message role {self.role!r} is not one of system, user, assistant, tool"
            )
        if type(self.tool_calls) is not tuple:
            object.__setattr__(self, "tool_calls", tuple(self.tool_calls))


#: `Message(role, content, tool_calls, tool_call_id)` for the runtime's own messages, whose
#: role is valid and calls a tuple: `_hotpath` skips `__post_init__`'s checks (fast) or not (plain).
new_message: Callable[..., Message] = message_constructor(Message)


@dataclass(slots=True, frozen=True)
class ToolSpec:
    """What a model is told about a tool: its name, description and JSON schema."""

    name: str
    description: str
    parameters: dict[str, Any]


@dataclass(slots=True)
class Usage:
    """Token counts of one model call, or of a whole run."""

    input_tokens: int = 0
    output_tokens: int = 0
    cached_input_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: Usage) -> None:
        """Add `other` into this usage, in place."""
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.cached_input_tokens += other.cached_input_tokens
        self.reasoning_tokens += other.reasoning_tokens
