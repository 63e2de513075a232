"""Budgets: money and tokens are reserved before they are spent, so runs cannot overspend.

```
Budget(usd=5.00, tokens=None, name="batch-42")     shared by runs, threads, event loops
  .reserve(usd=..., tokens=...)   ──► Reservation   (BudgetExceeded when it does not fit)
reserve([run, shared], usd=...)   ──► Reservation   on every budget, or on none
reserve_call([run, shared], input_tokens=..., price=..., max_tokens=...)
                                  ──► CallReservation: .max_tokens to send, capped to
                                      what every budget can still pay for
Reservation.settle(actual_usd, actual_tokens) ──► None, or an Overrun to log loudly
Reservation.release()             nothing was spent (the call never reached the provider)

Budget(usd=5.00, name="batch-42", backend="redis://host:6379/0" | "runs.db" | SQLiteStore)
                                  shared by processes (`_policies.budget_shared`): each reservation
                                  one atomic step in the backend; BudgetUnavailable when
                                  it cannot be reached (the call is not made)
```

The invariant, for every budget at every moment: ``spent + reserved <= limit``, as
long as every actual is within its reservation. An actual above its reservation (a
server that ignores ``max_tokens``, a tokenizer surprise) is recorded anyway, since the
money is spent, and flagged: `settle` returns an `Overrun` and the budget counts it.

Amounts are kept as integer pico-dollars (1e-12 $) under one lock per budget, so
sums are exact and concurrent reservations from any threads or tasks are atomic.
A reservation on several budgets takes their locks in one global order (no deadlock)
and succeeds on all of them or on none: the in-process budgets' part under their
locks, then each shared budget's in its backend; when one refuses, the parts already
held are given back. Nothing here awaits or blocks for long: the
locks are held for a few arithmetic operations.

`BudgetExceeded` is how a reservation that does not fit says so; its message names
the limit and the observed values ("budget of $0.50 would be exceeded: spent $0.47,
next call needs at least $0.05 (...)"). The loop turns it into stop reason `budget`.
"""

from __future__ import annotations

import functools
import math
import os
import threading
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from .._errors import LoopwiseError, UserError
from ..models._base import Price

__all__ = [
    "Budget",
    "BudgetExceeded",
    "BudgetSnapshot",
    "BudgetUnavailable",
    "CallReservation",
    "Overrun",
    "Reservation",
    "reserve",
    "reserve_call",
]

_PICO = 10**12  # pico-dollars per dollar
# An actual this close above its reservation (pico-dollars) is float noise, not an overrun.
_NOISE = 1_000


class BudgetExceeded(LoopwiseError):
    """A reservation does not fit in a budget. The loop stops the run with reason `budget`.

    Attributes:
        budget: The budget that refused.
        limit: ``"usd"`` or ``"tokens"``: which of its limits.
        limit_value: That limit (dollars or tokens).
        spent: What was already spent against it.
        reserved: What calls in flight hold.
        needed: What the refused reservation needed at least.
    """

    def __init__(
        self, message: str, *, budget: Budget, limit: Literal["usd", "tokens"],
        limit_value: float, spent: float, reserved: float, needed: float,
    ) -> None:
        super().__init__(message)
        self.budget = budget
        self.limit = limit
        self.limit_value = limit_value
        self.spent = spent
        self.reserved = reserved
        self.needed = needed


class BudgetUnavailable(BudgetExceeded):
    """A shared budget's backend (Redis, the SQLite file) could not be reached: the call is not made.

    A `BudgetExceeded`, so the loop treats a reservation that could not be checked as
    one that does not fit (never as money it may spend). Reading a shared budget's
    numbers (`spent_usd`, `snapshot`...) raises it too. `spent`, `reserved` are NaN.
    """


