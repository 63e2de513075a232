"""`loopwise demo`: six scenarios from production agent loops, on a simulated model (no network, no keys).

Each scenario runs a real `Agent` through the real loop; only the model
(`SupportDeskSimulator`, in `_demo.simulator`) and the three tools are simulated, with
latencies like a hosted model's (500–900 ms per THINK, a few hundred ms per tool).
Everything printed about a run is read back from its event log.

1. Triage: one run with parallel tool calls, shown as its trace.
2. The latency trap: the same work with one tool per model response (tools run
   one after another) vs all independent calls in one response (run concurrently),
   with where the time goes per phase.
3. The cost spiral: a model that never says it is done, stopped by the iteration
   cap, with its input tokens per iteration.
4. Debugging: a refund run whose order lookup partially succeeds on iteration 3 (two
   of the three orders, no error) and refunds the wrong amount on iteration 5; its
   decision log, and the mismatch view pointing at iteration 3.

5. The kill switch: a run stuck in a hung lookup, stopped from a second process by
   `loopwise kill RUN_ID --reason ...`; its trace says who stopped it and why.

Environment:
    LOOPWISE_DEMO_SPEED: multiplies every simulated latency, the model's and the
        tools'. ``1`` is real time (about 40 s in all), ``0`` runs the demo almost
        instantly (CI: ``LOOPWISE_DEMO_SPEED=0 loopwise demo``). A `speed` passed to
        `main` wins over it.

The runs go to the database every command uses (`main`'s `store`; by default
``$LOOPWISE_DB`` or ``.loopwise/loopwise.db``, as `loopwise demo --db PATH` chooses), so
that `loopwise runs`, `show` and `resume` read them afterwards. The demo ends with
those commands, spelled out for its runs; each works when pasted (the resume uses
`support_agent`, an attribute of this module made on first use: the triage agent with
its history lookup working again). Given a `MemoryStore`, it says that no command can
read the runs back, and prints none.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shlex
import sys
import tempfile
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
from rich.console import Console
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .._runtime.agent import Agent, new_run_id
from .._stores.sqlite import SQLiteStore, default_db_path
from ..cli._common import db_args as _db_args
from .._errors import UserError
from .._events import LimitHit, ModelCallFinished, ToolCallFinished
from .._policies.context import SlidingWindow
from .._policies.limits import Limits
from .._policies.runaway import RunawayDetector
from .._views.render import format_cost, format_duration, render_run, shorten
from .._views.decisions import decisions
from .._views.render_decisions import render_decisions
from .._views.result import RunResult
from .._views.profile import Phases, phase_times
from .._stores.base import EventStore
from .._tools.tool import Tool, tool
from ..models._base import Price
from .simulator import SupportDeskSimulator

__all__ = ["Phases", "cost_spiral", "debugging", "demo_tools", "latency_trap", "main", "phase_times", "refund_tools",
           "triage"]

SPEED_ENV = "LOOPWISE_DEMO_SPEED"
SEED = 4821
INSTRUCTIONS = (
    "You are a support agent. Triage the customer's message: check its sentiment and the "
    "customer's history, then draft a reply."
)
TASK = (
    "I've been waiting 3 weeks for my order and nobody answers my emails. "
    "This is ridiculous. (customer CUS-4821)"
)
#: Simulated tool latency ranges, in seconds at speed 1.
TOOL_LATENCY_S = {
    "analyze_sentiment": (0.15, 0.25),
    "get_customer_history": (0.25, 0.40),
    "generate_reply": (0.20, 0.30),
}
#: An example price for the cost spiral (dollars per million tokens), not any provider's.
HISTORY_TIMEOUT_S = 1.5
SPIRAL_PRICE = Price(2.50, 10.00)
SPIRAL_MAX_ITERATIONS = 8
SPIRAL_BUDGET_USD = 0.03
REFUND_TASK = (
    "I was charged for three orders that never arrived: ORD-7, ORD-8 and ORD-9. I want my money "
    "back, all of it. (customer CUS-4821)"
)
#: The debugging scenario's orders: id -> (warehouse, amount in dollars).
REFUND_ORDERS = {"ORD-7": ("west", 40.00), "ORD-8": ("west", 25.00), "ORD-9": ("east", 30.00)}
#: The warehouse whose replica lags: its orders are missing from lookups, without an error.
LAGGING_WAREHOUSE = "east"
REFUND_LATENCY_S = (0.10, 0.25)


# -- the tools -------------------------------------------------------------------------


_NEGATIVE = ("waiting", "weeks", "ridiculous", "angry", "nobody", "terrible", "worst", "refund", "never")
_POSITIVE = ("thanks", "thank you", "great", "love", "perfect")


def demo_tools(*, speed: float, seed: int | None = SEED) -> list[Tool]:
    """The demo's three async tools, with simulated latency scaled by `speed`."""
    rng = random.Random(seed)

    async def pause(name: str) -> None:
        low, high = TOOL_LATENCY_S[name]
        await anyio.sleep(rng.uniform(low, high) * speed)

    @tool
    async def analyze_sentiment(text: str) -> str:
        """Classify the sentiment of a customer message as negative, neutral or positive.

        Args:
            text: The customer's message.
        """
        await pause("analyze_sentiment")
        lowered = text.lower()
        negative = sum(word in lowered for word in _NEGATIVE)
        positive = sum(word in lowered for word in _POSITIVE)
        return "negative" if negative > positive else "positive" if positive > negative else "neutral"

    @tool
    async def get_customer_history(customer_id: str) -> dict[str, Any]:
        """A customer's tier, orders, open tickets and last order.

        Args:
            customer_id: The customer's id, like "CUS-4821".
        """
        await pause("get_customer_history")
        return _history(customer_id)

    @tool
    async def generate_reply(sentiment: str, history: str, context: str) -> str:
        """Draft a reply to the customer.

        Args:
            sentiment: The message's sentiment.
            history: What we know about the customer.
            context: The topic of the request, like "shipping".
        """
        await pause("generate_reply")
        opening = "I'm truly sorry for the wait, and for the silence." if sentiment == "negative" else "Thanks for reaching out."
        return (
            f"Hi, {opening} I've checked your account ({history}). I've escalated your {context} "
            "case to our logistics team and you'll get a tracking update within 24 hours. If it "
            "hasn't moved by then, we'll ship a replacement at no cost."
        )

    return [analyze_sentiment, get_customer_history, generate_reply]


