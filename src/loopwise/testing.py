"""What tests of code built on loopwise need: a fake clock, fake models, an in-memory store.

```python
import loopwise as lw
from loopwise.testing import FakeClock, ScriptedModel, MemoryStore

agent = lw.Agent(ScriptedModel(["done"]), store=MemoryStore(), clock=FakeClock(seed=7))
result = agent.run_sync("hi")
print(result.output, result.run_id == lw.Agent(
    ScriptedModel(["done"]), store=MemoryStore(), clock=FakeClock(seed=7)).run_sync("hi").run_id)
#> done True
```

`FakeClock` makes a run's time, ids and random numbers deterministic, and jumps the
event loop's time over waits when nothing else can happen, so a test of a 30 s
deadline, a backoff or a breaker's cool-down takes no real time (sync tools in
threads keep real time: see `FakeClock`). `FunctionModel` answers from a function,
`ScriptedModel` from a script; `MemoryStore` keeps the event log in memory.
"""

from __future__ import annotations

from ._runtime.fakeclock import FakeClock as FakeClock
from ._stores.base import MemoryStore as MemoryStore
from .models._function import FunctionModel as FunctionModel
from .models._function import ScriptedModel as ScriptedModel

__all__ = ["FakeClock", "FunctionModel", "MemoryStore", "ScriptedModel"]
