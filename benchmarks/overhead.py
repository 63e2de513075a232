"""How much does loopwise cost on top of the model and the tools?

Not a test: it prints a table of measurements next to the targets they are held to.

    .venv/bin/python benchmarks/overhead.py            # the full run (about a minute)
    .venv/bin/python benchmarks/overhead.py --quick    # a smoke run (a few seconds)

The workload is the seed post's support-desk run: call 1 of the model asks for two
tools (analyze_sentiment, get_customer_history), call 2 for one (generate_reply),
call 3 answers. Every model call reports `Usage(100, 20)`; a model call sleeps M and
a tool call T (`asyncio.sleep`, skipped when 0). The model decides which call it is
from the request (the number of assistant messages), never from global state, so
concurrent runs do not interfere.

(a) CPU per run, M = T = 0: sequential `await agent.run(...)` in one event loop after
    a warm-up, with the SQLite event log on (and MemoryStore for comparison). Process
    CPU (`time.process_time`: every thread, the store's janitor included) and the event
    loop thread's CPU (`time.thread_time` in that thread) are reported separately.
(b) Concurrency, M = 50 ms, T = 20 ms, SQLite on: N runs at once (`asyncio.gather`).
    Wall time over the critical path 3M + 2T = 190 ms; memory per concurrent run =
    (peak RSS - RSS before the batch) / N, read in fresh processes (one batch each);
    CPU per run, to check it does not grow with concurrency.
(c) `import loopwise` in a fresh interpreter (best of 5), and whether it imported openai.
(d) The policy wrappers alone, per call, on the event-loop thread: a tool call through
    `loopwise._tools.execute.execute` (the default `@tool` policy: a 30 s timeout scope and a
    circuit breaker) vs a bare `await tool.fn(**kwargs)`, and a model call through
    `call_with_policy` (the default `ModelPolicy`, as the loop makes it, less the
    reporter of failed attempts) vs a bare `await model.request(request)`; the median
    of several interleaved batches.
(e) Scaling, M = 50 ms, T = 20 ms, SQLite on: CPU per run at 100, 1000 and 5000 runs in
    flight (`--scale`), each level over batches totalling `--scale-runs` runs; against
    the first level's. With each: wall over the critical path, the cyclic collector's
    work in the batches (collections of each generation, its time per run, through
    `gc.callbacks`) and the objects it tracks per run in flight (`gc.get_objects()` at
    the peak of an untimed batch, less before it, over the runs).
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Self

import loopwise as lw

try:
    from loopwise._runtime.run import Run
    from loopwise._tools.execute import execute
except ImportError:  # (a tree from before the layout by layer: instructions.py counts old trees too)
    from loopwise._execute import execute  # type: ignore[no-redef]
    from loopwise._run import Run  # type: ignore[no-redef]
from loopwise.models import FunctionModel, ModelPolicy, ModelRequest, ModelResponse, ToolCall, Usage
from loopwise.models._resilience import call_with_policy

# The targets the measurements are held to.
# Issue 15's bounds (they replace issue 2's 250/200 µs and 1.5x, which a single CPython
# event loop cannot reach with the guarantees on): (a) ≤ 300 µs of process CPU per run
# with the SQLite log; (b) wall ÷ critical path ≤ 2.0x at 1000 concurrent runs.
TARGET_CPU_US = 300.0
TARGET_LOOP_CPU_US = 300.0
TARGET_WALL_RATIO = 2.0
TARGET_KB_PER_RUN = 20.0
TARGET_IMPORT_S = 0.3
TARGET_TOOL_WRAPPER_US = 20.0
#: (e): CPU per run at the highest level ÷ at the lowest; (b)-shape wall ÷ critical path at 1000.
TARGET_SCALE_RATIO = 1.25
TARGET_WALL_RATIO_1000 = 2.0

TASK = "I've been waiting 3 weeks for my refund on order ORD-1042 and nobody answers. Customer C-881."


# -- the workload ------------------------------------------------------------------


def make_agent(store: lw.EventStore, model_s: float, tool_s: float) -> lw.Agent:
    async def pause(seconds: float) -> None:
        if seconds:
            await asyncio.sleep(seconds)

    @lw.tool
    async def analyze_sentiment(text: str) -> str:
        """Classify the sentiment of a customer message."""
        await pause(tool_s)
        return "negative"

    @lw.tool
    async def get_customer_history(customer_id: str) -> dict:
        """The customer's past orders and tickets."""
        await pause(tool_s)
        return {"customer_id": customer_id, "orders": 7, "open_tickets": 1, "tier": "gold"}

    @lw.tool
    async def generate_reply(sentiment: str, history: str) -> str:
        """Draft a reply to the customer."""
        await pause(tool_s)
        return "Dear customer, we are sorry about the delay; your refund was issued today."

    async def support_model(request: ModelRequest) -> ModelResponse:
        await pause(model_s)
        turn = sum(1 for m in request.messages if m.role == "assistant")
        if turn == 0:
            calls = [
                ToolCall("analyze_sentiment", {"text": TASK}),
                ToolCall("get_customer_history", {"customer_id": "C-881"}),
            ]
            return ModelResponse(tool_calls=calls, usage=Usage(100, 20))
        if turn == 1:
            calls = [ToolCall("generate_reply", {"sentiment": "negative", "history": "gold, 7 orders"})]
            return ModelResponse(tool_calls=calls, usage=Usage(100, 20))
        return ModelResponse(text="Your refund was issued today; sorry for the wait.", usage=Usage(100, 20))

    return lw.Agent(
        FunctionModel(support_model),
        instructions="You are a support agent.",
        tools=[analyze_sentiment, get_customer_history, generate_reply],
        store=store,
    )


