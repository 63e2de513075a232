"""Budgets shared across processes: the ledger a named `Budget` keeps in Redis or SQLite.

```
Budget(usd=5.00, name="batch-42", backend="redis://host:6379/0")   any machine (`_policies.budget_redis`)
Budget(usd=5.00, name="batch-42", backend="runs.db" | SQLiteStore)  this machine (`_policies.budget_sqlite`)
```

A shared budget's numbers live in its backend, not in the process: each reservation
is one atomic step there (check ``spent + reserved + needed <= limit``, then hold),
and settling or releasing it is another. `_policies.budget.reserve` and `reserve_call` take
the in-process budgets' part first, then each shared budget's; when one refuses,
what was held is given back, so a reservation is on every budget or on none.

A reservation belongs to the process that took it. Each process has one *keeper*
thread per backend that refreshes its open reservations every `RESERVATION_TTL_S` / 6
(a tool call of an hour keeps its reservation), and retries what could not be
written (a settle during an outage). A reservation not refreshed for
`RESERVATION_TTL_S` — its process was SIGKILLed, or lost its backend — goes back to
the pool at the next reservation or read of that budget (on SQLite at once when its
process is gone, as leases are judged: `_control.plane.Lease.live`).

When the backend cannot be reached, a reservation fails with `BudgetUnavailable` (a
`BudgetExceeded`: the call is not made, the loop treats it as a refusal): a shared
budget is never spent unbudgeted. A settle that cannot be written is retried by the
keeper (the reservation it replaces is refreshed meanwhile), since that money is
spent; one still pending when the process exits is lost, and its reservation
expires.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from abc import ABC, abstractmethod
from collections.abc import Callable


__all__ = ["RESERVATION_TTL_S", "Keeper", "Ledger", "Refused", "Unreachable"]

_log = logging.getLogger("loopwise")

#: A reservation whose process stopped refreshing it for this long returns to the pool.
RESERVATION_TTL_S = 15.0
#: The keeper refreshes its reservations this many times per `RESERVATION_TTL_S`.
_BEATS_PER_TTL = 6
#: A keeper with nothing to keep for this long ends its thread (the next reservation starts one).
_IDLE_EXIT_S = 10.0


# Internal, not a LoopwiseError: `_policies.budget` raises it as `BudgetExceeded` (see `_errors`).
class Refused(Exception):
    """A shared budget's answer to a reservation that does not fit (amounts in pico-dollars or tokens)."""

    def __init__(self, limit: str, limit_value: int, spent: int, reserved: int, needed: int) -> None:
        super().__init__(limit)
        self.limit = limit
        self.limit_value = limit_value
        self.spent = spent
        self.reserved = reserved
        self.needed = needed


# Internal, not a LoopwiseError: `_policies.budget` raises it as `BudgetUnavailable` (see `_errors`).
class Unreachable(Exception):
    """The backend did not answer a reservation; `_policies.budget` raises it as `BudgetUnavailable`."""


class Ledger(ABC):
    """One named budget in a backend, as this process sees it. Amounts in pico-dollars.

    Args:
        name: The budget's name: what identifies it in the backend.
        limit_p: The dollar limit (pico-dollars), or `None`.
        limit_t: The token limit, or `None`.
    """

    def __init__(self, name: str, limit_p: int | None, limit_t: int | None) -> None:
        self.name = name
        self.limit_p = limit_p
        self.limit_t = limit_t

    @abstractmethod
    def describe(self) -> str:
        """Where the budget is kept (no password), for messages."""

    @abstractmethod
    def reserve(self, token: str, fixed_p: int, fixed_t: int, out_rate: int, floor: int,
                cap: int | None) -> int | None:
        """Hold ``fixed + n * (out_rate $, 1 token)`` with the largest ``n`` in [floor, cap] that fits.

        Plain reservations pass ``out_rate = floor = cap = 0``. Returns ``n`` (`None`, and
        0 held, when `cap` is `None` and no limit bounds it). Raises `Refused` when not even
        ``floor`` fits, `Unreachable` when the backend cannot answer, `UserError`
        when the backend holds other limits under this name.
        """

    @abstractmethod
    def resize(self, token: str, usd_p: int, tokens: int) -> None:
        """Shrink a held reservation to `usd_p` and `tokens` (another budget granted less)."""

    @abstractmethod
    def settle(self, token: str, actual_p: int, actual_t: int, over: bool) -> None:
        """Replace a reservation by what was spent; never raises for an outage (the keeper retries)."""

    @abstractmethod
    def release(self, token: str) -> None:
        """Give a reservation back; never raises for an outage (it expires on its own)."""

    @abstractmethod
    def charge(self, usd_p: int, tokens: int) -> None:
        """Count spending made elsewhere as spent, unchecked."""

    @abstractmethod
    def state(self) -> tuple[int, int, int, int, int, int]:
        """``(spent_p, reserved_p, spent_t, reserved_t, overruns, overrun_p)``, expired reservations reclaimed.

        Raises `Unreachable` when the backend cannot answer.
        """

    def _unreachable(self, exc: BaseException) -> Unreachable:
        return Unreachable(f"shared budget {self.name!r} at {self.describe()} is unreachable "
                           f"({type(exc).__name__}: {exc})")


