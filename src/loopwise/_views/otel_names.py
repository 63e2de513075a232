"""The GenAI semantic conventions' names, and the JSON shapes of their message attributes.

The conventions are those of semantic-conventions v1.41.1 (the GenAI pages have since
moved to `open-telemetry/semantic-conventions-genai`). The attribute names are our own
constants: the official `opentelemetry-semantic-conventions` package lags the GenAI
pages. `gen_ai.input.messages` and `gen_ai.output.messages` hold JSON: a list of
``{"role", "parts": [...]}``, each part a ``text``, a ``tool_call`` (id, name,
arguments) or a ``tool_call_response`` (id, response).
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Mapping
from typing import Any

from .._messages import Message, ToolCall

INSTALL_HINT = "pip install 'loopwise[otel]'"

# -- attribute names (GenAI semantic conventions) --------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"
GEN_AI_PROVIDER_NAME = "gen_ai.provider.name"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_CONVERSATION_ID = "gen_ai.conversation.id"
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_REQUEST_MAX_TOKENS = "gen_ai.request.max_tokens"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_USAGE_CACHE_READ_INPUT_TOKENS = "gen_ai.usage.cache_read.input_tokens"
#: Not in the conventions: the dollars of one model call, as Langfuse reads them.
GEN_AI_USAGE_COST = "gen_ai.usage.cost"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
GEN_AI_TOOL_CALL_ID = "gen_ai.tool.call.id"
GEN_AI_TOOL_TYPE = "gen_ai.tool.type"
# Opt-in (sensitive) content.
GEN_AI_TOOL_CALL_ARGUMENTS = "gen_ai.tool.call.arguments"
GEN_AI_TOOL_CALL_RESULT = "gen_ai.tool.call.result"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_SYSTEM_INSTRUCTIONS = "gen_ai.system_instructions"
ERROR_TYPE = "error.type"
SERVER_ADDRESS = "server.address"
SERVER_PORT = "server.port"

OP_INVOKE_AGENT = "invoke_agent"
OP_CHAT = "chat"
OP_EXECUTE_TOOL = "execute_tool"
#: `gen_ai.provider.name` of a model whose name has no `provider:` prefix.
OTHER_PROVIDER = "_OTHER"

# -- loopwise's own attributes ----------------------------------------------------------
LW_RUN_ID = "loopwise.run_id"
LW_STOP_REASON = "loopwise.stop_reason"
LW_STOP_DETAIL = "loopwise.stop_detail"
LW_ITERATIONS = "loopwise.iterations"
LW_MODEL_CALLS = "loopwise.model_calls"
#: The run's total dollars (models and tools). Not `gen_ai.usage.cost`: backends that sum
#: that attribute over a trace would count every model call twice.
LW_COST_USD = "loopwise.cost_usd"
LW_TAGS = "loopwise.tags"
LW_INCOMPLETE = "loopwise.incomplete"
LW_ITERATION = "loopwise.iteration"
LW_PURPOSE = "loopwise.purpose"
LW_LATENCY_S = "loopwise.latency_s"
LW_USAGE_ESTIMATED = "loopwise.usage_estimated"
LW_REASONING_TOKENS = "loopwise.usage.reasoning_tokens"
LW_RESERVED_USD = "loopwise.reserved_usd"
LW_OVERRUN_USD = "loopwise.overrun_usd"
LW_TOOL_CALLS = "loopwise.tool_calls"
LW_TOOL_OUTCOME = "loopwise.tool.outcome"
LW_TOOL_ATTEMPTS = "loopwise.tool.attempts"
LW_TOOL_FALLBACK = "loopwise.tool.fallback"
LW_TOOL_COST_USD = "loopwise.tool.cost_usd"

#: Tool outcomes that mark an `execute_tool` span as an error (a fallback that answered,
#: or a call skipped at the iteration limit, is not one).
ERROR_OUTCOMES = frozenset({"error", "invalid_arguments", "unknown_tool", "cancelled"})

AttrValue = str | bool | int | float | list[str] | list[int] | list[float] | list[bool]

def _clean(attributes: Mapping[str, Any]) -> dict[str, AttrValue]:
    """Drop None values (OpenTelemetry refuses them); tuples become lists."""
    out: dict[str, AttrValue] = {}
    for key, value in attributes.items():
        if value is None:
            continue
        out[key] = list(value) if isinstance(value, tuple) else value
    return out


def split_model(name: str) -> tuple[str, str]:
    """`"openai:gpt-4o-mini"` → `("openai", "gpt-4o-mini")`; a name with no prefix → `("_OTHER", name)`."""
    provider, sep, model = name.partition(":")
    if sep and provider and model:
        return provider, model
    return OTHER_PROVIDER, name


def _json(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, default=str)


def _parts(message: Message) -> list[dict[str, Any]]:
    parts: list[dict[str, Any]] = []
    if message.role == "tool":
        parts.append({"type": "tool_call_response", "id": message.tool_call_id, "response": message.content})
        return parts
    if message.content:
        parts.append({"type": "text", "content": message.content})
    parts.extend(_call_part(c) for c in message.tool_calls)
    return parts


def _call_part(call: ToolCall) -> dict[str, Any]:
    return {"type": "tool_call", "id": call.id, "name": call.name, "arguments": call.arguments}


def _output_messages(text: str | None, calls: Iterable[ToolCall], finish_reason: str | None) -> str:
    calls = list(calls)
    parts: list[dict[str, Any]] = [{"type": "text", "content": text}] if text else []
    parts.extend(_call_part(c) for c in calls)
    reason = finish_reason or ("tool_call" if calls else "stop")
    return _json([{"role": "assistant", "parts": parts, "finish_reason": reason}])


def input_messages(messages: Iterable[Message]) -> str:
    """`gen_ai.input.messages`: what a model call was sent, message by message."""
    return _json([{"role": m.role, "parts": _parts(m)} for m in messages])