@dataclass(kw_only=True, slots=True, frozen=True)
class BudgetSnapshot:
    """A budget's numbers at one instant (read together, under its lock)."""

    usd: float | None
    tokens: int | None
    spent_usd: float
    reserved_usd: float
    spent_tokens: int
    reserved_tokens: int
    overruns: int

    @property
    def remaining_usd(self) -> float | None:
        return None if self.usd is None else max(0.0, self.usd - self.spent_usd - self.reserved_usd)

    @property
    def remaining_tokens(self) -> int | None:
        return None if self.tokens is None else max(0, self.tokens - self.spent_tokens - self.reserved_tokens)


@dataclass(kw_only=True, slots=True, frozen=True)
class Overrun:
    """A settled call that cost more than its reservation: recorded, and to be logged loudly."""

    reserved_usd: float
    actual_usd: float
    reserved_tokens: int
    actual_tokens: int

    def __str__(self) -> str:
        return (
            f"the call cost {_usd(self.actual_usd)} ({self.actual_tokens:,} tokens) but only "
            f"{_usd(self.reserved_usd)} ({self.reserved_tokens:,} tokens) was reserved"
        )


class Budget:
    """Money and tokens that runs draw from; `None` means no limit on that count.

    ```python
    import loopwise as lw

    shared = lw.Budget(usd=5.00, name="batch-42")   # agent.run(task, budget=shared)
    ```

    Args:
        usd: The most dollars that may be spent, or `None`.
        tokens: The most tokens (input + output) that may be used, or `None`.
        name: What messages and events call it; with a `backend`, what identifies it there.
        backend: Where a budget shared by processes is kept: a ``redis://`` URL (processes
            on any machine), or the loopwise SQLite database (a path or an
            `lw.SQLiteStore`: the processes of one machine). `None` (the default): this
            process only. Every process that names the same budget must give it the same
            limits. See docs/budgets.md, "Shared budgets".

    Safe to share between threads and event loops.
    """

    __slots__ = (
        "_ledger", "_limit_p", "_lock", "_overrun_p", "_overruns", "_reserved_p", "_reserved_t",
        "_spent_p", "_spent_t", "name", "tokens", "usd",
    )

    def __init__(self, usd: float | None = None, *, tokens: int | None = None, name: str | None = None,
                 backend: Any = None) -> None:
        if usd is not None and (
            isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 <= usd < math.inf
        ):
            raise UserError(f"Budget(usd={usd!r}) must be a number of dollars >= 0, or None for no limit")
        if tokens is not None and (type(tokens) is not int or tokens < 0):
            raise UserError(f"Budget(tokens={tokens!r}) must be an int >= 0, or None for no limit")
        if name is not None and not isinstance(name, str):
            raise UserError(f"Budget(name={name!r}) must be a str or None")
        self.usd = None if usd is None else float(usd)
        self.tokens = tokens
        self.name = name
        self._limit_p = None if usd is None else _limit_pico(float(usd))
        self._lock = threading.Lock()
        self._spent_p = 0
        self._reserved_p = 0
        self._spent_t = 0
        self._reserved_t = 0
        self._overruns = 0
        self._overrun_p = 0
        self._ledger = None
        if backend is not None:
            if not name:
                raise UserError("a Budget with a backend is shared by its name: Budget(usd=..., name='batch-42', "
                                "backend=...)")
            from .budget_backends import ledger_for

            self._ledger = ledger_for(name, backend, self._limit_p, tokens)

    def __repr__(self) -> str:
        parts = [f"usd={self.usd!r}", f"tokens={self.tokens!r}"]
        if self.name is not None:
            parts.append(f"name={self.name!r}")
        if self._ledger is not None:
            return f"Budget({', '.join(parts)}, backend={self._ledger.describe()!r})"
        s = self.snapshot()
        parts.append(f"spent_usd={s.spent_usd:.6g}, reserved_usd={s.reserved_usd:.6g}")
        return f"Budget({', '.join(parts)})"

    def snapshot(self) -> BudgetSnapshot:
        """All the numbers at one instant."""
        if self._ledger is not None:
            sp, rp, st, rt, overruns, _ = self._shared_state()
            return BudgetSnapshot(usd=self.usd, tokens=self.tokens, spent_usd=sp / _PICO, reserved_usd=rp / _PICO,
                                  spent_tokens=st, reserved_tokens=rt, overruns=overruns)
        with self._lock:
            return BudgetSnapshot(
                usd=self.usd, tokens=self.tokens,
                spent_usd=self._spent_p / _PICO, reserved_usd=self._reserved_p / _PICO,
                spent_tokens=self._spent_t, reserved_tokens=self._reserved_t, overruns=self._overruns,
            )

    def _shared_state(self) -> tuple[int, int, int, int, int, int]:
        from .budget_shared import Unreachable

        try:
            return self._ledger.state()  # type: ignore[union-attr]
        except Unreachable as exc:
            raise _unavailable(self, str(exc), "its numbers could not be read") from exc

    @property
    def spent_usd(self) -> float:
        return self._spent_p / _PICO if self._ledger is None else self._shared_state()[0] / _PICO

    @property
    def reserved_usd(self) -> float:
        return self._reserved_p / _PICO if self._ledger is None else self._shared_state()[1] / _PICO

    @property
    def remaining_usd(self) -> float | None:
        """What is left to reserve (never below 0), or `None` without a dollar limit."""
        return self.snapshot().remaining_usd

    @property
    def spent_tokens(self) -> int:
        return self._spent_t if self._ledger is None else self._shared_state()[2]

    @property
    def reserved_tokens(self) -> int:
        return self._reserved_t if self._ledger is None else self._shared_state()[3]

    @property
    def remaining_tokens(self) -> int | None:
        """What is left to reserve (never below 0), or `None` without a token limit."""
        return self.snapshot().remaining_tokens

    @property
    def overruns(self) -> int:
        """Settled calls whose actual was above their reservation."""
        return self._overruns if self._ledger is None else self._shared_state()[4]

    @property
    def overrun_usd(self) -> float:
        """How much those calls cost above their reservations, together."""
        return self._overrun_p / _PICO if self._ledger is None else self._shared_state()[5] / _PICO

    def describe(self) -> dict[str, Any]:
        """The budget as JSON-ready values, for events."""
        s = self.snapshot()
        shared = {} if self._ledger is None else {"backend": self._ledger.describe()}
        return {"name": self.name, "usd": self.usd, "tokens": self.tokens, **shared, "spent_usd": s.spent_usd,
                "reserved_usd": s.reserved_usd, "spent_tokens": s.spent_tokens,
                "reserved_tokens": s.reserved_tokens, "overruns": s.overruns}

    def reserve(self, *, usd: float = 0.0, tokens: int = 0) -> Reservation:
        """Hold `usd` dollars and `tokens` tokens; raises `BudgetExceeded` when they do not fit."""
        return reserve((self,), usd=usd, tokens=tokens)

    def _label(self) -> str:
        return "budget" if self.name is None else f"budget {self.name!r}"

    def _charge(self, usd: float, tokens: int) -> None:
        """Count spending made elsewhere (earlier segments of a resumed run) as spent, unchecked."""
        if self._ledger is not None:
            from .budget_shared import Unreachable

            try:
                self._ledger.charge(_to_pico(max(0.0, usd)), max(0, tokens))
            except Unreachable as exc:
                raise _unavailable(self, str(exc), "the spending was not counted") from exc
            return
        with self._lock:
            self._spent_p += _to_pico(max(0.0, usd))
            self._spent_t += max(0, tokens)


