"""The public surface is a contract: changing it is a decision, not an accident."""

import loopwise
import loopwise.models


def test_top_level_exports():
    assert loopwise.__all__ == sorted(loopwise.__all__)
    assert set(loopwise.__all__) == {
        "Agent",
        "Backoff",
        "Budget",
        "BudgetExceeded",
        "BudgetUnavailable",
        "CallDecision",
        "CircuitBreaker",
        "CircuitOpenError",
        "Decision",
        "Template",
        "ToolRetry",
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
        "Tool",
        "ToolCaller",
        "ToolResult",
        "ToolSpec",
        "UserError",
        "WrapperToolCaller",
        "__version__",
        "decisions",
        "install_signal_handlers",
        "kill",
        "tool",
    }
    for name in loopwise.__all__:
        assert hasattr(loopwise, name), name


def test_models_exports():
    assert set(loopwise.models.__all__) == {
        "AttemptRecord",
        "FunctionModel",
        "Message",
        "Model",
        "ModelRequest",
        "ModelPolicy",
        "ModelResponse",
        "OpenAIModel",
        "Price",
        "ScriptedModel",
        "ToolCall",
        "ToolSpec",
        "Usage",
        "WrapperModel",
        "resolve_model",
    }
    for name in loopwise.models.__all__:
        assert hasattr(loopwise.models, name), name


def test_testing_exports():
    import loopwise.testing

    assert loopwise.testing.__all__ == sorted(loopwise.testing.__all__)
    assert set(loopwise.testing.__all__) == {"FakeClock", "FunctionModel", "MemoryStore", "ScriptedModel"}
    assert loopwise.testing.MemoryStore is loopwise.MemoryStore
    assert loopwise.testing.ScriptedModel is loopwise.models.ScriptedModel
    for name in loopwise.testing.__all__:
        assert hasattr(loopwise.testing, name), name


def test_events_exports():
    import loopwise.events

    assert loopwise.events.__all__ == sorted(loopwise.events.__all__)
    assert set(loopwise.events.__all__) == {
        "BreakerChanged",
        "ContextFolded",
        "ErrorInfo",
        "Event",
        "EventSchemaError",
        "IterationStarted",
        "KillReceived",
        "LimitHit",
        "ModelAttemptFailed",
        "ModelCallFinished",
        "ModelCallStarted",
        "Nudge",
        "RunFinished",
        "RunResumed",
        "RunStarted",
        "SCHEMA_VERSION",
        "ThreadAbandoned",
        "ToolAttemptFailed",
        "ToolCallFinished",
        "ToolCallStarted",
        "ToolFallback",
        "dumps",
        "dumps_lines",
        "loads",
        "loads_lines",
        "messages_seen",
    }
    for name in loopwise.events.__all__:
        assert hasattr(loopwise.events, name), name
