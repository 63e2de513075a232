"""A shared budget in the SQLite database of the event log: the processes of one machine.

Two tables beside the event log:

```
lw_budgets       name -> usd_p, tokens (the limits: pico-dollars, tokens; NULL for none),
                         spent_p, spent_t, overruns, overrun_p
lw_budget_holds  (name, token) -> owner, pid, usd_p, tokens, expires: one open reservation
```

Each reservation is one ``BEGIN IMMEDIATE`` transaction: holds whose owner is dead
are deleted first (judged as leases are, `_control.plane.Lease.live`: its process is gone,
or it stopped refreshing them for `RESERVATION_TTL_S`), then ``spent + reserved +
needed <= limit`` is checked, with ``reserved`` the sum of the holds, and the new hold
inserted. The keeper pushes ``expires`` of this process's holds forward (one
``UPDATE``). A database locked for longer than `_BUSY_S` (a long prune) fails the
reservation rather than holding up the run.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from . import budget_shared as _budget_shared
from .budget_shared import Keeper, Ledger, Refused, _log
from .._control.plane import HOST, Lease, _owner
from .._errors import UserError

__all__ = ["SQLiteLedger"]

_BUSY_S = 5.0

T = TypeVar("T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS lw_budgets (
    name TEXT PRIMARY KEY,
    usd_p INTEGER,
    tokens INTEGER,
    spent_p INTEGER NOT NULL DEFAULT 0,
    spent_t INTEGER NOT NULL DEFAULT 0,
    overruns INTEGER NOT NULL DEFAULT 0,
    overrun_p INTEGER NOT NULL DEFAULT 0
);
CREATE TABLE IF NOT EXISTS lw_budget_holds (
    name TEXT NOT NULL,
    token TEXT NOT NULL,
    owner TEXT NOT NULL,
    pid INTEGER NOT NULL,
    usd_p INTEGER NOT NULL,
    tokens INTEGER NOT NULL,
    expires REAL NOT NULL,
    PRIMARY KEY (name, token)
);
CREATE INDEX IF NOT EXISTS lw_budget_holds_owner ON lw_budget_holds (owner);
"""


class _Database:
    """This process's connection to one database file for shared budgets, and its keeper."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        self.keeper = Keeper(f"the budget tables of {path}", self._beat)

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One ``BEGIN IMMEDIATE`` transaction, committed unless it raises."""
        with self.lock:
            conn = self._conn
            if conn is None:
                conn = sqlite3.connect(self.path, timeout=_BUSY_S, isolation_level=None, check_same_thread=False)
                conn.execute(f"PRAGMA busy_timeout = {int(_BUSY_S * 1000)}")
                # As the event log has it (a no-op on its database): survives a crash of the process.
                conn.execute("PRAGMA journal_mode = WAL")
                conn.execute("PRAGMA synchronous = NORMAL")
                conn.executescript(_SCHEMA)
                self._conn = conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                conn.execute("ROLLBACK")
                raise
            conn.execute("COMMIT")

    def _beat(self, held: dict[Ledger, list[str]]) -> None:
        with self.transaction() as conn:
            conn.execute("UPDATE lw_budget_holds SET expires = ? WHERE owner = ?",
                         (time.time() + _budget_shared.RESERVATION_TTL_S, _owner()))


_databases: dict[Path, _Database] = {}
_databases_lock = threading.Lock()


def _database(path: Path) -> _Database:
    key = path.resolve()
    with _databases_lock:
        db = _databases.get(key)
        if db is None:
            db = _databases[key] = _Database(key)
        return db


def _reclaim(conn: sqlite3.Connection, name: str, now: float) -> None:
    """Delete the holds on `name` of owners that are dead or stopped refreshing them."""
    rows = conn.execute("SELECT owner, pid, MAX(expires) FROM lw_budget_holds WHERE name = ? AND owner != ? "
                        "GROUP BY owner, pid", (name, _owner())).fetchall()
    for owner, pid, expires in rows:
        # As a lease whose heartbeat is `expires - TTL`: dead when its pid is gone, or past `expires`.
        if not Lease("", owner, HOST, pid, (), expires, expires - _budget_shared.RESERVATION_TTL_S).live(now):
            conn.execute("DELETE FROM lw_budget_holds WHERE name = ? AND owner = ?", (name, owner))


