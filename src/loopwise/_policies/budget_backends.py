"""Which ledger keeps a shared budget: one on Redis, or one in the SQLite database.

Apart from `_policies.budget_shared` (what the ledgers share), which the ledgers import: this
module imports them, so the choice lives above both and nothing imports in a circle.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from .budget_shared import Ledger
from .._errors import UserError

__all__ = ["ledger_for"]


def ledger_for(name: str, backend: Any, limit_p: int | None, limit_t: int | None) -> Ledger:
    """The ledger of budget `name` in `backend`: a redis:// URL, an SQLite path, or an `SQLiteStore`."""
    from .._stores.sqlite import SQLiteStore

    if isinstance(backend, str) and backend.startswith(("redis://", "rediss://", "unix://")):
        try:
            from .budget_redis import RedisLedger
        except ImportError as exc:
            if getattr(exc, "name", "") == "redis":
                raise UserError("a Budget shared on Redis needs the redis package: pip install 'loopwise[redis]'"
                                ) from None
            raise
        return RedisLedger(backend, name, limit_p, limit_t)
    if isinstance(backend, SQLiteStore):
        backend = backend.path
    if isinstance(backend, (str, os.PathLike)) and str(backend) and "://" not in str(backend):
        from .budget_sqlite import SQLiteLedger

        return SQLiteLedger(Path(backend), name, limit_p, limit_t)
    raise UserError(f"Budget(backend={backend!r}) must be a redis:// URL (any machine), or the path of the "
                    "loopwise SQLite database or an lw.SQLiteStore (this machine)")
