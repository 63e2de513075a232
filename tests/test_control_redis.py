"""The Redis control plane against a real `redis-server` (started here on a free port).

Leases, atomic acquire across processes, kills delivered by pub/sub to runs in this
process and in child processes, 1000 attached runs, a Redis restart in the middle,
and agent runs stopped from another process. Bounds on time are generous: the
machine is shared; speed is measured in `benchmarks/`, not here.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import anyio
import pytest
import redis

import loopwise as lw
from loopwise._control import kill as _control
from loopwise._control import plane as _control_plane
from loopwise._control import redis as _control_redis
from loopwise._control.plane import HOST, KillRequest, LiveRun, _owner, local_runs, requester
from loopwise._control.redis import RedisControl
from loopwise.cli import main
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ToolCall

from .redis_server import RedisServer

ROOT = Path(__file__).resolve().parent.parent


# -- fixtures and helpers -------------------------------------------------------------


@pytest.fixture
def server(tmp_path) -> Iterator[RedisServer]:
    s = RedisServer.start_new(tmp_path / "redis")
    yield s
    s.close()


@pytest.fixture
def raw(server) -> Iterator[redis.Redis]:
    """A plain client, to look at what the control plane stored."""
    client = redis.Redis.from_url(server.url, decode_responses=True)
    yield client
    client.close()


class Runs:
    """LiveRuns attached to a plane; records what each receives (from the delivering thread)."""

    def __init__(self) -> None:
        self.got: dict[str, tuple[float, KillRequest]] = {}
        self.events: dict[str, threading.Event] = {}
        self.attached: list[tuple[RedisControl, str]] = []
        self._lock = threading.Lock()

    def attach(self, plane: RedisControl, run_id: str, tags: tuple[str, ...] = (), since: float = 0.0) -> LiveRun:
        self.events[run_id] = threading.Event()

        def on_kill(request: KillRequest) -> None:
            with self._lock:
                self.got[run_id] = (time.time(), request)
            self.events[run_id].set()

        run = LiveRun(run_id, tags, on_kill, since=since)
        plane.attach(run)
        self.attached.append((plane, run_id))
        return run

    def wait(self, run_id: str, timeout: float = 10.0) -> KillRequest:
        assert self.events[run_id].wait(timeout), f"the kill of {run_id} was not delivered within {timeout} s"
        return self.got[run_id][1]

    def delivered(self) -> set[str]:
        with self._lock:
            return set(self.got)


@pytest.fixture
def runs() -> Iterator[Runs]:
    r = Runs()
    yield r
    for plane, run_id in r.attached:  # the process-wide registry must not keep them
        plane.detach(run_id)


@pytest.fixture
def planes() -> Iterator[Callable[..., RedisControl]]:
    made: list[RedisControl] = []

    def make(url: str, **kwargs) -> RedisControl:
        made.append(RedisControl(url, **kwargs))
        return made[-1]

    yield make
    for p in made:
        p.close()


@pytest.fixture
def cached_controls() -> Iterator[None]:
    """Close the control planes that `control_for` cached for URLs during the test."""
    before = set(_control_plane._controls)
    yield
    for key in set(_control_plane._controls) - before:
        _control_plane._controls.pop(key).close()


def wait_until(condition: Callable[[], bool], timeout: float = 10.0, what: str = "the condition") -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)


def subscribed(client: redis.Redis, channel: str = "loopwise:kills") -> bool:
    return dict(client.pubsub_numsub(channel)).get(channel, 0) >= 1


def _env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.pop("LOOPWISE_REDIS_URL", None)
    env.update(PYTHONPATH=str(ROOT), LOOPWISE_DB=str(tmp_path / f"child-{time.monotonic_ns()}.db"), **extra)
    return env


# A child process: `kill` sends a kill with the real `lw.kill` and prints how many runs it
# signalled; `attach` attaches runs (ID or ID:TAG) and prints each kill it receives as a
# JSON line, until its stdin is closed; `acquire` waits for a go file, then races for a lease.
CHILD = r"""
import json, os, sys, threading, time
import loopwise as lw
from loopwise._control.plane import LiveRun, KillRequest
from loopwise._control.redis import RedisControl