class Reservation:
    """Money and tokens held on one or more budgets until the call they are for is done.

    Settle it (what was actually spent) or release it (nothing was), exactly once.
    """

    __slots__ = ("_budgets", "_open", "_token", "_usd_p", "tokens")

    def __init__(self, budgets: tuple[Budget, ...], usd_p: int, tokens: int) -> None:
        self._budgets = budgets
        self._usd_p = usd_p
        self.tokens = tokens
        self._open = True
        self._token: str | None = None  # its name in the backends of shared budgets

    @property
    def usd(self) -> float:
        return self._usd_p / _PICO

    @property
    def open(self) -> bool:
        """Neither settled nor released yet."""
        return self._open

    def __repr__(self) -> str:
        state = "open" if self._open else "closed"
        return f"<{type(self).__name__} usd={self.usd:.6g} tokens={self.tokens} {state}>"

    def settle(self, actual_usd: float, actual_tokens: int) -> Overrun | None:
        """Replace the reservation with what was spent. Returns an `Overrun` when that was more.

        An actual above the reservation is recorded all the same (it is spent) and
        counted in each budget's `overruns`.
        """
        if isinstance(actual_usd, bool) or not isinstance(actual_usd, (int, float)) or not 0 <= actual_usd < math.inf:
            raise UserError(f"Reservation.settle(actual_usd={actual_usd!r}) must be a number of dollars >= 0")
        if type(actual_tokens) is not int or actual_tokens < 0:
            raise UserError(f"Reservation.settle(actual_tokens={actual_tokens!r}) must be an int >= 0")
        actual_p = _to_pico(actual_usd)
        over = actual_p > self._usd_p + _NOISE or actual_tokens > self.tokens
        if not over:
            actual_p = min(actual_p, self._usd_p)  # float noise is not spending
        self._close(actual_p, actual_tokens, over)
        if not over:
            return None
        return Overrun(reserved_usd=self.usd, actual_usd=actual_p / _PICO,
                       reserved_tokens=self.tokens, actual_tokens=actual_tokens)

    def release(self) -> None:
        """Give the whole reservation back: nothing was spent."""
        self._close(None, 0, False)

    def _close(self, actual_p: int | None, actual_tokens: int, over: bool) -> None:
        local = [b for b in self._budgets if b._ledger is None]
        with _Locked(local if local else self._budgets):
            if not self._open:
                raise UserError(f"{type(self).__name__} was already settled or released")
            self._open = False
            for b in local:
                b._reserved_p -= self._usd_p
                b._reserved_t -= self.tokens
                if actual_p is not None:
                    b._spent_p += actual_p
                    b._spent_t += actual_tokens
                if over:
                    b._overruns += 1
                    b._overrun_p += max(0, actual_p - self._usd_p)  # type: ignore[operator]
        for b in self._budgets:  # shared ones: an outage queues the write (the keeper retries it)
            if b._ledger is not None:
                if actual_p is None:
                    b._ledger.release(self._token)  # type: ignore[arg-type]
                else:
                    b._ledger.settle(self._token, actual_p, actual_tokens, over)  # type: ignore[arg-type]


