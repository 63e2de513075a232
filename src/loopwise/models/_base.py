"""The model interface: one async method from a `ModelRequest` to a `ModelResponse`."""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

from .._messages import Message, ToolCall, ToolSpec, Usage

__all__ = ["Model", "ModelRequest", "ModelResponse", "Price"]


@dataclass(slots=True, frozen=True)
class Price:
    """Dollars per million tokens. `Price(0, 0)` for a self-hosted server."""

    input_per_mtok: float
    output_per_mtok: float
    cached_input_per_mtok: float | None = None

    def __post_init__(self) -> None:
        for name in ("input_per_mtok", "output_per_mtok", "cached_input_per_mtok"):
            value = getattr(self, name)
            # (NaN or infinity would make costs NaN or inf, which no budget can weigh)
            if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                                      or not math.isfinite(value) or value < 0):
                from .._errors import UserError

                raise UserError(f"Price.{name} must be a finite number >= 0, got {value!r}")

    def cost(self, usage: Usage) -> float:
        """The dollar cost of `usage` at this price (cached input priced as such)."""
        cached = min(usage.cached_input_tokens, usage.input_tokens)
        cached_rate = (
            self.input_per_mtok if self.cached_input_per_mtok is None else self.cached_input_per_mtok
        )
        return (
            (usage.input_tokens - cached) * self.input_per_mtok
            + cached * cached_rate
            + usage.output_tokens * self.output_per_mtok
        ) / 1_000_000


@dataclass(slots=True, frozen=True)
class ModelRequest:
    """What the model is shown for one call.

    `messages` are the context after REFINE: the instructions as the first system
    message, then the conversation. `tools` is empty for calls that must answer in
    text (the best-effort answer after a limit).
    """

    messages: list[Message]
    tools: list[ToolSpec] = field(default_factory=list)
    max_tokens: int | None = None


@dataclass(slots=True)
class ModelResponse:
    """What a model returned. No tool calls and some text is a final answer.

    `usage=None` means the provider did not report usage: the runtime estimates it
    and marks it as estimated. `finish_reason="length"` marks text cut by
    `max_tokens`, which is not a final answer.
    """

    text: str | None = None
    tool_calls: list[ToolCall] = field(default_factory=list)
    usage: Usage | None = None
    finish_reason: str | None = None


class Model(ABC):
    """A chat model the loop can call. Subclass it and implement `request`."""

    #: A short name for logs and traces, e.g. ``"openai:gpt-4o-mini"``.
    name: str = "model"
    #: Dollars per million tokens; `None` when unknown.
    price: Price | None = None

    @abstractmethod
    async def request(self, request: ModelRequest) -> ModelResponse:
        """Make one model call. Raise a `loopwise.ModelError` subclass on failure."""

    def describe(self) -> dict[str, Any]:
        """What the run-started event records about this model."""
        return {"name": self.name, "class": type(self).__name__}
