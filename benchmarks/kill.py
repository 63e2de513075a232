"""Kill latency: from `kill` returning to the run's end, with 1000 concurrent runs in one process.

    .venv/bin/python benchmarks/kill.py [--runs 1000] [--kills 50] [--no-redis]

1000 runs execute in this process, each waiting in a tool that sleeps 60 s. Then
`--kills` of them are stopped one by one, 20 ms apart:

- ``same process``: `lw.kill` from a thread of this process (the in-process path);
- ``other process``: `lw.kill` from a separate Python process, the way `loopwise kill`
  reaches a run (the watcher path: the database on the local backend, pub/sub on Redis).

The latency of one kill is the run's `run_finished` timestamp (written by the run) minus
the moment `kill` returned in the killer (both wall-clock, one machine). Target: p99
≤ 100 ms on each backend. The Redis backend runs when `redis-server` is installed (a
server is started on a free loopback port) or `--redis URL` is given.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import anyio

import loopwise as lw
from loopwise._control.plane import _controls, local_runs
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ToolCall

KILLER = """
import json, sys, time
import loopwise as lw
db, control, gap, ids = sys.argv[1], sys.argv[2] or None, float(sys.argv[3]), sys.argv[4:]
store = lw.SQLiteStore(db)
out = []
for run_id in ids:
    n = lw.kill(run_id, reason="benchmark", store=store, control=control)
    out.append((run_id, time.time(), n))
    time.sleep(gap)
print(json.dumps(out))
"""


def _agent(store: lw.EventStore, control: str | None) -> lw.Agent:
    @lw.tool(timeout=120)
    async def wait() -> str:
        await anyio.sleep(60)
        return "never"

    def fn(request: ModelRequest) -> ModelResponse:
        return ModelResponse(tool_calls=[ToolCall("wait", {})])

    return lw.Agent(FunctionModel(fn), tools=[wait], store=store, control=control,
                    limits=lw.Limits(budget_usd=None))


def _percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(p / 100 * (len(ordered) - 1))))]


async def _measure(runs: int, kills: int, gap: float, control: str | None, folder: Path) -> list[tuple]:
    db = folder / f"kill-{control is not None}.db"
    store = lw.SQLiteStore(db)
    agent = _agent(store, control)
    ids = [f"bench-{i:05d}" for i in range(runs)]
    rows = []
    async with anyio.create_task_group() as tg:
        for run_id in ids:
            tg.start_soon(functools.partial(agent.run, "wait", run_id=run_id))
        with anyio.fail_after(120):
            while len(local_runs()) < runs:
                await anyio.sleep(0.02)
        await anyio.sleep(1.0)  # leases reach the control plane; the runs sit in their tool
        here, there = ids[:kills], ids[kills:2 * kills]

        # Same process: a thread calls lw.kill, as a request handler would.
        returned: dict[str, float] = {}

        def kill_here() -> None:
            for run_id in here:
                lw.kill(run_id, reason="benchmark", store=store, control=control)
                returned[run_id] = time.time()
                time.sleep(gap)

        await anyio.to_thread.run_sync(kill_here)
        # Another process: the watcher path.
        proc = await anyio.run_process(
            [sys.executable, "-c", KILLER, str(db), control or "", str(gap), *there], check=True
        )
        for run_id, ts, n in json.loads(proc.stdout):
            assert n == 1, f"{run_id} was not signalled"
            returned[run_id] = ts
        await anyio.sleep(0.5)
        alive = len(local_runs())
        tg.cancel_scope.cancel()  # the other runs end as killed (cancelled by caller)
    store.close()
    store = lw.SQLiteStore(db)
    for label, group in (("same process", here), ("other process", there)):
        latencies = []
        for run_id in group:
            events = store.load(run_id)
            end = events[-1]
            assert end.kind == "run_finished" and end.stop_reason == "killed", (run_id, end)
            latencies.append((end.ts - returned[run_id]) * 1000)
        rows.append((label, latencies))
    store.close()
    assert alive == runs - 2 * kills, f"{runs - 2 * kills} runs should still be running, {alive} are"
    return rows


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_redis(folder: Path) -> tuple[subprocess.Popen, str] | None:
    server = shutil.which("redis-server")
    if server is None:
        return None
    port = _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.2) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, f"redis://127.0.0.1:{port}/0"
        except OSError:
            time.sleep(0.05)
    proc.kill()
    return None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=1000)
    parser.add_argument("--kills", type=int, default=50, help="kills per path (same process, other process)")
    parser.add_argument("--gap", type=float, default=0.02, help="seconds between kills")
    parser.add_argument("--redis", metavar="URL", help="a Redis server to use (default: start one if installed)")
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    os.environ.pop("LOOPWISE_REDIS_URL", None)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        backends: list[tuple[str, str | None]] = [("local (SQLite)", None)]
        server = None
        if not args.no_redis:
            if args.redis:
                backends.append(("redis", args.redis))
            elif (started := _start_redis(folder)) is not None:
                server, url = started
                backends.append(("redis", url))
            else:
                print("redis-server is not installed: the Redis backend is not measured", file=sys.stderr)
        try:
            for name, control in backends:
                for label, latencies in anyio.run(_measure, args.runs, args.kills, args.gap, control, folder):
                    results.append((name, label, latencies))
        finally:
            if server is not None:
                for name, control in backends:  # stop the plane's threads before its server
                    plane = _controls.pop(("redis", control), None)
                    if plane is not None:
                        plane.close()
                server.kill()
                server.wait()
    print(f"kill latency: from kill() returning to run_finished, {args.runs} concurrent runs in one process")
    print(f"{'backend':<16} {'killer':<14} {'kills':>5} {'p50 ms':>8} {'p99 ms':>8} {'max ms':>8}  target p99 <= 100 ms")
    for name, label, latencies in results:
        p99 = _percentile(latencies, 99)
        verdict = "ok" if p99 <= 100 else "MISSED"
        print(f"{name:<16} {label:<14} {len(latencies):>5} {statistics.median(latencies):>8.1f} {p99:>8.1f} "
              f"{max(latencies):>8.1f}  {verdict}")


if __name__ == "__main__":
    threading.current_thread().name = "benchmark"
    main()
