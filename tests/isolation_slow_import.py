"""Functions whose module takes $LOOPWISE_TEST_IMPORT_DELAY seconds to import in a child.

The delay stands for a process's start-up on a busy machine (or a module with heavy
imports): tests/test_isolation.py sets it after this module is imported in the test
process, so only the child processes, which inherit the environment, pay it.
"""

from __future__ import annotations

import os
import time

time.sleep(float(os.environ.get("LOOPWISE_TEST_IMPORT_DELAY", "0")))


def quick(value: object) -> object:
    return value


def forever() -> None:
    time.sleep(3600)