def recovery_tools(*, speed: float, seed: int | None = SEED) -> list[Tool]:
    """The triage tools, with a history lookup that hangs and its cached fallback."""
    analyze_sentiment, _, generate_reply = demo_tools(speed=speed, seed=seed)

    @tool(timeout=0.2)
    async def get_cached_history(customer_id: str) -> dict[str, Any]:
        """Yesterday's copy of a customer's history: cheaper, staler.

        Args:
            customer_id: The customer's id, like "CUS-4821".
        """
        return {**_history(customer_id), "as_of": "yesterday"}

    # The live lookup hangs, as a slow DB call does; its timeout does not.
    @tool(timeout=max(HISTORY_TIMEOUT_S * speed, 0.05), fallback=get_cached_history,
          alternatives=["get_cached_history"])
    async def get_customer_history(customer_id: str) -> dict[str, Any]:
        """A customer's live tier, orders, open tickets and last order.

        Args:
            customer_id: The customer's id, like "CUS-4821".
        """
        await anyio.sleep(3600)
        return _history(customer_id)

    return [analyze_sentiment, get_customer_history, generate_reply]


def refund_tools(*, speed: float, seed: int | None = SEED) -> list[Tool]:
    """The debugging scenario's tools: the triage lookups, a refund policy, an order lookup
    that partially succeeds, an eligibility check and the refund itself."""
    analyze_sentiment, get_customer_history, _ = demo_tools(speed=speed, seed=seed)
    rng = random.Random(seed)

    async def pause() -> None:
        await anyio.sleep(rng.uniform(*REFUND_LATENCY_S) * speed)

    @tool
    async def get_refund_policy(reason: str) -> str:
        """The refund policy that applies to a reason, like "not delivered".

        Args:
            reason: Why the customer wants a refund.
        """
        await pause()
        if "deliver" in reason.lower() or "arrive" in reason.lower():
            return "Orders not delivered within 14 days are refunded in full, shipping included."
        return "Refunds are possible within 30 days of delivery for unused items."

    @tool
    async def lookup_orders(order_ids: list[str]) -> dict[str, Any]:
        """Look up orders by id: amount and delivery status.

        Args:
            order_ids: The orders' ids, like ["ORD-7"].
        """
        await pause()
        # A partial OBSERVE: orders live in two warehouses, and the east one's
        # replica lags, so its orders are silently missing: a result, not an error.
        found = [{"id": oid, "amount": REFUND_ORDERS[oid][1], "status": "not delivered"}
                 for oid in order_ids if oid in REFUND_ORDERS and REFUND_ORDERS[oid][0] != LAGGING_WAREHOUSE]
        return {"orders": found, "count": len(found)}

    @tool
    async def check_refund_eligibility(order_ids: list[str]) -> dict[str, Any]:
        """Which of these orders may be refunded.

        Args:
            order_ids: The orders' ids.
        """
        await pause()
        return {"eligible": [oid for oid in order_ids if oid in REFUND_ORDERS], "ineligible": []}

    @tool
    async def issue_refund(customer_id: str, order_ids: list[str], amount: float) -> dict[str, Any]:
        """Refund an amount to a customer's card for some orders.

        Args:
            customer_id: The customer's id.
            order_ids: The orders refunded.
            amount: Dollars to refund.
        """
        await pause()
        return {"status": "refunded", "refund_id": "RF-20931", "customer_id": customer_id,
                "order_ids": order_ids, "amount": amount}

    return [analyze_sentiment, get_customer_history, get_refund_policy, lookup_orders, check_refund_eligibility,
            issue_refund]


