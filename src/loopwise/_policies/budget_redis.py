"""A shared budget on Redis: reservations from any machine, each one atomic Lua script.

What is stored for a budget named ``NAME`` (the keys of one budget, nothing else):

```
loopwise:budget:NAME          hash  usd_p, tokens (the limits: pico-dollars, tokens; '' for none),
                                    spent_p, spent_t, reserved_p, reserved_t, overruns, overrun_p
loopwise:budget:NAME:holds    hash  reservation token -> "usd_p tokens owner"
loopwise:budget:NAME:expiry   zset  reservation token -> when it expires (ms, the server's clock)
```

`_RESERVE` declares the budget on first use (its limits are stored; another process
declaring other limits under the name gets an error), gives back expired
reservations, checks ``spent + reserved + needed <= limit`` and holds the amount, in
one step. `_SETTLE` replaces a reservation by its actual spend (an actual above it
is recorded, and counted as an overrun); `_RELEASE` gives it back; `_REFRESH` (the
keeper, every few seconds) pushes the expiry of this process's open reservations
forward. Expiry is judged by the server's clock, so the machines' clocks do not
matter. Amounts are integers in Lua's doubles: exact up to 2**53 pico-dollars
($9,007), within a few pico-dollars above.

A call that cannot reach Redis raises `Unreachable`; after one, reservations fail at
once for `_FAIL_FAST_S` (a loop of many runs does not wait a connect timeout per
call).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any, TypeVar

from . import budget_shared as _budget_shared
from .budget_shared import Keeper, Ledger, Refused, _log
from .._control.plane import _owner
from .._control.redis import _redact
from .._errors import UserError

try:
    import redis
    from redis.backoff import ExponentialBackoff
    from redis.retry import Retry
except ImportError as exc:  # pragma: no cover - exercised by an install without the extra
    if getattr(exc, "name", "") == "redis":
        raise UserError("a Budget shared on Redis needs the redis package: pip install 'loopwise[redis]'") from None
    raise

__all__ = ["RedisLedger", "keys_of"]

_CONNECT_TIMEOUT_S = 1.0
_SOCKET_TIMEOUT_S = 2.0
_FAIL_FAST_S = 1.0
_UNAVAILABLE = (redis.ConnectionError, redis.TimeoutError, OSError)

T = TypeVar("T")

_LIB = """
local function n(x) return tonumber(x) or 0 end
local function s(x) return string.format('%.0f', x) end
local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end
local function parse(h)
  local p, t, owner = string.match(h, '^(%d+) (%d+) ?(.*)$')
  return n(p), n(t), owner or ''
end
-- Gives back the reservations whose expiry has passed.
local function reclaim(b, holds, expiry, now)
  local gone = redis.call('ZRANGEBYSCORE', expiry, '-inf', now)
  if #gone == 0 then return end
  local v = redis.call('HMGET', b, 'reserved_p', 'reserved_t')
  local rp, rt = n(v[1]), n(v[2])
  for _, tok in ipairs(gone) do
    local h = redis.call('HGET', holds, tok)
    if h then
      local p, t = parse(h)
      rp, rt = rp - p, rt - t
      redis.call('HDEL', holds, tok)
    end
    redis.call('ZREM', expiry, tok)
  end
  redis.call('HSET', b, 'reserved_p', s(rp), 'reserved_t', s(rt))
end
-- Stores the limits on first use; {'limits', usd_p, tokens} when others are stored.
local function declare(b, usd_p, tokens)
  local lim = redis.call('HMGET', b, 'usd_p', 'tokens')
  if not lim[1] then
    redis.call('HSET', b, 'usd_p', usd_p, 'tokens', tokens, 'spent_p', '0', 'spent_t', '0',
               'reserved_p', '0', 'reserved_t', '0', 'overruns', '0', 'overrun_p', '0')
  elseif lim[1] ~= usd_p or lim[2] ~= tokens then
    return {'limits', lim[1], lim[2]}
  end
  return nil
