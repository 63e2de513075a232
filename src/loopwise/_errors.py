"""loopwise's exceptions, in one tree.

```
ToolRetry                a signal a tool raises to ask for another attempt
LoopwiseError
├── UserError            a developer mistake, raised before a run starts
│                        (bad configuration, unknown run id, reused run id, ...)
├── StoreError           the event log's database cannot be written: a full disk,
│                        a read-only directory (names the file, the operation, the error)
└── ModelError           a model call failed; mapped at the adapter edge
    ├── ModelHTTPError     the provider answered with an error status
    ├── ModelTimeoutError  the provider did not answer in time
    ├── ModelConnectionError  the provider could not be reached
    └── ModelBehaviorError the model returned something the runtime cannot use
```

A run stopped by a limit, a kill or a model failure is not an exception: it is a
`RunResult` whose `stop_reason` says why. `ModelError`s end a run as `error`
(recorded in the log and returned in the result). `UserError` is raised to the
caller before a run starts; `StoreError` when the store cannot be opened, or cannot
take a run's end (no result then claims an end the log does not have).
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


class ToolRetry(Exception):
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