def _history(customer_id: str) -> dict[str, Any]:
    if customer_id.upper() == "CUS-4821":  # the demo's customer
        return {"customer_id": "CUS-4821", "tier": "gold", "orders": 3, "open_tickets": 1,
                "last_order": {"id": "ORD-1042", "status": "in transit", "days_waiting": 21}}
    digits = sum(int(c) for c in customer_id if c.isdigit())
    return {"customer_id": customer_id, "tier": ("bronze", "silver", "gold")[digits % 3], "orders": 1 + digits % 5,
            "open_tickets": digits % 2, "last_order": {"id": f"ORD-{1000 + digits}", "status": "delivered"}}


# `Phases` and `phase_times` (where a run's time went) live in `_views.profile`, imported above.


# -- the scenarios -----------------------------------------------------------------------


def _heading(console: Console, number: int, title: str, answers: str) -> None:
    console.print()
    heading = Text(f"{number}. {title}", style="bold")
    if heading.cell_len + 6 <= console.size.width:
        console.print(Rule(heading, align="left", style="cyan"))
    else:  # a rule would cut the title: the title, whole, then the rule
        console.print(heading)
        console.print(Rule(style="cyan"))
    console.print(Text("the problem: ", style="dim") + Text(answers, style="italic"))
    console.print()


def _command(console: Console, command: str, note: str = "") -> None:
    """A command to paste, on a line of its own (never wrapped: a copy gets it whole)."""
    line = Text("  $ ", style="dim") + Text(command, style="bold")
    if note:
        line.append(f"   # {note}", style="dim")
    console.print(line, soft_wrap=True)


def _run(console: Console, agent: Agent, task: str, *, tags: Sequence[str], what: str) -> RunResult:
    with console.status(f"running {what} on the simulated model…"):
        return agent.run_sync(task, tags=["demo", *tags])


def _agent(store: EventStore, *, speed: float, name: str, **model: Any) -> Agent:
    return Agent(
        SupportDeskSimulator(speed=speed, seed=SEED, **model),
        instructions=INSTRUCTIONS,
        tools=demo_tools(speed=speed),
        store=store,
        name=name,
    )


