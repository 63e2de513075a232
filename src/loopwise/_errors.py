"""loopwise's exceptions, in one tree.

Every exception loopwise raises to a caller (or records, by its class name, as the
error of a tool attempt) is a `LoopwiseError`: `except lw.LoopwiseError` catches them
all. A class that must also stay what it was (a `TimeoutError`, a `RuntimeError`) says
so with "also a": it has both bases. Defined in `_errors` unless a module is named.

```
LoopwiseError
├── UserError              a developer mistake, raised before a run starts
│                          (bad configuration, unknown run id, reused run id, ...)
├── StoreError             the event log's database cannot be written: a full disk,
│                          a read-only directory (names the file, the operation, the error)
├── ModelError             a model call failed; mapped at the adapter edge
│   ├── ModelHTTPError         the provider answered with an error status
│   ├── ModelTimeoutError      the provider did not answer in time
│   ├── ModelConnectionError   the provider could not be reached
│   └── ModelBehaviorError     the model returned something the runtime cannot use
├── BudgetExceeded         (_policies.budget) a reservation does not fit in a budget
│   └── BudgetUnavailable      (_policies.budget) a shared budget's backend did not answer
├── ToolRetry              a signal a tool raises to ask for another attempt
├── ToolArgumentsError     (_tools.tool) a call's arguments do not fit the tool's schema
├── UnusableResult         (_tools.execute) a tool returned a value with no text for the model
├── CircuitOpenError       (_tools.breaker) the tool's breaker is open: it was not called
├── PoolExhaustedError     (_tools.threads) also a RuntimeError: too many abandoned sync calls
├── ProcessStartError      (_tools.isolation) also a RuntimeError: its process did not start
├── ProcessCrashedError    (_tools.isolation) also a RuntimeError: its process died unanswered
├── ProcessTimeoutError    (_tools.isolation) also a TimeoutError: its process ran past the timeout
├── MCPServerError         (loopwise.mcp) an MCP server failed
│   ├── MCPConnectionError     (loopwise.mcp) it could not be started or reached
│   ├── MCPTimeoutError        (loopwise.mcp) also a TimeoutError: it did not answer in time
│   └── MCPToolError           (loopwise.mcp) it answered a tool call with an error
├── EventSchemaError       (loopwise.events) also a ValueError: not an event this loopwise
│                          reads (an unknown kind, a bad field, a newer schema's major version)
└── OTLPExportError   (_views.otel_send) the OTLP collector was unreachable or refused
```

A run stopped by a limit, a budget, a kill or a model failure is not an exception: it
is a `RunResult` whose `stop_reason` says why. `ModelError`s end a run as `error`
(recorded in the log and returned in the result). A tool's failure (its own exception,
or `ToolArgumentsError`, `UnusableResult`, `CircuitOpenError`, a `Process*Error`,
`PoolExhaustedError`) is recorded as that attempt's error, by class name, and answered
by the tool's retries and fallbacks; it does not escape the run. What does escape to the
caller: `UserError`, raised before a run starts; `StoreError` when the store cannot be
opened, or cannot take a run's end (no result then claims an end the log does not
have); the `MCPServerError`s of `loopwise.mcp`'s connection; `EventSchemaError` from
`loopwise.events.loads`; `OTLPExportError` from an export; `CircuitOpenError` from a `CircuitBreaker` used directly.

Internal, not `LoopwiseError`s (each is caught inside loopwise and never reaches a
caller; a comment at each class says so):
- `_Stop` (_runtime.run): the loop has decided to stop
- `TooDeep` (_stores.storable): a value nests too deep to store (a task: raised as `UserError`)
- `Refused` (_policies.budget_shared): a shared budget said no (raised as `BudgetExceeded`)
- `Unreachable` (_policies.budget_shared): its backend did not answer (raised as `BudgetUnavailable`)
- `CLIError` (cli._common): printed by `loopwise.cli.main`, with its exit status

tests/test_errors.py checks this docstring against the classes, both ways.
"""

from __future__ import annotations

import os
import shutil
from collections.abc import Mapping
from pathlib import Path

__all__ = [
    "LoopwiseError",
    "ToolRetry",
    "ModelBehaviorError",
    "ModelConnectionError",
    "ModelError",
    "ModelHTTPError",
    "ModelTimeoutError",
    "StoreError",
    "UserError",
]


class LoopwiseError(Exception):
    """Base class of every exception loopwise raises."""


class UserError(LoopwiseError):
    """A developer mistake: the message names what is wrong and how to fix it."""


class ModelError(LoopwiseError):
    """A model call failed. Ends the run with stop reason `error`."""


class ModelHTTPError(ModelError):
    """The provider answered with an HTTP error status.

    `headers` are the answer's headers (names in lower case) when the adapter has
    them; `retry_after` is the wait in seconds the server asked for (`Retry-After`),
    which model retries honour.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        body: object = None,
        headers: Mapping[str, str] | None = None,
        retry_after: float | None = None,
    ) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.body = body
        self.headers = headers
        self.retry_after = retry_after


class ModelTimeoutError(ModelError):
    """The provider did not answer within the model's timeout."""


class ModelConnectionError(ModelError):
    """The provider could not be reached."""


class ModelBehaviorError(ModelError):
    """The model (or a test double) returned something the runtime cannot use."""


class ToolRetry(LoopwiseError):
    """Raise it in a tool to ask for another attempt (within the tool's `retries`).

    The message is recorded with the attempt; when no attempt is left, the fallback
    chain answers, or the model reads the message as the tool's error.
    """


class StoreError(LoopwiseError):
    """The event log's database could not be written (or opened): the message names the
    file, what was being done, and the operating system's or SQLite's error."""


def store_error(path: os.PathLike[str] | str, doing: str, exc: BaseException) -> StoreError:
    """A `StoreError` saying what failed (`doing` the database `path`), with SQLite's or the OS's error.

    SQLite names a full disk (or a file-size limit) only as "disk I/O error" or "database or
    disk is full": the space left on the file's filesystem is added, which says which.
    """
    code = getattr(exc, "sqlite_errorname", None)
    why = f"{type(exc).__name__}: {exc}" + (f" ({code})" if code else "")
    try:
        free = shutil.disk_usage(Path(path).parent).free
        why += f"; {free:,} bytes free on that filesystem"
    except OSError:
        pass
    return StoreError(f"cannot {doing} the loopwise database {path}: {why}")
