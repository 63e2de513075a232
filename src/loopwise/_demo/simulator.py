"""`SupportDeskSimulator`: a simulated support-desk model, for `loopwise demo` and tests.

It is a simulator, not a language model: no network, no keys, no weights. It reads
each request the way a tool-calling agent would — the customer's message, which
tools it is offered, which tool results are already in the conversation — and
decides its next step from a script, with realistic latency and token counts.

```python
from loopwise.models import SupportDeskSimulator

model = SupportDeskSimulator(seed=7, speed=0)   # speed=0: no simulated latency
```

Modes:

- ``"triage"`` — the agent a support desk wants. THINK 1 asks for
  ``analyze_sentiment(text=...)`` and ``get_customer_history(customer_id=...)``
  (both at once, or one per response with ``parallel_tool_calls=False``); the
  next asks for ``generate_reply(sentiment=..., history=..., context=...)``; then
  it answers with a text built from the tool results. It asks for each tool at
  most once and only for tools it is offered; a tool that failed is read as
  "unknown" and the triage goes on.
- ``"refund"`` — the seed post's debugging scenario: a customer asks for a refund of
  the orders named in the message (``ORD-<digits>``). THINK 1 asks for the sentiment
  and the history, then ``get_refund_policy(reason=...)``, then
  ``lookup_orders(order_ids=[...])``, then ``check_refund_eligibility(order_ids=[...])``
  and ``issue_refund(customer_id=..., order_ids=[...], amount=...)`` for the orders the
  lookup returned, then it answers. Like a model that keeps whatever context it is
  given, it trusts a lookup that returned fewer orders than it asked for, and refunds
  only those.
- ``"never_done"`` — the seed post's cost spiral: a model that never concludes it
  is done. Every THINK that is offered tools asks for more context (the same
  lookups again) with a "what I know so far" recap of every result, so its output
  grows each iteration and the context grows faster. Only a call with no tools
  (the best-effort answer after a limit) gets text from it.

When a tool's schema offers the ``loopwise_expect`` property
(`Agent(expectations=True)`), the refund mode fills it, as a model told how would: a few
words or a JSON value it expects in the result.

The customer id is the first ``CUS-<digits>`` in the customer's message, else
`customer_id`. Token counts are computed from the text: input ≈ UTF-8 bytes / 4
of the messages and tool specs (plus 4 per message), output the same for the
response's text and tool calls. A response longer than the request's
`max_tokens` is cut, as a provider would: its text is shortened, its tool calls
dropped and `finish_reason` is ``"length"``. It costs $0 unless given a `price`.

With a `seed`, each call's random choices (its latency and its wording) are a
function of the seed and the request, so a run replays the same way, even when
several runs share the model at once.
"""

from __future__ import annotations

import hashlib
import json
import random
import re
from collections.abc import Sequence
from datetime import datetime
from dataclasses import dataclass, field
from typing import Any, Literal, get_args

import anyio

from .._errors import UserError
from .._messages import ToolCall, ToolSpec, Usage
from ..models._base import Model, ModelRequest, ModelResponse, Price

__all__ = ["SupportDeskSimulator"]

Mode = Literal["triage", "never_done", "refund"]

SENTIMENT = "analyze_sentiment"
HISTORY = "get_customer_history"
REPLY = "generate_reply"
POLICY = "get_refund_policy"
ORDERS = "lookup_orders"
ELIGIBILITY = "check_refund_eligibility"
REFUND = "issue_refund"
EXPECT_KEY = "loopwise_expect"  # as in loopwise._tools.expect; kept here so the simulator reads schemas alone

_CUSTOMER_RE = re.compile(r"\bCUS-\d+\b", re.IGNORECASE)
_ORDER_RE = re.compile(r"\bORD-\d+\b", re.IGNORECASE)
_TOPICS = (
    ("shipping", ("order", "deliver", "shipping", "shipped", "package", "parcel", "arrive", "waiting", "tracking")),
    ("billing", ("refund", "charge", "charged", "invoice", "billing", "payment", "price")),
    ("account", ("login", "log in", "password", "account", "locked")),
)
# What the runtime writes for a call it did not run; not a result the model can use.
_NOT_A_RESULT = ("not executed:",)
# So the `sleep` can be observed in tests without slowing them.
_sleep = anyio.sleep