def triage(console: Console, store: EventStore, *, speed: float) -> RunResult:
    """Scenario 1: one run whose model asks for independent tools together; its trace."""
    _heading(console, 1, "Triage: a run that explains itself",
             '"400 lines of JSON, zero insight" — every step below is read from the event log')
    agent = _agent(store, speed=speed, name="support-triage")
    result = _run(console, agent, TASK, tags=["triage"], what="the triage")
    render_run(store.load(result.run_id), console)
    db = _db_args(store)
    if db is not None:
        console.print()
        console.print(Text("The same trace, read back from the log by any process:", style="dim"))
        _command(console, f"loopwise show {result.run_id}{db}")
    return result


def error_recovery(console: Console, store: EventStore, *, speed: float) -> RunResult:
    """Scenario: the history lookup hangs; its timeout holds and the cache answers, saying why."""
    _heading(console, 2, "Error recovery: a hung lookup, a timeout that holds, a fallback that says why",
             '"one slow DB call froze the whole loop"; "in production, error handling is the product"')
    console.print(Text(
        f"get_customer_history hangs. @tool(timeout={HISTORY_TIMEOUT_S:g}, fallback=get_cached_history) cuts it "
        "off and answers from yesterday's cache; the model reads which fallback answered and why, and the "
        "log keeps every attempt."))
    console.print()
    agent = Agent(SupportDeskSimulator(speed=speed, seed=SEED), instructions=INSTRUCTIONS,
                  tools=recovery_tools(speed=speed), store=store, name="support-recovery")
    result = _run(console, agent, TASK, tags=["recovery"], what="the triage with a hung lookup")
    render_run(store.load(result.run_id), console)
    return result


def latency_trap(console: Console, store: EventStore, *, speed: float) -> tuple[RunResult, RunResult]:
    """Scenario 2: one tool per response vs all independent calls in one response."""
    _heading(console, 3, "The latency trap: tools one after another vs concurrently",
             '"turned a 2-second response into a 14-second loading screen"')
    console.print(Text(
        "The same triage twice. First the model asks for one tool per response, so every tool "
        "waits for a THINK and runs alone; then it asks for the independent lookups in one "
        "response, and loopwise runs them at once."
    ))
    sequential = _run(console, _agent(store, speed=speed, name="support-sequential", parallel_tool_calls=False),
                      TASK, tags=["latency", "sequential"], what="one tool per response")
    concurrent = _run(console, _agent(store, speed=speed, name="support-concurrent"),
                      TASK, tags=["latency", "concurrent"], what="all calls in one response")
    seq = phase_times(store.load(sequential.run_id))
    con = phase_times(store.load(concurrent.run_id))

    table = Table(title="where the time goes (from the event log)", title_justify="left", title_style="bold")
    table.add_column("phase")
    table.add_column("one tool per response", justify="right")
    table.add_column("all in one response", justify="right")
    table.add_column("saved", justify="right")

    def row(label: str, a: float, b: float, a_note: str = "", b_note: str = "") -> None:
        table.add_row(label, format_duration(a) + a_note, format_duration(b) + b_note,
                      format_duration(a - b) if a > b else "-")

    row("THINK", seq.think_s, con.think_s, f" · {seq.model_calls} calls", f" · {con.model_calls} calls")
    row("ACT", seq.act_s, con.act_s, f" · {seq.act_phases} steps", f" · {con.act_phases} steps")
    row("  tools' own time", seq.tool_s, con.tool_s, f" · {seq.tool_calls} calls", f" · {con.tool_calls} calls")
    row("overhead", seq.overhead_s, con.overhead_s)
    table.add_section()
    row("total", seq.total_s, con.total_s)
    console.print()
    console.print(table)
    console.print(Text("THINK: time in model calls. ACT: wall time from the first tool's start to the last "
                       "one's end, per step. Overhead: the rest, the loop and its event log.", style="dim"))
    if speed == 0:
        console.print(Text("At speed 0 the simulated latencies are off, so these timings are only the "
                           f"runtime's own work; at speed 1 (unset ${SPEED_ENV}) the trap shows.", style="dim"))
    elif con.total_s > 0:
        console.print(Text.assemble(
            ("concurrent is ", ""), (f"{seq.total_s / con.total_s:.1f}× faster", "bold green"),
            ((f" ({format_duration(seq.total_s)} → {format_duration(con.total_s)}): one model round trip "
              "fewer, and the lookups overlap. THINK dominates: fewer, fuller "
              "iterations are the cure."), ""),
        ))
    return sequential, concurrent


