"""`OpenAIModel`: any server that speaks the OpenAI chat-completions protocol."""

from __future__ import annotations

from typing import Any

from .._errors import UserError
from ._base import Model, ModelRequest, ModelResponse, Price

__all__ = ["OpenAIModel"]


class OpenAIModel(Model):
    """Placeholder replaced by the real adapter."""

    def __init__(self, model: str, *, base_url: str | None = None, api_key: str | None = None,
                 price: Price | None = None, **kwargs: Any) -> None:
        self.model = model
        self.name = f"openai:{model}"
        self.price = price

    async def request(self, request: ModelRequest) -> ModelResponse:
        raise UserError("not yet")
