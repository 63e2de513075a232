"""`store.tail(run_id, after_seq)`: follow a live run's events until its end.

Checked on both stores in-process (the run's tool waits on an event the test sets, so
the tail is seen yielding while the run is still under way), and on an SQLite file
written by another process (a real subprocess whose tool waits for a line on stdin).
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import time
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._stores import sqlite_tail as _sqlite_tail
from loopwise._events import RunFinished, RunResumed, RunStarted
from loopwise._messages import new_message
from loopwise.models import ModelResponse, ScriptedModel, ToolCall

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(params=["sqlite", "memory"])
def store(request, tmp_path):
    s = lw.SQLiteStore(tmp_path / "lw.db") if request.param == "sqlite" else lw.MemoryStore()
    yield s
    s.close()


def _gated_agent(store: lw.EventStore, gates: list[asyncio.Event]) -> lw.Agent:
    calls = iter(gates)

    @lw.tool
    async def wait_for_gate() -> str:
        """Wait."""
        await next(calls).wait()
        return "opened"

    model = ScriptedModel([ToolCall("wait_for_gate", {}), ToolCall("wait_for_gate", {}), ModelResponse(text="done")])
    return lw.Agent(model, tools=[wait_for_gate], store=store, limits=lw.Limits(budget_usd=None))


async def test_tail_follows_a_live_run_to_its_end(store):
    gates = [asyncio.Event(), asyncio.Event()]
    agent = _gated_agent(store, gates)
    run = asyncio.create_task(agent.run("t", run_id="live"))
    seen: list = []
    async with asyncio.timeout(60):
        while not store.has_run("live"):  # (its first events are written before its first await)
            await asyncio.sleep(0)
        async for event in store.tail("live"):
            seen.append(event)
            if event.kind == "tool_call_started":
                assert not run.done()  # the run is waiting in its tool: the tail follows it live
                gates[sum(e.kind == "tool_call_started" for e in seen) - 1].set()
        result = await run
    assert result.stop_reason == "done"
    assert [e.seq for e in seen] == list(range(len(seen)))
    assert seen == store.load("live") and isinstance(seen[-1], RunFinished)


async def test_tail_after_seq_and_of_a_finished_run(store):
    agent = lw.Agent(ScriptedModel([ModelResponse(text="hi")]), store=store)
    await agent.run("t", run_id="done-already")
    events = store.load("done-already")
    async with asyncio.timeout(30):
        assert [e async for e in store.tail("done-already")] == events  # ends at once
        assert [e async for e in store.tail("done-already", after_seq=2)] == events[3:]
        assert [e async for e in store.tail("done-already", events[-2].seq)] == events[-1:]


async def test_a_resumed_run_tail_ends_at_an_end_and_continues_from_it(store):
    task = [new_message("user", "t")]
    store.write([RunStarted(run_id="r", seq=0, ts=1.0, task=task),
                 RunFinished(run_id="r", seq=1, ts=2.0, stop_reason="killed")])
    if isinstance(store, lw.SQLiteStore):
        store._sync()
    async with asyncio.timeout(30):
        # Ended killed: the tail ends there (a resume may come later, or never).
        assert [e.seq async for e in store.tail("r")] == [0, 1]
        # A tail from that end waits for the resumed segment, and ends at its end.
        later = asyncio.create_task(_collect(store.tail("r", after_seq=1)))
        await asyncio.sleep(0.05)
        assert not later.done()
        store.write([RunResumed(run_id="r", seq=2, ts=3.0, segment=1, previous_end="killed", iteration=1, by="me")])
        store.write([RunFinished(run_id="r", seq=3, ts=4.0, stop_reason="done")])
        assert [e.seq for e in await later] == [2, 3]
        # Started over once the resume has begun: it follows to the latest end, not the first.
        assert [e.seq async for e in store.tail("r")] == [0, 1, 2, 3]


async def _collect(it) -> list:
    return [e async for e in it]


async def test_unknown_run_and_bad_after_seq_are_one_line_errors(store):
    with pytest.raises(lw.UserError, match="no run with id 'nope'") as err:
        await _collect(store.tail("nope"))
    assert "\n" not in str(err.value)
    store.write([RunStarted(run_id="x", seq=0, ts=1.0, task=[new_message("user", "t")])])
    for bad in (-2, "0", True, 1.5):
        with pytest.raises(lw.UserError, match=r"tail\(after_seq=...\) must be an int >= -1"):
            await _collect(store.tail("x", after_seq=bad))


async def test_cancelling_a_tail_cleans_up(store, monkeypatch):
    opened: list[sqlite3.Connection] = []
    real_open = _sqlite_tail._open
    monkeypatch.setattr(_sqlite_tail, "_open", lambda s: opened.append(real_open(s)) or opened[-1])
    store.write([RunStarted(run_id="open", seq=0, ts=1.0, task=[new_message("user", "t")])])
    first = asyncio.Event()

    async def follow() -> None:
        async for _ in store.tail("open"):
            first.set()

    task = asyncio.create_task(follow())
    async with asyncio.timeout(30):
        await first.wait()
        await asyncio.sleep(0.05)  # (waiting for the next write)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
    if isinstance(store, lw.SQLiteStore):
        assert len(opened) == 1
        with pytest.raises(sqlite3.ProgrammingError):
            opened[0].execute("SELECT 1")  # closed
    else:
        assert all(f.done() for _, f in store._waiters)  # (no waiter left pending)
    # The store is usable, and a write after the cancel wakes nobody in error.
    store.write([RunFinished(run_id="open", seq=1, ts=2.0, stop_reason="done")])
    async with asyncio.timeout(30):
        assert [e.seq async for e in store.tail("open")] == [0, 1]


_CHILD = """
import asyncio, sys
import loopwise as lw
from loopwise.models import ModelResponse, ScriptedModel, ToolCall

