"""Instructions per run of overhead.py's (a) workload, counted by valgrind: a noise-free A/B.

Not a test, and not a time: the CPU instructions one run executes, counted by
`valgrind --tool=callgrind`. On a shared machine, (a)'s microseconds move by ±10% from
one run to the next, more than most changes to the loop are worth; this count moves by
well under 1%, so two trees can be compared in one command:

    .venv/bin/python benchmarks/instructions.py                        # this tree's src/
    .venv/bin/python benchmarks/instructions.py --src /tmp/old/src --src src
    .venv/bin/python benchmarks/instructions.py --store sqlite         # see the caveat below

(`git archive REV | tar -x -C /tmp/old` makes a tree of an older commit.)

Each tree runs the workload twice under callgrind, with N and 2N sequential runs after
the same warm-up; the difference of the two totals over N is what one run executes,
without the interpreter's start, the imports and the warm-up. Both run at once (two
processes), about 15 s in all at the default N.

Timers fire by the clock, and under valgrind's ~50x slowdown they would fire ~50x too
often per run: the watchdog's pings and the control plane's turns are pushed out of the
count (on the CPU they come every few hundred and every ~60 runs). With `--store
sqlite`, the store's copies into SQLite are made every `COPY_EVERY` (60) runs instead
of on its 20 ms timer; the copy is counted like the rest (it runs on the event loop's
thread). Use `--runs` a multiple of 60 there. Kernel time (the journal's `write(2)`,
SQLite's file I/O) is not counted: only instructions in the process.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from rich.console import Console
from rich.table import Table

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

# What each counted process runs: overhead.py's workload, `runs` times after `warmup`.
_WORKLOAD = """
import asyncio, os, sys, tempfile
sys.path.insert(0, {bench!r})
import overhead
import loopwise as lw

# Timers fire by the clock, and under valgrind a run takes ~50x longer: what they do
# would be counted ~50x too often per run. The watchdog's pings (every 0.1 s) and the
# control plane's turns (every 20 ms; a run alive at its second turn takes a lease) are
# pushed out of the count. The SQLite store copies its journal into SQLite on timers
# too (every GATHER_S on the loop, the janitor after JANITOR_S): instead, a copy every
# COPY_EVERY runs, what the 20 ms timer makes of (a)'s runs on the CPU.
# (Each private module by its place in this layout, then by its older places: the same
# workload counts trees from before the layout by layer, and before the splits.)
import importlib

def _first(*names):
    for name in names:
        try:
            return importlib.import_module(name)
        except ImportError:
            pass
    raise ImportError("none of these in this tree: " + repr(names))

_local_plane = _first("loopwise._control.local", "loopwise._control_local", "loopwise._control")
start_watchdog = _first("loopwise._runtime.watchdog", "loopwise._watchdog").start_watchdog
_local_plane.POLL_S = 3600.0
if sys.argv[1] == "sqlite":
    _sqlite = _first("loopwise._stores.sqlite_write", "loopwise._sqlite_write", "loopwise._sqlite")
    _sqlite.GATHER_S = _sqlite.JANITOR_S = 3600.0

async def main(kind, warmup, runs):
    start_watchdog(asyncio.get_running_loop(), threshold=3600.0, interval=3600.0)
    with tempfile.TemporaryDirectory() as tmp:
        store = lw.MemoryStore() if kind == "memory" else lw.SQLiteStore(os.path.join(tmp, "i.db"))
        copy = getattr(store, "_flush_on_loop", None)
        loop = asyncio.get_running_loop()
        agent = overhead.make_agent(store, 0, 0)
        for i in range(warmup + runs):
            result = await agent.run(overhead.TASK)
            if i < warmup:
                overhead.check(result)
            if copy is not None and i % {copy_every} == {copy_every} - 1:
                copy(loop)
        store.close()

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

