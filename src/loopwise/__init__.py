"""loopwise: a runtime for tool-calling LLM agent loops in production.

A loop that always stops, degrades gracefully when tools fail, keeps its cost
bounded, explains why it did what it did, and can be debugged after the fact.
"""

from __future__ import annotations

from ._runtime.agent import Agent as Agent
from ._tools.breaker import CircuitBreaker as CircuitBreaker
from ._policies.budget import Budget as Budget
from ._policies.budget import BudgetExceeded as BudgetExceeded
from ._policies.budget import BudgetUnavailable as BudgetUnavailable
from ._tools.breaker import CircuitOpenError as CircuitOpenError
from ._policies.context import FullContext as FullContext
from ._control.kill import kill as kill
from ._views.decisions import CallDecision as CallDecision
from ._views.decisions import Decision as Decision
from ._views.decisions import decisions as decisions
from ._policies.context import SlidingWindow as SlidingWindow
from ._errors import LoopwiseError as LoopwiseError
from ._errors import ModelBehaviorError as ModelBehaviorError
from ._errors import ModelConnectionError as ModelConnectionError
from ._errors import ModelError as ModelError
from ._errors import ModelHTTPError as ModelHTTPError
from ._errors import ModelTimeoutError as ModelTimeoutError
from ._errors import StoreError as StoreError
from ._errors import ToolRetry as ToolRetry
from ._errors import UserError as UserError
from ._events import Event as Event
from ._policies.limits import Limits as Limits
from ._policies.redact import Redactor as Redactor
from ._messages import Message as Message
from ._messages import ToolSpec as ToolSpec
from ._views.result import RunResult as RunResult
from ._policies.runaway import RunawayDetector as RunawayDetector
from ._runtime.signals import install_signal_handlers as install_signal_handlers
from ._stores.sqlite import SQLiteStore as SQLiteStore
from ._stores.base import EventStore as EventStore
from ._stores.base import MemoryStore as MemoryStore
from ._tools.policy import Backoff as Backoff
from ._tools.policy import Template as Template
from ._tools.caller import PolicyToolCaller as PolicyToolCaller
from ._tools.caller import ToolCaller as ToolCaller
from ._tools.caller import WrapperToolCaller as WrapperToolCaller
from ._tools.result import ToolResult as ToolResult
from ._tools.tool import RunContext as RunContext
from ._tools.tool import Tool as Tool
from ._tools.tool import tool as tool

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "Backoff",
    "Budget",
    "BudgetExceeded",
    "BudgetUnavailable",
    "CallDecision",
    "CircuitBreaker",
    "CircuitOpenError",
    "Decision",
    "Event",
    "EventStore",
    "FullContext",
    "Limits",
    "LoopwiseError",
    "MemoryStore",
    "Message",
    "ModelBehaviorError",
    "ModelConnectionError",
    "ModelError",
    "ModelHTTPError",
    "ModelTimeoutError",
    "PolicyToolCaller",
    "Redactor",
    "RunContext",
    "RunResult",
    "RunawayDetector",
    "SQLiteStore",
    "SlidingWindow",
    "StoreError",
    "Template",
    "Tool",
    "ToolCaller",
    "ToolResult",
    "ToolRetry",
    "ToolSpec",
    "UserError",
    "WrapperToolCaller",
    "__version__",
    "decisions",
    "install_signal_handlers",
    "kill",
    "tool",
]