end
"""

# KEYS: budget, holds, expiry. ARGV: limit_p, limit_t ('' none), token, fixed_p, fixed_t,
# out_rate, floor, cap ('' none), ttl_ms, owner. -> {'ok', n ('' when nothing capped it)} | {'usd'|'tokens', limit,
# spent, reserved, needed} | {'limits', usd_p, tokens} | {'held'}
_RESERVE = _LIB + """
local now = now_ms()
local bad = declare(KEYS[1], ARGV[1], ARGV[2])
if bad then return bad end
if redis.call('HEXISTS', KEYS[2], ARGV[3]) == 1 then return {'held'} end
reclaim(KEYS[1], KEYS[2], KEYS[3], now)
local v = redis.call('HMGET', KEYS[1], 'spent_p', 'reserved_p', 'spent_t', 'reserved_t')
local sp, rp, st, rt = n(v[1]), n(v[2]), n(v[3]), n(v[4])
local fp, ft, rate, floor = n(ARGV[4]), n(ARGV[5]), n(ARGV[6]), n(ARGV[7])
local cap = tonumber(ARGV[8])
if ARGV[1] ~= '' then
  local avail = n(ARGV[1]) - sp - rp
  if avail < fp + floor * rate then return {'usd', ARGV[1], s(sp), s(rp), s(fp + floor * rate)} end
  if rate > 0 then
    local afford = math.floor((avail - fp) / rate)
    while afford > 0 and fp + afford * rate > avail do afford = afford - 1 end
    while fp + (afford + 1) * rate <= avail do afford = afford + 1 end
    if cap == nil or afford < cap then cap = afford end
  end
end
if ARGV[2] ~= '' then
  local avail = n(ARGV[2]) - st - rt
  if avail < ft + floor then return {'tokens', ARGV[2], s(st), s(rt), s(ft + floor)} end
  if cap == nil or avail - ft < cap then cap = avail - ft end
end
local out = cap or 0
local p, t = fp + out * rate, ft + out
redis.call('HSET', KEYS[1], 'reserved_p', s(rp + p), 'reserved_t', s(rt + t))
redis.call('HSET', KEYS[2], ARGV[3], s(p) .. ' ' .. s(t) .. ' ' .. ARGV[10])
redis.call('ZADD', KEYS[3], now + n(ARGV[9]), ARGV[3])
if cap == nil then return {'ok', ''} end
return {'ok', s(cap)}
"""

# KEYS: budget, holds. ARGV: token, usd_p, tokens (smaller than held). -> 'ok' | 'unknown'
_RESIZE = _LIB + """
local h = redis.call('HGET', KEYS[2], ARGV[1])
if not h then return 'unknown' end
local p, t, owner = parse(h)
local v = redis.call('HMGET', KEYS[1], 'reserved_p', 'reserved_t')
redis.call('HSET', KEYS[1], 'reserved_p', s(n(v[1]) - p + n(ARGV[2])), 'reserved_t', s(n(v[2]) - t + n(ARGV[3])))
redis.call('HSET', KEYS[2], ARGV[1], ARGV[2] .. ' ' .. ARGV[3] .. ' ' .. owner)
return 'ok'
"""

# KEYS: budget, holds, expiry. ARGV: token, actual_p, actual_t, over (1/0) -> 'ok' | 'unknown'
# (never held, already settled or released, or expired: nothing is changed).
_SETTLE = _LIB + """
local h = redis.call('HGET', KEYS[2], ARGV[1])
if not h then return 'unknown' end
local p, t = parse(h)
local v = redis.call('HMGET', KEYS[1], 'spent_p', 'reserved_p', 'spent_t', 'reserved_t', 'overruns', 'overrun_p')
local ap, at = n(ARGV[2]), n(ARGV[3])
redis.call('HSET', KEYS[1], 'spent_p', s(n(v[1]) + ap), 'reserved_p', s(n(v[2]) - p),
           'spent_t', s(n(v[3]) + at), 'reserved_t', s(n(v[4]) - t))
if ARGV[4] == '1' then
  redis.call('HSET', KEYS[1], 'overruns', s(n(v[5]) + 1), 'overrun_p', s(n(v[6]) + math.max(0, ap - p)))