# The other workload (`--workload waiting`): batches of AT_ONCE tool calls at once through the
# runtime's `execute` (the default policy: a 30 s timeout), each waiting 20 ms; a "run" is
# one batch. What a call's timeout costs when the call waits (`_hotpath`'s sweeper).
_WAITING = """
import asyncio, sys
import loopwise as lw
try:
    from loopwise._tools.execute import execute
except ImportError:  # (a tree from before the layout by layer)
    from loopwise._execute import execute

AT_ONCE = 1000

class NoEvents:
    def attempt_failed(self, *a): pass
    def fallback_tried(self, *a): pass
    def breaker_changed(self, *a): pass
    def thread_abandoned(self, *a): pass

@lw.tool
async def get_tier(customer_id: str) -> str:
    \"\"\"The customer's tier.\"\"\"
    await asyncio.sleep(0.02)
    return "gold"

async def main(kind, warmup, runs):
    kwargs = get_tier.validate({{"customer_id": "C-881"}})
    ctx = lw.RunContext(run_id="bench", call_id="call-1", iteration=1)
    events = NoEvents()
    for _ in range(warmup + runs):
        await asyncio.gather(*(execute(get_tier, kwargs, ctx, events) for _ in range(AT_ONCE)))

asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
"""

_COLLECTED = re.compile(r"Collected : (\d+)")
#: With the SQLite store, the runs between two copies into SQLite: what a copy every 20 ms
#: (`GATHER_S`) makes of (a)'s sequential runs at ~300 us each.
COPY_EVERY = 60


def _start(src: Path, kind: str, warmup: int, runs: int, script: Path, plain: str = "") -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(src), "PYTHONHASHSEED": "0", "LOOPWISE_PLAIN": plain}
    return subprocess.Popen(
        ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null",
         sys.executable, str(script), kind, str(warmup), str(runs)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def _collected(process: subprocess.Popen[str]) -> int:
    out, err = process.communicate()
    match = _COLLECTED.search(err)
    if process.returncode != 0 or match is None:
        raise SystemExit(f"the counted run failed (exit {process.returncode}):\n{out}{err[-3000:]}")
    return int(match.group(1))


def count(src: Path, kind: str, warmup: int, runs: int, script: Path, plain: str = "") -> float:
    """Instructions per run: (total with 2N runs - total with N runs) / N."""
    once = _start(src, kind, warmup, runs, script, plain)
    twice = _start(src, kind, warmup, 2 * runs, script, plain)
    return (_collected(twice) - _collected(once)) / runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--src", type=Path, action="append",
                        help="a tree's src/ directory to measure (repeatable; default: this checkout's src/)")
    parser.add_argument("--store", choices=["memory", "sqlite"], default="memory",
                        help="the event store (default memory; see the caveat for sqlite)")
    parser.add_argument("--runs", type=int, default=240, help="N: the runs counted (default 240)")
    parser.add_argument("--warmup", type=int, default=60, help="runs before counting (default 60)")
    parser.add_argument("--plain", action="append",
                        help="a LOOPWISE_PLAIN value to count each tree under (repeatable; '' is the fast "
                             "versions; default: only ''): the hot-path tricks against their plain versions")
    parser.add_argument("--workload", choices=["run", "waiting"], default="run",
                        help="run: overhead.py's (a) run (default); waiting: a batch of 1000 tool calls at once "
                             "through execute, each waiting 20 ms, counted as one 'run'")
    args = parser.parse_args()
    if shutil.which("valgrind") is None:
        raise SystemExit("valgrind is not installed; on Debian or Ubuntu: apt-get install valgrind")
    if args.runs < 1 or args.warmup < 1:
        raise SystemExit("--runs and --warmup must be at least 1")
    sources = args.src or [ROOT / "src"]
    for src in sources:
        if not (src / "loopwise" / "__init__.py").is_file():
            raise SystemExit(f"--src {src}: no loopwise package there (give a tree's src/ directory)")
    what = "overhead.py (a) workload" if args.workload == "run" else "1000 waiting tool calls"
    table = Table(title=f"instructions per run, {what}, {args.store} store")
    table.add_column("src")
    table.add_column("LOOPWISE_PLAIN")
    table.add_column("instructions/run", justify="right")
    table.add_column("vs first", justify="right")
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "workload.py"
        source = _WORKLOAD if args.workload == "run" else _WAITING
        script.write_text(source.format(bench=str(HERE), copy_every=COPY_EVERY))
        first = None
        for src in sources:
            for plain in args.plain or [""]:
                per_run = count(src.resolve(), args.store, args.warmup, args.runs, script, plain)
                first = per_run if first is None else first
                table.add_row(str(src), plain or "-", f"{per_run:,.0f}", f"{(per_run / first - 1) * 100:+.2f}%")
    console = Console()
    console.print(table)
    console.print(f"  N = {args.runs} runs after {args.warmup} warm-up runs, counted by valgrind's callgrind; "
                  f"Python {sys.version.split()[0]}", style="dim")


if __name__ == "__main__":
    main()