def _tokens(text: str | None) -> int:
    """A token count from the text: UTF-8 bytes / 4, rounded up."""
    if not text:
        return 0
    return (len(text.encode()) + 3) // 4


def _arguments_text(arguments: dict[str, Any] | str) -> str:
    return arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)


def _short(text: str, width: int) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


@dataclass(slots=True)
class _Reading:
    """What the simulator makes of a request."""

    message: str
    customer_id: str
    topic: str
    offered: set[str]
    #: Offered tools whose schema has the `loopwise_expect` property.
    expects: set[str] = field(default_factory=set)
    #: Tool name -> how many times the conversation shows it asked for.
    asked: dict[str, int] = field(default_factory=dict)
    #: Tool name -> its latest usable result (an error result is kept as such).
    results: dict[str, str] = field(default_factory=dict)
    #: Every usable result, in order, as (tool name, arguments, content).
    log: list[tuple[str, str, str]] = field(default_factory=list)
    #: THINK steps that asked for tools so far.
    tool_turns: int = 0

    def ok(self, name: str) -> str | None:
        """The tool's latest result, or None if it is missing or an error."""
        value = self.results.get(name)
        if value is None or _is_error(value):
            return None
        return value


def _is_error(content: str) -> bool:
    """A tool error as loopwise reports it: 'error: ...' text or a {"error": ...} object."""
    stripped = content.lstrip()
    return stripped.lower().startswith("error") or stripped.startswith('{"error"')


def _read(request: ModelRequest, default_customer: str) -> _Reading:
    messages = request.messages
    message = next((m.content for m in messages if m.role == "user" and m.content), "") or ""
    match = _CUSTOMER_RE.search(message)
    customer_id = match.group(0).upper() if match else default_customer
    lowered = message.lower()
    topic = next((name for name, words in _TOPICS if any(w in lowered for w in words)), "general")
    reading = _Reading(message=message, customer_id=customer_id, topic=topic,
                       offered={spec.name for spec in request.tools},
                       expects={spec.name for spec in request.tools if _offers_expectation(spec)})
    calls: dict[str, ToolCall] = {}
    for m in messages:
        if m.role == "assistant" and m.tool_calls:
            reading.tool_turns += 1
            for call in m.tool_calls:
                reading.asked[call.name] = reading.asked.get(call.name, 0) + 1
                if call.id:
                    calls[call.id] = call
        elif m.role == "tool" and m.tool_call_id in calls:
            content = m.content or ""
            if content.startswith(_NOT_A_RESULT):
                continue
            call = calls[m.tool_call_id]
            reading.results[call.name] = content
            reading.log.append((call.name, _arguments_text(call.arguments), content))
    return reading


def _offers_expectation(spec: ToolSpec) -> bool:
    properties = spec.parameters.get("properties") if isinstance(spec.parameters, dict) else None
    return isinstance(properties, dict) and EXPECT_KEY in properties


def _json_object(content: str | None) -> dict[str, Any]:
    try:
        data = json.loads(content or "")
    except ValueError:
        return {}
    return data if isinstance(data, dict) else {}


def _history_summary(content: str | None) -> str:
    """A customer history result in a few words (JSON objects are read by key)."""
    if content is None:
        return "history unknown"
    # A fallback answered: "<tool> timed out after 1 s; answered from <fallback>: <result>"
    source = ""
    head, sep, rest = content.partition("; answered from ")
    if sep:
        fallback, _, content = rest.partition(": ")
        why = head.split(" ", 1)[1] if " " in head else "failed"
        source = f" (from {fallback}: the live lookup {why})"
    summary = _history_fields(content)
    return summary + source


