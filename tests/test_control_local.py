"""The local control plane's watcher: cheap when nothing happens, never misses a kill.

A second `LocalControl` on the same database stands for another process where that
is enough (it has its own connection and writes the kill marker as a process would);
the races use real processes.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

import loopwise as lw
from loopwise._control import kill as _control
from loopwise._control import local as _control_local
from loopwise._control import plane as _control_plane
from loopwise._control.local import LocalControl
from loopwise._control.marker import marker_path
from loopwise._control.plane import KillRequest, LiveRun


def _db(tmp_path: Path) -> Path:
    db = tmp_path / "lw.db"
    lw.SQLiteStore(db).close()  # a loopwise database (WAL), as the runs' processes have
    return db


class _Runs:
    """LiveRuns that record the kills delivered to them (run id -> monotonic time)."""

    def __init__(self) -> None:
        self.killed: dict[str, float] = {}
        self.lock = threading.Lock()

    def make(self, run_id: str, loop: asyncio.AbstractEventLoop | None, tags: tuple[str, ...] = ()) -> LiveRun:
        def on_kill(request: KillRequest) -> None:
            with self.lock:
                self.killed.setdefault(request.run_id, time.monotonic())

        return LiveRun(run_id, tags, on_kill, loop)

    async def wait(self, n: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.killed) < n:
            if time.monotonic() > deadline:
                raise AssertionError(f"{len(self.killed)} of {n} kills delivered after {timeout} s")
            await asyncio.sleep(0.005)


def _request(run_id: str) -> KillRequest:
    return KillRequest(run_id, "test", "tester", time.time())


@contextlib.asynccontextmanager
async def _attached(db: Path, ids: list[str]) -> AsyncIterator[tuple[LocalControl, _Runs]]:
    """A watcher on `db` with runs `ids` attached on this loop; all detached and closed after."""
    plane = LocalControl(db)
    runs = _Runs()
    loop = asyncio.get_running_loop()
    for run_id in ids:
        plane.attach(runs.make(run_id, loop))
    try:
        yield plane, runs
    finally:
        for run_id in ids:
            plane.detach(run_id)
        plane.close()


async def _until(predicate, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.01)


async def test_a_poll_that_finds_nothing_reads_no_database(tmp_path, monkeypatch):
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    plane = LocalControl(_db(tmp_path))
    queries = []
    real = plane._poll_kills
    plane._poll_kills = lambda conn: (queries.append(time.monotonic()), real(conn))[1]  # type: ignore[method-assign]
    runs = _Runs()
    plane.attach(runs.make("quiet", asyncio.get_running_loop()))
    try:
        await asyncio.sleep(0.1)
        before = len(queries)  # (the first poll reads lw_kills: kills stored before the marker was mapped)
        await asyncio.sleep(0.5)  # 25 polls
        assert len(queries) == before, "a poll with an unchanged marker must not query"
        # A kill in "another process": the next poll reads it, and delivers it.
        other = LocalControl(plane.path)
        other.record_kills([_request("quiet")])
        await runs.wait(1, timeout=1.0)
        assert len(queries) == before + 1
        other.close()
    finally:
        plane.detach("quiet")
        plane.close()


async def test_a_kill_from_another_process_is_delivered_through_the_marker(tmp_path, monkeypatch):
    # No safety-net query for the length of the test: only the marker can bring the kill.
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    db = _db(tmp_path)
    async with _attached(db, ["target"]) as (_, runs):
        await asyncio.sleep(0.1)
        code = ("import sys, time; from loopwise._control.local import LocalControl; "
                "from loopwise._control.plane import KillRequest; "
                "p = LocalControl(sys.argv[1]); p.record_kills([KillRequest('target', 'r', 'b', time.time())]); "
                "print(time.time())")
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, str(db),
                                                    stdout=asyncio.subprocess.PIPE)
        out, _ = await proc.communicate()
        float(out)  # the killer's process recorded it and exited
        await runs.wait(1, timeout=20.0)  # before any safety query (every 30 s here): the marker brought it
        assert marker_path(db).stat().st_size == 8


_KILLER = """
import sys, time
from loopwise._control.local import LocalControl; from loopwise._control.plane import KillRequest
plane = LocalControl(sys.argv[1])
for run_id in sys.argv[2:]:
    plane.record_kills([KillRequest(run_id, "race", "killer", time.time())])
