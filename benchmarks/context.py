"""What does a sliding context window save over appending everything?

Not a test: it prints tables of measurements next to the targets they are held to.

    .venv/bin/python benchmarks/context.py                      # N = 20 and 40, keep_last=2
    .venv/bin/python benchmarks/context.py --iterations 20,40,80 --keep-last 3 --result-bytes 4000

The workload runs the real loop (`lw.Agent`, `MemoryStore`) with a `FunctionModel` priced
at `Price(2.50, 10.00)`: for N iterations the model asks for one tool call,
`read_page(n)` with n = 1, 2, ..., N, whose result is ~2 KB of varied text (the page
number seeds it); then it answers. It tells which page comes next from the last tool
call in its request (never from global state), so it works on whatever context the
policy leaves it. Usage it reports: input tokens counted from the request (UTF-8 bytes /
4 of every message's content and tool-call arguments), 50 output tokens per call. A
request with no tools is a summary call (the only tool-less call in these runs: the run
ends with the model's own answer, before any limit): it answers a ~150-token summary.

Every number is read from the run's event log (`store.load(run_id)`): the
`model_call_finished` events, their `purpose` (think / summary), `usage.input_tokens` and
`cost_usd`. Compared: naive append (`FullContext()`), `SlidingWindow(keep_last=K)`
(default K = 2) and, for comparison, `SlidingWindow(keep_last=1)`.

Targets (issue 4), for `SlidingWindow(keep_last=K)`: input tokens per iteration flat
(iteration 20 within 1.5x of iteration 4); total input tokens, summary calls included,
>= 3x lower than naive append at 20 iterations and >= 5x lower at 40.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
from dataclasses import dataclass, field

from rich.console import Console
from rich.table import Table

import loopwise as lw
from loopwise._events import ModelCallFinished
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, Price, ToolCall, Usage

PRICE = Price(2.50, 10.00)
OUTPUT_TOKENS = 50
SUMMARY_TOKENS = 150
TARGET_FLAT = 1.5  # iteration 20 / iteration 4
TARGET_RATIO = {20: 3.0, 40: 5.0}  # naive total input / window total input

TASK = ("Read the report page by page with read_page, starting at page 1, and tell me the "
        "three most important findings.")
INSTRUCTIONS = "You are a careful analyst. Use the tools; answer once you have read every page."

WORDS = ("revenue margin churn cohort latency region pipeline forecast variance incident audit "
         "backlog quota renewal pricing discount partner segment headcount outage vendor contract "
         "ledger invoice refund escalation roadmap milestone regression benchmark capacity").split()


# -- the workload ------------------------------------------------------------------


def page_text(n: int, size: int) -> str:
    """~`size` bytes of varied text, the same for the same page."""
    rng = random.Random(n)
    parts = [f"Page {n}."]
    length = len(parts[0])
    while length < size:
        sentence = (f"{rng.choice(WORDS).capitalize()} {rng.choice(WORDS)} {rng.randint(1, 9999)} "
                    f"{rng.choice(WORDS)} {rng.choice(WORDS)} {rng.randint(10, 99)}% {rng.choice(WORDS)}.")
        parts.append(sentence)
        length += len(sentence) + 1
    return " ".join(parts)[:size]


def count_tokens(request: ModelRequest) -> int:
    """UTF-8 bytes / 4 of every message's content and tool-call arguments."""
    total = 0
    for message in request.messages:
        total += len((message.content or "").encode())
        for call in message.tool_calls:
            args = call.arguments if isinstance(call.arguments, str) else json.dumps(call.arguments)
            total += len(call.name.encode()) + len(args.encode())
    return total // 4


def last_page(request: ModelRequest) -> int:
    """The page of the last read_page call in the request (0 when none)."""
    for message in reversed(request.messages):
        for call in reversed(message.tool_calls):
            if call.name == "read_page" and isinstance(call.arguments, dict):
                return int(call.arguments["n"])
    return 0


def make_model(iterations: int) -> FunctionModel:
    def reader(request: ModelRequest) -> ModelResponse:
        usage = Usage(count_tokens(request), OUTPUT_TOKENS)
        if not request.tools:  # a summary call
            seen = max((int(w) for w in request.messages[-1].content.replace(".", " ").split()
                        if w.isdigit() and len(w) < 3), default=0)
            text = " ".join(f"p{i % 100}: {WORDS[i % len(WORDS)]} up {i % 37}%;" for i in range(1, 60))
            text = f"Read through page {seen}. " + text
            return ModelResponse(text=text[: SUMMARY_TOKENS * 4], usage=Usage(count_tokens(request), SUMMARY_TOKENS))
        n = last_page(request) + 1
        if n > iterations:
            return ModelResponse(text="Findings: " + " ".join(WORDS[:30]), usage=usage)
        note = f"Page {n - 1} noted; reading page {n} next to check the figures against the earlier pages."
        return ModelResponse(text=note, tool_calls=[ToolCall("read_page", {"n": n}, id=f"call_{n}")], usage=usage)

    return FunctionModel(reader, price=PRICE, name="reader")


@dataclass
class Measured:
    label: str
    iterations: int
    think: dict[int, int] = field(default_factory=dict)  # iteration -> input tokens
    think_input: int = 0
    summary_calls: int = 0
    summary_input: int = 0
    output: int = 0
    cost_usd: float = 0.0
    result_cost_usd: float = 0.0
    stop_reason: str = ""

    @property
    def total_input(self) -> int:
        return self.think_input + self.summary_input


