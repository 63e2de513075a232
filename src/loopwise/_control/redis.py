"""The control plane on Redis: leases and kill requests that reach runs on any machine.

What is stored (``{prefix}`` defaults to ``loopwise``):

```
{prefix}:leases          hash   run id -> lease JSON (owner, host, pid, tags, acquired, heartbeat)
{prefix}:kill:{run_id}   string the latest kill request JSON (run_id, reason, by, ts); expires after a day
{prefix}:kills           pub/sub channel: a JSON list of kill requests, published after they are stored
```

A kill is stored first, then published. Each process with runs attached has two
daemon threads, so that the runs' event loops never wait on Redis:

- the *subscriber* listens on the channel and hands each request to its run at once;
- the *writer* writes the leases of runs as they attach, releases them as they
  detach, refreshes all of them every `HEARTBEAT_S` in one round trip, and reads the
  kill keys of all attached runs every `RECHECK_S` (one ``MGET``): a backstop for a
  notification that was lost.

When Redis goes away the runs go on. Both threads reconnect with backoff and log
once per outage on the ``loopwise`` logger. After reconnecting they write this
process's leases again (a restarted Redis without persistence lost them) and read
the kill keys of every attached run, so a kill stored while the subscriber was away
is still delivered. Calls that must answer (`record_kills`, `acquire`, `leases`,
`pending_kill`) raise `UserError` while Redis is unreachable, saying that nothing
was stored: a kill is never claimed that did not happen.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections.abc import Callable, Iterable
from typing import Any, TypeVar
from urllib.parse import urlsplit, urlunsplit

from . import plane as _control_plane
from .plane import HOST, Attachable, ControlPlane, KillRequest, Lease, _log, _owner
from .._errors import UserError

try:
    import redis
    from redis.backoff import ExponentialBackoff, NoBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised by an install without the extra
    if getattr(exc, "name", "") == "redis":
        raise UserError("the Redis control plane needs the redis package: pip install 'loopwise[redis]'") from None
    raise

__all__ = ["KILL_TTL_S", "RECHECK_S", "RedisControl"]

#: How often the writer reads the kill keys of attached runs (a backstop to pub/sub).
RECHECK_S = 1.0
#: How long a kill request is kept in Redis.
KILL_TTL_S = 24 * 3600
#: Reconnection backoff: first wait, longest wait (seconds).
_BACKOFF_S = (0.05, 1.0)
#: Timeouts of one Redis call (seconds): a blocked network must not hang a thread for long.
_CONNECT_TIMEOUT_S = 2.0
_SOCKET_TIMEOUT_S = 5.0
#: How long the subscriber blocks on one read before it looks at whether it should stop.
_LISTEN_S = 0.25
_CHUNK = 1000

T = TypeVar("T")

# Writes leases: each (run id, lease) pair is written if the field is absent, ours, or
# stale; a live lease of another owner is left alone and its run id returned.
_PUT = """
local lost = {}
local owner, now, ttl = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 4, #ARGV, 2 do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  local ok, held = true, nil
  if cur then ok, held = pcall(cjson.decode, cur) end
  if cur and ok and type(held) == 'table' and held.owner ~= owner
     and tonumber(held.heartbeat) and now - tonumber(held.heartbeat) < ttl then
    lost[#lost + 1] = ARGV[i]
  else
    redis.call('HSET', KEYS[1], ARGV[i], ARGV[i + 1])
  end
end
return lost
"""

# Releases leases: deletes each run id's field only if this owner holds it.
_DROP = """
local owner = ARGV[1]
for i = 2, #ARGV do
  local cur = redis.call('HGET', KEYS[1], ARGV[i])
  if cur then
    local ok, held = pcall(cjson.decode, cur)
    if not ok or type(held) ~= 'table' or held.owner == owner then redis.call('HDEL', KEYS[1], ARGV[i]) end
  end
end
return 0
"""

# Compare and set one field: set ARGV[3] if the field's value is ARGV[2] ('' = absent).
_CAS = """
local cur = redis.call('HGET', KEYS[1], ARGV[1])
if (cur or '') == ARGV[2] then redis.call('HSET', KEYS[1], ARGV[1], ARGV[3]) return 1 end
return 0
"""

_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OSError)


def _redact(url: str) -> str:
    """`url` without its password."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable URL>"
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if parts.port is not None:
        host = f"{host}:{parts.port}"
    user = f"{parts.username}:***@" if parts.username else ":***@"
    return urlunsplit((parts.scheme, user + host, parts.path, parts.query, parts.fragment))


def _lease_json(run_id: str, tags: Iterable[str], acquired: float, heartbeat: float) -> str:
    return json.dumps({"owner": _owner(), "host": HOST, "pid": os.getpid(), "tags": list(tags),
                       "acquired": acquired, "heartbeat": heartbeat}, separators=(",", ":"))


def _text(reply: bytes | str) -> str:
    """A reply of our clients: already str (they decode responses); bytes only if that changes."""
    return reply if isinstance(reply, str) else reply.decode()


def _parse_lease(run_id: str, raw: str) -> Lease | None:
    try:
        d = json.loads(raw)
        return Lease(run_id, str(d["owner"]), str(d["host"]), int(d["pid"]), tuple(map(str, d["tags"])),
                     float(d["acquired"]), float(d["heartbeat"]))
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("loopwise control plane (redis): ignoring a malformed lease of run %s (%s): %r",
                     run_id, exc, raw[:200])
        return None


def _request_dict(r: KillRequest) -> dict[str, Any]:
    return {"run_id": r.run_id, "reason": r.reason, "by": r.by, "ts": r.ts}


def _parse_request(d: Any) -> KillRequest | None:
    try:
        return KillRequest(str(d["run_id"]), str(d["reason"]), str(d["by"]), float(d["ts"]))
    except (KeyError, TypeError, ValueError):
        _log.warning("loopwise control plane (redis): ignoring a malformed kill request: %r", str(d)[:200])
        return None


class RedisControl(ControlPlane):
    """The control plane on a Redis server: kill by id, tag or all, reaching runs on any machine.

    Args:
        url: ``redis://[:password@]host[:port][/db]``, ``rediss://...`` (TLS) or
            ``unix:///path/to/socket``.
        prefix: The prefix of every key, so that several deployments can share a server.

    Raises:
        UserError: `url` or `prefix` is malformed.
    """

    name = "redis"

    def __init__(self, url: str, *, prefix: str = "loopwise") -> None:
        if not isinstance(url, str) or not url.startswith(("redis://", "rediss://", "unix://")):
            raise UserError(f"the Redis URL must start with redis://, rediss:// or unix://, got {url!r} "
                            "(for example redis://localhost:6379/0)")
        if not isinstance(prefix, str) or not prefix or any(c.isspace() for c in prefix):
            raise UserError(f"prefix must be a non-empty str without spaces, got {prefix!r}")
        self.url = url
        self.prefix = prefix
        self._shown = _redact(url)
        self._leases_key = f"{prefix}:leases"
        self._channel = f"{prefix}:kills"
        # Blocking calls (kill, resume, views): one reconnection attempt covers a pooled
        # connection that a restart of the server left dead.
        self._client = self._new_client(Retry(ExponentialBackoff(cap=0.2, base=0.02), 1))
        self._cas = self._client.register_script(_CAS)

        self._lock = threading.Lock()
        self._runs: dict[str, Attachable] = {}
        self._acquired: dict[str, float] = {}
        self._to_attach: list[str] = []
        self._to_detach: list[str] = []
        self._resync = True
        self._wake = threading.Event()
        self._stop = threading.Event()  # set by close(): the current threads end
        self._threads: dict[str, threading.Thread] = {}
        self._failing: set[str] = set()
        self._down_since = 0.0
        self._outage_logged = False

    def _new_client(self, retry: Retry) -> redis.Redis:
        try:
            return redis.Redis.from_url(
                self.url, decode_responses=True, retry=retry, socket_connect_timeout=_CONNECT_TIMEOUT_S,
                socket_timeout=_SOCKET_TIMEOUT_S, socket_keepalive=True, health_check_interval=10,
            )
        except ValueError as exc:
            raise UserError(f"malformed Redis URL {self._shown!r}: {exc} "
                            "(expected redis://[:password@]host[:port][/db])") from None

    def describe(self) -> str:
        return f"redis ({self._shown}, prefix {self.prefix!r})"

    def _kill_key(self, run_id: str) -> str:
        return f"{self.prefix}:kill:{run_id}"

    def _unreachable(self, exc: BaseException, consequence: str) -> UserError:
        return UserError(f"the Redis control plane at {self._shown} is unreachable "
                         f"({type(exc).__name__}: {exc}): {consequence}. Check that Redis runs at that URL "
                         "($LOOPWISE_REDIS_URL or control=...), then try again")

    def _call(self, fn: Callable[[], T], consequence: str) -> T:
        try:
            return fn()
        except _UNAVAILABLE as exc:
            raise self._unreachable(exc, consequence) from exc

    # -- the run's side: never blocks -----------------------------------------------

    def _attach(self, run: Attachable) -> None:
        now = time.time()
        with self._lock:
            self._runs[run.run_id] = run
            self._acquired.setdefault(run.run_id, now)
            self._to_attach.append(run.run_id)
            # Started on the first run, after close(), and in a forked child (threads do not survive a fork).
            for name, target in (("writer", self._write_loop), ("subscriber", self._listen_loop)):
                thread = self._threads.get(name)
                if thread is None or not thread.is_alive():
                    thread = threading.Thread(target=target, args=(self._stop,), name=f"loopwise-redis-{name}",
                                              daemon=True)
                    self._threads[name] = thread
                    thread.start()
        self._wake.set()

    def _detach(self, run_id: str) -> None:
        with self._lock:
            self._runs.pop(run_id, None)
            self._acquired.pop(run_id, None)
            self._to_detach.append(run_id)
        self._wake.set()

    # -- outages: logged once each ----------------------------------------------------

    def _down(self, who: str, exc: BaseException) -> None:
        """`who` (a thread) lost Redis. Said once per outage, and only while runs are here to care."""
        with self._lock:
            if not self._failing:
                self._down_since = time.monotonic()
                self._resync = True
            self._failing.add(who)
            say = not self._outage_logged and bool(self._runs)
            self._outage_logged |= say
        if say:
            _log.warning("loopwise control plane: Redis at %s is unreachable (%s: %s); runs go on, and kills "
                         "from other processes reach them once it is back; reconnecting",
                         self._shown, type(exc).__name__, exc)

    def _up(self, who: str) -> None:
        with self._lock:
            if who not in self._failing:
                return
            self._failing.discard(who)
            say = not self._failing and self._outage_logged
            if not self._failing:
                self._outage_logged = False
            n = len(self._runs)
        if say:
            _log.warning("loopwise control plane: Redis at %s is back after %.1f s; restoring the leases of "
                         "%d runs and checking them for kills", self._shown, time.monotonic() - self._down_since, n)

    def _backoff(self, delay: float, stop: threading.Event) -> float:
        """Wait `delay` (with jitter) unless closed; the next delay."""
        stop.wait(delay * random.uniform(0.8, 1.2))
        return min(delay * 2, _BACKOFF_S[1])

    # -- the writer thread ------------------------------------------------------------

    def _write_loop(self, stop: threading.Event) -> None:
        client = self._new_client(Retry(NoBackoff(), 1))
        put = client.register_script(_PUT)
        drop = client.register_script(_DROP)
        next_beat = next_check = 0.0
        delay = _BACKOFF_S[0]
        try:
            while not stop.is_set():
                with self._lock:
                    attach, self._to_attach = self._to_attach, []
                    detach, self._to_detach = self._to_detach, []
                    resync, self._resync = self._resync, False
                    runs = dict(self._runs)
                    acquired = dict(self._acquired)
                now = time.monotonic()
                beat = resync or now >= next_beat
                check = resync or now >= next_check
                try:
                    self._write(client, put, drop, runs, acquired,
                                runs if beat else {r: runs[r] for r in attach if r in runs},
                                [r for r in detach if r not in runs],
                                runs if check else {r: runs[r] for r in attach if r in runs})
                except _UNAVAILABLE as exc:
                    with self._lock:
                        self._to_detach[:0] = detach
                        self._resync = True
                    self._down("writer", exc)
                    delay = self._backoff(delay, stop)
                    continue
                except Exception as exc:  # noqa: BLE001 - a server-side error (OOM, READONLY replica, ...)
                    with self._lock:
                        self._to_detach[:0] = detach
                        self._resync = True
                    _log.warning("loopwise control plane: Redis at %s refused a write (%s: %s); retrying",
                                 self._shown, type(exc).__name__, exc, exc_info=not isinstance(exc, redis.RedisError))
                    delay = self._backoff(max(delay, 1.0), stop)
                    continue
                delay = _BACKOFF_S[0]
                self._up("writer")
                if beat:
                    next_beat = now + _control_plane.HEARTBEAT_S
                if check:
                    next_check = now + RECHECK_S
                with self._lock:
                    pending = bool(self._to_attach or self._to_detach or self._resync)
                    idle = not self._runs
                if pending:
                    continue
                self._wake.wait(None if idle else max(0.0, min(next_beat, next_check) - time.monotonic()))
                self._wake.clear()
        finally:
            client.close()

    def _write(self, client: redis.Redis, put: Any, drop: Any, runs: dict[str, Attachable],
               acquired: dict[str, float], write: dict[str, Attachable], release: list[str],
               check: dict[str, Attachable]) -> None:
        """One round trip: release leases, write leases, read kill keys; then deliver."""
        if not (write or release or check):
            return
        owner = _owner()
        now = time.time()
        pipe = client.pipeline(transaction=False)
        for i in range(0, len(release), _CHUNK):
            drop(keys=[self._leases_key], args=[owner, *release[i:i + _CHUNK]], client=pipe)
        ids = list(write)
        for i in range(0, len(ids), _CHUNK):
            args: list[Any] = [owner, now, _control_plane.LEASE_TTL_S]
            for run_id in ids[i:i + _CHUNK]:
                args += [run_id, _lease_json(run_id, write[run_id].tags, acquired.get(run_id, now), now)]
            put(keys=[self._leases_key], args=args, client=pipe)
        checked = list(check)
        for i in range(0, len(checked), _CHUNK):
            pipe.mget([self._kill_key(r) for r in checked[i:i + _CHUNK]])
        replies = pipe.execute()
        n_drop = (len(release) + _CHUNK - 1) // _CHUNK
        n_put = (len(ids) + _CHUNK - 1) // _CHUNK
        lost = [r for reply in replies[n_drop:n_drop + n_put] for r in reply]
        if lost:
            _log.warning("loopwise control plane: the leases of runs %s are held by another live process (a "
                         "resume elsewhere took them while this one was out of touch); this process does not "
                         "overwrite them", ", ".join(lost[:10]) + (" ..." if len(lost) > 10 else ""))
        values = [v for reply in replies[n_drop + n_put:] for v in reply]
        for run_id, raw in zip(checked, values, strict=True):
            if raw is None:
                continue
            try:
                request = _parse_request(json.loads(raw))
            except ValueError:
                request = None
            if request is not None and request.run_id == run_id:
                check[run_id].deliver(request)

    # -- the subscriber thread --------------------------------------------------------

    def _listen_loop(self, stop: threading.Event) -> None:
        client = self._new_client(Retry(NoBackoff(), 0))
        delay = _BACKOFF_S[0]
        try:
            while not stop.is_set():
                pubsub = client.pubsub()
                try:
                    pubsub.subscribe(self._channel)
                    while not stop.is_set():
                        message = pubsub.get_message(timeout=_LISTEN_S)
                        if message is None:
                            continue
                        if message["type"] == "subscribe":
                            # Listening from now on; what was stored before, the writer reads.
                            with self._lock:
                                self._resync = True
                            self._wake.set()
                            self._up("subscriber")
                            delay = _BACKOFF_S[0]
                        elif message["type"] == "message":
                            self._on_message(message["data"])
                except _UNAVAILABLE as exc:
                    self._down("subscriber", exc)
                    delay = self._backoff(delay, stop)
                except Exception as exc:  # noqa: BLE001 - the thread must not die: runs would go deaf
                    _log.warning("loopwise control plane: the Redis subscriber failed (%s: %s); subscribing again",
                                 type(exc).__name__, exc, exc_info=not isinstance(exc, redis.RedisError))
                    delay = self._backoff(max(delay, 1.0), stop)
                finally:
                    try:
                        pubsub.close()
                    except Exception:  # noqa: BLE001 - closing a broken connection
                        pass
        finally:
            client.close()

    def _on_message(self, data: str) -> None:
        try:
            items = json.loads(data)
        except ValueError:
            _log.warning("loopwise control plane (redis): ignoring a malformed message on %s: %r",
                         self._channel, data[:200])
            return
        for item in items if isinstance(items, list) else [items]:
            request = _parse_request(item)
            if request is None:
                continue
            if request.run_id == "":  # a kill of every run, or of a tag's (`record_broadcast`)
                tag = item.get("tag")
                with self._lock:
                    targets = [r for r in self._runs.values() if (tag is None or tag in r.tags)
                               and self._acquired.get(r.run_id, request.ts) <= request.ts]
                for run in targets:
                    run.deliver(KillRequest(run.run_id, request.reason, request.by, request.ts))
                continue
            with self._lock:
                target = self._runs.get(request.run_id)
            if target is not None:
                target.deliver(request)

    # -- blocking calls ---------------------------------------------------------------

    def acquire(self, run_id: str, tags: Iterable[str]) -> None:
        tags = tuple(tags)
        consequence = f"the lease of run {run_id} was not taken (the run was not resumed)"
        for _ in range(20):
            raw = self._call(lambda: self._client.hget(self._leases_key, run_id), consequence)
            now = time.time()
            if raw is not None:
                lease = _parse_lease(run_id, _text(raw))
                with self._lock:
                    ours_released = lease is not None and lease.owner == _owner() and run_id not in self._runs
                if lease is not None and lease.live(now) and not ours_released:
                    raise UserError(
                        f"run {run_id} is being executed by {lease.host} pid {lease.pid} (its lease was renewed "
                        f"{now - lease.heartbeat:.0f} s ago); stop it with `loopwise kill {run_id}` or wait for "
                        f"it to end (a dead process's lease expires after {_control_plane.LEASE_TTL_S:g} s)"
                    )
            value = _lease_json(run_id, tags, now, now)
            # (called at once, in this iteration: the lambda sees this iteration's raw and value)
            taken = self._call(lambda: self._cas(keys=[self._leases_key], args=[run_id, raw or "", value]),
                               consequence)
            if taken:
                with self._lock:  # a release of our earlier lease, still queued, must not drop this one
                    self._to_detach = [r for r in self._to_detach if r != run_id]
                    self._acquired[run_id] = now
                return
            # The lease changed between reading and writing it (a heartbeat): look again.
        raise UserError(f"could not take the lease of run {run_id}: it kept changing (another process is "
                        "renewing it); try again")

    def leases(self, run_ids: Iterable[str] | None = None) -> dict[str, Lease]:
        consequence = "could not read which runs are running (nothing was stored; no kill was sent)"
        if run_ids is None:
            everything = self._call(lambda: self._client.hgetall(self._leases_key), consequence)
            items = [(_text(r), _text(v)) for r, v in everything.items()]
        else:
            ids = list(dict.fromkeys(run_ids))
            items = []
            for i in range(0, len(ids), _CHUNK):
                chunk = ids[i:i + _CHUNK]
                # (called at once, in this iteration: the lambda sees this iteration's chunk)
                values = self._call(lambda: self._client.hmget(self._leases_key, chunk), consequence)
                items += [(r, _text(v)) for r, v in zip(chunk, values, strict=True) if v is not None]
        out = {}
        for run_id, raw in items:
            lease = _parse_lease(run_id, raw)
            if lease is not None:
                out[run_id] = lease
        return out

    def record_kills(self, requests: list[KillRequest]) -> None:
        if not requests:
            return

        def store() -> None:
            pipe = self._client.pipeline(transaction=True)
            for r in requests:
                pipe.set(self._kill_key(r.run_id), json.dumps(_request_dict(r)), ex=KILL_TTL_S)
            for i in range(0, len(requests), _CHUNK):
                pipe.publish(self._channel, json.dumps([_request_dict(r) for r in requests[i:i + _CHUNK]]))
            pipe.execute()

        n = len(requests)
        self._call(store, f"the kill of {n} run{'s' if n != 1 else ''} was NOT stored and no run was signalled "
                          "(a kill is safe to repeat)")

    def record_broadcast(self, tag: str | None, request: KillRequest) -> None:
        """Published only (an older loopwise ignores it): it reaches the runs attached when it is sent.

        The leased runs also get a stored kill each (`record_kills`); this is for those
        whose lease the writer thread has not written yet.
        """
        message = json.dumps([{**_request_dict(request), "run_id": "", "tag": tag}])
        self._call(lambda: self._client.publish(self._channel, message),
                   "the kill was NOT sent to the runs too young for a lease (a kill is safe to repeat)")

    def pending_kill(self, run_id: str) -> KillRequest | None:
        raw = self._call(lambda: self._client.get(self._kill_key(run_id)),
                         f"could not read whether run {run_id} was killed")
        if raw is None:
            return None
        try:
            return _parse_request(json.loads(raw))
        except ValueError:
            return None

    def close(self) -> None:
        """Stop the threads and close the connections (leases of attached runs expire on their own).

        Attaching a run afterwards starts them again.
        """
        with self._lock:
            threads, self._threads = list(self._threads.values()), {}
            stop, self._stop = self._stop, threading.Event()
        stop.set()
        self._wake.set()
        for t in threads:
            if t is not threading.current_thread():
                t.join(timeout=5.0)
        self._client.close()