def cost_spiral(console: Console, store: EventStore, *, speed: float) -> RunResult:
    """Scenario 3: a model that never says it is done, stopped by the iteration cap."""
    _heading(console, 4, "The cost spiral: a model that never says it is done",
             '"burned $47 in 3 minutes"; "ran 23 iterations before a human noticed"')
    console.print(Text(
        f"This simulated model always wants more context and recaps everything it has seen, so its "
        f"output and the context grow every iteration. Limits(max_iterations={SPIRAL_MAX_ITERATIONS}) "
        f"stops it, then one last call with tools off asks for its best answer. Priced at an example "
        f"{format_cost(SPIRAL_PRICE.input_per_mtok)} / {format_cost(SPIRAL_PRICE.output_per_mtok)} "
        "per million input / output tokens."
    ))
    agent = Agent(
        SupportDeskSimulator(mode="never_done", speed=speed, seed=SEED, price=SPIRAL_PRICE),
        instructions=INSTRUCTIONS,
        tools=demo_tools(speed=speed),
        limits=Limits(max_iterations=SPIRAL_MAX_ITERATIONS, budget_usd=None),
        runaway=RunawayDetector(enabled=False),
        store=store,
        name="support-spiral",
    )
    result = _run(console, agent, TASK, tags=["cost-spiral"], what="the never-done model")
    events = store.load(result.run_id)

    table = Table(title="every model call (from the event log)", title_justify="left", title_style="bold")
    table.add_column("iteration", justify="right")
    table.add_column("input tok", justify="right")
    table.add_column("output tok", justify="right")
    table.add_column("cost", justify="right")
    table.add_column("asked for")
    for event in events:
        if isinstance(event, ModelCallFinished):
            if event.purpose == "final_answer":
                asked = "best-effort answer, tools off"
            else:
                asked = ", ".join(c.name for c in event.tool_calls) or shorten(event.text, 40)
            label = str(event.iteration) if event.purpose == "think" else "answer"
            table.add_row(label, f"{event.usage.input_tokens:,}", f"{event.usage.output_tokens:,}",
                          format_cost(event.cost_usd), Text(asked))
    table.add_section()
    table.add_row("total", f"{result.usage.input_tokens:,}", f"{result.usage.output_tokens:,}",
                  format_cost(result.cost_usd), "")
    console.print()
    console.print(table)
    limit = next((e for e in events if isinstance(e, LimitHit)), None)
    console.print(Text.assemble(("stop reason ", "dim"), (result.stop_reason, "bold yellow"),
                                (f"   {result.iterations} iterations   {result.model_calls} model calls", "")))
    if limit is not None:
        console.print(Text("limit  ", style="dim") + Text(limit.detail))
    console.print(Text("best-effort answer", style="dim"))
    console.print(Text(result.output or "(none)"))
    console.print()
    budgeted = Agent(
        SupportDeskSimulator(mode="never_done", speed=speed, seed=SEED, price=SPIRAL_PRICE),
        instructions=INSTRUCTIONS,
        tools=demo_tools(speed=speed),
        limits=Limits(max_iterations=SPIRAL_MAX_ITERATIONS, budget_usd=SPIRAL_BUDGET_USD),
        runaway=RunawayDetector(enabled=False),
        store=store,
        name="support-spiral-budget",
    )
    capped = _run(console, budgeted, TASK, tags=["cost-spiral", "budget"], what="the never-done model on a budget")
    events = store.load(capped.run_id)
    limit = next((e for e in events if isinstance(e, LimitHit)), None)
    console.print(Text(
        f"The same model with Limits(budget_usd={SPIRAL_BUDGET_USD:g}): before every model call loopwise "
        "reserves its worst case (the input, counted, plus the max_tokens it sends) and makes no call "
        "that could not be paid for.", style=""))
    console.print(Text.assemble(("stop reason ", "dim"), (capped.stop_reason, "bold yellow"),
                                (f"   {capped.iterations} iterations   spent {format_cost(capped.cost_usd)} "
                                 f"of {format_cost(SPIRAL_BUDGET_USD)}", "")))
    if limit is not None:
        console.print(Text("limit  ", style="dim") + Text(limit.detail))
    console.print()
    defaults = Agent(
        SupportDeskSimulator(mode="never_done", speed=speed, seed=SEED, price=SPIRAL_PRICE),
        instructions=INSTRUCTIONS,
        tools=demo_tools(speed=speed),
        context=SlidingWindow(keep_last=2),
        store=store,
        name="support-spiral-defaults",
    )
    caught = _run(console, defaults, TASK, tags=["cost-spiral", "defaults"], what="the never-done model, defaults")
    events = store.load(caught.run_id)
    inputs = [e.usage.input_tokens for e in events if isinstance(e, ModelCallFinished) and e.purpose == "think"]
    console.print(Text(
        "With loopwise's defaults (runaway detection on) and SlidingWindow(keep_last=2): the model is warned "
        "when it repeats the same lookups, then stopped.", style=""))
    console.print(Text.assemble(("stop reason ", "dim"), (caught.stop_reason, "bold yellow"),
                                (f"   {caught.iterations} iterations   spent {format_cost(caught.cost_usd)}   "
                                 f"input tokens per THINK {', '.join(f'{n:,}' for n in inputs)}", "")))
    if caught.reason:
        console.print(Text("why    ", style="dim") + Text(caught.reason))
    return result


