"""A readable trace of one run, computed from its events (`loopwise show`, `loopwise run`).

```
run cb9be7c5cedd4ff8856ad01ad754dbd8   agent support   model openai:gpt-4o-mini
started 2026-11-24 08:04:13   tags nightly   limits max_iterations=8   tools lookup
task Where are my orders?
iteration 1  +0ms ──────────────────────────────────────────────────────────────
THINK   1.20s   100 in / 10 out tok   $0.0001
        thinks   checking
        asks for lookup(order_id="1"), lookup(order_id="2")
ACT     2 tool calls   2 ran concurrently   20ms
        ▕██████████▏ lookup(order_id="1")  ok    20ms  {"order_id":"1","status"…
        ▕█████░░░░░▏ lookup(order_id="2")  ok    10ms  {"order_id":"2","status"…
iteration 2  +1.24s ────────────────────────────────────────────────────────────
THINK   0.91s   150 in / 5 out tok   $0.0002
        answers  Both orders shipped.
────────────────────────────────────────────────────────────────────────────────
done   2 iterations   2 model calls   250 in / 15 out tok   $0.0003   2.15s
output
Both orders shipped.
```

Text from the model and the tools is shown as plain text (never as rich markup) and
shortened; only the run's output, in the footer, is shown whole.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any

from rich.console import Console
from rich.padding import Padding
from rich.rule import Rule
from rich.text import Text

from .._events import (
    BreakerChanged,
    Event,
    IterationStarted,
    KillReceived,
    LimitHit,
    ModelAttemptFailed,
    ModelCallFinished,
    ModelCallStarted,
    Nudge,
    RunFinished,
    RunResumed,
    RunStarted,
    ThreadAbandoned,
    ToolAttemptFailed,
    ToolCallFinished,
    ToolCallStarted,
    ToolFallback,
)
from .._messages import ToolCall

__all__ = ["format_cost", "format_duration", "render_run", "shorten"]

LABEL_WIDTH = 8
BAR_WIDTH = 10
#: A tool row goes on two lines unless this much of its result fits after its outcome.
MIN_RESULT_WIDTH = 24

STOP_STYLES = {
    "done": "bold green",
    "max_iterations": "bold yellow",
    "budget": "bold yellow",
    "deadline": "bold yellow",
    "runaway": "bold yellow",
    "killed": "bold red",
    "error": "bold red",
}
OUTCOME_STYLES = {
    "ok": "green",
    "fallback": "yellow",
    "error": "red",
    "invalid_arguments": "yellow",
    "unknown_tool": "yellow",
    "not_executed": "dim",
    "cancelled": "red",
    "unknown": "bold yellow",
}


# -- formatting helpers (also used by the CLI's tables) ------------------------------


def shorten(text: str | None, width: int) -> str:
    """`text` on one line, whitespace collapsed, cut to `width` characters with "…"."""
    if not text:
        return ""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: max(width - 1, 0)] + "…"


def format_cost(cost: float | None) -> str:
    if cost is None:
        return "-"
    if cost == 0:
        return "$0"
    if cost < 0.0001:
        return "<$0.0001"
    return f"${cost:.4f}" if cost < 1 else f"${cost:,.2f}"


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    if seconds < 1:
        return f"{seconds * 1000:.0f}ms"
    if seconds < 120:
        return f"{seconds:.2f}s"
    minutes, secs = divmod(seconds, 60)
    return f"{int(minutes)}m{secs:04.1f}s"


def format_time(ts: float) -> str:
    """A wall-clock timestamp in local time, to the second."""
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts))


def _json(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return repr(value)


def format_arguments(arguments: dict[str, Any] | str | None, width: int = 60) -> str:
    if arguments is None:
        return ""
    if isinstance(arguments, str):  # the raw (maybe malformed) JSON the provider sent
        return shorten(arguments, width)
    return shorten(", ".join(f"{k}={_json(v)}" for k, v in arguments.items()), width)


def format_call(name: str, arguments: dict[str, Any] | str | None, width: int = 60) -> str:
    return f"{name}({format_arguments(arguments, width)})"


# -- the trace -----------------------------------------------------------------------


def _line(label: str, style: str, *parts: str | Text | tuple[str, str]) -> Text:
    text = Text(f"{label:<{LABEL_WIDTH}}", style=style)
    for i, part in enumerate(parts):
        if i:
            text.append("   ")
        if isinstance(part, tuple):
            text.append(part[0], style=part[1])
        else:
            text.append(part)
    return text


def _detail(body: str | Text, *, prefix: str = "", style: str = "") -> Padding:
    """A line under a THINK / NUDGE line, indented (also where it wraps)."""
    text = Text()
    if prefix:
        text.append(prefix, style="dim")
    text.append(body if isinstance(body, Text) else Text(body, style=style))
    return Padding(text, (0, 0, 0, LABEL_WIDTH), expand=False)


def _header(started: RunStarted | None, first: Event, console: Console) -> None:
    head = Text()
    head.append("run ", style="bold")
    head.append(first.run_id, style="bold cyan")
    if started is None:
        console.print(head)
        console.print(Text("  (the log has no run_started event)", style="yellow"))
        return
    model = started.agent.get("model")
    model_name = model.get("name") if isinstance(model, dict) else model
    for key, value in (("agent", started.agent.get("name")), ("model", model_name)):
        if value:
            head.append(f"   {key} ", style="dim")
            head.append(str(value))
    console.print(head)
    meta = Text()
    meta.append("started ", style="dim")
    meta.append(format_time(started.ts))
    if started.tags:
        meta.append("   tags ", style="dim")
        meta.append(", ".join(started.tags), style="magenta")
    limits = [f"{k}={v}" for k, v in started.limits.items() if v is not None and not isinstance(v, bool)]
    if limits:
        meta.append("   limits ", style="dim")
        meta.append(" ".join(limits))
    tools = started.agent.get("tools")
    if tools:
        meta.append("   tools ", style="dim")
        meta.append(shorten(", ".join(map(str, tools)), 60))
    console.print(meta)
    for message in started.task:
        if message.role == "user" and message.content:
            console.print(Text("task ", style="dim") + Text(shorten(message.content, 200)))
            break


def _think(event: ModelCallFinished, header_model: str | None, model: str | None, console: Console) -> None:
    label = "THINK" if event.purpose == "think" else "ANSWER"
    parts: list[str | tuple[str, str]] = []
    if model and model != header_model:
        parts.append((model, "cyan"))
    parts.append(format_duration(event.latency_s))
    if event.error is not None:
        console.print(_line(label, "bold blue", *parts, ("failed", "bold red")))
        console.print(_detail(shorten(f"{event.error.type}: {event.error.message}", 200), style="red"))
        return
    tilde = "~" if event.usage_estimated else ""
    parts.append(f"{tilde}{event.usage.input_tokens:,} in / {tilde}{event.usage.output_tokens:,} out tok")
    parts.append(format_cost(event.cost_usd))
    if event.purpose == "final_answer":
        parts.append(("best-effort answer, tools off", "dim"))
    console.print(_line(label, "bold blue", *parts))
    if event.tool_calls:
        if event.text and event.text.strip():
            console.print(_detail(shorten(event.text, 160), prefix="thinks   ", style="italic"))
        console.print(_detail(_asks(event.tool_calls), prefix="asks for "))
    elif event.finish_reason == "length":
        console.print(_detail(shorten(event.text, 160), prefix="cut by max_tokens ", style="yellow"))
    elif event.text and event.text.strip():
        console.print(_detail(shorten(event.text, 160), prefix="answers  "))
    else:
        console.print(_detail("(empty response)", style="yellow"))


def _asks(calls: Sequence[ToolCall]) -> Text:
    width = max(24, 100 // max(len(calls), 1))
    return Text(", ".join(format_call(str(c.name), c.arguments, width) for c in calls))


def _act(calls: list[tuple[ToolCallStarted, ToolCallFinished | None]], console: Console,
         notes: dict[str, list[Text]] | None = None, extra: list[Text] | None = None) -> None:
    # Tools that ran: their span is [finished.ts - latency, finished.ts] on the wall clock.
    spans: dict[str, tuple[float, float]] = {}
    for started, finished in calls:
        if finished is not None and finished.outcome in ("ok", "fallback", "error", "cancelled"):
            spans[started.call_id] = (finished.ts - finished.latency_s, finished.ts)
    concurrent = _overlapping(spans)
    summary: list[str | tuple[str, str]] = [f"{len(calls)} tool call{'s' if len(calls) != 1 else ''}"]
    if concurrent:
        summary.append((f"{len(concurrent)} ran concurrently", "bold"))
    if spans:
        summary.append(format_duration(max(e for _, e in spans.values()) - min(s for s, _ in spans.values())))
    console.print(_line("ACT", "bold green", *summary))
    show_bars = len(spans) > 1
    lo = min((s for s, _ in spans.values()), default=0.0)
    hi = max((e for _, e in spans.values()), default=0.0)
    # A row is `[bar] call  outcome  latency  result` when that fits the console with
    # room for the start of the result; else two lines, `[bar] call` over
    # `outcome  latency  result`, so that no row loses its outcome, latency or result.
    width = console.size.width
    indent = LABEL_WIDTH + (BAR_WIDTH + 3 if show_bars else 0)
    rows = [(started, finished, format_call(started.name, started.arguments, 40)) for started, finished in calls]
    call_width = max(len(call) for _, _, call in rows)
    outcome_width = max(len(f.outcome) if f is not None else 0 for _, f, _ in rows)
    status_width = outcome_width + 2 + (8 if spans else 0)
    one_line = width - indent - call_width - 2 - status_width >= MIN_RESULT_WIDTH
    for started, finished, call in rows:
        line = Text(" " * LABEL_WIDTH)
        if show_bars:
            line.append(_bar(spans.get(started.call_id), lo, hi))
            line.append(" ")
        if one_line:
            line.append(call.ljust(call_width + 2))
        else:
            line.append(_fit_call(started.name, started.arguments, width - indent))
            console.print(line, no_wrap=True, overflow="ellipsis")
            line = Text(" " * indent)
        if finished is None:
            line.append("no result recorded", style="yellow")
        else:
            style = OUTCOME_STYLES.get(finished.outcome, "")
            line.append(finished.outcome.ljust(outcome_width + 2), style=style)
            if started.call_id in spans:
                line.append(format_duration(finished.latency_s).rjust(6) + "  ")
            elif spans:
                line.append(" " * 8)
            result_width = min(80, max(width - len(line), 1))
            if finished.outcome == "ok":
                line.append(shorten(finished.content, result_width), style="dim")
            elif finished.error is not None and finished.outcome == "error":
                line.append(shorten(f"{finished.error.type}: {finished.error.message}", result_width), style=style)
            else:
                line.append(shorten(finished.content, result_width), style=style)
        console.print(line, no_wrap=True, overflow="ellipsis")
        for note in (notes or {}).get(started.call_id, ()):
            console.print(Padding(note, (0, 0, 0, LABEL_WIDTH + 2), expand=False))
    for line in extra or ():
        console.print(Padding(line, (0, 0, 0, LABEL_WIDTH), expand=False))


def _fit_call(name: str, arguments: dict[str, Any] | str | None, width: int) -> str:
    """`name(arguments)` in at most `width` characters: the arguments are cut first."""
    call = format_call(name, arguments, 40)
    if len(call) <= width:
        return call
    if len(name) + 3 <= width:
        return format_call(name, arguments, width - len(name) - 2)
    return shorten(name, width)


def _tool_note(event: ToolAttemptFailed | ToolFallback | ThreadAbandoned) -> Text:
    if isinstance(event, ToolAttemptFailed):
        text = Text(f"✗ attempt {event.attempt}  ", style="red")
        text.append(shorten(event.error.message or event.error.type, 80))
        text.append(f"  {format_duration(event.latency_s)}", style="dim")
        if event.retry_in_s is not None:
            text.append(f"  → retry in {format_duration(event.retry_in_s)}", style="dim")
        return text
    if isinstance(event, ToolFallback):
        if event.ok:
            return Text(f"↳ answered from {event.fallback}", style="yellow")
        return Text(f"↳ fallback {event.fallback} did not answer: {shorten(event.reason, 80)}", style="red")
    return Text(f"⚠ thread {event.thread} abandoned (the sync tool runs on detached)", style="yellow")


def _model_attempt(event: ModelAttemptFailed) -> Text:
    """A failed model attempt, labelled by what the log says came next: RETRY (the same
    model again) or FAILED (not retried: the next model, or the call failed), and why."""
    error = shorten(f"{event.error.type}: {event.error.message}", 90)
    why = " ".join(event.reason.split()).replace(" is not retried", " is not retryable")
    if event.retry_in_s is not None:
        return _line("RETRY", "bold yellow", f"{event.model} attempt {event.attempt}", (error, "yellow"),
                     (f"({why or f'retry in {format_duration(event.retry_in_s)}'})", "dim"))
    if not why:  # (a log written before attempts said why)
        why = "the next model is tried" if event.will_fallback else "the call failed"
    return _line("FAILED", "bold red", f"{event.model} attempt {event.attempt}", (error, "yellow"),
                 (f"(not retried: {why})", "red"))


def _overlapping(spans: dict[str, tuple[float, float]]) -> set[str]:
    """The calls whose run overlapped another call's run."""
    out: set[str] = set()
    items = sorted(spans.items(), key=lambda kv: kv[1][0])
    for i, (a, (a0, a1)) in enumerate(items):
        for b, (b0, b1) in items[i + 1 :]:
            if b0 >= a1:
                break
            if min(a1, b1) > b0:
                out.update((a, b))
    return out


