"""Which exceptions say that a tool's infrastructure failed, not that it answered "no".

A circuit breaker counts these by default (`CircuitBreaker`): a tool that cannot
reach its backend, or whose backend is down, fails for every caller alike, and
calling it again soon is waste. A tool that raised `ValueError("amount over the
refund limit")` worked: the next call, with other arguments, may well succeed.

Counted (`is_infrastructure`):

- `TimeoutError` (which `asyncio.TimeoutError` and `socket.timeout` are), and
  `ConnectionError` with its subclasses (refused, reset, aborted, broken pipe);
- an `OSError` of a network kind: a DNS failure (`socket.gaierror`, `socket.herror`),
  an `ssl.SSLError`, or one whose errno says the network or host is unreachable or
  down, the connection was refused, reset or aborted, or timed out;
- `urllib.error.URLError` for such a reason, and `urllib.error.HTTPError` with
  status 429 or 5xx;
- the HTTP clients' own, looked up only if the client is imported already (never
  imported here): httpx's (and httpx2's) timeouts, network, remote-protocol and proxy errors and
  `HTTPStatusError` with status 429 or 5xx; requests' `ConnectionError`, `Timeout`
  and `HTTPError` with status 429 or 5xx; aiohttp's `ClientConnectionError` and
  `ClientResponseError` with status 429 or 5xx; openai's (and anthropic's)
  `APIConnectionError` (timeouts included) and `APIStatusError` with status 429 or 5xx;
- loopwise's own: `ProcessCrashedError` and `ProcessStartError` (an
  `isolation="process"` tool's process died or did not start), `MCPConnectionError`;
- an exception raised ``from`` one of these (its `__cause__`), or an exception group
  holding one.
"""

from __future__ import annotations

import errno
import sys

__all__ = ["is_infrastructure"]

_NETWORK_ERRNOS = frozenset(
    getattr(errno, name) for name in (
        "ECONNREFUSED", "ECONNRESET", "ECONNABORTED", "ETIMEDOUT", "EHOSTUNREACH", "ENETUNREACH",
        "ENETDOWN", "EHOSTDOWN", "ENETRESET", "EPIPE", "ESHUTDOWN",
    ) if hasattr(errno, name)
)

# (module, exception class names that always count, class names that count for status 429/5xx)
_CLIENTS: tuple[tuple[str, tuple[str, ...], tuple[str, ...]], ...] = (
    ("httpx", ("TimeoutException", "NetworkError", "RemoteProtocolError", "ProxyError"), ("HTTPStatusError",)),
    ("httpx2", ("TimeoutException", "NetworkError", "RemoteProtocolError", "ProxyError"), ("HTTPStatusError",)),
    ("requests.exceptions", ("ConnectionError", "Timeout"), ("HTTPError",)),
    ("aiohttp", ("ClientConnectionError",), ("ClientResponseError",)),
    ("openai", ("APIConnectionError",), ("APIStatusError",)),
    ("anthropic", ("APIConnectionError",), ("APIStatusError",)),
    ("loopwise._tools.isolation", ("ProcessCrashedError", "ProcessStartError"), ()),
    ("loopwise.mcp", ("MCPConnectionError",), ()),
)

_MAX_DEPTH = 8  # causes and groups followed, at most


def _status(exc: BaseException) -> int | None:
    """The HTTP status an exception carries (on itself or its `response`), if any."""
    for holder in (exc, getattr(exc, "response", None)):
        for attr in ("status_code", "status", "code"):
            value = getattr(holder, attr, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    return None


def _server_side(status: int | None) -> bool:
    return status is not None and (status == 429 or 500 <= status <= 599)


def _classes(module: str, names: tuple[str, ...]) -> tuple[type, ...]:
    mod = sys.modules.get(module)
    if mod is None:
        return ()
    found = (getattr(mod, name, None) for name in names)
    return tuple(c for c in found if isinstance(c, type))


def _one(exc: BaseException) -> bool:
    urllib_error = sys.modules.get("urllib.error")  # (none of these is imported here: if the module is
    if urllib_error is not None:                     # not imported yet, no exception of it was raised)
        if isinstance(exc, urllib_error.HTTPError):  # (a URLError, and an OSError, too)
            return _server_side(exc.code)
        if isinstance(exc, urllib_error.URLError):
            reason = exc.reason
            return isinstance(reason, BaseException) and _one(reason)
    if isinstance(exc, (TimeoutError, ConnectionError, *_classes("socket", ("gaierror", "herror")),
                        *_classes("ssl", ("SSLError",)))):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    for module, always, by_status in _CLIENTS:
        if module not in sys.modules:
            continue
        if isinstance(exc, _classes(module, always)):
            return True
        if isinstance(exc, _classes(module, by_status)) and _server_side(_status(exc)):
            return True
    return False


def is_infrastructure(exc: BaseException, _depth: int = 0) -> bool:
    """True if `exc` says the tool could not reach, or was failed by, what it depends on."""
    if _one(exc):
        return True
    if _depth >= _MAX_DEPTH:
        return False
    if isinstance(exc, BaseExceptionGroup):
        return any(is_infrastructure(e, _depth + 1) for e in exc.exceptions)
    cause = exc.__cause__
    return cause is not None and is_infrastructure(cause, _depth + 1)