@lw.tool
async def wait_for_parent() -> str:
    '''Wait for a line on stdin.'''
    print("in-tool", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    return "released"

store = lw.SQLiteStore(sys.argv[1])
agent = lw.Agent(ScriptedModel([ToolCall("wait_for_parent", {}), ToolCall("wait_for_parent", {}),
                                ModelResponse(text="done")]),
                 tools=[wait_for_parent], store=store, limits=lw.Limits(budget_usd=None))
print(asyncio.run(agent.run("t", run_id=sys.argv[2])).stop_reason, flush=True)
store.close()
"""


async def test_tail_follows_a_run_written_by_another_process(tmp_path, monkeypatch):
    db = tmp_path / "shared.db"
    reader = lw.SQLiteStore(db)
    reads = []
    real_read = reader._read
    monkeypatch.setattr(reader, "_read", lambda *a, **k: reads.append(a[0]) or real_read(*a, **k))
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CHILD, str(db), "elsewhere", stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE, env={"PYTHONPATH": str(ROOT / "src"), "PATH": "/usr/bin:/bin"})
    try:
        async with asyncio.timeout(90):
            assert await proc.stdout.readline() == b"in-tool\n"
            seen = []
            released = 0
            async for event in reader.tail("elsewhere"):
                seen.append(event)
                if event.kind == "tool_call_started":
                    released += 1
                    started = time.monotonic()
                    if released == 2:
                        assert await proc.stdout.readline() == b"in-tool\n"
                    proc.stdin.write(b"go\n")
                    await proc.stdin.drain()
                elif event.kind == "tool_call_finished" and released == 2:
                    # The other process's event came while the tail waited (well under its 90 s bound).
                    assert time.monotonic() - started < 60
            assert await proc.stdout.readline() == b"done\n"
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert released == 2 and isinstance(seen[-1], RunFinished) and seen[-1].stop_reason == "done"
    assert seen == reader.load("elsewhere")
    # Woken by commits, not by reading the run in a loop: a read per wake-up (a commit of
    # the other process, a few a step), not one per poll of the change counter.
    assert len(reads) <= 4 * len(seen), len(reads)
    reader.close()
