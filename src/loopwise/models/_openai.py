"""`OpenAIModel`: any server that speaks the OpenAI chat-completions protocol.

OpenAI itself, vLLM, Ollama, the llama.cpp server, LM Studio... through the official
`openai` SDK. The SDK is imported when the first `OpenAIModel` is made, never when
`loopwise` is imported (it costs more than half a second).

SDK errors are mapped here, at the adapter edge, to the most specific loopwise error:

```
openai.APIStatusError              → ModelHTTPError (status_code, body, headers, retry_after)
openai.APITimeoutError             → ModelTimeoutError
openai.APIConnectionError          → ModelConnectionError
openai.APIResponseValidationError  → ModelBehaviorError
any other openai.OpenAIError       → ModelError
no choices in the answer           → ModelBehaviorError
```
"""

from __future__ import annotations

import asyncio
import json
import re
from collections.abc import AsyncGenerator
from datetime import datetime
from typing import TYPE_CHECKING, Any

from .._errors import (
    ModelBehaviorError,
    ModelConnectionError,
    ModelError,
    ModelHTTPError,
    ModelTimeoutError,
    UserError,
)
from .._messages import Message, ToolCall, ToolSpec, Usage
from ._base import Model, ModelRequest, ModelResponse, Price
from ._resilience import parse_retry_after

if TYPE_CHECKING:
    import openai

    from .._policies.tokens import TokenEstimator

__all__ = ["OpenAIModel"]

# Reasoning models (o1, o3, o4-mini, gpt-5...) reject `max_tokens` and take
# `max_completion_tokens`; most other OpenAI-compatible servers only know `max_tokens`.
_MAX_COMPLETION_TOKENS_MODEL = re.compile(r"^(?:o\d+|gpt-5)(?:$|[-.:_])")
_DETAIL_LIMIT = 500


def uses_max_completion_tokens(model: str) -> bool:
    """Whether `model` takes `max_completion_tokens` rather than `max_tokens`."""
    return bool(_MAX_COMPLETION_TOKENS_MODEL.match(model.rsplit("/", 1)[-1].lower()))