class SQLiteLedger(Ledger):
    """Budget `name` in the loopwise database at `path` (see the module docstring for its tables)."""

    def __init__(self, path: Path, name: str, limit_p: int | None, limit_t: int | None) -> None:
        super().__init__(name, limit_p, limit_t)
        self._db = _database(path)

    def describe(self) -> str:
        return str(self._db.path)

    def _do(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        try:
            with self._db.transaction() as conn:
                return fn(conn)
        except sqlite3.OperationalError as exc:
            raise self._unreachable(exc) from exc

    def _declare(self, conn: sqlite3.Connection) -> None:
        row = conn.execute("SELECT usd_p, tokens FROM lw_budgets WHERE name = ?", (self.name,)).fetchone()
        if row is None:
            conn.execute("INSERT INTO lw_budgets (name, usd_p, tokens) VALUES (?, ?, ?)",
                         (self.name, self.limit_p, self.limit_t))
        elif tuple(row) != (self.limit_p, self.limit_t):
            def show(p: int | None, t: int | None) -> str:
                return f"usd={'None' if p is None else f'{p / 10**12:g}'}, tokens={t}"

            raise UserError(f"shared budget {self.name!r} in {self.describe()} was declared with {show(*row)}; "
                            f"this process declares {show(self.limit_p, self.limit_t)}: give every process the "
                            "same limits, or use another name")

    def reserve(self, token: str, fixed_p: int, fixed_t: int, out_rate: int, floor: int,
                cap: int | None) -> int | None:
        def step(conn: sqlite3.Connection) -> int | None:
            self._declare(conn)
            now = time.time()
            _reclaim(conn, self.name, now)
            sp, st = conn.execute("SELECT spent_p, spent_t FROM lw_budgets WHERE name = ?", (self.name,)).fetchone()
            rp, rt = conn.execute("SELECT COALESCE(SUM(usd_p), 0), COALESCE(SUM(tokens), 0) FROM lw_budget_holds "
                                  "WHERE name = ?", (self.name,)).fetchone()
            out = cap
            if self.limit_p is not None:
                avail = self.limit_p - sp - rp
                if avail < fixed_p + floor * out_rate:
                    raise Refused("usd", self.limit_p, sp, rp, fixed_p + floor * out_rate)
                if out_rate:
                    afford = (avail - fixed_p) // out_rate
                    out = afford if out is None else min(out, afford)
            if self.limit_t is not None:
                avail_t = self.limit_t - st - rt
                if avail_t < fixed_t + floor:
                    raise Refused("tokens", self.limit_t, st, rt, fixed_t + floor)
                out = avail_t - fixed_t if out is None else min(out, avail_t - fixed_t)
            n = out or 0
            conn.execute("INSERT INTO lw_budget_holds (name, token, owner, pid, usd_p, tokens, expires) "
                         "VALUES (?, ?, ?, ?, ?, ?, ?)",
                         (self.name, token, _owner(), os.getpid(), fixed_p + n * out_rate, fixed_t + n,
                          now + _budget_shared.RESERVATION_TTL_S))
            return out

        out = self._do(step)
        self._db.keeper.hold(self, token)
        return out

    def resize(self, token: str, usd_p: int, tokens: int) -> None:
        self._do(lambda conn: conn.execute("UPDATE lw_budget_holds SET usd_p = ?, tokens = ? WHERE name = ? AND "
                                           "token = ?", (usd_p, tokens, self.name, token)))

    def settle(self, token: str, actual_p: int, actual_t: int, over: bool) -> None:
        def step(conn: sqlite3.Connection) -> None:
            row = conn.execute("SELECT usd_p FROM lw_budget_holds WHERE name = ? AND token = ?",
                               (self.name, token)).fetchone()
            conn.execute("DELETE FROM lw_budget_holds WHERE name = ? AND token = ?", (self.name, token))
            if row is None:
                _log.error("loopwise shared budgets: a reservation on budget %r expired before it was settled; "
                           "its spend is counted now", self.name)
                self._declare(conn)
            conn.execute("UPDATE lw_budgets SET spent_p = spent_p + ?, spent_t = spent_t + ?, overruns = "
                         "overruns + ?, overrun_p = overrun_p + ? WHERE name = ?",
                         (actual_p, actual_t, int(over and row is not None),
                          max(0, actual_p - row[0]) if over and row is not None else 0, self.name))

        self._write(step, token, f"settle a reservation on budget {self.name!r}")

    def release(self, token: str) -> None:
        self._write(lambda conn: conn.execute("DELETE FROM lw_budget_holds WHERE name = ? AND token = ?",
                                              (self.name, token)),
                    token, f"release a reservation on budget {self.name!r}")

    def charge(self, usd_p: int, tokens: int) -> None:
        def step(conn: sqlite3.Connection) -> None:
            self._declare(conn)
            conn.execute("UPDATE lw_budgets SET spent_p = spent_p + ?, spent_t = spent_t + ? WHERE name = ?",
                         (usd_p, tokens, self.name))

        self._do(step)

    def _write(self, step: Callable[[sqlite3.Connection], object], token: str, what: str) -> None:
        def write() -> None:
            with self._db.transaction() as conn:
                step(conn)
            self._db.keeper.drop(self, token)

        try:
            write()
        except sqlite3.OperationalError:  # locked past the busy timeout: the keeper retries
            self._db.keeper.later(what, write)

    def state(self) -> tuple[int, int, int, int, int, int]:
        def step(conn: sqlite3.Connection) -> tuple[int, int, int, int, int, int]:
            row = conn.execute("SELECT spent_p, spent_t, overruns, overrun_p FROM lw_budgets WHERE name = ?",
                               (self.name,)).fetchone()
            if row is None:
                return (0, 0, 0, 0, 0, 0)
            _reclaim(conn, self.name, time.time())
            rp, rt = conn.execute("SELECT COALESCE(SUM(usd_p), 0), COALESCE(SUM(tokens), 0) FROM lw_budget_holds "
                                  "WHERE name = ?", (self.name,)).fetchone()
            return (row[0], rp, row[1], rt, row[2], row[3])

        return self._do(step)