def debugging(console: Console, store: EventStore, *, speed: float) -> RunResult:
    """Scenario: a partial OBSERVE on iteration 3 goes wrong on iteration 5; the decision log finds it."""
    _heading(console, 5, "Debugging: the iteration where expectation and reality parted",
             '"the bug could be on iteration 7 of 12 — and it depends on what happened in iteration 3"')
    owed = sum(amount for _, amount in REFUND_ORDERS.values())
    console.print(Text(
        f"A customer asks for a refund of three orders (${owed:.2f}). The order lookup reads two "
        f"warehouses; the {LAGGING_WAREHOUSE} one lags, so the lookup returns two of the three orders, "
        "without an error. The run goes on, every step green, and refunds the wrong amount. With "
        "Agent(expectations=True) the model writes down, in each tool call it makes anyway, what it expects "
        "back; loopwise records whether reality matched."))
    console.print()
    agent = Agent(SupportDeskSimulator(mode="refund", speed=speed, seed=SEED), instructions=INSTRUCTIONS,
                  tools=refund_tools(speed=speed), store=store, name="support-refund", expectations=True)
    result = _run(console, agent, REFUND_TASK, tags=["debugging"], what="the refund")
    events = store.load(result.run_id)
    db = _db_args(store)
    for option in ("--decisions", "--mismatches"):
        if option == "--mismatches":
            console.print()
        if db is None:
            console.print(Text(f"the {option[2:]} view (loopwise show {option})", style="bold"))
        else:
            _command(console, f"loopwise show {result.run_id} {option}{db}")
        render_decisions(events, console, mismatches_only=option == "--mismatches")
    refunded = next((e for e in events if isinstance(e, ToolCallFinished) and e.name == "issue_refund"), None)
    console.print()
    first = next((d.iteration for d in decisions(events) if d.match is False), None)
    if refunded is not None and first is not None:
        console.print(Text.assemble(
            ("No error anywhere: every tool call in the trace is ok. The refund on iteration ", ""),
            (str(refunded.iteration), "bold"), (" paid ", ""), (f"${_refund_amount(refunded.content):.2f}", "bold red"),
            (f" of the ${owed:.2f} owed. The mismatch view points at the cause, iteration ", ""),
            (str(first), "bold"), (", where lookup_orders returned fewer orders than the model expected.", ""),
        ))
    return result


def _refund_amount(content: str) -> float:
    try:
        data = json.loads(content)
    except ValueError:
        return 0.0
    amount = data.get("amount") if isinstance(data, dict) else None
    return float(amount) if isinstance(amount, (int, float)) else 0.0


def kill_tools(*, speed: float, seed: int | None = SEED) -> list[Tool]:
    """The triage tools, with a history lookup that hangs and no timeout set."""
    analyze_sentiment, _, generate_reply = demo_tools(speed=speed, seed=seed)

    @tool(timeout=3600)
    async def get_customer_history(customer_id: str) -> dict[str, Any]:
        """A customer's live tier, orders, open tickets and last order.

        Args:
            customer_id: The customer's id, like "CUS-4821".
        """
        _stuck.set()
        await anyio.sleep(3600)
        return _history(customer_id)

    return [analyze_sentiment, get_customer_history, generate_reply]