async def measure(label: str, context: lw.ContextPolicy, iterations: int, result_bytes: int) -> Measured:
    @lw.tool
    def read_page(n: int) -> str:
        """Read one page of the report."""
        return page_text(n, result_bytes)

    store = lw.MemoryStore()
    agent = lw.Agent(
        make_model(iterations),
        instructions=INSTRUCTIONS,
        tools=[read_page],
        context=context,
        limits=lw.Limits(max_iterations=iterations + 1, budget_usd=None),
        runaway=lw.RunawayDetector(enabled=False),
        store=store,
    )
    result = await agent.run(TASK)
    m = Measured(label, iterations, result_cost_usd=result.cost_usd, stop_reason=result.stop_reason)
    for event in store.load(result.run_id):
        if not isinstance(event, ModelCallFinished):
            continue
        m.cost_usd += event.cost_usd
        m.output += event.usage.output_tokens
        if event.purpose == "summary":
            m.summary_calls += 1
            m.summary_input += event.usage.input_tokens
        else:
            m.think[event.iteration] = event.usage.input_tokens
            m.think_input += event.usage.input_tokens
    return m


# -- the report --------------------------------------------------------------------


def verdict(ok: bool) -> str:
    return "[green]ok[/]" if ok else "[bold red]MISSED[/]"


def shown_iterations(n: int) -> list[int]:
    marks = {1, 2, 3, 4, n, n + 1} | set(range(8, n + 1, 4))
    return sorted(i for i in marks if i <= n + 1)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iterations", default="20,40", help="comma-separated run lengths (default 20,40)")
    parser.add_argument("--keep-last", type=int, default=2, help="SlidingWindow(keep_last=K) (default 2)")
    parser.add_argument("--result-bytes", type=int, default=2000, help="bytes per tool result (default 2000)")
    args = parser.parse_args()
    lengths = sorted({int(x) for x in args.iterations.split(",") if x.strip()})
    k = args.keep_last
    console = Console(width=max(Console().width, 120))

    policies: list[tuple[str, object]] = [("naive append", lw.FullContext),
                                          (f"window k={k}", lambda: lw.SlidingWindow(keep_last=k))]
    if k != 1:
        policies.append(("window k=1", lambda: lw.SlidingWindow(keep_last=1)))

    runs: dict[int, list[Measured]] = {}
    for n in lengths:
        runs[n] = [await measure(label, make(), n, args.result_bytes) for label, make in policies]

    console.print(f"[bold]Context growth[/]: {args.result_bytes:,}-byte tool results, {OUTPUT_TOKENS} output "
                  f"tokens per call, priced ${PRICE.input_per_mtok:g} / ${PRICE.output_per_mtok:g} per M "
                  "input / output tokens; every number from the event log.")

    longest = runs[lengths[-1]]
    table = Table(title=f"input tokens per THINK call, N = {lengths[-1]} (iteration {lengths[-1] + 1} answers)",
                  title_justify="left")
    table.add_column("iteration", justify="right")
    for m in longest:
        table.add_column(m.label, justify="right")
    for i in shown_iterations(lengths[-1]):
        table.add_row(str(i), *(f"{m.think.get(i, 0):,}" for m in longest))
    console.print(table)

    table = Table(title="totals (summary calls included)", title_justify="left")
    for name in ("N", "context", "THINK input", "summary calls", "summary input", "total input",
                 "output", "cost", "naive / this"):
        table.add_column(name, justify="left" if name == "context" else "right")
    for n in lengths:
        naive = runs[n][0]
        for m in runs[n]:
            table.add_row(str(n), m.label, f"{m.think_input:,}", str(m.summary_calls), f"{m.summary_input:,}",
                          f"{m.total_input:,}", f"{m.output:,}", f"${m.cost_usd:.4f}",
                          f"{naive.total_input / m.total_input:.2f}x")
        table.add_section()
    console.print(table)

    table = Table(title=f"targets (SlidingWindow(keep_last={k}))", title_justify="left")
    for name in ("target", "measured", ""):
        table.add_column(name)
    for n in lengths:
        window = runs[n][1]
        if n >= 20:
            flat = window.think[20] / window.think[4]
            table.add_row(f"N={n}: iteration 20 within {TARGET_FLAT}x of iteration 4",
                          f"{window.think[20]:,} / {window.think[4]:,} = {flat:.2f}x", verdict(flat <= TARGET_FLAT))
        if n in TARGET_RATIO:
            ratio = runs[n][0].total_input / window.total_input
            table.add_row(f"N={n}: total input >= {TARGET_RATIO[n]:g}x lower than naive",
                          f"{ratio:.2f}x", verdict(ratio >= TARGET_RATIO[n]))
    console.print(table)
    for n in lengths:
        for m in runs[n]:
            if abs(m.cost_usd - m.result_cost_usd) > 1e-9 or m.stop_reason != "done":
                console.print(f"[yellow]warning[/]: N={n} {m.label}: events ${m.cost_usd:.6f}, "
                              f"RunResult ${m.result_cost_usd:.6f}, stop_reason {m.stop_reason}")


if __name__ == "__main__":
    asyncio.run(main())