class CallReservation(Reservation):
    """The reservation of one model call, and the `max_tokens` to send with it."""

    __slots__ = ("input_tokens", "max_tokens")

    def __init__(self, budgets: tuple[Budget, ...], usd_p: int, tokens: int,
                 input_tokens: int, max_tokens: int | None) -> None:
        super().__init__(budgets, usd_p, tokens)
        #: The estimated input the reservation covers.
        self.input_tokens = input_tokens
        #: What to send as the call's `max_tokens` (`None`: send none; nothing limits the output).
        self.max_tokens = max_tokens


def reserve(budgets: Iterable[Budget], *, usd: float = 0.0, tokens: int = 0) -> Reservation:
    """Hold `usd` and `tokens` on every budget, or on none (`BudgetExceeded`).

    E.g. a tool call's declared `cost_usd`, on the run's budget and a shared one.
    """
    if isinstance(usd, bool) or not isinstance(usd, (int, float)) or not 0 <= usd < math.inf:
        raise UserError(f"reserve(usd={usd!r}) must be a number of dollars >= 0")
    if type(tokens) is not int or tokens < 0:
        raise UserError(f"reserve(tokens={tokens!r}) must be an int >= 0")
    usd_p = _to_pico(usd, up=True)
    held = _ordered(budgets)
    local = [b for b in held if b._ledger is None]
    with _Locked(local):
        for b in local:
            if b._limit_p is not None and b._spent_p + b._reserved_p + usd_p > b._limit_p:
                raise _exceeded_usd(b, usd_p, f"needs {_usd(usd_p / _PICO)}")
            if b.tokens is not None and b._spent_t + b._reserved_t + tokens > b.tokens:
                raise _exceeded_tokens(b, tokens, f"needs {tokens:,} tokens")
        reservation = _hold(Reservation(held, usd_p, tokens))
    if len(local) < len(held):
        _hold_shared(reservation, usd_p, tokens, 0, 0, 0, f"needs {_usd(usd_p / _PICO)}", f"needs {tokens:,} tokens")
    return reservation