_stuck = threading.Event()


def kill_switch(console: Console, *, speed: float, store: EventStore | None = None) -> RunResult:
    """Scenario: a stuck run stopped from a second process with `loopwise kill`.

    The run goes to `store` if it is a database file (`loopwise kill` needs one to reach
    the run); else to a temporary one, deleted after.
    """
    _heading(console, 6, "The kill switch: stopping a run from another process",
             '"build the kill switch before you need it ... a way for a human to stop it mid-run"')
    console.print(Text(
        "The history lookup hangs and nobody gave it a timeout. An operator stops the run from a second "
        "terminal. The kill is stored in the database; the run's watcher picks it up, cancels the lookup in "
        "flight and writes who stopped it and why."))
    console.print()
    _stuck.clear()
    with contextlib.ExitStack() as stack:
        if isinstance(store, SQLiteStore):
            db_store = store
        else:
            folder = stack.enter_context(tempfile.TemporaryDirectory())
            db_store = SQLiteStore(os.path.join(folder, "loopwise.db"))
            stack.callback(db_store.close)
        agent = Agent(SupportDeskSimulator(speed=speed, seed=SEED), instructions=INSTRUCTIONS,
                      tools=kill_tools(speed=speed), store=db_store, name="support-stuck")
        run_id = new_run_id()
        reason = "stuck on a hung lookup"
        command = [sys.executable, "-m", "loopwise", "kill", run_id, "--reason", reason,
                   "--db", str(Path(db_store.path).absolute())]
        shown = f"loopwise kill {run_id} --reason {shlex.quote(reason)}{_db_args(db_store)}"
        killer: dict[str, Any] = {}

        async def operator() -> None:
            await anyio.to_thread.run_sync(_stuck.wait, abandon_on_cancel=True)
            await anyio.sleep(0.3 * speed)
            _command(console, shown)
            done = await anyio.run_process(command, check=False, stdin=None)
            killer["out"] = (done.stdout.decode() + done.stderr.decode()).strip()
            console.print(Text(killer["out"], style="dim"))

        async def both() -> RunResult:
            async with anyio.create_task_group() as tg:
                tg.start_soon(operator)
                result = await agent.run(TASK, run_id=run_id, tags=["demo", "kill"])
                if not _stuck.is_set():
                    tg.cancel_scope.cancel()  # the run ended on its own: no operator needed
            return result

        with console.status("running the triage, which gets stuck…"):
            result = anyio.run(both)
        events = db_store.load(run_id)
    console.print()
    render_run(events, console)
    received = next((e for e in events if e.kind == "kill_received"), None)
    if received is not None:
        console.print()
        console.print(Text.assemble(
            ("The run ended ", ""), ("killed", "bold red"),
            (f" {format_duration(events[-1].ts - received.requested_ts)} after the kill was stored", ""),
            (", with the lookup in flight cancelled. A killed run can be resumed: continued from its log, "
             "as a new segment of it (see the last command below).", ""),
        ))
    return result


def resume_agent(speed: float | None = None) -> Agent:
    """The agent that resumes the kill-switch run: the triage agent, its history lookup
    working again (and safe to run again: a read). `speed`: as `main`'s."""
    speed = _speed(speed)
    tools = demo_tools(speed=speed)
    lookup = next(t for t in tools if t.name == "get_customer_history")
    fixed = tool(lookup.fn, idempotent=True)
    return Agent(SupportDeskSimulator(speed=speed, seed=SEED), instructions=INSTRUCTIONS,
                 tools=[fixed if t is lookup else t for t in tools], name="support-stuck")


#: What `loopwise resume ... --agent` names to continue the kill-switch run.
RESUME_AGENT = "loopwise._demo.scenario:support_agent"


