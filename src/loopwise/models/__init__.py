"""Models the loop can call, and the types of a model call.

```python
from loopwise.models import FunctionModel, ModelRequest, ModelResponse, ScriptedModel, ToolCall
```
"""

from __future__ import annotations

from .._messages import Message as Message
from .._messages import ToolCall as ToolCall
from .._messages import ToolSpec as ToolSpec
from .._messages import Usage as Usage
from ._base import Model as Model
from ._base import ModelRequest as ModelRequest
from ._base import ModelResponse as ModelResponse
from ._base import Price as Price
from ._function import FunctionModel as FunctionModel
from ._function import ScriptedModel as ScriptedModel
from ._openai import OpenAIModel as OpenAIModel
from ._resilience import AttemptRecord as AttemptRecord
from ._resilience import ModelPolicy as ModelPolicy
from ._resolve import resolve_model as resolve_model
from ._wrapper import WrapperModel as WrapperModel

__all__ = [
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
]