def _history_fields(content: str) -> str:
    try:
        data = json.loads(content)
    except ValueError:
        return _short(content, 120)
    if not isinstance(data, dict):
        return _short(content, 120)
    parts = []
    if "tier" in data:
        parts.append(f"{data['tier']} tier")
    if "orders" in data:
        n = data["orders"]
        parts.append(f"{n} order{'s' if n != 1 else ''}")
    if "open_tickets" in data:
        n = data["open_tickets"]
        parts.append(f"{n} open ticket{'s' if n != 1 else ''}")
    last = data.get("last_order")
    if isinstance(last, dict) and last.get("id"):
        status = last.get("status", "")
        days = last.get("days_waiting")
        parts.append(f"last order {last['id']} {status}" + (f" for {days} days" if days else ""))
    if data.get("as_of"):
        parts.append(f"as of {data['as_of']}")
    return ", ".join(parts) if parts else _short(content, 120)


class SupportDeskSimulator(Model):
    """A simulated support-desk agent model: scripted decisions, realistic timing and tokens.

    Not a language model: see this module's docstring for what it decides and when.

    Args:
        mode: ``"triage"`` (finishes the job), ``"refund"`` (refunds the orders a
            lookup returned: the debugging scenario) or ``"never_done"`` (never says it
            is done: the cost-spiral model).
        parallel_tool_calls: Ask for independent tools in one response (True), or
            one tool per response (False: the latency trap).
        latency_s: The range a call's simulated latency is drawn from, in seconds
            (the seed post measured 0.5–0.9 s per THINK).
        speed: Multiplies the latency; 0 answers at once (tests, CI).
        seed: Makes latency and wording reproducible (see the module docstring).
        customer_id: The customer id used when the message names none.
        price: Dollars per million tokens; the simulator costs $0 without one.
        name: The model's name in logs and traces.
    """

    def __init__(
        self,
        *,
        mode: Mode = "triage",
        parallel_tool_calls: bool = True,
        latency_s: tuple[float, float] = (0.5, 0.9),
        speed: float = 1.0,
        seed: int | str | None = None,
        customer_id: str = "CUS-4821",
        price: Price | None = None,
        name: str = "simulator:support-desk",
    ) -> None:
        if mode not in get_args(Mode):
            raise UserError(f"SupportDeskSimulator(mode={mode!r}) is not a mode; modes: "
                            f"{', '.join(repr(m) for m in get_args(Mode))}")
        if type(parallel_tool_calls) is not bool:
            raise UserError(f"SupportDeskSimulator(parallel_tool_calls={parallel_tool_calls!r}) must be True or False")
        if (
            not isinstance(latency_s, Sequence)
            or len(latency_s) != 2
            or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in latency_s)
            or not 0 <= latency_s[0] <= latency_s[1]
        ):
            raise UserError(f"SupportDeskSimulator(latency_s={latency_s!r}) must be (min, max) seconds "
                            "with 0 <= min <= max, e.g. (0.5, 0.9)")
        if not isinstance(speed, (int, float)) or isinstance(speed, bool) or not speed >= 0:
            raise UserError(f"SupportDeskSimulator(speed={speed!r}) must be a number >= 0 "
                            "(1 for real time, 0 for no simulated latency)")
        if seed is not None and (isinstance(seed, bool) or not isinstance(seed, (int, str))):
            raise UserError(f"SupportDeskSimulator(seed={seed!r}) must be an int, a str or None")
        if not isinstance(customer_id, str) or not customer_id:
            raise UserError(f"SupportDeskSimulator(customer_id={customer_id!r}) must be a non-empty str")
        if price is not None and not isinstance(price, Price):
            raise UserError(f"SupportDeskSimulator(price=...) must be a loopwise.models.Price, got {type(price).__name__}")
        self.mode: Mode = mode
        self.parallel_tool_calls = parallel_tool_calls
        self.latency_s = (float(latency_s[0]), float(latency_s[1]))
        self.speed = float(speed)
        self.seed = seed
        self.customer_id = customer_id
        self.price = price
        self.name = name
        self._unseeded = random.Random()

    def default_price(self, *, input_tokens: int = 0, at: datetime | None = None) -> Price:
        """$0 unless given a `price`: a simulation."""
        return Price(0, 0)

    def describe(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "class": type(self).__name__,
            "mode": self.mode,
            "parallel_tool_calls": self.parallel_tool_calls,
            "seed": self.seed,
        }

    def __repr__(self) -> str:
        return (f"SupportDeskSimulator(mode={self.mode!r}, parallel_tool_calls={self.parallel_tool_calls}, "
                f"latency_s={self.latency_s}, speed={self.speed}, seed={self.seed!r})")

    # -- a call --------------------------------------------------------------------

    async def request(self, request: ModelRequest) -> ModelResponse:
        rng = self._rng(request)
        reading = _read(request, self.customer_id)
        if self.mode == "never_done":
            response = self._never_done(reading, rng)
        elif self.mode == "refund":
            response = self._refund(reading, rng)
        else:
            response = self._triage(reading, rng)
        self._account(request, response)
        delay = rng.uniform(*self.latency_s) * self.speed
        await _sleep(delay)
        return response

    def _rng(self, request: ModelRequest) -> random.Random:
        if self.seed is None:
            return self._unseeded
        digest = hashlib.sha256(repr(self.seed).encode())
        for m in request.messages:
            digest.update(f"\0{m.role}\0{m.content}\0{m.tool_call_id}".encode())
            for call in m.tool_calls:
                digest.update(f"\0{call.name}\0{_arguments_text(call.arguments)}".encode())
        digest.update(f"\0{len(request.tools)}\0{request.max_tokens}".encode())
        return random.Random(digest.hexdigest())

    @staticmethod
    def _account(request: ModelRequest, response: ModelResponse) -> None:
        """Count tokens from the text, and cut a response longer than `max_tokens`."""
        input_tokens = sum(4 + _tokens(m.content) + sum(_tokens(c.name) + _tokens(_arguments_text(c.arguments))
                                                        for c in m.tool_calls)
                           for m in request.messages)
        if request.tools:
            input_tokens += _tokens(json.dumps([_spec_dict(s) for s in request.tools]))
        output_tokens = _tokens(response.text) + sum(
            _tokens(c.name) + _tokens(_arguments_text(c.arguments)) for c in response.tool_calls
        )
        limit = request.max_tokens
        if limit is not None and output_tokens > limit:
            cut = (response.text or "").encode()[: limit * 4].decode(errors="ignore")
            response.text = cut
            response.tool_calls = []
            response.finish_reason = "length"
            output_tokens = min(limit, _tokens(cut))
        response.usage = Usage(input_tokens, output_tokens)

    # -- triage --------------------------------------------------------------------

    def _triage(self, r: _Reading, rng: random.Random) -> ModelResponse:
        if not r.offered:
            return ModelResponse(text=self._answer(r), finish_reason="stop")
        lookups = [name for name in (SENTIMENT, HISTORY) if name in r.offered and name not in r.asked]
        if lookups:
            if not self.parallel_tool_calls:
                lookups = lookups[:1]
            calls = [self._lookup_call(name, r) for name in lookups]
            if len(calls) > 1:
                text = rng.choice((
                    (f"The customer writes about a {r.topic} problem. I'll check the message's sentiment "
                     f"and {r.customer_id}'s history at the same time."),
                    (f"A {r.topic} complaint from {r.customer_id}. Sentiment and customer history are "
                     "independent lookups, so I'll ask for both at once."),
                ))
            elif calls[0].name == SENTIMENT:
                text = rng.choice(("First, how upset is the customer? Checking the sentiment.",
                                   "Let me start with the sentiment of the message."))
            else:
                text = rng.choice((f"Next, {r.customer_id}'s history.",
                                   f"Now let me look up {r.customer_id}'s history."))
            return ModelResponse(text=text, tool_calls=calls, finish_reason="tool_calls")
        if REPLY in r.offered and REPLY not in r.asked:
            sentiment = self._sentiment(r)
            history = _history_summary(r.ok(HISTORY))
            call = ToolCall(REPLY, {"sentiment": sentiment, "history": history, "context": r.topic})
            text = rng.choice((
                f"Sentiment is {sentiment}; {r.customer_id}: {history}. Drafting a reply.",
                f"I have what I need ({sentiment} sentiment; {history}). Asking for a draft reply.",
            ))
            return ModelResponse(text=text, tool_calls=[call], finish_reason="tool_calls")
        return ModelResponse(text=self._answer(r), finish_reason="stop")

    @staticmethod
    def _lookup_call(name: str, r: _Reading) -> ToolCall:
        if name == SENTIMENT:
            return ToolCall(SENTIMENT, {"text": r.message})
        return ToolCall(HISTORY, {"customer_id": r.customer_id})

    @staticmethod
    def _sentiment(r: _Reading) -> str:
        value = r.ok(SENTIMENT)
        return _short(value, 40) if value else "unknown"

    def _answer(self, r: _Reading) -> str:
        """The final answer: a triage note and the reply, from the tool results at hand."""
        sentiment = self._sentiment(r)
        history = _history_summary(r.ok(HISTORY))
        note = f"Triage for {r.customer_id}: sentiment {sentiment}, topic {r.topic}; {history}."
        draft = r.ok(REPLY)
        if draft is None:
            apology = "I'm sorry for the trouble. " if sentiment == "negative" else ""
            draft = (f"Hi, {apology}I've looked into your {r.topic} request and a teammate will follow up "
                     "with a concrete update today.")
            return f"{note}\nNo drafted reply was available, so here is a holding reply:\n{draft}"
        return f"{note}\nReply to send:\n{draft}"

    # -- refund --------------------------------------------------------------------

    @staticmethod
    def _call(r: _Reading, name: str, arguments: dict[str, Any], expect: Any) -> ToolCall:
        """A call, with the model's expectation when the schema asks for one (a str: the schema's type)."""
        if name in r.expects:
            arguments = {**arguments, EXPECT_KEY: expect if isinstance(expect, str) else json.dumps(expect)}
        return ToolCall(name, arguments)

    def _refund(self, r: _Reading, rng: random.Random) -> ModelResponse:
        asked_for = list(dict.fromkeys(m.upper() for m in _ORDER_RE.findall(r.message)))
        if not r.offered:
            return ModelResponse(text=self._refund_answer(r), finish_reason="stop")
        lookups = [name for name in (SENTIMENT, HISTORY) if name in r.offered and name not in r.asked]
        if lookups:
            calls = [self._call(r, SENTIMENT, {"text": r.message}, "negative") if name == SENTIMENT
                     else self._call(r, HISTORY, {"customer_id": r.customer_id}, {"customer_id": r.customer_id})
                     for name in lookups]
            text = rng.choice((
                f"{r.customer_id} wants a refund. First the sentiment and the customer's history, at once.",
                f"A refund request from {r.customer_id}: checking sentiment and history together first.",
            ))
            return ModelResponse(text=text, tool_calls=calls, finish_reason="tool_calls")
        if POLICY in r.offered and POLICY not in r.asked:
            call = self._call(r, POLICY, {"reason": "not delivered"}, "refunded in full")
            return ModelResponse(text="Orders that never arrived: let me check the refund policy for that.",
                                 tool_calls=[call], finish_reason="tool_calls")
        if ORDERS in r.offered and ORDERS not in r.asked and asked_for:
            call = self._call(r, ORDERS, {"order_ids": asked_for}, {"count": len(asked_for)})
            return ModelResponse(text=f"Looking up the {len(asked_for)} orders the customer listed: "
                                      f"{', '.join(asked_for)}.", tool_calls=[call], finish_reason="tool_calls")
        found = self._found_orders(r)
        ids = [o["id"] for o in found]
        amount = round(sum(o["amount"] for o in found), 2)
        if ELIGIBILITY in r.offered and ELIGIBILITY not in r.asked and found:
            listed = ", ".join(f"{o['id']} (${o['amount']:.2f})" for o in found)
            call = self._call(r, ELIGIBILITY, {"order_ids": ids}, {"eligible": ids})
            return ModelResponse(text=f"Found the orders: {listed}. Checking they can be refunded.",
                                 tool_calls=[call], finish_reason="tool_calls")
        if REFUND in r.offered and REFUND not in r.asked and found:
            call = self._call(r, REFUND, {"customer_id": r.customer_id, "order_ids": ids, "amount": amount},
                              {"status": "refunded", "amount": amount})
            return ModelResponse(text=f"All eligible. Refunding ${amount:.2f} for {', '.join(ids)}.",
                                 tool_calls=[call], finish_reason="tool_calls")
        return ModelResponse(text=self._refund_answer(r), finish_reason="stop")

    @staticmethod
    def _found_orders(r: _Reading) -> list[dict[str, Any]]:
        """The orders the lookup returned, as far as the model can read them."""
        orders = _json_object(r.ok(ORDERS)).get("orders")
        out = []
        for o in orders if isinstance(orders, list) else []:
            if isinstance(o, dict) and isinstance(o.get("id"), str) and isinstance(o.get("amount"), (int, float)):
                out.append({"id": o["id"], "amount": float(o["amount"])})
        return out

    def _refund_answer(self, r: _Reading) -> str:
        refund = _json_object(r.ok(REFUND))
        if refund.get("status") == "refunded":
            ids = refund.get("order_ids") or [o["id"] for o in self._found_orders(r)]
            return (f"Hi, I'm sorry your orders never arrived. I've refunded ${float(refund.get('amount', 0)):.2f} "
                    f"for {', '.join(map(str, ids))} (refund {refund.get('refund_id', '')}); "
                    "it will reach your card within 5 business days.")
        return (f"Hi, I'm sorry your orders never arrived. I could not complete the refund for {r.customer_id} "
                "yet; a teammate will follow up today.")

    # -- never done ----------------------------------------------------------------

    def _never_done(self, r: _Reading, rng: random.Random) -> ModelResponse:
        recap = "\n".join(f"- {name}({_short(args, 60)}) -> {_short(content, 160)}" for name, args, content in r.log)
        if not r.offered:
            return ModelResponse(
                text=(f"I never finished checking everything, but from what I have: {r.customer_id}, "
                      f"sentiment {self._sentiment(r)}, {_history_summary(r.ok(HISTORY))}. Suggested reply: "
                      f"apologize and give a concrete update on the {r.topic} issue."),
                finish_reason="stop",
            )
        lookups = [name for name in (SENTIMENT, HISTORY) if name in r.offered]
        if not self.parallel_tool_calls:
            lookups = lookups[r.tool_turns % len(lookups):][:1] if lookups else []
        calls = [self._lookup_call(name, r) for name in lookups]
        doubt = rng.choice((
            "That may not be the whole picture; I need more context before I can reply.",
            "Something may have changed since; let me gather more context to be sure.",
            "I am not confident yet. More context first.",
        ))
        step = r.tool_turns + 1
        if recap:
            text = f"Step {step}. What I know so far:\n{recap}\n{doubt}"
        else:
            text = f"Step {step}. Before replying I need context on {r.customer_id}. {doubt}"
        if not calls:  # none of the tools it knows is offered: it tries another, still not done
            calls = [ToolCall(min(r.offered), {})]
        return ModelResponse(text=text, tool_calls=calls, finish_reason="tool_calls")


def _spec_dict(spec: ToolSpec) -> dict[str, Any]:
    return {"name": spec.name, "description": spec.description, "parameters": spec.parameters}