def reserve_call(
    budgets: Iterable[Budget],
    *,
    input_tokens: int,
    price: Price | None,
    max_tokens: int | None,
    min_output_tokens: int = 16,
) -> CallReservation:
    """Plan one model call under every budget: the `max_tokens` to send, reserved on all of them.

    The call's worst case is its (estimated) input at the full input price, with no
    cache hit, plus `max_tokens` of output. The output is capped to what every budget
    can still pay for after the input; the reservation is taken on all budgets at
    once, or on none.

    Args:
        budgets: The run's own budget, a shared one... (each budget once).
        input_tokens: The input estimate (an upper bound: `TokenEstimator.estimate`).
        price: The model's price. `None` (unknown) is a mistake under a dollar limit.
        max_tokens: The `max_tokens` the agent wants; `None` for no wish (then the
            budgets alone cap it, and with no limit to cap it none is sent).
        min_output_tokens: The smallest useful answer. When not even the input plus
            this many output tokens fit (or plus `max_tokens`, if smaller), the call
            is refused.

    Raises:
        BudgetExceeded: the call does not fit; its message names the budget, the
            limit and the numbers. The loop stops the run with reason `budget`.
    """
    if type(input_tokens) is not int or input_tokens < 0:
        raise UserError(f"reserve_call(input_tokens={input_tokens!r}) must be an int >= 0")
    if max_tokens is not None and (type(max_tokens) is not int or max_tokens < 1):
        raise UserError(f"reserve_call(max_tokens={max_tokens!r}) must be an int >= 1 or None")
    if type(min_output_tokens) is not int or min_output_tokens < 1:
        raise UserError(f"reserve_call(min_output_tokens={min_output_tokens!r}) must be an int >= 1")
    held = _ordered(budgets)
    if price is None:
        unpriced = next((b for b in held if b.usd is not None), None)
        if unpriced is not None:
            raise UserError(
                f"the model's price is unknown, so a dollar {unpriced._label()} cannot be kept: give the model "
                "price=Price(...) (Price(0, 0) for a self-hosted server) or remove the dollar limit"
            )
        in_rate = out_rate = 0
    else:
        in_rate = _pico_per_token(price.input_per_mtok)
        out_rate = _pico_per_token(price.output_per_mtok)
    floor = min_output_tokens if max_tokens is None else min(min_output_tokens, max_tokens)
    input_p = input_tokens * in_rate
    cap = max_tokens
    local = [b for b in held if b._ledger is None]
    with _Locked(local):
        for b in local:  # in the caller's order: the first budget that refuses is named
            if b._limit_p is not None:
                available = b._limit_p - b._spent_p - b._reserved_p
                if available < input_p + floor * out_rate:
                    needed = input_p + floor * out_rate
                    raise _exceeded_usd(b, needed, f"needs at least {_usd(needed / _PICO)} "
                                        f"({input_tokens:,} input tokens and a {floor:,}-token answer)")
                if out_rate:
                    affordable = (available - input_p) // out_rate
                    cap = affordable if cap is None else min(cap, affordable)
            if b.tokens is not None:
                available_t = b.tokens - b._spent_t - b._reserved_t
                if available_t < input_tokens + floor:
                    raise _exceeded_tokens(b, input_tokens + floor, f"needs at least {input_tokens + floor:,} "
                                           f"({input_tokens:,} input and a {floor:,}-token answer)")
                cap = available_t - input_tokens if cap is None else min(cap, available_t - input_tokens)
        output = cap or 0
        reservation = _hold(CallReservation(held, input_p + output * out_rate, input_tokens + output, input_tokens,
                                            cap))
    if len(local) < len(held):
        reservation.max_tokens = _hold_shared(
            reservation, input_p, input_tokens, out_rate, floor, cap,
            f"needs at least {_usd((input_p + floor * out_rate) / _PICO)} ({input_tokens:,} input tokens and a "
            f"{floor:,}-token answer)",
            f"needs at least {input_tokens + floor:,} ({input_tokens:,} input and a {floor:,}-token answer)")
    return reservation