def _bar(span: tuple[float, float] | None, lo: float, hi: float) -> Text:
    """`▕██░░░▏`: where in the ACT phase this call ran."""
    text = Text("▕", style="dim")
    if span is None:
        text.append(" " * BAR_WIDTH)
    else:
        total = hi - lo
        if total <= 0:
            start, end = 0, BAR_WIDTH
        else:
            start = min(int((span[0] - lo) / total * BAR_WIDTH), BAR_WIDTH - 1)
            end = max(round((span[1] - lo) / total * BAR_WIDTH), start + 1)
        text.append("░" * start, style="dim")
        text.append("█" * (end - start), style="green")
        text.append("░" * (BAR_WIDTH - end), style="dim")
    text.append("▏", style="dim")
    return text


def _footer(finished: RunFinished | None, events: Sequence[Event], console: Console) -> None:
    if finished is None:
        console.print(Rule(Text("not finished", style="yellow"), style="dim", align="left"))
        last = events[-1]
        console.print(Text(
            f"the log ends at event #{last.seq} ({last.kind}, {format_time(last.ts)}): "
            "the run is still going, or its process died",
            style="yellow",
        ))
        return
    console.print(Rule(style="dim"))
    usage = finished.usage
    parts: list[str | tuple[str, str]] = [
        (finished.stop_reason, STOP_STYLES.get(finished.stop_reason, "bold")),
        f"{finished.iterations} iteration{'s' if finished.iterations != 1 else ''}",
        f"{finished.model_calls} model call{'s' if finished.model_calls != 1 else ''}",
        f"{usage.input_tokens:,} in / {usage.output_tokens:,} out tok",
        format_cost(finished.cost_usd),
        format_duration(finished.duration_s),
    ]
    line = Text()
    for i, part in enumerate(parts):
        if i:
            line.append("   ")
        if isinstance(part, tuple):
            line.append(part[0], style=part[1])
        else:
            line.append(part)
    console.print(line)
    if finished.reason:
        console.print(Text("reason ", style="dim") + Text(finished.reason))
    if finished.error is not None and finished.error.message not in (finished.reason or ""):
        console.print(Text("error  ", style="dim") + Text(f"{finished.error.type}: {finished.error.message}", style="red"))
    if finished.output is not None:
        console.print(Text("output", style="dim"))
        console.print(Text(finished.output))
    else:
        console.print(Text("no output", style="dim"))