def check(result: lw.RunResult) -> None:
    if result.stop_reason != "done" or result.iterations != 3 or result.model_calls != 3:
        raise SystemExit(f"the workload did not run as designed: {result!r}")


# -- measuring ---------------------------------------------------------------------


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        m = re.search(rf"^{field}:\s+(\d+) kB", f.read(), re.MULTILINE)
    return int(m.group(1)) if m else 0


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return _status_kb("VmHWM") <= _status_kb("VmRSS") + 64


class _RSSSampler:
    """The fallback: sample VmRSS every few ms in a thread and keep the maximum."""

    def __init__(self, every_s: float = 0.002) -> None:
        self.every_s = every_s
        self.peak = _status_kb("VmRSS")
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            self.peak = max(self.peak, _status_kb("VmRSS"))

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _status_kb("VmRSS"))


@dataclass
class Cpu:
    runs: int
    wall_s: float
    process_s: float
    loop_s: float

    @property
    def us_per_run(self) -> float:
        return self.process_s / self.runs * 1e6

    @property
    def loop_us_per_run(self) -> float:
        return self.loop_s / self.runs * 1e6

    @property
    def other_us_per_run(self) -> float:
        return (self.process_s - self.loop_s) / self.runs * 1e6


async def _sequential(agent: lw.Agent, runs: int, warmup: int) -> Cpu:
    for _ in range(warmup):
        check(await agent.run(TASK))
    gc.collect()
    wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
    for _ in range(runs):
        await agent.run(TASK)
    loop1, cpu1, wall1 = time.thread_time(), time.process_time(), time.perf_counter()
    return Cpu(runs, wall1 - wall0, cpu1 - cpu0, loop1 - loop0)