class OpenAIModel(Model):
    """A model served over the OpenAI chat-completions protocol.

    ```python
    from loopwise.models import OpenAIModel, Price

    model = OpenAIModel("qwen2.5:7b", base_url="http://localhost:11434/v1", api_key="unused",
                        price=Price(0, 0))  # a self-hosted server (Ollama) costs $0
    ```

    Args:
        model: The model name the server knows, e.g. ``"gpt-4o-mini"``.
        base_url: The server's base URL (default: ``$OPENAI_BASE_URL``, else OpenAI's).
        api_key: The API key (default: ``$OPENAI_API_KEY``). A local server that needs
            none still needs a string: any, such as ``"unused"``.
        price: Dollars per million tokens; `None` (unknown) by default.
        timeout: Seconds one HTTP attempt may wait to connect, to send, or between
            bytes of the answer (the SDK's timeout). Expiry is retried, then raises
            `ModelTimeoutError`.
        max_retries: Retries of a failed attempt (connection errors, timeouts, 408,
            409, 429 and 5xx), with the SDK's backoff. ``0`` fails on the first error.
            Under a `ModelPolicy`, which retries itself, use ``0``: the two multiply.
        client: An `openai.AsyncOpenAI` to use instead of making one (its base URL and
            key; `timeout` and `max_retries` still apply). The caller closes it.
    """

    def __init__(
        self,
        model: str,
        *,
        base_url: str | None = None,
        api_key: str | None = None,
        price: Price | None = None,
        timeout: float = 60.0,
        max_retries: int = 2,
        client: openai.AsyncOpenAI | None = None,
    ) -> None:
        if not isinstance(model, str) or not model:
            raise UserError(f"OpenAIModel needs a model name such as 'gpt-4o-mini', got {model!r}")
        if price is not None and not isinstance(price, Price):
            raise UserError(f"OpenAIModel(price=...) must be a loopwise.models.Price, got {type(price).__name__}")
        if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
            raise UserError(f"OpenAIModel(timeout=...) must be a number of seconds > 0, got {timeout!r}")
        if type(max_retries) is not int or max_retries < 0:
            raise UserError(f"OpenAIModel(max_retries=...) must be an int >= 0, got {max_retries!r}")
        for option, value in (("base_url", base_url), ("api_key", api_key)):
            if value is not None and not isinstance(value, str):
                raise UserError(f"OpenAIModel({option}=...) must be a str, got {type(value).__name__}")
        import openai

        if client is not None:
            if not isinstance(client, openai.AsyncOpenAI):
                raise UserError(f"OpenAIModel(client=...) must be an openai.AsyncOpenAI, got {type(client).__name__}")
            if base_url is not None or api_key is not None:
                raise UserError(
                    "OpenAIModel got client= together with base_url= or api_key=, which would be "
                    "ignored; configure them on the client, or leave client out"
                )
        self.model = model
        self.name = f"openai:{model}"
        self.price = price
        self.timeout = float(timeout)
        self.max_retries = max_retries
        self._owns_client = client is None
        self._base_url_arg = base_url
        self._api_key_arg = api_key
        self._user_client = client
        client = self._new_client()  # raises UserError now, before any run, if no key
        self._client: openai.AsyncOpenAI | None = client
        self._loop: object | None = None
        self._guard: AsyncGenerator[None, None] | None = None
        #: The server's base URL, as the SDK resolved it (argument, $OPENAI_BASE_URL or default).
        self.base_url = str(client.base_url)
        self._secret = client.api_key if isinstance(client.api_key, str) else ""
        if self._owns_client:
            # Later clients (one per event loop) keep what this one resolved from the
            # environment, even if the environment changes meanwhile.
            self._base_url_arg = self.base_url
            self._api_key_arg = self._secret or None

    def _new_client(self) -> openai.AsyncOpenAI:
        import openai

        if self._user_client is not None:
            return self._user_client.with_options(timeout=self.timeout, max_retries=self.max_retries)
        try:
            return openai.AsyncOpenAI(
                api_key=self._api_key_arg,
                base_url=self._base_url_arg,
                timeout=self.timeout,
                max_retries=self.max_retries,
            )
        except openai.OpenAIError as exc:
            if not self._api_key_arg and "credentials" in str(exc).lower():
                raise UserError(
                    f"OpenAIModel({self.model!r}) has no API key: set the OPENAI_API_KEY environment "
                    "variable or pass api_key=... (a local server that needs no key still needs a "
                    'string: any, such as api_key="unused")'
                ) from None
            raise UserError(f"OpenAIModel({self.model!r}) could not make its openai client: {exc}") from None

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "class": type(self).__name__, "model": self.model, "base_url": self.base_url,
                "timeout": self.timeout, "max_retries": self.max_retries}

    def __repr__(self) -> str:
        return f"OpenAIModel({self.model!r}, base_url={self.base_url!r})"

    # -- the client's life ---------------------------------------------------------

    async def _client_for_this_loop(self) -> openai.AsyncOpenAI:
        """The client for the running event loop, made anew when the loop changed.

        Pooled connections belong to the loop that opened them, and each `run_sync` runs
        its own loop. So the first call on a loop parks an async generator there whose
        `finally` closes the client: the loop closes it at its shutdown
        (`shutdown_asyncgens`, which `asyncio.run` and trio both do), while it can still
        close sockets, and a later loop gets a fresh client.
        """
        loop = _current_loop()
        if loop is not self._loop:
            if self._loop is not None or self._client is None:
                self._client = self._new_client()  # the previous one closed with its loop
            self._loop = loop
            if self._owns_client:
                self._guard = _close_with_loop(self._client)
                await self._guard.__anext__()
        return self._client  # type: ignore[return-value]

    async def aclose(self) -> None:
        """Close the connections this model opened (not those of a `client=` passed in).

        Optional: they are closed when the event loop that opened them shuts down. The
        model stays usable; a later call opens new connections.
        """
        guard, self._guard = self._guard, None
        client, self._client, self._loop = self._client, None, None
        if guard is not None:
            await guard.aclose()
        elif client is not None and self._owns_client:
            await client.close()

    # -- the budgets' hooks ----------------------------------------------------------

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price | None:
        """What `genai-prices` knows for this model name at this server (None: unknown)."""
        from .._policies.prices import lookup_price

        return lookup_price(self.model, base_url=self.base_url, input_tokens=input_tokens, at=at)

    def token_estimator(self) -> TokenEstimator:
        """Exact counts when the model name maps to a tiktoken encoding (whatever server it
        talks to: the name says which tokenizer); else the default byte bound."""
        from .._policies.tokens import TokenEstimator, encoding_for_model

        encoding = encoding_for_model(self.model)
        return TokenEstimator() if encoding is None else TokenEstimator.for_encoding(encoding)

    # -- one call ------------------------------------------------------------------

    def request_params(self, request: ModelRequest) -> dict[str, Any]:
        """The keyword arguments of `chat.completions.create` for `request`."""
        params: dict[str, Any] = {"model": self.model, "messages": [_message(m) for m in request.messages]}
        if request.tools:
            params["tools"] = [_tool(spec) for spec in request.tools]
        if request.max_tokens is not None:
            key = "max_completion_tokens" if uses_max_completion_tokens(self.model) else "max_tokens"
            params[key] = request.max_tokens
        return params

    async def request(self, request: ModelRequest) -> ModelResponse:
        import openai

        params = self.request_params(request)
        client = await self._client_for_this_loop()
        try:
            completion = await client.chat.completions.create(**params)
        except openai.APIStatusError as exc:
            headers = {name.lower(): value for name, value in exc.response.headers.items()}
            raise ModelHTTPError(
                self._redact(f"{self.name} at {self.base_url} answered HTTP {exc.status_code}: {_detail(exc)}"),
                status_code=exc.status_code,
                body=exc.body,
                headers=headers,
                retry_after=parse_retry_after(headers),
            ) from exc
        except openai.APITimeoutError as exc:
            raise ModelTimeoutError(
                f"{self.name} at {self.base_url} did not answer within timeout={self.timeout:g}s"
                f"{_attempts(self.max_retries)}"
            ) from exc
        except openai.APIConnectionError as exc:
            cause = f": {type(exc.__cause__).__name__}: {exc.__cause__}" if exc.__cause__ else ""
            raise ModelConnectionError(
                self._redact(f"could not reach {self.name} at {self.base_url}{_attempts(self.max_retries)}{cause}")
            ) from exc
        except openai.APIResponseValidationError as exc:
            raise ModelBehaviorError(
                self._redact(f"{self.name} at {self.base_url} sent an answer the openai SDK rejected: {exc}")
            ) from exc
        except openai.OpenAIError as exc:
            raise ModelError(
                self._redact(f"{self.name} at {self.base_url} failed: {type(exc).__name__}: {exc}")
            ) from exc
        return self._response(completion)

    def _response(self, completion: Any) -> ModelResponse:
        choices = getattr(completion, "choices", None)
        if not isinstance(choices, list) or not choices:
            raise ModelBehaviorError(
                f"{self.name} at {self.base_url} sent a chat completion with no choices"
                + ("" if isinstance(choices, list) else f" (got {_short(completion)})")
            )
        choice = choices[0]
        message = getattr(choice, "message", None)
        if message is None:
            raise ModelBehaviorError(f"{self.name} at {self.base_url} sent a choice with no message: {_short(choice)}")
        text = getattr(message, "content", None)
        if text is None:
            text = getattr(message, "refusal", None)  # a refusal is the model's answer
        if isinstance(text, list):  # content parts, as some compatible servers send: the text ones
            text = _text_of_parts(text)
        if text is not None and not isinstance(text, str):
            raise ModelBehaviorError(f"{self.name} sent message content of type {type(text).__name__}, not a string")
        calls = []
        for raw in getattr(message, "tool_calls", None) or ():
            function = getattr(raw, "function", None)
            if function is not None:
                name, arguments = getattr(function, "name", None), getattr(function, "arguments", None)
            else:  # a custom tool call; loopwise sends function tools only
                custom = getattr(raw, "custom", None)
                name, arguments = getattr(custom, "name", None), getattr(custom, "input", None)
            calls.append(ToolCall(name=name if isinstance(name, str) else str(name),
                                  arguments=_raw_arguments(arguments), id=getattr(raw, "id", None) or None))
        finish_reason = getattr(choice, "finish_reason", None)
        return ModelResponse(
            text=text,
            tool_calls=calls,
            usage=_usage(getattr(completion, "usage", None)),
            finish_reason=finish_reason if isinstance(finish_reason, str) else None,
        )

    def _redact(self, message: str) -> str:
        if len(self._secret) >= 4:
            message = message.replace(self._secret, "<api key>")
        return message