# -- helpers ---------------------------------------------------------------------------


def _ordered(budgets: Iterable[Budget]) -> tuple[Budget, ...]:
    """Each budget once, in the caller's order."""
    seen: dict[int, Budget] = {}
    for b in budgets:
        if not isinstance(b, Budget):
            raise UserError(f"expected a loopwise Budget, got {type(b).__name__}")
        seen.setdefault(id(b), b)
    return tuple(seen.values())


class _Locked:
    """Holds the locks of several budgets, taken in one global order (by id: no deadlock)."""

    __slots__ = ("_locks",)

    def __init__(self, budgets: Sequence[Budget]) -> None:
        self._locks = [b._lock for b in sorted(budgets, key=id)] if len(budgets) > 1 else [b._lock for b in budgets]

    def __enter__(self) -> None:
        for lock in self._locks:
            lock.acquire()

    def __exit__(self, *exc: object) -> None:
        for lock in reversed(self._locks):
            lock.release()


def _hold(reservation: Reservation) -> Any:
    """Add a reservation to its in-process budgets (their locks held)."""
    for b in reservation._budgets:
        if b._ledger is None:
            b._reserved_p += reservation._usd_p
            b._reserved_t += reservation.tokens
    return reservation


def _hold_shared(r: Reservation, fixed_p: int, fixed_t: int, out_rate: int, floor: int, cap: int | None,
                 needs_usd: str, needs_tokens: str) -> int | None:
    """Hold `r` on its shared budgets too (its in-process part is held): on all of them, or give it all back.

    Each backend grants ``fixed + n * out_rate`` with the largest ``n`` up to `cap` that
    fits; the next is asked for no more. `r` ends at the smallest grant, on every
    budget. Returns that ``n`` (`None`: nothing capped it).
    """
    from .budget_shared import Refused, Unreachable

    r._token = f"{os.getpid()}-{os.urandom(8).hex()}"
    granted: list[Budget] = []
    try:
        for b in r._budgets:
            if b._ledger is not None:
                cap = b._ledger.reserve(r._token, fixed_p, fixed_t, out_rate, floor, cap)
                granted.append(b)
    except BaseException as exc:
        for held in granted:
            held._ledger.release(r._token)  # type: ignore[union-attr]
        r._budgets = tuple(x for x in r._budgets if x._ledger is None)
        r.release()
        if isinstance(exc, Refused):  # (`b`: the budget that refused)
            if exc.limit == "usd":
                raise _exceeded_usd(b, exc.needed, needs_usd, exc.spent, exc.reserved) from None
            raise _exceeded_tokens(b, exc.needed, needs_tokens, exc.spent, exc.reserved) from None
        if isinstance(exc, Unreachable):
            raise _unavailable(b, str(exc), "the call was not made") from exc
        raise
    usd_p, tokens = fixed_p + (cap or 0) * out_rate, fixed_t + (cap or 0)
    if (usd_p, tokens) != (r._usd_p, r.tokens):  # a later budget granted less (or capped what none had)
        for b in granted[:-1]:
            try:
                b._ledger.resize(r._token, usd_p, tokens)  # type: ignore[union-attr]
            except Unreachable:  # it holds more than needed until the settle replaces it: safe
                pass
        local = [b for b in r._budgets if b._ledger is None]
        with _Locked(local):
            for b in local:
                b._reserved_p += usd_p - r._usd_p
                b._reserved_t += tokens - r.tokens
            r._usd_p, r.tokens = usd_p, tokens
    return cap


