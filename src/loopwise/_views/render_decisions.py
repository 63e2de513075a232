"""The decision log on a console (`loopwise show RUN_ID --decisions` / `--mismatches`).

```
decision log of run 18eaf556…   expectations on   6 iterations   1 mismatch, first at iteration 3
iteration 3  ✗ mismatch  ◀ first mismatch: expectation and reality parted here ─────────────
  thought   Looking up the three orders the customer listed.
  call      lookup_orders(order_ids=["ORD-7", "ORD-8", "ORD-9"])
    expected  {"count": 3}
    actual    ok  {"orders": [...], "count": 2}
    match     ✗ no  (default comparison)
```

`--mismatches` shows only the iterations whose `match` is False, the first one
highlighted: where to start reading. Text from the model and the tools is printed as
plain text (never as rich markup) and shortened.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.rule import Rule
from rich.table import Table
from rich.text import Text

from .decisions import CallDecision, Decision, decisions, expectations_on
from .._events import Event
from .render import OUTCOME_STYLES, shorten

__all__ = ["NO_EXPECTATIONS", "render_decisions"]

NO_EXPECTATIONS = "this run recorded no expectations (run it with Agent(expectations=True))"
_LABEL = 10
_MATCH = {True: ("✓ yes", "green"), False: ("✗ no", "bold red"), None: ("? unknown", "dim")}
_ITERATION = {True: ("✓ matched", "green"), False: ("✗ mismatch", "bold red"), None: ("", "")}


def _expected_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def _row(label: str, body: str | Text, *, indent: int = 2, style: str = "") -> Padding:
    """`label  body`, indented; a long body wraps under itself, not under the label."""
    grid = Table.grid()
    grid.add_column(width=_LABEL, no_wrap=True, style="dim")
    grid.add_column(overflow="fold")
    grid.add_row(label, body if isinstance(body, Text) else Text(body, style=style))
    return Padding(grid, (0, 0, 0, indent), expand=False)


def _call(call: CallDecision, console: Console, show_expectations: bool) -> None:
    console.print(_row("call", shorten(f"{call.name}({_arguments(call.arguments)})", 140)))
    if show_expectations:
        expected = "(none)" if call.expected is None else shorten(_expected_text(call.expected), 140)
        console.print(_row("expected", expected, indent=4, style="dim" if call.expected is None else "italic"))
    actual = Text()
    if call.outcome is None:
        actual.append("no result recorded", style="yellow")
    else:
        actual.append(call.outcome, style=OUTCOME_STYLES.get(call.outcome, ""))
        actual.append("  ")
        actual.append(shorten(call.actual, 140))
    console.print(_row("actual", actual, indent=4))
    if show_expectations and call.expected is not None:
        label, style = _MATCH[call.match]
        verdict = Text(label, style=style)
        by = {"check": "the tool's check", "default": "default comparison"}.get(call.match_by or "")
        if by:
            verdict.append(f"  ({by})", style="dim")
        if call.match_note:
            verdict.append(f"  {call.match_note}", style="yellow")
        console.print(_row("match", verdict, indent=4))


def _arguments(arguments: Any) -> str:
    if isinstance(arguments, dict):
        return ", ".join(f"{k}={json.dumps(v, ensure_ascii=False, default=str)}" for k, v in arguments.items())
    return "" if arguments is None else str(arguments)


def _decision(d: Decision, console: Console, show_expectations: bool, *, first_mismatch: bool = False) -> None:
    title = Text(f"iteration {d.iteration}", style="bold")
    label, style = _ITERATION[d.match] if show_expectations else ("", "")
    if label:
        title.append(f"  {label}", style=style)
    if first_mismatch:
        title.append("  ◀ first mismatch: expectation and reality parted here", style="bold red")
    console.print(Rule(title, style="red" if first_mismatch else "dim", align="left"))
    if d.thought:
        console.print(_row("thought", shorten(d.thought, 200), style="italic"))
    if d.calls:
        for call in d.calls:
            _call(call, console, show_expectations)
    else:
        console.print(_row("action", d.action or "nothing recorded",
                           style="" if d.action_kind == "answer" else "yellow"))
        if d.answer:
            console.print(_row("answer", shorten(d.answer, 200)))
    for i, line in enumerate(d.why):
        console.print(_row("why" if i == 0 else "", shorten(line, 200), style="yellow"))


def render_decisions(events: Sequence[Event], console: Console, *, mismatches_only: bool = False) -> None:
    """Print a run's decision log; `mismatches_only`: the iterations that differed, first highlighted."""
    log = decisions(events)
    on = expectations_on(events)
    mismatches = [d for d in log if d.match is False]
    head = Text("decision log of run ", style="bold")
    head.append(events[0].run_id if events else "?", style="bold cyan")
    head.append("   expectations ", style="dim")
    head.append("on" if on else "off")
    head.append(f"   {len(log)} iteration{'s' if len(log) != 1 else ''}")
    if on:
        head.append("   ")
        if mismatches:
            head.append(f"{len(mismatches)} mismatch{'es' if len(mismatches) != 1 else ''}, "
                        f"first at iteration {mismatches[0].iteration}", style="bold red")
        else:
            head.append("no mismatches", style="green")
    console.print(head)
    if not log:
        console.print(Text("(no iterations recorded)", style="dim"))
        return
    if mismatches_only:
        if not on:
            console.print(Text(NO_EXPECTATIONS, style="yellow"))
            return
        if not mismatches:
            calls = [c for d in log for c in d.calls if c.expected is not None]
            matched = sum(c.match is True for c in calls)
            console.print(Text(
                f"no mismatches: {matched} of {len(calls)} expectation{'s' if len(calls) != 1 else ''} matched, "
                f"{len(calls) - matched} could not be checked", style="green"))
            return
        for i, d in enumerate(mismatches):
            _decision(d, console, True, first_mismatch=i == 0)
        return
    if not on:
        console.print(Text(NO_EXPECTATIONS, style="yellow"))
    first = mismatches[0].iteration if mismatches else None
    for d in log:
        _decision(d, console, on, first_mismatch=d.iteration == first)