def measure_sequential(store_kind: str, runs: int, warmup: int, repeat: int) -> Cpu:
    """CPU per run with M = T = 0; the median of `repeat` batches (each in a fresh store)."""
    results = []
    for _ in range(repeat):
        with tempfile.TemporaryDirectory() as tmp:
            store = lw.SQLiteStore(Path(tmp) / "bench.db") if store_kind == "sqlite" else lw.MemoryStore()
            try:
                results.append(asyncio.run(_sequential(make_agent(store, 0, 0), runs, warmup)))
            finally:
                store.close()
    return sorted(results, key=lambda c: c.process_s)[len(results) // 2]


@dataclass
class Concurrent:
    runs: int
    wall_s: float
    critical_s: float
    cpu: Cpu
    rss_before_kb: int
    rss_peak_kb: int
    peak_method: str

    @property
    def ratio(self) -> float:
        return self.wall_s / self.critical_s

    @property
    def kb_per_run(self) -> float:
        return (self.rss_peak_kb - self.rss_before_kb) / self.runs


async def _concurrent(agent: lw.Agent, warm_agent: lw.Agent, runs: int, model_s: float, tool_s: float) -> Concurrent:
    # Warm up: the store's copies, the code paths, the allocator's arenas for a small batch.
    for result in await asyncio.gather(*(warm_agent.run(TASK) for _ in range(50))):
        check(result)
    await asyncio.gather(*(agent.run(TASK) for _ in range(10)))
    gc.collect()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    sampler = None if reset else _RSSSampler().__enter__()
    wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
    results = await asyncio.gather(*(agent.run(TASK) for _ in range(runs)))
    loop1, cpu1, wall1 = time.thread_time(), time.process_time(), time.perf_counter()
    if sampler is not None:
        sampler.__exit__(None)
        peak, method = sampler.peak, "VmRSS sampled every 2 ms"
    else:
        peak, method = _status_kb("VmHWM"), "VmHWM after clear_refs"
    for result in results:
        check(result)
    return Concurrent(
        runs=runs,
        wall_s=wall1 - wall0,
        critical_s=3 * model_s + 2 * tool_s,
        cpu=Cpu(runs, wall1 - wall0, cpu1 - cpu0, loop1 - loop0),
        rss_before_kb=rss_before,
        rss_peak_kb=peak,
        peak_method=method,
    )


def memory_in_fresh_processes(processes: int, runs: int, model_ms: float, tool_ms: float) -> list[Concurrent]:
    """(b)'s memory, read in `processes` fresh interpreters, one batch each (one at a time).

    A process's peak RSS over a batch moves by ±10% from one process to the next (where
    the allocator's arenas fall, when the collector runs); a batch after another in the
    same process reuses what the first made it take. So each reading is a new process.
    """
    readings = []
    for _ in range(processes):
        done = subprocess.run(
            [sys.executable, __file__, "--memory-probe", "--concurrency", str(runs), "--model-ms", str(model_ms),
             "--tool-ms", str(tool_ms)], capture_output=True, text=True, timeout=600,
        )
        if done.returncode != 0:
            raise SystemExit(f"the memory probe failed:\n{done.stdout}{done.stderr}")
        wall_s, rss_before_kb, rss_peak_kb, method = json.loads(done.stdout.strip().splitlines()[-1])
        readings.append(Concurrent(runs, wall_s, 3 * model_ms / 1000 + 2 * tool_ms / 1000, Cpu(runs, wall_s, 0.0, 0.0),
                                   rss_before_kb, rss_peak_kb, method))
    return readings


def measure_concurrent(runs: int, model_s: float, tool_s: float) -> Concurrent:
    with tempfile.TemporaryDirectory() as tmp:
        store = lw.SQLiteStore(Path(tmp) / "bench.db")
        try:
            agent = make_agent(store, model_s, tool_s)
            warm = make_agent(store, 0, 0)
            return asyncio.run(_concurrent(agent, warm, runs, model_s, tool_s))
        finally:
            store.close()


async def _bare(runs: int, model_s: float, tool_s: float) -> tuple[float, Cpu]:
    """The same sleeps, in the same shape, with no loopwise: what the machine's event loop
    costs for this workload on its own (timers, wake-ups), to read (b) against."""

    async def pause(seconds: float) -> str:
        await asyncio.sleep(seconds)
        return "x"

    async def run() -> None:
        await pause(model_s)
        await asyncio.gather(pause(tool_s), pause(tool_s))
        await pause(model_s)
        await pause(tool_s)
        await pause(model_s)

    await asyncio.gather(*(run() for _ in range(50)))
    gc.collect()
    wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
    await asyncio.gather(*(run() for _ in range(runs)))
    loop1, cpu1, wall1 = time.thread_time(), time.process_time(), time.perf_counter()
    return (wall1 - wall0) / (3 * model_s + 2 * tool_s), Cpu(runs, wall1 - wall0, cpu1 - cpu0, loop1 - loop0)


def measure_bare(runs: int, model_s: float, tool_s: float) -> tuple[float, Cpu]:
    return asyncio.run(_bare(runs, model_s, tool_s))


_IMPORT_PROBE = (
    "import sys, time; t = time.perf_counter(); import loopwise; "
    "print(time.perf_counter() - t, 'openai' in sys.modules, len(sys.modules))"
)


def measure_import(tries: int = 5) -> tuple[float, bool, int]:
    best, openai, modules = float("inf"), False, 0
    for _ in range(tries):
        out = subprocess.run([sys.executable, "-c", _IMPORT_PROBE], capture_output=True, text=True, check=True)
        seconds, imported, n = out.stdout.split()
        if float(seconds) < best:
            best, openai, modules = float(seconds), imported == "True", int(n)
    return best, openai, modules


class _NoEvents:
    """A `CallEvents` that drops what it is told (the loop would write it to the log)."""

    def attempt_failed(self, *args: object) -> None:
        pass

    def fallback_tried(self, *args: object) -> None:
        pass

    def breaker_changed(self, *args: object) -> None:
        pass

    def thread_abandoned(self, *args: object) -> None:
        pass


@dataclass
class PerCall:
    bare_us: float
    wrapped_us: float

    @property
    def added_us(self) -> float:
        return self.wrapped_us - self.bare_us


async def _per_call(bare: Callable[[], Awaitable[object]], wrapped: Callable[[], Awaitable[object]],
                    calls: int, batches: int) -> PerCall:
    """The event-loop thread's CPU µs per call of each, in interleaved batches; medians."""

    async def batch(fn: Callable[[], Awaitable[object]]) -> float:
        t0 = time.thread_time()
        for _ in range(calls):
            await fn()
        return (time.thread_time() - t0) / calls * 1e6

    await batch(bare)
    await batch(wrapped)  # warm-up
    bare_us, wrapped_us = [], []
    for _ in range(batches):
        gc.collect()
        bare_us.append(await batch(bare))
        wrapped_us.append(await batch(wrapped))
    return PerCall(sorted(bare_us)[batches // 2], sorted(wrapped_us)[batches // 2])


async def _wrappers(calls: int, batches: int) -> tuple[PerCall, PerCall]:
    @lw.tool
    async def get_tier(customer_id: str) -> str:
        """The customer's tier."""
        return "gold"

    kwargs = get_tier.validate({"customer_id": "C-881"})
    ctx = lw.RunContext(run_id="bench", call_id="call-1", iteration=1)
    events = _NoEvents()
    fn = get_tier.fn

    async def bare_tool() -> object:
        return await fn(**kwargs)

    async def wrapped_tool() -> object:
        return await execute(get_tier, kwargs, ctx, events)

    response = ModelResponse(text="Your refund was issued today.", usage=Usage(100, 20))

    async def answer(request: ModelRequest) -> ModelResponse:
        return response

    model = FunctionModel(answer)
    models = [model]
    request = ModelRequest(messages=[lw.Message("user", TASK)], max_tokens=1024)
    policy = ModelPolicy()
    check = Run._check_response

    async def bare_model() -> object:
        return await model.request(request)

    async def wrapped_model() -> object:
        # As the loop makes it, less the attempt reporter, which only hears of failures.
        return await call_with_policy(models, request, policy, check=check)

    return (await _per_call(bare_tool, wrapped_tool, calls, batches),
            await _per_call(bare_model, wrapped_model, calls, batches))


def measure_wrappers(calls: int, batches: int) -> tuple[PerCall, PerCall]:
    return asyncio.run(_wrappers(calls, batches))


async def _waiting_calls(at_once: int, wait_s: float, batches: int) -> PerCall:
    """(d) for calls that wait: `at_once` tool calls at a time, each sleeping `wait_s`, through
    `execute` and bare; event-loop thread CPU per call, the median of interleaved batches."""

    @lw.tool
    async def get_tier(customer_id: str) -> str:
        """The customer's tier."""
        await asyncio.sleep(wait_s)
        return "gold"

    kwargs = get_tier.validate({"customer_id": "C-881"})
    ctx = lw.RunContext(run_id="bench", call_id="call-1", iteration=1)
    events = _NoEvents()
    fn = get_tier.fn

    async def bare() -> object:
        return await fn(**kwargs)

    async def wrapped() -> object:
        return await execute(get_tier, kwargs, ctx, events)

    async def batch(call: Callable[[], Awaitable[object]]) -> float:
        t0 = time.thread_time()
        await asyncio.gather(*(call() for _ in range(at_once)))
        return (time.thread_time() - t0) / at_once * 1e6

    await batch(bare)
    await batch(wrapped)  # warm-up
    bare_us, wrapped_us = [], []
    for _ in range(batches):
        gc.collect()
        bare_us.append(await batch(bare))
        gc.collect()
        wrapped_us.append(await batch(wrapped))
    return PerCall(sorted(bare_us)[batches // 2], sorted(wrapped_us)[batches // 2])


def measure_waiting_calls(at_once: int, wait_s: float, batches: int) -> PerCall:
    return asyncio.run(_waiting_calls(at_once, wait_s, batches))


class _GcWatch:
    """The cyclic collector's collections per generation and its CPU time, while entered."""

    def __init__(self) -> None:
        self.collections = [0, 0, 0]
        self.seconds_by_generation = [0.0, 0.0, 0.0]
        self._t0 = 0.0

    @property
    def seconds(self) -> float:
        return sum(self.seconds_by_generation)

    def _callback(self, phase: str, info: dict[str, int]) -> None:
        if phase == "start":
            self._t0 = time.thread_time()
        else:
            self.seconds_by_generation[info["generation"]] += time.thread_time() - self._t0
            self.collections[info["generation"]] += 1

    def __enter__(self) -> Self:
        gc.callbacks.append(self._callback)
        return self

    def __exit__(self, *exc: object) -> None:
        gc.callbacks.remove(self._callback)


@dataclass
class Level:
    concurrency: int
    batches: list[Concurrent]
    gc: _GcWatch
    tracked_per_run: float

    @property
    def runs(self) -> int:
        return sum(b.runs for b in self.batches)

    @property
    def us_per_run(self) -> float:
        return sum(b.cpu.process_s for b in self.batches) / self.runs * 1e6

    @property
    def loop_us_per_run(self) -> float:
        return sum(b.cpu.loop_s for b in self.batches) / self.runs * 1e6

    @property
    def ratio(self) -> float:
        return sorted(b.ratio for b in self.batches)[len(self.batches) // 2]


async def _tracked_per_run(agent: lw.Agent, runs: int, every_s: float) -> float:
    """Objects the cyclic collector tracks per run in flight: the peak of a batch, less before it."""
    gc.collect()
    before = len(gc.get_objects())
    peak = before
    batch = asyncio.gather(*(agent.run(TASK) for _ in range(runs)))
    while not batch.done():
        await asyncio.sleep(every_s)
        peak = max(peak, len(gc.get_objects()))
    await batch
    return (peak - before) / runs


async def _level(agent: lw.Agent, warm_agent: lw.Agent, concurrency: int, total: int,
                 model_s: float, tool_s: float) -> Level:
    for result in await asyncio.gather(*(warm_agent.run(TASK) for _ in range(50))):
        check(result)
    tracked = await _tracked_per_run(agent, concurrency, max(model_s, tool_s) / 4 or 0.005)
    batches = []
    watch = _GcWatch()
    # One collection before the first batch, none between them: a full collection resets the
    # collector's count towards the next one, so collecting before each batch of 100 would
    # hide every full collection that a process running batch after batch makes.
    gc.collect()
    for _ in range(max(1, -(-total // concurrency))):
        with watch:
            wall0, cpu0, loop0 = time.perf_counter(), time.process_time(), time.thread_time()
            results = await asyncio.gather(*(agent.run(TASK) for _ in range(concurrency)))
            loop1, cpu1, wall1 = time.thread_time(), time.process_time(), time.perf_counter()
        for result in results:
            check(result)
        batches.append(Concurrent(concurrency, wall1 - wall0, 3 * model_s + 2 * tool_s,
                                  Cpu(concurrency, wall1 - wall0, cpu1 - cpu0, loop1 - loop0), 0, 0, ""))
    return Level(concurrency, batches, watch, tracked)


def measure_scaling(levels: list[int], total: int, model_s: float, tool_s: float) -> list[Level]:
    """(e): each level in a fresh store (the same process, one after the other)."""
    out = []
    for concurrency in levels:
        with tempfile.TemporaryDirectory() as tmp:
            store = lw.SQLiteStore(Path(tmp) / "bench.db")
            try:
                out.append(asyncio.run(_level(make_agent(store, model_s, tool_s), make_agent(store, 0, 0),
                                              concurrency, total, model_s, tool_s)))
            finally:
                store.close()
    return out


# -- the report --------------------------------------------------------------------


def _verdict(ok: bool) -> str:
    return "ok" if ok else "MISSED"


def report(rows: list[tuple[str, str, str, str]], notes: list[str], title: str) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:
        print(title)
        width = max(len(r[0]) for r in rows)
        for name, value, target, verdict in rows:
            print(f"  {name:<{width}}  {value:>16}  {target:>10}  {verdict}")
        for note in notes:
            print("  " + note)
        return
    table = Table(title=title, title_justify="left")
    table.add_column("measurement")
    table.add_column("value", justify="right")
    table.add_column("target", justify="right")
    table.add_column("")
    for name, value, target, verdict in rows:
        style = "red" if verdict == "MISSED" else None
        table.add_row(name, value, target, verdict, style=style)
    console = Console(width=max(100, Console().width))
    console.print(table)
    for note in notes:
        console.print("  " + note, highlight=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="sequential runs measured in (a) (default 1000)")
    parser.add_argument("--warmup", type=int, default=200, help="runs before measuring (a) (default 200)")
    parser.add_argument("--repeat", type=int, default=3, help="batches in (a); the median is shown (default 3)")
    parser.add_argument("--concurrency", type=int, default=1000, help="concurrent runs in (b) (default 1000)")
    parser.add_argument("--repeat-b", type=int, default=3,
                        help="batches in (b), each in a fresh store, and fresh processes for its memory; "
                             "the medians are shown (default 3)")
    parser.add_argument("--model-ms", type=float, default=50.0, help="M in (b) (default 50)")
    parser.add_argument("--tool-ms", type=float, default=20.0, help="T in (b) (default 20)")
    parser.add_argument("--calls", type=int, default=5000, help="calls per batch in (d) (default 5000)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 200 runs, 200 concurrent, 1 repeat")
    parser.add_argument("--scale", default="100,1000,5000",
                        help="(e): concurrency levels, comma-separated (default 100,1000,5000)")
    parser.add_argument("--scale-runs", type=int, default=5000,
                        help="(e): runs measured at each level, in batches of the level (default 5000)")
    parser.add_argument("--only", choices=["a", "b", "c", "d", "e"], action="append",
                        help="run only these parts (default a to d; e, the scaling table, only when named)")
    parser.add_argument("--memory-probe", action="store_true", help=argparse.SUPPRESS)  # one (b) batch, as JSON
    args = parser.parse_args(argv)
    if args.memory_probe:
        c = measure_concurrent(args.concurrency, args.model_ms / 1000, args.tool_ms / 1000)
        print(json.dumps([c.wall_s, c.rss_before_kb, c.rss_peak_kb, c.peak_method]))
        return
    if args.quick:
        args.runs, args.warmup, args.repeat, args.concurrency, args.calls, args.repeat_b = 200, 50, 1, 200, 1000, 1
    parts = set(args.only or "abcd")
    try:
        levels = [int(level) for level in args.scale.split(",")]
    except ValueError:
        raise SystemExit(f"--scale {args.scale!r}: give concurrency levels as integers, e.g. 100,1000,5000") from None
    model_s, tool_s = args.model_ms / 1000, args.tool_ms / 1000

    rows: list[tuple[str, str, str, str]] = []
    notes: list[str] = []
    # (b)'s memory is read in fresh processes, each running one batch and nothing else:
    # what earlier work (another batch, (a)) leaves allocated is reused by a batch after
    # it (measured after (a), (b) read ~14 KB per run where on its own it reads ~22 KB).
    if "b" in parts:
        fresh = sorted(memory_in_fresh_processes(max(1, args.repeat_b), args.concurrency, args.model_ms,
                                                 args.tool_ms), key=lambda c: c.kb_per_run)
        memory_b = fresh[len(fresh) // 2]
        batches = sorted([measure_concurrent(args.concurrency, model_s, tool_s) for _ in range(max(1, args.repeat_b))],
                         key=lambda c: c.ratio)
        conc = batches[len(batches) // 2]
        rows_b = [
            (f"(b) wall ÷ critical path, {conc.runs} concurrent", f"{conc.ratio:.2f}× ({conc.wall_s * 1000:.0f} ms)",
             f"≤ {TARGET_WALL_RATIO}×", _verdict(conc.ratio <= TARGET_WALL_RATIO)),
            ("(b) memory per concurrent run", f"{memory_b.kb_per_run:.1f} KB", f"≤ {TARGET_KB_PER_RUN:.0f} KB",
             _verdict(memory_b.kb_per_run <= TARGET_KB_PER_RUN)),
            ("(b) CPU/run at concurrency, process", f"{conc.cpu.us_per_run:.0f} µs", "", ""),
            ("(b) CPU/run at concurrency, event-loop thread", f"{conc.cpu.loop_us_per_run:.0f} µs", "", ""),
        ]
        if conc.critical_s > 0:
            bare_ratio, bare_cpu = measure_bare(args.concurrency, model_s, tool_s)
            rows_b += [
                ("(b) baseline: same sleeps in bare asyncio, no loopwise", f"{bare_ratio:.2f}×, {bare_cpu.us_per_run:.0f} µs/run",
                 "", ""),
            ]
        notes_b = [f"(b) M = {args.model_ms:g} ms, T = {args.tool_ms:g} ms, critical path "
                   f"{conc.critical_s * 1000:.0f} ms; the median of {len(batches)} batches (ratios "
                   f"{', '.join(f'{c.ratio:.2f}×' for c in batches)}); memory: the median of {len(fresh)} fresh "
                   f"processes, one batch each ({', '.join(f'{c.kb_per_run:.1f}' for c in fresh)} KB), RSS "
                   f"{memory_b.rss_before_kb / 1024:.1f} → {memory_b.rss_peak_kb / 1024:.1f} MiB "
                   f"({memory_b.peak_method})"]
    if "a" in parts:
        sqlite = measure_sequential("sqlite", args.runs, args.warmup, args.repeat)
        memory = measure_sequential("memory", args.runs, args.warmup, args.repeat)
        rows += [
            ("(a) CPU/run, SQLite log, process", f"{sqlite.us_per_run:.0f} µs", f"≤ {TARGET_CPU_US:.0f} µs",
             _verdict(sqlite.us_per_run <= TARGET_CPU_US)),
            ("(a) CPU/run, SQLite log, event-loop thread", f"{sqlite.loop_us_per_run:.0f} µs",
             f"≤ {TARGET_LOOP_CPU_US:.0f} µs", _verdict(sqlite.loop_us_per_run <= TARGET_LOOP_CPU_US)),
            ("(a) CPU/run, SQLite log, other threads", f"{sqlite.other_us_per_run:.0f} µs", "", ""),
            ("(a) wall/run, SQLite log", f"{sqlite.wall_s / sqlite.runs * 1e6:.0f} µs", "", ""),
            ("(a) CPU/run, MemoryStore, process", f"{memory.us_per_run:.0f} µs", "", ""),
            ("(a) CPU/run, MemoryStore, event-loop thread", f"{memory.loop_us_per_run:.0f} µs", "", ""),
        ]
        notes.append(f"(a) M = T = 0; {args.runs} sequential runs after {args.warmup} warm-up runs, "
                     f"median of {args.repeat} batches")
    if "b" in parts:
        rows += rows_b
        notes += notes_b
    if "c" in parts:
        seconds, openai, modules = measure_import()
        rows += [
            ("(c) import loopwise (best of 5)", f"{seconds:.3f} s", f"≤ {TARGET_IMPORT_S} s",
             _verdict(seconds <= TARGET_IMPORT_S)),
            ("(c) openai imported by `import loopwise`", "yes" if openai else "no", "no", _verdict(not openai)),
        ]
        notes.append(f"(c) {modules} modules in sys.modules after the import")
    if "d" in parts:
        batches = 5 if not args.quick else 3
        tool_call, model_call = measure_wrappers(args.calls, batches)
        rows += [
            ("(d) tool call: added by the policy wrappers", f"{tool_call.added_us:.1f} µs",
             f"≤ {TARGET_TOOL_WRAPPER_US:.0f} µs", _verdict(tool_call.added_us <= TARGET_TOOL_WRAPPER_US)),
            ("(d) model call: added by call_with_policy", f"{model_call.added_us:.1f} µs", "", ""),
        ]
        at_once = 3000 if not args.quick else 300
        waiting = measure_waiting_calls(at_once, 0.02, batches)
        rows += [
            (f"(d) tool call that waits 20 ms, {at_once} at once: added by the wrappers", f"{waiting.added_us:.1f} µs",
             "", ""),
        ]
        notes.append(f"(d) waiting calls: {waiting.wrapped_us:.1f} µs through execute vs {waiting.bare_us:.1f} µs "
                     f"bare per call (asyncio.gather of {at_once}, median of {batches} interleaved batches)")
        notes.append(f"(d) event-loop thread CPU per call, median of {batches} interleaved batches of "
                     f"{args.calls}: tool {tool_call.wrapped_us:.1f} µs through execute vs "
                     f"{tool_call.bare_us:.1f} µs bare; model {model_call.wrapped_us:.1f} µs through "
                     f"call_with_policy vs {model_call.bare_us:.1f} µs bare")
    if "e" in parts:
        scaled = measure_scaling(levels, args.scale_runs, model_s, tool_s)
        first = scaled[0]
        for level in scaled:
            vs = level.us_per_run / first.us_per_run
            last = level is scaled[-1] and len(scaled) > 1
            rows.append((f"(e) CPU/run at {level.concurrency} concurrent (process, loop thread)",
                         f"{level.us_per_run:.0f} µs, {level.loop_us_per_run:.0f} µs ({vs:.2f}×)",
                         f"≤ {TARGET_SCALE_RATIO}×" if last else "", _verdict(vs <= TARGET_SCALE_RATIO) if last else ""))
            rows.append((f"(e) wall ÷ critical path at {level.concurrency}", f"{level.ratio:.2f}×",
                         f"≤ {TARGET_WALL_RATIO_1000}×" if level.concurrency == 1000 else "",
                         _verdict(level.ratio <= TARGET_WALL_RATIO_1000) if level.concurrency == 1000 else ""))
            g = level.gc
            per_gen = "/".join(f"{s / level.runs * 1e6:.0f}" for s in g.seconds_by_generation)
            rows.append((f"(e) gc at {level.concurrency}: tracked objects per run in flight; "
                         "collections gen 0/1/2; gc CPU per run (gen 0/1/2)",
                         f"{level.tracked_per_run:.0f}; {g.collections[0]}/{g.collections[1]}/{g.collections[2]}; "
                         f"{g.seconds / level.runs * 1e6:.0f} µs ({per_gen})", "", ""))
        notes.append(f"(e) M = {args.model_ms:g} ms, T = {args.tool_ms:g} ms, SQLite; at each level, batches of "
                     f"that many concurrent runs totalling ≥ {args.scale_runs} runs (CPU summed over them, wall "
                     f"ratio the median batch's); ratios against {first.concurrency}")
    notes.append(f"Python {sys.version.split()[0]} on {os.cpu_count()} CPUs; "
                 f"loopwise {lw.__version__}; gc enabled")
    report(rows, notes, "loopwise overhead")


if __name__ == "__main__":
    main()