def _to_pico(usd: float, *, up: bool = False) -> int:
    exact = Decimal(repr(float(usd))) * _PICO
    return math.ceil(exact) if up else round(exact)


@functools.lru_cache(maxsize=256)
def _limit_pico(usd: float) -> int:
    """`_to_pico(usd)`, remembered: every run of an agent makes a budget of the same limit."""
    return _to_pico(usd)


@functools.lru_cache(maxsize=1024)
def _pico_per_token(rate_per_mtok: float) -> int:
    """Dollars per million tokens as pico-dollars per token, rounded up ($1/MTok = 1e6)."""
    return math.ceil(Decimal(repr(float(rate_per_mtok))) * 1_000_000)


def _exceeded_usd(b: Budget, needed_p: int, needs: str, spent_p: int | None = None,
                  reserved_p: int | None = None) -> BudgetExceeded:
    """(`spent_p`, `reserved_p`: a shared budget's, as its backend saw them.)"""
    spent_p = b._spent_p if spent_p is None else spent_p
    reserved_p = b._reserved_p if reserved_p is None else reserved_p
    in_flight = f", {_usd(reserved_p / _PICO)} reserved by calls in flight" if reserved_p else ""
    return BudgetExceeded(
        f"{b._label()} of {_usd(b.usd)} would be exceeded: spent {_usd(spent_p / _PICO)}{in_flight}, "
        f"next call {needs}",
        budget=b, limit="usd", limit_value=b.usd, spent=spent_p / _PICO,  # type: ignore[arg-type]
        reserved=reserved_p / _PICO, needed=needed_p / _PICO,
    )


def _exceeded_tokens(b: Budget, needed: int, needs: str, spent: int | None = None,
                     reserved: int | None = None) -> BudgetExceeded:
    spent = b._spent_t if spent is None else spent
    reserved = b._reserved_t if reserved is None else reserved
    in_flight = f", {reserved:,} reserved by calls in flight" if reserved else ""
    return BudgetExceeded(
        f"token {b._label()} of {b.tokens:,} would be exceeded: spent {spent:,}{in_flight}, next call {needs}",
        budget=b, limit="tokens", limit_value=b.tokens, spent=spent,  # type: ignore[arg-type]
        reserved=reserved, needed=needed,
    )


def _unavailable(b: Budget, reason: str, consequence: str) -> BudgetUnavailable:
    return BudgetUnavailable(
        f"{reason}: {consequence} (a shared budget that cannot be checked is not spent); check that it is up",
        budget=b, limit="usd" if b.usd is not None else "tokens",
        limit_value=b.usd if b.usd is not None else b.tokens,  # type: ignore[arg-type]
        spent=math.nan, reserved=math.nan, needed=math.nan,
    )


def _usd(value: float | None) -> str:
    """Dollars for messages: $0.47, $5.00, $0.00031."""
    if value is None:
        return "no limit"
    if value == 0:
        return "$0"
    if value >= 0.01:
        text = f"{value:,.4f}".rstrip("0")
        whole, _, cents = text.partition(".")
        return f"${whole}.{cents.ljust(2, '0')}"
    return f"${value:.2g}" if value >= 1e-9 else f"${value:.1e}"