end
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 'ok'
"""

# KEYS: budget, holds, expiry. ARGV: token -> 'ok' | 'unknown'
_RELEASE = _LIB + """
local h = redis.call('HGET', KEYS[2], ARGV[1])
if not h then return 'unknown' end
local p, t = parse(h)
local v = redis.call('HMGET', KEYS[1], 'reserved_p', 'reserved_t')
redis.call('HSET', KEYS[1], 'reserved_p', s(n(v[1]) - p), 'reserved_t', s(n(v[2]) - t))
redis.call('HDEL', KEYS[2], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
return 'ok'
"""

# KEYS: budget. ARGV: limit_p, limit_t, usd_p, tokens -> 'ok' | {'limits', ...}
_CHARGE = _LIB + """
local bad = declare(KEYS[1], ARGV[1], ARGV[2])
if bad then return bad end
local v = redis.call('HMGET', KEYS[1], 'spent_p', 'spent_t')
redis.call('HSET', KEYS[1], 'spent_p', s(n(v[1]) + n(ARGV[3])), 'spent_t', s(n(v[2]) + n(ARGV[4])))
return 'ok'
"""

# KEYS: holds, expiry. ARGV: ttl_ms, token... -> the tokens no longer held (expired meanwhile).
_REFRESH = _LIB + """
local at = now_ms() + n(ARGV[1])
local missing = {}
for i = 2, #ARGV do
  if redis.call('HEXISTS', KEYS[1], ARGV[i]) == 1 then
    redis.call('ZADD', KEYS[2], at, ARGV[i])
  else
    missing[#missing + 1] = ARGV[i]
  end
end
return missing
"""

# KEYS: budget, holds, expiry -> {} (no such budget) | the six numbers, expired reservations reclaimed.
_STATE = _LIB + """
if redis.call('EXISTS', KEYS[1]) == 0 then return {} end
reclaim(KEYS[1], KEYS[2], KEYS[3], now_ms())
return redis.call('HMGET', KEYS[1], 'spent_p', 'reserved_p', 'spent_t', 'reserved_t', 'overruns', 'overrun_p')
"""


def keys_of(name: str) -> tuple[str, str, str]:
    """The keys of budget `name`: its hash, its reservations, their expiry."""
    base = f"loopwise:budget:{name}"
    return base, f"{base}:holds", f"{base}:expiry"


class _Server:
    """This process's connection to one Redis URL, its scripts and its keeper."""

    def __init__(self, url: str) -> None:
        self.shown = _redact(url)
        try:
            self.client = redis.Redis.from_url(
                url, decode_responses=True, retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
                socket_connect_timeout=_CONNECT_TIMEOUT_S, socket_timeout=_SOCKET_TIMEOUT_S,
                socket_keepalive=True, health_check_interval=10,
            )
        except ValueError as exc:
            raise UserError(f"malformed Redis URL {self.shown!r} in Budget(backend=...): {exc} "
                            "(expected redis://[:password@]host[:port][/db])") from None
        s = self.client.register_script
        self.reserve, self.resize, self.settle = s(_RESERVE), s(_RESIZE), s(_SETTLE)
        self.release, self.charge, self.refresh, self.state = s(_RELEASE), s(_CHARGE), s(_REFRESH), s(_STATE)
        self.keeper = Keeper(f"Redis at {self.shown}", self._beat)
        self._down_until = 0.0
        self._down: BaseException | None = None

    def call(self, fn: Callable[[], T]) -> T:
        """`fn()`, failing fast (the last error) for a moment after Redis was found down."""
        if time.monotonic() < self._down_until and self._down is not None:
            raise self._down
        try:
            return fn()
        except _UNAVAILABLE as exc:
            self._down, self._down_until = exc, time.monotonic() + _FAIL_FAST_S
            raise

    def _beat(self, held: dict[Ledger, list[str]]) -> None:
        ttl_ms = int(_budget_shared.RESERVATION_TTL_S * 1000)
        pipe = self.client.pipeline(transaction=False)
        ledgers = list(held)
        for ledger in ledgers:
            _, holds, expiry = keys_of(ledger.name)
            self.refresh(keys=[holds, expiry], args=[ttl_ms, *held[ledger]], client=pipe)
        for ledger, missing in zip(ledgers, self.call(pipe.execute), strict=True):
            # (A reservation settled or released meanwhile was dropped before its script ran.)
            lost = [token for token in missing if self.keeper.drop(ledger, token)]
            if lost:
                _log.error("loopwise shared budgets: %d reservations on budget %r expired while this process held "
                           "them (Redis at %s was out of reach for %g s or more); they no longer count",
                           len(lost), ledger.name, self.shown, _budget_shared.RESERVATION_TTL_S)


_servers: dict[str, _Server] = {}
_servers_lock = threading.Lock()


def _server(url: str) -> _Server:
    with _servers_lock:
        server = _servers.get(url)
        if server is None:
            server = _servers[url] = _Server(url)
        return server


def _limit(value: int | None) -> str:
    return "" if value is None else str(value)


class RedisLedger(Ledger):
    """Budget `name` on the Redis server at `url` (see the module docstring for its keys)."""

    def __init__(self, url: str, name: str, limit_p: int | None, limit_t: int | None) -> None:
        super().__init__(name, limit_p, limit_t)
        self._server = _server(url)
        self._keys = list(keys_of(name))

    def describe(self) -> str:
        return self._server.shown

    def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        try:
            return self._server.call(lambda: script(keys=keys, args=args))
        except _UNAVAILABLE as exc:
            raise self._unreachable(exc) from exc

    def _limits_error(self, stored: list[Any]) -> UserError:
        def show(p: str | None, t: str | None) -> str:
            usd = "None" if not p else f"{int(p) / 10**12:g}"
            return f"usd={usd}, tokens={t or None}"

        return UserError(
            f"shared budget {self.name!r} at {self.describe()} was declared with {show(*stored[1:3])}; this "
            f"process declares {show(_limit(self.limit_p), _limit(self.limit_t))}: give every process the same "
            "limits, or use another name"
        )

    def reserve(self, token: str, fixed_p: int, fixed_t: int, out_rate: int, floor: int,
                cap: int | None) -> int | None:
        ttl_ms = int(_budget_shared.RESERVATION_TTL_S * 1000)
        reply = self._run(self._server.reserve, self._keys,
                          [_limit(self.limit_p), _limit(self.limit_t), token, fixed_p, fixed_t, out_rate, floor,
                           "" if cap is None else cap, ttl_ms, _owner()])
        if reply[0] == "ok":
            self._server.keeper.hold(self, token)
            return int(reply[1]) if reply[1] else None
        if reply[0] == "limits":
            raise self._limits_error(reply)
        if reply[0] == "held":
            raise UserError(f"reservation {token} is already held on shared budget {self.name!r}")
        raise Refused(reply[0], *(int(x) for x in reply[1:5]))

    def resize(self, token: str, usd_p: int, tokens: int) -> None:
        self._run(self._server.resize, self._keys[:2], [token, usd_p, tokens])

    def settle(self, token: str, actual_p: int, actual_t: int, over: bool) -> None:
        def write() -> None:
            reply = self._server.call(lambda: self._server.settle(keys=self._keys,
                                                                  args=[token, actual_p, actual_t, int(over)]))
            if reply == "unknown":  # expired while out of reach: the money is spent all the same
                _log.error("loopwise shared budgets: a reservation on budget %r expired before it was settled; "
                           "its spend is counted now", self.name)
                self.charge(actual_p, actual_t)

        self._write(write, token, f"settle a reservation on budget {self.name!r}")

    def release(self, token: str) -> None:
        self._write(lambda: self._server.call(lambda: self._server.release(keys=self._keys, args=[token])),
                    token, f"release a reservation on budget {self.name!r}")

    def charge(self, usd_p: int, tokens: int) -> None:
        reply = self._server.call(lambda: self._server.charge(
            keys=self._keys[:1], args=[_limit(self.limit_p), _limit(self.limit_t), usd_p, tokens]))
        if isinstance(reply, list):
            raise self._limits_error(reply)

    def _write(self, write: Callable[[], None], token: str, what: str) -> None:
        """Close reservation `token` with `write`; during an outage, keep it refreshed and retry."""
        keeper = self._server.keeper
        keeper.drop(self, token)  # first: a refresh racing the write must not find it gone and cry wolf
        try:
            write()
        except _UNAVAILABLE:
            keeper.hold(self, token)

            def retry() -> None:
                write()
                keeper.drop(self, token)

            keeper.later(what, retry)

    def state(self) -> tuple[int, int, int, int, int, int]:
        reply = self._run(self._server.state, self._keys, [])
        if not reply:
            return (0, 0, 0, 0, 0, 0)
        return tuple(int(x or 0) for x in reply)  # type: ignore[return-value]