def render_run(events: list[Event], console: Console) -> None:
    """Print a compact trace of one run: header, each iteration's THINK and ACT, footer.

    Works on any prefix of a run's log (a run still going, or one whose process died).
    """
    if not events:
        console.print(Text("(no events)", style="dim"))
        return
    started = next((e for e in events if isinstance(e, RunStarted)), None)
    finished = next((e for e in reversed(events) if isinstance(e, RunFinished)), None)
    _header(started, events[0], console)
    header_model = None
    if started is not None:
        model = started.agent.get("model")
        header_model = model.get("name") if isinstance(model, dict) else model
    t0 = started.ts if started is not None else events[0].ts

    pending_model: ModelCallStarted | None = None
    calls: list[tuple[ToolCallStarted, ToolCallFinished | None]] = []
    index: dict[str, int] = {}
    notes: dict[str, list[Text]] = {}
    extra: list[Text] = []

    def flush_act() -> None:
        if calls or extra:
            _act(calls, console, notes, extra)
            calls.clear()
            index.clear()
            notes.clear()
            extra.clear()

    def flush_model() -> None:
        nonlocal pending_model
        if pending_model is not None:
            label = "THINK" if pending_model.purpose == "think" else "ANSWER"
            console.print(_line(label, "bold blue", ("no answer recorded", "yellow")))
            pending_model = None

    for event in events:
        if isinstance(event, (ToolAttemptFailed, ToolFallback, ThreadAbandoned)):
            notes.setdefault(event.call_id, []).append(_tool_note(event))
            continue
        if isinstance(event, BreakerChanged):
            extra.append(Text(f"breaker {event.name}: {event.old} → {event.new} ({event.reason})",
                              style="bold yellow" if event.new == "open" else "yellow"))
            continue
        if isinstance(event, ModelAttemptFailed):
            console.print(_model_attempt(event))
            continue
        if isinstance(event, (ToolCallStarted, ToolCallFinished)):
            flush_model()
            if isinstance(event, ToolCallStarted):
                index[event.call_id] = len(calls)
                calls.append((event, None))
            elif event.call_id in index:
                i = index[event.call_id]
                calls[i] = (calls[i][0], event)
            else:  # settled by a resume: its start is in the previous segment
                index[event.call_id] = len(calls)
                calls.append((ToolCallStarted(run_id=event.run_id, seq=event.seq, ts=event.ts,
                                              iteration=event.iteration, call_id=event.call_id,
                                              name=event.name), event))
            continue
        flush_act()
        if isinstance(event, IterationStarted):
            flush_model()
            title = Text(f"iteration {event.iteration}", style="bold")
            title.append(f"  +{format_duration(event.ts - t0)}", style="dim")
            console.print(Rule(title, style="dim", align="left"))
        elif isinstance(event, ModelCallStarted):
            flush_model()
            pending_model = event
        elif isinstance(event, ModelCallFinished):
            model = pending_model.model if pending_model is not None else None
            pending_model = None
            _think(event, header_model, model, console)
        elif isinstance(event, Nudge):
            flush_model()
            console.print(_line("NUDGE", "bold magenta", event.reason))
            console.print(_detail(shorten(event.content, 160), style="dim"))
        elif isinstance(event, LimitHit):
            flush_model()
            console.print(_line("LIMIT", "bold yellow", (event.limit, "bold yellow"), event.detail))
        elif isinstance(event, KillReceived):
            flush_model()
            console.print(_line("KILL", "bold red", (f"by {event.by}", "bold red"), event.reason,
                                (f"received {format_duration(max(0.0, event.ts - event.requested_ts))} "
                                 "after the request", "dim")))
        elif isinstance(event, RunResumed):
            flush_model()
            title = Text(f"resumed (segment {event.segment + 1})", style="bold cyan")
            title.append(f"  after {event.previous_end}, by {event.by}", style="dim")
            console.print(Rule(title, style="cyan", align="left"))
            carried = f"carried over: {format_cost(event.cost_usd)}, {format_duration(event.active_s)} active"
            if event.charged_usd:
                carried += f" (a model call in flight charged at its reservation: {format_cost(event.charged_usd)})"
            console.print(_detail(carried, style="dim"))
            for c in event.interrupted_calls:
                what = ("runs again (idempotent)" if c.get("action") == "rerun"
                        else "outcome unknown: not run again (not idempotent)")
                console.print(_detail(f"interrupted {c.get('name')} [{c.get('call_id')}]: {what}", style="yellow"))
    flush_act()
    flush_model()
    _footer(finished, events, console)
