"""The model interface: one async method from a `ModelRequest` to a `ModelResponse`.

Besides `request`, a model may override three hooks, each with a default here:
`default_price` (its price when no `price=` was given: the budgets' dollars),
`token_estimator` (how its prompts are counted before a call: the budgets' tokens) and
`aclose` (release its connections; `async with model:` calls it).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, Self

from .._messages import Message, ToolCall, ToolSpec, Usage
from .._policies.prices import Price

if TYPE_CHECKING:
    from .._policies.tokens import TokenEstimator

__all__ = ["Model", "ModelRequest", "ModelResponse", "Price"]


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
    #: Dollars per million tokens, given by the user: it overrides `default_price`. `None`: not given.
    price: Price | None = None

    @abstractmethod
    async def request(self, request: ModelRequest) -> ModelResponse:
        """Make one model call. Raise a `loopwise.ModelError` subclass on failure."""

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
        """The price of one call when `price` is `None`: what a price list knows, or `None` (unknown).

        Args:
            input_tokens: The prompt's size, for models whose price rises past a threshold.
            at: When the call is made, for prices that change on a date (None: now).

        The default knows nothing: a dollar budget then refuses the model before the run
        (`docs/budgets.md`). The test models and the simulator say $0; `OpenAIModel`
        looks its name up in `genai-prices`.
        """
        return None

    def token_estimator(self) -> TokenEstimator:
        """A new `TokenEstimator` for this model's calls (the loop keeps it for them: caches, calibration).

        The default bounds tokens by UTF-8 bytes and calibrates on the usage the model
        reports. Override it for a model whose tokenizer is at hand (`OpenAIModel`
        counts exactly for model names that map to a tiktoken encoding).
        """
        from .._policies.tokens import TokenEstimator

        return TokenEstimator()

    async def aclose(self) -> None:
        """Release what the model holds (connections); it stays usable. The default holds nothing."""

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def describe(self) -> dict[str, Any]:
        """What the run-started event records about this model."""
        return {"name": self.name, "class": type(self).__name__}
