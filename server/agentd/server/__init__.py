"""agentd's server runtime: define agents and tools in an app module, serve them over gRPC.

    from agentd.server import Agent, App, function_tool
"""

from agentd.server.app import App
from agentd.server.models.base import ModelSettings
from agentd.server.models.script import Script, call, calls, hosted, reason, say
from agentd.server.runtime.agent import Agent, ResultCaching
from agentd.server.runtime.context import RunContext, ToolContext
from agentd.server.runtime.guardrails import (
    ClassifierGuardrail,
    DenyListGuardrail,
    GuardrailResult,
    InputGuardrail,
    OutputGuardrail,
    RegexGuardrail,
    ToolGuardrail,
    input_guardrail,
    output_guardrail,
    tool_guardrail,
)
from agentd.server.runtime.history import Compaction
from agentd.server.runtime.tools import FunctionTool, function_tool

__all__ = [
    "Agent",
    "App",
    "ClassifierGuardrail",
    "Compaction",
    "DenyListGuardrail",
    "FunctionTool",
    "GuardrailResult",
    "InputGuardrail",
    "ModelSettings",
    "OutputGuardrail",
    "RegexGuardrail",
    "ResultCaching",
    "RunContext",
    "Script",
    "ToolContext",
    "ToolGuardrail",
    "call",
    "calls",
    "function_tool",
    "hosted",
    "input_guardrail",
    "output_guardrail",
    "reason",
    "say",
    "tool_guardrail",
]