def __getattr__(name: str) -> Any:
    # `loopwise._demo.scenario:support_agent` is made when it is asked for, at $LOOPWISE_DEMO_SPEED
    # then (importing the demo never fails on a bad speed).
    if name == "support_agent":
        return resume_agent()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# -- main --------------------------------------------------------------------------------


def _speed(speed: float | None) -> float:
    if speed is None:
        raw = os.environ.get(SPEED_ENV, "").strip()
        if not raw:
            return 1.0
        try:
            speed = float(raw)
        except ValueError:
            raise UserError(f"${SPEED_ENV}={raw!r} is not a number; use 1 for real time, 0 for no delays") from None
        source = f"${SPEED_ENV}={raw!r}"
    else:
        source = f"speed={speed!r}"
    if isinstance(speed, bool) or not isinstance(speed, (int, float)) or not 0 <= speed < float("inf"):
        raise UserError(f"{source} must be a number >= 0 (1 for real time, 0 for no delays)")
    return float(speed)


def main(console: Console, *, speed: float | None = None, store: EventStore | None = None) -> int:
    """Run the demo's scenarios, printing to `console`. Returns the exit status.

    Args:
        console: Where the demo prints.
        speed: Multiplies every simulated latency (default: ``$LOOPWISE_DEMO_SPEED``, else 1).
        store: Where the runs go (default: the database every command uses,
            ``$LOOPWISE_DB`` or ``.loopwise/loopwise.db``, opened and closed here).
    """
    try:
        speed = _speed(speed)
    except UserError as exc:
        console.print(Text(f"error: {exc}", style="red"))
        return 2
    if store is None:
        store = SQLiteStore(default_db_path())
        try:
            return main(console, speed=speed, store=store)
        finally:
            store.close()
    console.print(Text("loopwise demo", style="bold") + Text(
        "  six production scenarios on a simulated support-desk model: no network, no keys"
        + (f" (speed {speed:g})" if speed != 1 else ""), style="dim"))
    expected: list[tuple[str, RunResult, str]] = []
    result = triage(console, store, speed=speed)
    expected.append(("triage", result, "done"))
    result = error_recovery(console, store, speed=speed)
    expected.append(("error recovery", result, "done"))
    sequential, concurrent = latency_trap(console, store, speed=speed)
    expected += [("one tool per response", sequential, "done"), ("all calls in one response", concurrent, "done")]
    result = cost_spiral(console, store, speed=speed)
    expected.append(("cost spiral", result, "max_iterations"))
    debugged = debugging(console, store, speed=speed)
    expected.append(("debugging", debugged, "done"))
    killed = kill_switch(console, speed=speed, store=store)
    expected.append(("kill switch", killed, "killed"))
    _epilogue(console, store, expected[0][1], debugged, killed)
    wrong = [(name, r, want) for name, r, want in expected if r.stop_reason != want]
    for name, r, want in wrong:
        console.print(Text(f"the {name} run ended as {r.stop_reason!r}, not {want!r} "
                           f"({r.reason or 'no reason recorded'}); run id {r.run_id}", style="bold red"))
    return 1 if wrong else 0


def _epilogue(console: Console, store: EventStore, triaged: RunResult, debugged: RunResult,
              killed: RunResult) -> None:
    """Where the runs are, and the commands that read them back (each works as printed)."""
    console.print()
    console.print(Rule(Text("Your turn", style="bold"), align="left", style="cyan"))
    db = _db_args(store)
    if db is None:
        console.print(Text(f"These runs were kept in memory ({store.describe()}), so no loopwise command can "
                           "read them back; run from the command line, the demo writes them to its database "
                           "(--db PATH).", style="dim"))
        return
    console.print(Text(f"Every run above is in {store.describe()}, tagged demo. Read them back:"))
    _command(console, f"loopwise runs{db}", "the runs, newest first")
    _command(console, f"loopwise show {triaged.run_id}{db}", "the triage's trace")
    _command(console, f"loopwise show {debugged.run_id} --mismatches{db}", "where the refund went wrong")
    _command(console, f"loopwise profile --tag demo{db}", "where the time went, over the demo's runs")
    if killed.stop_reason == "killed":
        _command(console, f"loopwise resume {killed.run_id} --agent {RESUME_AGENT}{db}",
                 "finish the killed run, its lookup fixed")