mode, url = sys.argv[1], sys.argv[2]
if mode == "kill":
    what = json.loads(sys.argv[3])
    n = lw.kill(control=url, reason="from a child", **what)
    print(json.dumps({"n": n, "sent_at": time.time(), "pid": os.getpid()}), flush=True)
elif mode == "attach":
    plane = RedisControl(url)
    lock = threading.Lock()
    def on_kill(request):
        with lock:
            print(json.dumps({"run_id": request.run_id, "reason": request.reason, "by": request.by,
                              "received": time.time(), "ts": request.ts}), flush=True)
    for spec in sys.argv[3:]:
        run_id, _, tags = spec.partition(":")
        plane.attach(LiveRun(run_id, tuple(t for t in tags.split(",") if t), on_kill))
    print(json.dumps({"ready": os.getpid()}), flush=True)
    sys.stdin.read()
elif mode == "acquire":
    plane = RedisControl(url)
    go = sys.argv[4]
    while not os.path.exists(go):
        time.sleep(0.001)
    try:
        plane.acquire(sys.argv[3], ["t"])
        print(json.dumps({"won": os.getpid()}), flush=True)
    except lw.UserError as exc:
        print(json.dumps({"lost": str(exc)}), flush=True)
    sys.stdin.read()
"""


class Child:
    """A child Python process running CHILD; its stdout lines are JSON, read by a thread."""

    def __init__(self, tmp_path: Path, *args: str) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", CHILD, *args], cwd=ROOT, env=_env(tmp_path),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True)
        self.lines: list[dict] = []
        self._cond = threading.Condition()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(json.loads(line))
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[dict], bool], timeout: float = 30.0) -> dict:
        with self._cond:
            ok = self._cond.wait_for(lambda: any(predicate(x) for x in self.lines) or self.proc.poll() is not None,
                                     timeout)
            found = [x for x in self.lines if predicate(x)]
        if not found:
            err = self.proc.stderr.read() if ok and self.proc.poll() is not None and self.proc.stderr else ""
            raise AssertionError(f"the child did not print the expected line within {timeout} s: {self.lines} {err}")
        return found[0]

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._reader.join(timeout=5)
        for f in (self.proc.stdout, self.proc.stderr, self.proc.stdin):
            if f is not None and not f.closed:
                f.close()


def kill_from_child(tmp_path: Path, url: str, **what) -> dict:
    """`lw.kill(**what)` in a separate Python process; what it printed (n, sent_at, pid)."""
    child = Child(tmp_path, "kill", url, json.dumps(what))
    try:
        child.proc.wait(timeout=60)
        assert child.proc.returncode == 0, child.proc.stderr.read() if child.proc.stderr else ""
        return child.wait_for(lambda x: "n" in x)
    finally:
        child.close()


# -- leases -----------------------------------------------------------------------------


def test_attach_writes_leases_the_heartbeat_renews_them_detach_releases_them(server, raw, runs, planes,
                                                                             monkeypatch):
    monkeypatch.setattr(_control_plane, "HEARTBEAT_S", 0.1)
    plane = planes(server.url)
    t0 = time.time()
    for i in range(3):
        runs.attach(plane, f"run-{i}", tags=("batch-1", f"n{i}"))
    wait_until(lambda: len(plane.leases()) == 3, what="three leases")
    lease = plane.leases()["run-1"]
    assert (lease.owner, lease.host, lease.pid, lease.tags) == (_owner(), HOST, os.getpid(), ("batch-1", "n1"))
    assert lease.live() and t0 - 1 <= lease.acquired <= lease.heartbeat
    # Stored as JSON in one hash.
    assert json.loads(raw.hget("loopwise:leases", "run-1"))["tags"] == ["batch-1", "n1"]
    assert set(plane.leases(["run-0", "run-2", "nope"])) == {"run-0", "run-2"}
    # The heartbeat renews every lease; `acquired` stays.
    first = lease.heartbeat
    wait_until(lambda: plane.leases()["run-1"].heartbeat > first + 0.2, what="a renewed heartbeat")
    assert plane.leases()["run-1"].acquired == lease.acquired
    # Detach releases the lease, and the run leaves the process-wide registry.
    plane.detach("run-1")
    wait_until(lambda: set(plane.leases()) == {"run-0", "run-2"}, what="the release of run-1")
    assert "run-1" not in {r.run_id for r in local_runs()}
    assert plane.describe() == f"redis ({server.url}, prefix 'loopwise')"


def test_close_stops_the_threads(server, raw, runs):
    plane = RedisControl(server.url)
    runs.attach(plane, "r")
    wait_until(lambda: "r" in plane.leases() and subscribed(raw), what="the lease")
    threads = list(plane._threads.values())
    assert len(threads) == 2 and all(t.is_alive() for t in threads)
    plane.detach("r")
    plane.close()
    assert not any(t.is_alive() for t in threads)
    wait_until(lambda: not subscribed(raw), what="the end of the subscription")
    # Used again, it starts again.
    runs.attach(plane, "r2")
    wait_until(lambda: "r2" in plane.leases() and subscribed(raw), what="the lease after close")
    plane.record_kills([KillRequest("r2", "after close", requester(), time.time())])
    assert runs.wait("r2").reason == "after close"
    plane.detach("r2")
    plane.close()


def test_prefixes_keep_deployments_apart(server, raw, runs, planes, tmp_path):
    a = planes(server.url, prefix="blue")
    b = planes(server.url, prefix="green")
    runs.attach(a, "run-a")
    wait_until(lambda: "run-a" in a.leases(), what="the lease in blue")
    assert b.leases() == {} and raw.hkeys("green:leases") == [] and raw.hkeys("blue:leases") == ["run-a"]
    b.record_kills([KillRequest("run-a", "wrong deployment", requester(), time.time())])
    assert a.pending_kill("run-a") is None and b.pending_kill("run-a") is not None
    a.record_kills([KillRequest("run-a", "right one", requester(), time.time())])
    assert runs.wait("run-a").reason == "right one"


def test_a_live_lease_of_another_owner_is_not_overwritten(server, raw, runs, planes, monkeypatch, caplog):
    monkeypatch.setattr(_control_plane, "HEARTBEAT_S", 0.05)
    plane = planes(server.url)
    runs.attach(plane, "taken")
    wait_until(lambda: "taken" in plane.leases(), what="the lease")
    other = {"owner": "elsewhere:1:abcd", "host": "elsewhere", "pid": 1, "tags": [], "acquired": time.time(),
             "heartbeat": time.time()}
    raw.hset("loopwise:leases", "taken", json.dumps(other))
    with caplog.at_level(logging.WARNING, logger="loopwise"):
        wait_until(lambda: any("held by another live process" in r.getMessage() for r in caplog.records),
                   what="the warning")
    assert plane.leases()["taken"].owner == "elsewhere:1:abcd"
    # Releasing does not delete another owner's lease either.
    plane.detach("taken")
    time.sleep(0.3)
    assert plane.leases()["taken"].owner == "elsewhere:1:abcd"


# -- acquire ----------------------------------------------------------------------------


def _put_lease(raw: redis.Redis, run_id: str, *, host: str, pid: int, heartbeat: float) -> None:
    raw.hset("loopwise:leases", run_id, json.dumps({"owner": f"{host}:{pid}:0000", "host": host, "pid": pid,
                                                    "tags": ["x"], "acquired": heartbeat, "heartbeat": heartbeat}))


def test_acquire_is_refused_while_the_lease_is_live_and_granted_once_it_is_not(server, raw, planes):
    plane = planes(server.url)
    plane.acquire("fresh", ["a"])
    lease = plane.leases()["fresh"]
    assert lease.owner == _owner() and lease.tags == ("a",) and lease.live()
    # Another live process on this host holds it.
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        _put_lease(raw, "held", host=HOST, pid=holder.pid, heartbeat=time.time())
        with pytest.raises(lw.UserError, match=rf"run held is being executed by {HOST} pid {holder.pid}.*"
                                               r"loopwise kill held"):
            plane.acquire("held", [])
    finally:
        holder.kill()
        holder.wait()
    plane.acquire("held", ["b"])  # its process died: the lease is free
    assert plane.leases()["held"].owner == _owner()
    # On another machine: live while its heartbeat is recent, free once it is older than the TTL.
    _put_lease(raw, "remote", host="elsewhere", pid=1, heartbeat=time.time())
    with pytest.raises(lw.UserError, match="being executed by elsewhere pid 1"):
        plane.acquire("remote", [])
    _put_lease(raw, "remote", host="elsewhere", pid=1, heartbeat=time.time() - _control_plane.LEASE_TTL_S - 1)
    plane.acquire("remote", [])
    assert plane.leases()["remote"].host == HOST


def test_acquire_is_atomic_across_processes(server, tmp_path):
    go = tmp_path / "go"
    children = [Child(tmp_path, "acquire", server.url, "contested", str(go)) for _ in range(6)]
    try:
        time.sleep(1.0)  # let them start (they wait for the go file either way)
        go.touch()
        outcomes = [c.wait_for(lambda x: "won" in x or "lost" in x, timeout=60) for c in children]
    finally:
        for c in children:
            c.close()
    winners = [o for o in outcomes if "won" in o]
    assert len(winners) == 1, outcomes
    assert all("is being executed by" in o["lost"] for o in outcomes if "lost" in o)


# -- kills ------------------------------------------------------------------------------


def test_a_kill_is_stored_then_delivered_by_pubsub(server, raw, runs, planes, monkeypatch):
    monkeypatch.setattr(_control_redis, "RECHECK_S", 600.0)  # no backstop: only pub/sub can deliver in time
    plane = planes(server.url)
    for i in range(20):
        runs.attach(plane, f"run-{i}")
    wait_until(lambda: subscribed(raw) and len(plane.leases()) == 20, what="the subscription")
    latencies = []
    for i in range(20):
        request = KillRequest(f"run-{i}", f"stop {i}", requester(), time.time())
        plane.record_kills([request])
        sent = time.time()
        assert runs.wait(f"run-{i}", timeout=10) == request
        latencies.append(runs.got[f"run-{i}"][0] - sent)
    assert max(latencies) < 10
    # Durable, with an expiry.
    stored = plane.pending_kill("run-3")
    assert stored is not None and stored.reason == "stop 3"
    assert 0 < raw.ttl("loopwise:kill:run-3") <= _control_redis.KILL_TTL_S
    assert plane.pending_kill("never-killed") is None


def test_a_kill_from_an_earlier_segment_is_not_delivered_again(server, raw, runs, planes):
    plane = planes(server.url)
    plane.record_kills([KillRequest("resumed", "the first kill", requester(), time.time() - 10)])
    runs.attach(plane, "resumed", since=time.time() - 5)
    wait_until(lambda: subscribed(raw), what="the subscription")
    time.sleep(2 * _control_redis.RECHECK_S + 0.2)  # the writer has read the old request, and ignored it
    assert runs.delivered() == set()
    plane.record_kills([KillRequest("resumed", "the second kill", requester(), time.time())])
    assert runs.wait("resumed").reason == "the second kill"


def test_a_kill_from_another_process_reaches_runs_here(server, raw, runs, planes, tmp_path):
    plane = planes(server.url)
    runs.attach(plane, "here-1", tags=("t",))
    runs.attach(plane, "here-2", tags=("t",))
    wait_until(lambda: subscribed(raw) and len(plane.leases()) == 2, what="the leases")
    out = kill_from_child(tmp_path, server.url, run_id="here-2")
    assert out["n"] == 1
    request = runs.wait("here-2")
    assert request.reason == "from a child" and request.by.endswith(f"pid {out['pid']}")
    assert runs.got["here-2"][0] - out["sent_at"] < 10
    assert runs.delivered() == {"here-2"}


def test_kill_by_tag_across_two_processes(server, raw, runs, planes, tmp_path):
    plane = planes(server.url)
    runs.attach(plane, "here-t", tags=("batch-7",))
    runs.attach(plane, "here-u", tags=("other",))
    child = Child(tmp_path, "attach", server.url, "there-t:batch-7,x", "there-u:other")
    try:
        child.wait_for(lambda x: "ready" in x)
        wait_until(lambda: len([x for x in plane.leases().values() if x.live()]) == 4 and subscribed(raw),
                   what="four live leases")
        out = kill_from_child(tmp_path, server.url, tag="batch-7")
        assert out["n"] == 2
        assert runs.wait("here-t").reason == "from a child"
        there = child.wait_for(lambda x: x.get("run_id") == "there-t")
        assert there["by"].endswith(f"pid {out['pid']}")
        # Then all, from this process: the child's other run hears of it too.
        assert lw.kill(all=True, control=plane, reason="everything") >= 3
        assert runs.wait("here-u").reason == "everything"
        child.wait_for(lambda x: x.get("run_id") == "there-u")
    finally:
        child.close()
    assert {x["run_id"] for x in child.lines if "run_id" in x} == {"there-t", "there-u"}
    assert runs.got["here-t"][1].reason == "from a child"  # delivered once


def test_1000_attached_runs_kill_one_only_that_one_hears_it(server, raw, runs, planes, tmp_path):
    plane = planes(server.url)
    for i in range(1000):
        runs.attach(plane, f"run-{i:04d}", tags=(f"t{i % 2}",))
    wait_until(lambda: len(plane.leases()) == 1000 and subscribed(raw), timeout=30, what="1000 leases")
    assert all(lease.live() for lease in plane.leases().values())
    out = kill_from_child(tmp_path, server.url, run_id="run-0500")
    assert out["n"] == 1
    runs.wait("run-0500")
    time.sleep(2 * _control_redis.RECHECK_S + 0.2)  # the backstop has read all 1000 kill keys since
    assert runs.delivered() == {"run-0500"}


def test_kill_while_redis_is_down_says_nothing_was_stored(server, raw, runs, planes, cached_controls, tmp_path,
                                                          capsys):
    db = tmp_path / "lw.db"
    lw.SQLiteStore(db).close()
    plane = planes(server.url)
    runs.attach(plane, "r1")
    wait_until(lambda: "r1" in plane.leases(), what="the lease")
    server.stop()
    with pytest.raises(lw.UserError, match=r"unreachable .*the kill of 1 run was NOT stored and no run was "
                                           r"signalled"):
        plane.record_kills([KillRequest("r1", "x", requester(), time.time())])
    with pytest.raises(lw.UserError, match=r"unreachable .*nothing was stored; no kill was sent"):
        lw.kill(tag="t", control=server.url)
    with pytest.raises(lw.UserError, match="could not read whether run r1 was killed"):
        plane.pending_kill("r1")
    with pytest.raises(lw.UserError, match="the lease of run r2 was not taken"):
        plane.acquire("r2", [])
    assert main(["kill", "--all", "--redis", server.url, "--db", str(db)]) == 2
    assert "no kill was sent" in capsys.readouterr().err
    assert runs.delivered() == set()


def test_redis_restarted_mid_way_leases_come_back_and_later_kills_land(server, raw, runs, planes, tmp_path,
                                                                       caplog):
    plane = planes(server.url)
    for i in range(5):
        runs.attach(plane, f"run-{i}", tags=("t",))
    wait_until(lambda: len(plane.leases()) == 5 and subscribed(raw), what="five leases")
    with caplog.at_level(logging.INFO, logger="loopwise"):
        server.stop()
        # While it is down, attaching and detaching return at once (the run's loop never waits).
        t0 = time.monotonic()
        runs.attach(plane, "late", tags=("t",))
        plane.detach("run-4")
        assert time.monotonic() - t0 < 1.0
        time.sleep(2.5)  # several reconnection attempts
        server.start()
        # The restarted server lost everything (no persistence); this process writes its leases again.
        expected = {"run-0", "run-1", "run-2", "run-3", "late"}
        wait_until(lambda: set(plane.leases()) == expected and subscribed(raw), timeout=20,
                   what="the leases written again")
        out = kill_from_child(tmp_path, server.url, tag="t")
        assert out["n"] == 5
        for run_id in expected:
            assert runs.wait(run_id).reason == "from a child"
        wait_until(lambda: any("is back after" in r.getMessage() for r in caplog.records), what="the log line")
    messages = [r.getMessage() for r in caplog.records if r.name == "loopwise"]
    assert len([m for m in messages if "is unreachable" in m]) == 1, messages  # once per outage
    assert len([m for m in messages if "is back after" in m]) == 1, messages


def test_an_outage_with_no_run_here_is_not_logged_and_a_later_one_is(server, raw, runs, planes, caplog):
    plane = planes(server.url)
    runs.attach(plane, "gone")
    wait_until(lambda: "gone" in plane.leases() and subscribed(raw), what="the lease")
    plane.detach("gone")
    wait_until(lambda: plane.leases() == {}, what="the release")
    with caplog.at_level(logging.INFO, logger="loopwise"):
        server.stop()
        time.sleep(1.5)  # the subscriber notices and retries, quietly: no run here cares
        assert not [r for r in caplog.records if r.name == "loopwise"]
        server.start()
        wait_until(lambda: subscribed(raw), what="the subscription")
        runs.attach(plane, "next")
        wait_until(lambda: "next" in plane.leases(), what="the lease")
        server.stop()
        wait_until(lambda: any("is unreachable" in r.getMessage() for r in caplog.records), what="the warning")
        server.start()
        wait_until(lambda: any("is back after" in r.getMessage() for r in caplog.records), what="the log line")


def test_a_kill_stored_while_the_subscriber_is_away_is_still_delivered(server, raw, runs, planes, monkeypatch):
    monkeypatch.setattr(_control_redis, "RECHECK_S", 600.0)  # the periodic backstop is out of the picture
    plane = planes(server.url)
    runs.attach(plane, "away")
    wait_until(lambda: subscribed(raw), what="the subscription")
    server.stop()
    time.sleep(1.0)  # the subscriber's reconnection backoff grows
    server.start()
    # Stored at once, most likely before the subscriber is back: the check after it reconnects finds it.
    other = planes(server.url)
    other.record_kills([KillRequest("away", "while you were out", requester(), time.time())])
    assert runs.wait("away", timeout=20).reason == "while you were out"


# -- bad input --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "kwargs", "message"),
    [
        ("http://localhost:6379", {}, "must start with redis://, rediss:// or unix://"),
        ("redis://localhost:notaport", {}, "malformed Redis URL .*Port could not be cast"),
        ("redis://localhost:6379", {"prefix": ""}, "prefix must be a non-empty str"),
        ("redis://localhost:6379", {"prefix": "a b"}, "prefix must be a non-empty str"),
    ],
)
def test_bad_configuration_is_a_clear_error(url, kwargs, message):
    with pytest.raises(lw.UserError, match=message):
        RedisControl(url, **kwargs)


def test_bad_urls_through_kill_and_agent(cached_controls):
    with pytest.raises(lw.UserError, match="malformed Redis URL"):
        lw.kill("r", control="redis://localhost:notaport")
    with pytest.raises(lw.UserError, match="must start with redis://"):
        lw.kill("r", control="localhost:6379")


def test_a_password_is_not_shown_in_messages(server):
    plane = RedisControl(f"redis://:s3cret@127.0.0.1:{server.port}/0")
    try:
        assert "s3cret" not in plane.describe() and ":***@" in plane.describe()
    finally:
        plane.close()


def test_the_redis_package_missing_says_which_extra_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "redis", None)  # `import redis` raises ImportError
    monkeypatch.delitem(sys.modules, "loopwise._control.redis")
    with pytest.raises(lw.UserError, match=r"pip install 'loopwise\[redis\]'"):
        _control._redis_control("redis://localhost:6379")


# -- agent runs -------------------------------------------------------------------------


def _agent(tools, fn, store, url):
    return lw.Agent(FunctionModel(fn), tools=tools, store=store, limits=lw.Limits(budget_usd=None), control=url)


async def _wait_lease(plane: RedisControl, run_id: str, timeout: float = 20.0) -> None:
    with anyio.fail_after(timeout):
        while True:
            leases = await anyio.to_thread.run_sync(plane.leases)
            if run_id in leases and leases[run_id].live():
                return
            await anyio.sleep(0.02)


async def test_an_agent_run_whose_tool_sleeps_30s_is_killed_from_another_process(server, tmp_path, planes,
                                                                                  cached_controls):
    napping = anyio.Event()

    @lw.tool(timeout=60)
    async def nap() -> str:
        napping.set()
        await anyio.sleep(30)
        return "rested"

    store = lw.SQLiteStore(tmp_path / "lw.db")
    agent = _agent([nap], lambda r: ModelResponse(tool_calls=[ToolCall("nap", {})]), store, server.url)
    assert agent.control.name == "redis"
    result: dict[str, lw.RunResult] = {}

    async def go() -> None:
        result["r"] = await agent.run("sleep", run_id="napper", tags=["night"])

    t0 = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        await napping.wait()
        await _wait_lease(planes(server.url), "napper")
        # The killer's machine has none of this run's log: the lease in Redis is enough.
        out = await anyio.to_thread.run_sync(lambda: kill_from_child(tmp_path, server.url, run_id="napper"))
        assert out["n"] == 1
    elapsed = time.monotonic() - t0
    r = result["r"]
    assert r.stop_reason == "killed" and elapsed < 20, f"stopped after {elapsed:.1f} s; the tool sleeps 30 s"
    events = store.load("napper")
    received, finished = events[-2], events[-1]
    assert received.kind == "kill_received" and received.reason == "from a child"
    assert received.by.endswith(f"pid {out['pid']}")
    assert 0 <= finished.ts - received.requested_ts < 5.0
    store.close()


def test_a_run_in_another_process_on_redis_is_killed_from_here(server, tmp_path, planes, cached_controls):
    db = tmp_path / "lw.db"
    env = _env(tmp_path, LW_TEST_DIR=str(tmp_path), LOOPWISE_REDIS_URL=server.url)
    with open(tmp_path / "child.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loopwise", "run", "tests.durable_agents:sleeper",
                                 "--db", str(db), "--task", "sleep", "--tag", "remote"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    plane = planes(server.url)
    try:
        wait_until(lambda: (tmp_path / "napping").exists() or proc.poll() is not None, timeout=60,
                   what="the child's nap")
        assert proc.poll() is None, (tmp_path / "child.out").read_text()
        wait_until(lambda: len(plane.leases()) == 1, what="the child's lease in Redis")
        [(run_id, lease)] = plane.leases().items()
        assert lease.pid == proc.pid and lease.tags == ("remote",)
        t0 = time.monotonic()
        assert lw.kill(run_id, control=server.url, reason="stop over redis") == 1
        proc.wait(timeout=30)
        elapsed = time.monotonic() - t0
    finally:
        proc.kill()
        proc.wait()
    assert elapsed < 20
    store = lw.SQLiteStore(db)
    try:
        events = store.load(run_id)
    finally:
        store.close()
    received, finished = events[-2], events[-1]
    assert finished.stop_reason == "killed" and received.reason == "stop over redis"
    assert 0 <= finished.ts - received.requested_ts < 5.0
    wait_until(lambda: plane.leases() == {}, what="the release of the lease")


async def test_a_run_goes_on_through_a_redis_restart_and_a_later_kill_lands(server, tmp_path, planes,
                                                                            cached_controls):
    steps: list[str] = []
    last = anyio.Event()

    @lw.tool(timeout=60)
    async def work(n: int) -> str:
        if n == 1:
            await anyio.to_thread.run_sync(server.stop)
        elif n == 2:
            await anyio.sleep(1.5)  # Redis stays down a while; the run does not wait on it
        elif n == 3:
            await anyio.to_thread.run_sync(server.start)
        else:
            last.set()
            await anyio.sleep(30)
        steps.append(f"step {n}")
        return f"step {n} ok"

    def fn(request: ModelRequest) -> ModelResponse:
        n = sum(1 for m in request.messages if m.role == "tool") + 1
        return ModelResponse(tool_calls=[ToolCall("work", {"n": n})])

    store = lw.SQLiteStore(tmp_path / "lw.db")
    agent = _agent([work], fn, store, server.url)
    result: dict[str, lw.RunResult] = {}

    async def go() -> None:
        result["r"] = await agent.run("work", run_id="through")

    async with anyio.create_task_group() as tg:
        tg.start_soon(go)
        await last.wait()
        assert steps == ["step 1", "step 2", "step 3"]
        # The restarted Redis lost the lease; the run's process wrote it again.
        await _wait_lease(planes(server.url), "through")
        out = await anyio.to_thread.run_sync(lambda: kill_from_child(tmp_path, server.url, run_id="through"))
        assert out["n"] == 1
    r = result["r"]
    assert r.stop_reason == "killed" and r.iterations == 4
    assert store.load("through")[-2].reason == "from a child"
    store.close()


def test_loopwise_kill_reaches_a_run_on_a_machine_without_its_database(server, tmp_path, planes, cached_controls):
    # The runner writes its log to its own database; the operator's machine has none:
    # the run's lease in Redis is enough for `loopwise kill RUN_ID --redis URL`.
    db = tmp_path / "runner.db"
    env = _env(tmp_path, LW_TEST_DIR=str(tmp_path), LOOPWISE_REDIS_URL=server.url)
    with open(tmp_path / "child.out", "w") as out:
        proc = subprocess.Popen([sys.executable, "-m", "loopwise", "run", "tests.durable_agents:sleeper",
                                 "--db", str(db), "--task", "sleep"],
                                cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)
    plane = planes(server.url)
    try:
        wait_until(lambda: len(plane.leases()) == 1 or proc.poll() is not None, timeout=60, what="the lease")
        assert proc.poll() is None, (tmp_path / "child.out").read_text()
        [run_id] = plane.leases()
        operator = _env(tmp_path)
        killer = subprocess.run(
            [sys.executable, "-m", "loopwise", "kill", run_id, "--redis", server.url, "--reason", "from afar",
             "--db", str(tmp_path / "operator-has-no.db")],
            cwd=ROOT, env=operator, capture_output=True, text=True, timeout=60,
        )
        assert killer.returncode == 0, killer.stderr
        assert "kill sent to 1 run" in killer.stdout
        proc.wait(timeout=30)
    finally:
        proc.kill()
        proc.wait()
    assert not (tmp_path / "operator-has-no.db").exists()
    store = lw.SQLiteStore(db)
    try:
        finished = store.load(run_id)[-1]
    finally:
        store.close()
    assert finished.stop_reason == "killed" and finished.reason.endswith(": from afar")


def test_a_kill_of_a_tag_or_all_reaches_the_runs_attached_before_it(server, raw, runs, planes):
    """Published to every process: matched against the runs attached there, leased or not yet."""
    plane = planes(server.url)
    other = planes(server.url)  # another process, as far as this one can tell
    for run_id, tags in (("a", ("nightly",)), ("b", ("nightly", "eu")), ("c", ("eu",))):
        runs.attach(plane, run_id, tags)
    wait_until(lambda: subscribed(raw), what="the subscription")
    other.record_broadcast("nightly", KillRequest("", "tagged", "tester", time.time()))
    assert runs.wait("a").reason == "tagged" and runs.wait("b").reason == "tagged"
    made = time.time()
    time.sleep(0.01)
    runs.attach(plane, "late", ("nightly", "eu"))  # attached after that kill, and after the next one was made
    other.record_broadcast(None, KillRequest("", "all, made before late", "tester", made))
    assert runs.wait("c").reason == "all, made before late"
    other.record_broadcast(None, KillRequest("", "all", "tester", time.time()))
    assert runs.wait("late").reason == "all"