# -- conversions ---------------------------------------------------------------------


def _arguments(arguments: dict[str, Any] | str) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False, default=str)


def _raw_arguments(arguments: Any) -> dict[str, Any] | str:
    """Tool-call arguments as received. A string stays the raw JSON the model wrote: the
    loop parses it, and a malformed one becomes an error the model can correct. Some
    servers send an object (kept) or nothing (no arguments)."""
    if isinstance(arguments, (str, dict)):
        return arguments
    if arguments is None:
        return "{}"
    return json.dumps(arguments, default=str)  # the loop says it must be a JSON object


def _message(message: Message) -> dict[str, Any]:
    role = message.role
    if role == "assistant":
        out: dict[str, Any] = {"role": "assistant", "content": message.content}
        if message.tool_calls:
            out["tool_calls"] = [
                {"id": call.id, "type": "function",
                 "function": {"name": call.name, "arguments": _arguments(call.arguments)}}
                for call in message.tool_calls
            ]
        elif message.content is None:
            out["content"] = ""
        return out
    if role == "tool":
        return {"role": "tool", "tool_call_id": message.tool_call_id, "content": message.content or ""}
    return {"role": role, "content": message.content or ""}


def _tool(spec: ToolSpec) -> dict[str, Any]:
    return {"type": "function",
            "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters}}


def _usage(usage: Any) -> Usage | None:
    """The SDK's usage as a `Usage`; `None` when absent or unusable (the loop estimates it)."""
    if usage is None:
        return None
    prompt = getattr(usage, "prompt_tokens", None)
    completion = getattr(usage, "completion_tokens", None)
    if not isinstance(prompt, int) or not isinstance(completion, int):
        return None
    cached = getattr(getattr(usage, "prompt_tokens_details", None), "cached_tokens", None)
    reasoning = getattr(getattr(usage, "completion_tokens_details", None), "reasoning_tokens", None)
    return Usage(
        input_tokens=prompt,
        output_tokens=completion,
        cached_input_tokens=cached if isinstance(cached, int) else 0,
        reasoning_tokens=reasoning if isinstance(reasoning, int) else 0,
    )


def _detail(exc: openai.APIStatusError) -> str:
    body = exc.body
    error = body.get("error", body) if isinstance(body, dict) else body
    detail: str
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        detail = error["message"]
    elif isinstance(error, str) and error:
        detail = error
    else:
        detail = exc.message
    return detail if len(detail) <= _DETAIL_LIMIT else detail[:_DETAIL_LIMIT] + "…"


def _attempts(max_retries: int) -> str:
    return f" (after {max_retries} retr{'y' if max_retries == 1 else 'ies'})" if max_retries else ""


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 200 else text[:200] + "…"


def _current_loop() -> object:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:  # another anyio backend (trio)
        import trio

        return trio.lowlevel.current_trio_token()


async def _close_with_loop(client: openai.AsyncOpenAI) -> AsyncGenerator[None, None]:
    try:
        yield
    finally:
        await client.close()


def _text_of_parts(parts: list[Any]) -> str | list[Any]:
    """Message content sent as parts (``[{"type": "text", "text": "..."}, ...]``): their text, joined.

    Parts of other types (a thinking trace, an image) are left out; a list with no text
    part at all, or with parts that are not objects, is returned as it came (refused).
    """
    texts = []
    for part in parts:
        if not isinstance(part, dict):
            return parts
        if part.get("type") == "text" and isinstance(part.get("text"), str):
            texts.append(part["text"])
    return "".join(texts) if texts else parts