"""


async def test_many_kills_racing_with_the_poll_are_all_delivered(tmp_path, monkeypatch):
    # Three processes overwrite the marker as fast as they can store kills, while the
    # watcher reads it and queries. With no safety-net query, every kill must still
    # arrive through the marker: a kill stored after the watcher's query changes the
    # marker after the watcher read it.
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    db = _db(tmp_path)
    ids = [f"run-{i:03d}" for i in range(300)]
    async with _attached(db, ids) as (_, runs):
        await asyncio.sleep(0.1)
        procs = [await asyncio.create_subprocess_exec(sys.executable, "-c", _KILLER, str(db), *ids[k::3])
                 for k in range(3)]
        for proc in procs:
            assert await proc.wait() == 0
        await runs.wait(len(ids), timeout=5.0)


async def test_a_kill_stored_right_after_the_query_is_not_missed(tmp_path, monkeypatch):
    # The worst moment, made certain: a kill committed (and its marker written) just after
    # the watcher's query read lw_kills. The query did not see it; the marker must.
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    db = _db(tmp_path)
    plane = LocalControl(db)
    other = LocalControl(db)
    runs = _Runs()
    plane.attach(runs.make("late", asyncio.get_running_loop()))
    armed = threading.Event()
    real = plane._poll_kills

    def poll(conn) -> None:
        real(conn)
        if armed.is_set():
            armed.clear()
            other.record_kills([_request("late")])

    plane._poll_kills = poll  # type: ignore[method-assign]
    try:
        await asyncio.sleep(0.1)
        armed.set()
        other.record_kills([_request("nobody")])  # (a kill for no run here: the watcher queries)
        await runs.wait(1, timeout=2.0)
        assert not armed.is_set()
    finally:
        plane.detach("late")
        other.close()
        plane.close()


async def test_kills_racing_with_the_poll_from_threads(tmp_path, monkeypatch):
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    db = _db(tmp_path)
    ids = [f"t-{i:03d}" for i in range(200)]
    killers = [LocalControl(db) for _ in range(4)]

    def kill(k: int) -> None:
        for i, run_id in enumerate(ids[k::4]):
            killers[k].record_kills([_request(run_id)])
            if i % 7 == 0:
                time.sleep(0.003)  # land some of them right around a poll

    try:
        async with _attached(db, ids) as (_, runs):
            await asyncio.sleep(0.05)
            await asyncio.gather(*(asyncio.to_thread(kill, k) for k in range(4)))
            await runs.wait(len(ids), timeout=5.0)
    finally:
        for k in killers:
            k.close()


async def test_a_kill_without_its_marker_write_is_delivered_by_the_safety_query(tmp_path, monkeypatch):
    # A killer that cannot write the marker (its permissions, an older loopwise).
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 0.3)
    db = _db(tmp_path)
    async with _attached(db, ["unsignalled"]) as (_, runs):
        await asyncio.sleep(0.1)
        monkeypatch.setattr(_control_local, "_bump_marker", lambda db: None)
        other = LocalControl(db)
        other.record_kills([_request("unsignalled")])
        await runs.wait(1, timeout=20.0)  # no marker was written: the safety query brought it
        other.close()


async def test_a_deleted_marker_is_mapped_again(tmp_path, monkeypatch):
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 0.3)
    db = _db(tmp_path)
    other = LocalControl(db)
    try:
        async with _attached(db, ["first", "second"]) as (_, runs):
            await asyncio.sleep(0.1)
            marker_path(db).unlink()  # the watcher's mapping is of a file no killer writes any more
            other.record_kills([_request("first")])  # (writes a new marker)
            await runs.wait(1, timeout=2.0)  # by the safety query, which maps the new marker
            monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
            await asyncio.sleep(0.4)  # the last safety query with the short interval
            other.record_kills([_request("second")])
            # Before the next safety query (30 s): the new marker is watched.
            await runs.wait(2, timeout=20.0)
    finally:
        other.close()


async def test_a_run_shorter_than_a_poll_takes_no_lease_a_longer_one_does(tmp_path):
    plane = LocalControl(_db(tmp_path))
    runs = _Runs()
    loop = asyncio.get_running_loop()
    try:
        for i in range(50):  # sequential short runs, as a busy process has
            plane.attach(runs.make(f"short-{i}", loop))
            await asyncio.sleep(0)
            plane.detach(f"short-{i}")
        await asyncio.sleep(0.1)
        assert plane.leases() == {} and plane._written == {}
        plane.attach(runs.make("long", loop, tags=("nightly",)))
        await _until(lambda: "long" in plane.leases(), timeout=1.0)
        lease = plane.leases()["long"]
        assert lease.live() and lease.tags == ("nightly",) and lease.owner == _control_plane._owner()
        plane.detach("long")
        await _until(lambda: plane.leases() == {}, timeout=1.0)
    finally:
        plane.close()


async def test_a_blocked_loop_still_gets_its_runs_leased(tmp_path, monkeypatch):
    # The loop's timer cannot turn while a sync call holds the loop: the watcher's own
    # turn (every QUERY_EVERY_S) leases the run, well within LEASE_GRACE_S.
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 0.3)
    async with _attached(_db(tmp_path), ["stuck"]) as (plane, _):
        deadline = time.monotonic() + 1.5
        while "stuck" not in plane._written and time.monotonic() < deadline:
            time.sleep(0.01)  # the loop is blocked
        assert "stuck" in plane._written
        assert time.monotonic() < deadline


async def test_leases_are_renewed(tmp_path, monkeypatch):
    monkeypatch.setattr(_control_local, "HEARTBEAT_S", 0.1)
    async with _attached(_db(tmp_path), ["beating"]) as (plane, _):
        await _until(lambda: "beating" in plane.leases(), timeout=1.0)
        first = plane.leases()["beating"].heartbeat
        await asyncio.sleep(0.35)
        assert plane.leases()["beating"].heartbeat > first


def test_a_late_release_does_not_remove_a_lease_taken_again(tmp_path, monkeypatch):
    # A run detached (its lease to be released) and resumed at once in this process: the
    # release names the old lease (its acquired time), not the one resume just took.
    plane = LocalControl(_db(tmp_path))
    monkeypatch.setattr(plane, "_start_watcher", lambda: None)  # we play the watcher
    try:
        plane.acquire("again", ["t"])
        first = plane.leases()["again"].acquired
        plane.detach("again")  # (the release is queued)
        time.sleep(0.01)
        plane.acquire("again", ["t"])  # our own lease, being released: not refused
        second = plane.leases()["again"].acquired
        assert second > first
        conn = _control_local._connect(plane.path)
        plane._write_leases(conn)  # the late release
        conn.close()
        assert plane.leases()["again"].acquired == second
        plane.detach("again")
        conn = _control_local._connect(plane.path)
        plane._write_leases(conn)
        conn.close()
        assert plane.leases() == {}
    finally:
        plane.close()


def test_a_run_attached_outside_its_loop_is_polled_for(tmp_path, monkeypatch):
    # No event loop to run a timer: the watcher reads lw_kills every poll for it.
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    monkeypatch.setattr(_control_local, "_bump_marker", lambda db: None)
    db = _db(tmp_path)
    plane = LocalControl(db)
    other = LocalControl(db)
    runs = _Runs()
    plane.attach(runs.make("loopless", None))
    try:
        time.sleep(0.1)
        other.record_kills([_request("loopless")])
        t0 = time.monotonic()
        while "loopless" not in runs.killed and time.monotonic() - t0 < 20:
            time.sleep(0.005)
        # No marker, no safety query for 30 s: the watcher's poll for runs without a loop brought it.
        assert "loopless" in runs.killed
    finally:
        plane.detach("loopless")
        other.close()
        plane.close()


def test_runs_on_several_loops_and_closed_loops_are_let_go(tmp_path, monkeypatch):
    monkeypatch.setattr(_control_local, "QUERY_EVERY_S", 30.0)
    db = _db(tmp_path)
    plane = LocalControl(db)
    other = LocalControl(db)
    runs = _Runs()

    async def one(run_id: str) -> None:
        plane.attach(runs.make(run_id, asyncio.get_running_loop()))
        try:
            await asyncio.sleep(0.1)
            other.record_kills([_request(run_id)])
            deadline = time.monotonic() + 2
            while run_id not in runs.killed and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
        finally:
            plane.detach(run_id)

    try:
        threads = [threading.Thread(target=asyncio.run, args=(one(f"loop-{i}"),)) for i in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        for i in range(3, 6):  # one after the other, each in a new loop (run_sync)
            asyncio.run(one(f"loop-{i}"))
        assert sorted(runs.killed) == [f"loop-{i}" for i in range(6)]
        assert len(plane._timers) <= 1, "closed loops are not kept"
    finally:
        other.close()
        plane.close()


@pytest.mark.parametrize("n", [1, 200])
async def test_attach_and_detach_leave_nothing_behind(tmp_path, n):
    plane = LocalControl(_db(tmp_path))
    runs = _Runs()
    loop = asyncio.get_running_loop()
    try:
        for i in range(n):
            plane.attach(runs.make(f"r{i}", loop))
        await asyncio.sleep(0.1)
        for i in range(n):
            plane.detach(f"r{i}")
        await _until(lambda: plane.leases() == {}, timeout=2.0)
        assert plane._runs == {} and plane._counts == {} and plane._keys == {} and plane._written == {}
    finally:
        plane.close()


async def test_kills_of_all_or_a_tag_reach_attached_runs_in_a_database_made_before_the_tag_column(tmp_path):
    """`lw_kills` without its `tag` column (an older loopwise made it) gets one; broadcasts match attached runs."""
    import sqlite3

    db = _db(tmp_path)
    conn = sqlite3.connect(db)
    conn.executescript("CREATE TABLE lw_kills (id INTEGER PRIMARY KEY AUTOINCREMENT, run_id TEXT NOT NULL, "
                       "reason TEXT NOT NULL, by TEXT NOT NULL, ts REAL NOT NULL);")
    conn.close()
    other = LocalControl(db)  # another process, as far as the watcher can tell
    try:
        async with _attached(db, []) as (plane, runs):
            loop = asyncio.get_running_loop()
            for run_id, tags in (("a", ("nightly",)), ("b", ("nightly", "eu")), ("c", ("eu",))):
                plane.attach(runs.make(run_id, loop, tags))
            other.record_broadcast("nightly", KillRequest("", "tagged", "tester", time.time()))
            await runs.wait(2, timeout=5)
            assert set(runs.killed) == {"a", "b"}
            other.record_broadcast(None, KillRequest("", "all", "tester", time.time()))
            await runs.wait(3, timeout=5)
            plane.attach(runs.make("late", loop, ("nightly",)))  # attached after both kills...
            # ...and after this one, made a second ago but read only now.
            other.record_broadcast("nightly", KillRequest("", "old", "tester", time.time() - 1.0))
            other.record_kills([_request("c")])  # (a marker bump behind it, read with it)
            await asyncio.sleep(_control_local.POLL_S * 5)
            assert set(runs.killed) == {"a", "b", "c"}
            for run_id in ("a", "b", "c", "late"):
                plane.detach(run_id)
    finally:
        other.close()


TRUNCATING_CHILD = """
import asyncio, os, sys, time
from pathlib import Path
import loopwise as lw
from loopwise._control.local import LocalControl
from loopwise._control.marker import marker_path
from loopwise._control.plane import KillRequest
from loopwise.models import ScriptedModel, ToolCall