class Keeper:
    """One thread per backend and process: refreshes this process's reservations, retries failed writes.

    Args:
        what: The backend, for log messages.
        beat: Refreshes the given open reservations (``{ledger: [token, ...]}``); raises on an outage.
    """

    def __init__(self, what: str, beat: Callable[[dict[Ledger, list[str]]], None]) -> None:
        self._what = what
        self._beat = beat
        self._lock = threading.Lock()
        self._open: dict[str, Ledger] = {}  # token -> its ledger (a token may be on several: key by both)
        self._retry: list[tuple[str, Callable[[], None]]] = []
        self._thread: threading.Thread | None = None
        self._pid = os.getpid()
        self._wake = threading.Event()
        self._failing = False

    def hold(self, ledger: Ledger, token: str) -> None:
        with self._lock:
            self._open[f"{id(ledger)}:{token}"] = ledger
            self._start()

    def drop(self, ledger: Ledger, token: str) -> bool:
        """Stop refreshing a reservation; whether it was refreshed until now."""
        with self._lock:
            return self._open.pop(f"{id(ledger)}:{token}", None) is not None

    def later(self, what: str, write: Callable[[], None]) -> None:
        """Retry `write` (which raises on an outage) until it succeeds."""
        with self._lock:
            self._retry.append((what, write))
            self._start()
        self._wake.set()

    def _start(self) -> None:
        if self._pid != os.getpid():  # a forked child: the parent's reservations are not ours
            self._pid, self._open, self._retry, self._thread = os.getpid(), {}, [], None
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._loop, name="loopwise-budget-keeper", daemon=True)
            self._thread.start()

    def _loop(self) -> None:
        idle_since: float | None = None
        while True:
            interval = RESERVATION_TTL_S / _BEATS_PER_TTL
            with self._lock:
                held: dict[Ledger, list[str]] = {}
                for key, ledger in self._open.items():
                    held.setdefault(ledger, []).append(key.partition(":")[2])
                retry, self._retry = self._retry, []
                if not held and not retry:
                    now = time.monotonic()
                    idle_since = idle_since or now
                    if now - idle_since >= _IDLE_EXIT_S:
                        self._thread = None
                        return
                else:
                    idle_since = None
            failed: list[tuple[str, Callable[[], None]]] = []
            error: BaseException | None = None
            try:
                if held:
                    self._beat(held)
            except Exception as exc:  # noqa: BLE001 - an outage: try again at the next beat
                error = exc
            for what, write in retry:
                try:
                    write()
                except Exception as exc:  # noqa: BLE001 - still down
                    failed.append((what, write))
                    error = exc
            with self._lock:
                self._retry[:0] = failed
            self._report(error, failed)
            self._wake.wait(interval if error is None else min(interval, 1.0))
            self._wake.clear()

    def _report(self, error: BaseException | None, failed: list[tuple[str, Callable[[], None]]]) -> None:
        if error is not None and not self._failing:
            self._failing = True
            pending = f"; retrying: {', '.join(w for w, _ in failed[:3])}" if failed else ""
            _log.warning("loopwise shared budgets: %s is unreachable (%s: %s): new reservations fail, open ones "
                         "expire after %g s unless it is back by then%s", self._what, type(error).__name__, error,
                         RESERVATION_TTL_S, pending)
        elif error is None and self._failing:
            self._failing = False
            _log.warning("loopwise shared budgets: %s is back", self._what)