db = Path(sys.argv[1])

@lw.tool
async def tidy(ctx: lw.RunContext) -> str:
    os.truncate(marker_path(db), 0)  # someone empties the kill marker while the run polls it
    await asyncio.sleep(0.2)  # (10 polls of the emptied marker)
    other = LocalControl(db)  # a killer, as another process would be: stores, then rewrites the marker
    other.record_kills([KillRequest(ctx.run_id, "after the marker was emptied", "test", time.time())])
    other.close()
    await asyncio.sleep(30)
    return "never"

store = lw.SQLiteStore(db)
agent = lw.Agent(ScriptedModel([ToolCall("tidy", {}), "done"]), tools=[tidy], store=store)
t0 = time.monotonic()
result = agent.run_sync("go")
print(result.stop_reason, round(time.monotonic() - t0, 1) < 10, flush=True)
store.close()
"""


def test_an_emptied_marker_file_neither_crashes_the_process_nor_stops_kills(tmp_path):
    """A marker read through a memory map faulted (SIGBUS: the process died) once someone emptied the file."""
    db = _db(tmp_path)
    done = subprocess.run([sys.executable, "-c", TRUNCATING_CHILD, str(db)], capture_output=True, text=True,
                          timeout=60, cwd=Path(__file__).resolve().parent.parent)
    assert done.returncode == 0, (done.returncode, done.stderr[-2000:])
    assert done.stdout.split() == ["killed", "True"]


def _open_files_under(directory: Path) -> list[str]:
    found = []
    for fd in Path("/proc/self/fd").iterdir():
        with contextlib.suppress(OSError):
            target = str(fd.readlink())
            if target.startswith(str(directory)):
                found.append(target)
    return found


@pytest.mark.skipif(not Path("/proc/self/fd").exists(), reason="reads /proc/self/fd")
def test_closing_the_store_and_its_control_plane_leaves_no_file_open(tmp_path):
    """The watcher thread's connection is closed too: while it was open, SQLite kept the
    descriptors of every connection closed before it (a process that used many databases
    kept all their files open)."""
    from loopwise.models import ScriptedModel

    store = lw.SQLiteStore(tmp_path / "x.db")
    lw.Agent(ScriptedModel(["hi"]), store=store).run_sync("t")
    plane = _control.control_for(store)
    store.close()
    watcher = plane._thread
    assert watcher is not None and watcher.is_alive()  # it would idle on for IDLE_EXIT_S
    plane.close()
    assert not watcher.is_alive()
    assert _open_files_under(tmp_path) == []
