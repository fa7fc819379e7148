"""An agent definition as data: one pydantic model for agent files, the API and code.

``AgentDefinition`` validates the shape of a definition (every model forbids unknown
fields); ``find_violations``/``definition_errors`` add the checks that need more than one
field or a look inside a JSON schema, and — given the app's tools and the known agent
names — the references: python tool refs, handoff targets, classifier agents. All
violations come back at once, each with the path of its field (``tools[1].parameters``,
``guardrails.input[0].pattern``; ``""`` for the definition as a whole).

Paths point into JSON schemas too (``tools[0].parameters.properties.city.type``), so an
agent file's error names the very line.

Definitions from untrusted sources (the API) must not import Python code: a python tool
``ref`` of the form ``module:attribute`` imports ``module``. The checks take
``allow_imports`` (False unless the caller says so); with it False such refs are
violations and only tools the app module defines, by name, are allowed. Nor may they start
processes: with ``allow_imports`` False a stdio MCP server (a command) is a violation too, and
only streamable HTTP MCP servers are allowed.
"""

from __future__ import annotations

import difflib
import importlib
import json
import re
import types
from typing import Annotated, Any, Collection, Literal, Mapping, Union, get_args, get_origin

import jsonschema
import jsonschema.validators
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_core import PydanticCustomError

from agentd.server.agents.template import parse_template
from agentd.server.models.base import hosted_tool_problem
from agentd.server.runtime.agent import AGENT_NAME_RE, MAX_RESULT_CACHE_TTL_S, handoff_tool_name
from agentd.server.runtime.errors import AgentdError
from agentd.server.runtime.guardrails import GUARDRAIL_NAME_RE, Guardrail, regex_flags
from agentd.server.runtime.items import json_problem
from agentd.server.runtime.tools import TOOL_NAME_RE, FunctionTool
from agentd.server.tenancy import TENANT_RE, valid_tenant

Loc = tuple[Union[str, int], ...]

# A python reference: "package.module:attribute", or a bare name the app module defines.
PYTHON_REF_RE = re.compile(r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*|[A-Za-z0-9_-]{1,64})$")
# A guardrail reference: "package.module:attribute", or a name in the app's App.guardrails.
GUARDRAIL_REF_RE = re.compile(
    r"^(?:[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*:[A-Za-z_][A-Za-z0-9_]*|[A-Za-z0-9][A-Za-z0-9_.-]{0,63})$"
)
NAME_PATTERN = TOOL_NAME_RE.pattern
MAX_TOOLS = 128  # OpenAI's limit on the tools of one request; handoffs count as tools
TOOL_CHOICES = ("auto", "required", "none")
# The error type of the model-level checks pydantic runs when a definition is constructed
# directly; ``find_violations`` reports the same checks itself, field by field.
_CHECKS_ERROR = "agent_definition"


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


# -- model settings -----------------------------------------------------------------------


class ModelSettingsDefinition(_Model):
    """Sampling and tool-use settings sent with every model call of the agent (unset: the model's default)."""

    temperature: float | None = Field(None, ge=0, le=2, description="Sampling temperature, 0 to 2.")
    top_p: float | None = Field(None, ge=0, le=1, description="Nucleus sampling: the probability mass to sample from, 0 to 1.")
    max_output_tokens: int | None = Field(
        None, ge=1, description="The most tokens one model answer may have (sent as max_completion_tokens)."
    )
    reasoning_effort: Literal["minimal", "low", "medium", "high"] | None = Field(
        None, description="How hard a reasoning model thinks before answering."
    )
    reasoning_summary: Literal["auto", "concise", "detailed"] | None = Field(
        None,
        description="Ask a reasoning model for summaries of its reasoning (Responses API only), kept in the "
        "session's reasoning items; unset: none asked.",
    )
    tool_choice: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description='"auto", "required" (some tool must be called), "none", or the name of one of the '
        "agent's tools to force that tool.",
    )
    parallel_tool_calls: bool | None = Field(
        None, description="Whether the model may call several tools in one turn."
    )


# -- tools --------------------------------------------------------------------------------


class CallerTool(_Model):
    """A tool the calling service executes: the run emits action_required with the model's call and
    waits for SubmitToolOutputs. The model's arguments are forwarded as it wrote them; the caller
    checks them against ``parameters``."""

    type: Literal["caller"] = Field(description='"caller": the calling service executes this tool.')
    name: str = Field(pattern=NAME_PATTERN, description="The tool's name as the model sees it: letters, digits, _ or -, at most 64.")
    description: str = Field("", max_length=4096, description="What the tool does, for the model.")
    parameters: dict[str, Any] = Field(
        default_factory=lambda: {"type": "object", "properties": {}, "additionalProperties": False},
        description='A JSON Schema (draft 2020-12 unless it says otherwise in "$schema") of type "object" '
        "describing the arguments. It is sent in strict mode when every object requires all its "
        "properties and allows no others; else as written, non-strict. Only local $refs (#/...).",
    )
    needs_approval: bool = Field(False, description="Every call waits for the caller's ApproveToolCall first.")
    timeout_s: float | None = Field(
        None, gt=0, le=7 * 86400,
        description="How long the run waits for the caller's output, in seconds; a call that times out "
        "gives the model an error output. Unset: no limit.",
    )

    @model_validator(mode="after")
    def _check_parameters(self) -> "CallerTool":
        _raise_checks(schema_violations(self.parameters, ("parameters",), require_object=True))
        return self


class PythonTool(_Model):
    """A Python function tool (``@function_tool``): by name, one the app module's agents use, or
    by ``module:attribute`` (files and code only; imports the module)."""

    type: Literal["python"] = Field(description='"python": a Python function tool agentd runs.')
    ref: str = Field(
        pattern=PYTHON_REF_RE.pattern,
        description='The tool: the name of a tool the app module defines, or "package.module:attribute" '
        "of a FunctionTool (not allowed in definitions made through the API).",
    )
    needs_approval: bool | None = Field(
        None, description="Overrides the tool's own needs_approval (unset: as the tool says)."
    )


ToolDefinition = Annotated[Union[CallerTool, PythonTool], Field(discriminator="type")]


class HostedToolDefinition(BaseModel):
    """A tool the model provider runs itself (OpenAI's Responses API): its calls and results are
    streamed as hosted_tool_call events, never executed by agentd. Options besides ``type`` are
    sent to the API as written (e.g. ``vector_store_ids`` for file_search, ``search_context_size``
    for web_search, ``container`` for code_interpreter, ``size`` for image_generation)."""

    model_config = ConfigDict(extra="allow", frozen=True)

    type: Literal["web_search", "file_search", "code_interpreter", "image_generation"] = Field(
        description='"web_search", "file_search" (needs vector_store_ids), "code_interpreter" (an automatic '
        'container unless "container" says otherwise) or "image_generation".'
    )


# -- MCP servers --------------------------------------------------------------------------

MCPToolName = Annotated[str, Field(min_length=1, max_length=128)]


class MCPToolFilterDefinition(_Model):
    """Which of an MCP server's tools the agent gets, by the names the server gives them."""

    allow: list[MCPToolName] | None = Field(
        None, max_length=1024, description="Only these tools; unset: every tool the server lists."
    )
    deny: list[MCPToolName] = Field(default_factory=list, max_length=1024, description="Never these tools.")


class _MCPServerOptions(_Model):
    name: str = Field(
        pattern=r"^[A-Za-z0-9_-]{1,32}$",
        description="Names the server in logs, traces (the mcp_server attribute) and error outputs, and "
        "prefixes its tools' names where they collide with another server's or the agent's own "
        "({name}_{tool}): letters, digits, _ or -, at most 32.",
    )
    tool_filter: MCPToolFilterDefinition = Field(
        default_factory=MCPToolFilterDefinition, description="Which of the server's tools the agent gets."
    )
    require_approval: Literal["always", "never"] | list[MCPToolName] = Field(
        "never",
        description='"always", "never", or the names of the tools whose calls wait for the caller\'s '
        "ApproveToolCall (as the server names them).",
    )
    timeout_s: float | None = Field(
        None, gt=0, le=3600,
        description="How long one call may take, in seconds (then it is cancelled on the server and the model "
        "reads an error); unset: the server's AGENTD_TOOL_TIMEOUT_S.",
    )
    max_tools: int = Field(128, ge=1, le=128, description="The most tools the agent takes from this server.")
    max_result_chars: int = Field(
        50_000, ge=100, le=1_000_000,
        description="A longer tool result is cut to this many characters, with a note saying so.",
    )


class MCPStdioServerDefinition(_MCPServerOptions):
    """An MCP server agentd starts as a subprocess and speaks to over its stdin and stdout. Agent
    files only: definitions made through the API cannot start processes."""

    type: Literal["stdio"] = Field(description='"stdio": a command agentd runs.')
    command: str = Field(min_length=1, max_length=4096, description="The executable, e.g. npx or python.")
    args: list[Annotated[str, Field(max_length=4096)]] = Field(
        default_factory=list, max_length=256, description="Its arguments."
    )
    env: dict[Annotated[str, Field(pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")], Annotated[str, Field(max_length=32768)]] = (
        Field(
            default_factory=dict, max_length=256,
            description="Environment variables, over a minimal environment (HOME, LOGNAME, PATH, SHELL, TERM, "
            "USER); nothing else of agentd's environment is passed.",
        )
    )
    cwd: str | None = Field(None, min_length=1, max_length=4096, description="Its working directory.")


class MCPHttpServerDefinition(_MCPServerOptions):
    """An MCP server at a streamable HTTP endpoint."""

    type: Literal["streamable_http"] = Field(description='"streamable_http": an MCP endpoint URL.')
    url: str = Field(min_length=1, max_length=2048, description="The endpoint, http:// or https://.")
    headers: dict[str, Annotated[str, Field(max_length=8192)]] = Field(
        default_factory=dict, max_length=64, description="Headers sent with every request."
    )
    context_headers: dict[str, Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict, max_length=64,
        description="Headers sent with each tool call, rendered from the run: {run_id}, {tenant}, {subject}, "
        "{agent}, {session_id}, {call_id} (values that are not printable ASCII are percent-encoded).",
    )

    @field_validator("url")
    @classmethod
    def _check_url(cls, url: str) -> str:
        from agentd.server.mcp.client import check_url

        check_url(url)
        return url

    @field_validator("headers")
    @classmethod
    def _check_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        from agentd.server.mcp.client import check_header_name, check_header_value

        for name, value in headers.items():
            check_header_name(name)
            check_header_value(name, value)
        return headers

    @field_validator("context_headers")
    @classmethod
    def _check_context_headers(cls, headers: dict[str, str]) -> dict[str, str]:
        from agentd.server.mcp.client import check_context_template, check_header_name

        for name, value in headers.items():
            check_header_name(name)
            check_context_template(name, value)
        return headers


MCPServerDefinition = Annotated[
    Union[MCPStdioServerDefinition, MCPHttpServerDefinition], Field(discriminator="type")
]


# -- guardrails ---------------------------------------------------------------------------

GuardrailName = Annotated[
    str,
    Field(
        pattern=GUARDRAIL_NAME_RE.pattern,
        description="Names the guardrail in events and traces: letters, digits, _, - or ., starting with a "
        "letter or digit, at most 64.",
    ),
]


class PythonGuardrailSpec(_Model):
    """A guardrail written in Python: one the app module registers by name, or ``module:attribute``."""

    type: Literal["python"] = Field(description='"python": a guardrail function.')
    ref: str = Field(
        pattern=GUARDRAIL_REF_RE.pattern,
        description='The name the app module registers the guardrail under, or "package.module:attribute" '
        "(not allowed in definitions made through the API).",
    )


class RegexGuardrailSpec(_Model):
    """Trips when the text matches a regular expression (Python ``re`` syntax, searched anywhere)."""

    type: Literal["regex"] = Field(description='"regex": trips on a regular expression match.')
    name: GuardrailName
    flags: str = Field(
        "", pattern=r"^[imsxa]*$",
        description='Regular expression flags, each at most once: "i" ignore case, "m" multi-line, '
        '"s" dot matches newline, "x" verbose, "a" ASCII-only \\w, \\b, \\d and \\s.',
    )
    pattern: str = Field(min_length=1, max_length=2000, description="The regular expression.")

    @field_validator("flags")
    @classmethod
    def _unique_flags(cls, flags: str) -> str:
        if len(set(flags)) != len(flags):
            raise ValueError(f"flags {flags!r} repeat a flag")
        return flags

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str, info: Any) -> str:
        flags = info.data.get("flags") or ""
        try:
            re.compile(pattern, regex_flags(flags))
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


class DenyListGuardrailSpec(_Model):
    """Trips when the text contains any of the words (as whole words)."""

    type: Literal["deny_list"] = Field(description='"deny_list": trips on any of a list of words.')
    name: GuardrailName
    words: list[Annotated[str, Field(min_length=1, max_length=200)]] = Field(
        min_length=1, max_length=10_000, description="The words or phrases that trip the guardrail."
    )
    case_sensitive: bool = Field(False, description="Match the words' case exactly.")

    @field_validator("words")
    @classmethod
    def _not_blank(cls, words: list[str]) -> list[str]:
        blank = [i for i, word in enumerate(words) if not word.strip()]
        if blank:
            raise ValueError(f"words[{blank[0]}] is blank")
        return words


class ClassifierGuardrailSpec(_Model):
    """Asks another agent whether the text should be stopped. That agent's output schema must be
    ``{"tripwire": boolean, "reason": string}``."""

    type: Literal["classifier"] = Field(description='"classifier": another agent judges the text.')
    name: GuardrailName
    agent: str = Field(
        pattern=AGENT_NAME_RE.pattern,
        description='The classifying agent; its output schema is {"tripwire": boolean, "reason": string}.',
    )
    instructions: str | None = Field(
        None, max_length=100_000, description="Extra instructions for the classifier about this check."
    )


GuardrailSpec = Annotated[
    Union[PythonGuardrailSpec, RegexGuardrailSpec, DenyListGuardrailSpec, ClassifierGuardrailSpec],
    Field(discriminator="type"),
]


class ResultCacheDefinition(_Model):
    """Opt in to the result cache (``runtime.agent.ResultCaching``): a run without a session that
    repeats an earlier request exactly (tenant, agent version, input, input items, context,
    max_turns) within ``ttl_s`` is answered with that run's result, marked cached, without a model
    call and without running tools. Never for runs with a session; never when this agent or one it
    hands off to has caller tools, tools needing approval or MCP servers requiring approval; other
    tools only with ``allow_tools``. Only completed runs are stored."""

    ttl_s: float = Field(
        gt=0, le=MAX_RESULT_CACHE_TTL_S,
        description="How long a result is served, in seconds (more than 0, at most 30 days).",
    )
    allow_tools: bool = Field(
        False,
        description="The agent's tools (and those of the agents it hands off to) are safe to skip: a cache hit "
        "does not run them. Without it, an agent with tools, MCP servers or hosted tools is never cached.",
    )


class GuardrailsDefinition(_Model):
    """Checks on what goes into and out of the agent; a tripped guardrail ends the run."""

    input: list[GuardrailSpec] = Field(
        default_factory=list, max_length=32, description="Checks on the run's input, before or beside the first turn."
    )
    output: list[GuardrailSpec] = Field(
        default_factory=list, max_length=32, description="Checks on the agent's final output."
    )
    tool: list[GuardrailSpec] = Field(
        default_factory=list, max_length=32, description="Checks on each tool call's arguments and output."
    )
    input_mode: Literal["parallel", "blocking"] = Field(
        "parallel",
        description='"parallel": input checks run beside the first model turn (its answer is dropped if '
        'one trips); "blocking": the first turn waits for them.',
    )


# -- the agent ----------------------------------------------------------------------------


def _check_template(text: str) -> str:
    parse_template(text)  # ValueError with the reason
    return text


def _check_tenant(tenant: str) -> str:
    if not valid_tenant(tenant):
        raise ValueError(f"tenant {tenant!r} must match {TENANT_RE.pattern}")
    return tenant


class AgentDefinition(_Model):
    """One agent: its instructions, model, tools, handoffs, output and guardrails."""

    name: str = Field(
        pattern=AGENT_NAME_RE.pattern,
        description="The agent's name and resource id (agents/{name}): lowercase letters, digits, _ or -, "
        "starting with a letter or digit, at most 64.",
    )
    description: str = Field(
        "", max_length=4096, description="What the agent does; other agents see it in their handoff tool."
    )
    instructions: Annotated[str, AfterValidator(_check_template)] = Field(
        "",
        max_length=200_000,
        description="The system prompt, a template: {key} is replaced by the run's context[\"key\"] (a run "
        "whose context lacks a key fails); {{ and }} are literal braces. Only plain keys: no {}, "
        "{0}, {a.b}, {a[0]}, {a!r} or {a:>5}.",
    )
    model: str | None = Field(
        None, min_length=1, max_length=256, description="The model to call; unset: the server's default model."
    )
    model_settings: ModelSettingsDefinition = Field(
        default_factory=ModelSettingsDefinition, description="Sampling and tool-use settings."
    )
    tools: list[ToolDefinition] = Field(
        default_factory=list, max_length=MAX_TOOLS, description="The tools the model may call."
    )
    mcp_servers: list[MCPServerDefinition] = Field(
        default_factory=list, max_length=16,
        description="MCP servers whose tools the model may call too: streamable_http endpoints, and (agent "
        "files only) stdio commands.",
    )
    handoffs: list[Annotated[str, Field(pattern=AGENT_NAME_RE.pattern)]] = Field(
        default_factory=list,
        max_length=MAX_TOOLS,
        description="Agents this one may hand the conversation to (each becomes a transfer_to_<name> tool). "
        "Every target must exist; cycles are fine.",
    )
    output_schema: dict[str, Any] | None = Field(
        None,
        description="A JSON Schema the final output must match (the model is asked for JSON); unset: the "
        "final output is text. Only local $refs (#/...).",
    )
    model_api: Literal["responses", "chat_completions"] | None = Field(
        None,
        description="The OpenAI API the model is called on: responses or chat_completions; unset: responses "
        "when the agent has hosted tools, else the server's AGENTD_MODEL_API.",
    )
    hosted_tools: list[HostedToolDefinition] = Field(
        default_factory=list, max_length=16,
        description="Tools the model provider runs itself (Responses API only), e.g. {\"type\": \"web_search\"}.",
    )
    max_turns: int = Field(10, ge=1, le=100, description="The most model turns a run of this agent may take.")
    history_limit: int | None = Field(
        None, ge=0,
        description="The most session items a run sends to the model (its newest); 0: the whole session; "
        "unset: the server's AGENTD_HISTORY_MAX_ITEMS.",
    )
    guardrails: GuardrailsDefinition = Field(
        default_factory=GuardrailsDefinition, description="Input, output and tool guardrails."
    )
    tenants: list[Annotated[str, AfterValidator(_check_tenant)]] | None = Field(
        None, min_length=1, max_length=1000,
        description="The tenants that may see and run this agent; unset: every tenant.",
    )
    cache: ResultCacheDefinition | None = Field(
        None,
        description="Opt in to the result cache: identical requests without a session are answered from it for "
        "ttl_s seconds (no model call, no tools run); unset: never cached.",
    )

    @property
    def context_keys(self) -> tuple[str, ...]:
        """The run context keys the instructions template uses."""
        return parse_template(self.instructions).keys

    @model_validator(mode="after")
    def _check_fields_together(self) -> "AgentDefinition":
        _raise_checks(agent_checks(self.model_dump()))
        return self


# -- violations ---------------------------------------------------------------------------


class DefinitionError(AgentdError):
    """A definition that does not validate, with every violation as (field path, message)."""

    def __init__(self, violations: list[tuple[str, str]]) -> None:
        self.violations = list(violations)
        problems = "; ".join(f"{path}: {message}" if path else message for path, message in self.violations)
        super().__init__(f"invalid agent definition ({len(self.violations)} problem(s)): {problems}")


def format_loc(loc: Loc) -> str:
    """``("tools", 1, "parameters")`` → ``tools[1].parameters``."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif re.match(r"^[A-Za-z_$][A-Za-z0-9_$-]*$", part):
            out += f".{part}" if out else part
        else:
            out += f"[{json.dumps(part, ensure_ascii=False)}]"
    return out


def find_violations(
    data: Any,
    *,
    app_tools: Mapping[str, FunctionTool] | None = None,
    known_agents: Collection[str] | None = None,
    allow_imports: bool = False,
    app_guardrails: Mapping[str, object] | None = None,
) -> list[tuple[Loc, str]]:
    """Every violation of ``data`` (a definition as a dict, from any source) as (location, message).

    With ``app_tools`` (the app module's tools by name) python tool refs are resolved, with
    ``app_guardrails`` (``App.guardrails_by_name``) python guardrail refs; with ``known_agents``
    handoff and classifier targets are checked (the agent's own name counts). ``allow_imports``:
    whether ``module:attribute`` refs may import (agent files: yes; the API: no).
    """
    found: list[tuple[Loc, str]] = []
    try:
        AgentDefinition.model_validate(data)
    except ValidationError as exc:
        found.extend(_from_pydantic(exc))
    except RecursionError:
        found.append(((), "nests too deeply"))
    if isinstance(data, dict):
        for index, tool in enumerate(_list(data.get("tools"))):
            if isinstance(tool, dict) and tool.get("type") == "caller" and isinstance(tool.get("parameters"), dict):
                found.extend(schema_violations(tool["parameters"], ("tools", index, "parameters"), require_object=True))
        found.extend(agent_checks(data))
        found.extend(reference_violations(
            data, app_tools=app_tools, known_agents=known_agents, allow_imports=allow_imports,
            app_guardrails=app_guardrails,
        ))
    unique: dict[tuple[Loc, str], None] = {}
    for violation in found:
        unique.setdefault(violation, None)
    return list(unique)


def definition_errors(
    data: Any,
    *,
    app_tools: Mapping[str, FunctionTool] | None = None,
    known_agents: Collection[str] | None = None,
    allow_imports: bool = False,
    app_guardrails: Mapping[str, object] | None = None,
) -> list[tuple[str, str]]:
    """Every violation of ``data`` as (field path, message); empty when it is valid."""
    return [
        (format_loc(loc), message)
        for loc, message in find_violations(
            data, app_tools=app_tools, known_agents=known_agents, allow_imports=allow_imports,
            app_guardrails=app_guardrails,
        )
    ]


def parse_definition(
    data: Any,
    *,
    app_tools: Mapping[str, FunctionTool] | None = None,
    known_agents: Collection[str] | None = None,
    allow_imports: bool = False,
    app_guardrails: Mapping[str, object] | None = None,
) -> AgentDefinition:
    """The definition, or ``DefinitionError`` with every violation."""
    if isinstance(data, AgentDefinition):
        data = data.model_dump()
    errors = definition_errors(
        data, app_tools=app_tools, known_agents=known_agents, allow_imports=allow_imports,
        app_guardrails=app_guardrails,
    )
    if errors:
        raise DefinitionError(errors)
    return AgentDefinition.model_validate(data)


# -- checks beyond one field ----------------------------------------------------------------


def agent_checks(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """The checks across fields and inside schemas that need no context. ``data`` may be
    malformed (these run beside pydantic's own validation): anything not of the expected
    shape is skipped here, pydantic reports it."""
    found: list[tuple[Loc, str]] = []
    tool_names: dict[str, int] = {}
    all_names_known = True
    for index, tool in enumerate(_list(data.get("tools"))):
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "caller":
            field, name = "name", tool.get("name")
        elif tool.get("type") == "python":
            field, name = "ref", tool.get("ref")
            if isinstance(name, str) and ":" in name:
                all_names_known, name = False, None  # its name is known once imported
        else:
            continue
        if not isinstance(name, str):
            continue
        if name in tool_names:
            found.append((("tools", index, field), f"two tools are named {name!r} (tools[{tool_names[name]}] too)"))
        else:
            tool_names[name] = index
    handoff_tools: set[str] = set()
    seen: dict[str, int] = {}
    for index, target in enumerate(_list(data.get("handoffs"))):
        if not isinstance(target, str):
            continue
        if target in seen:
            found.append((("handoffs", index), f"hands off to {target!r} twice (handoffs[{seen[target]}] too)"))
            continue
        seen[target] = index
        tool = handoff_tool_name(target)
        handoff_tools.add(tool)
        if tool in tool_names:
            found.append((
                ("handoffs", index),
                f"the handoff to {target!r} is the tool {tool!r}, and tools[{tool_names[tool]}] has that name",
            ))
    tools, handoffs = _list(data.get("tools")), _list(data.get("handoffs"))
    if len(tools) + len(handoffs) > MAX_TOOLS and len(tools) <= MAX_TOOLS and len(handoffs) <= MAX_TOOLS:
        found.append((("tools",), f"{len(tools)} tools and {len(handoffs)} handoffs: at most {MAX_TOOLS} together"))
    settings = data.get("model_settings")
    choice = settings.get("tool_choice") if isinstance(settings, dict) else None
    if isinstance(choice, str) and choice not in TOOL_CHOICES and all_names_known:
        if choice not in tool_names and choice not in handoff_tools:
            found.append((("model_settings", "tool_choice"), _unknown_choice(choice, [*tool_names, *handoff_tools])))
    if isinstance(data.get("output_schema"), dict):
        found.extend(schema_violations(data["output_schema"], ("output_schema",), require_object=False))
    hosted = _list(data.get("hosted_tools"))
    for index, spec in enumerate(hosted):
        if not isinstance(spec, dict):
            continue
        problem = _not_json(spec)
        if problem is not None:
            found.append((("hosted_tools", index, *problem[0]), problem[1]))
        elif spec.get("type") == "file_search":
            problem_text = hosted_tool_problem(spec)
            if problem_text is not None:
                found.append((("hosted_tools", index, "vector_store_ids"), problem_text))
    if hosted and data.get("model_api") == "chat_completions":
        found.append((
            ("hosted_tools",),
            "hosted tools run only on the Responses API, and model_api is chat_completions; set model_api to "
            "responses (or leave it unset) or drop the hosted tools",
        ))
    servers: dict[str, int] = {}
    for index, server in enumerate(_list(data.get("mcp_servers"))):
        name = server.get("name") if isinstance(server, dict) else None
        if isinstance(name, str) and name in servers:
            found.append((("mcp_servers", index, "name"), f"two MCP servers are named {name!r} (mcp_servers[{servers[name]}] too)"))
        elif isinstance(name, str):
            servers[name] = index
    tenants: dict[str, int] = {}
    for index, tenant in enumerate(_list(data.get("tenants"))):
        if isinstance(tenant, str) and tenant in tenants:
            found.append((("tenants", index), f"tenant {tenant!r} is listed twice (tenants[{tenants[tenant]}] too)"))
        elif isinstance(tenant, str):
            tenants[tenant] = index
    found.extend(_cache_checks(data))
    guardrails = data.get("guardrails")
    if isinstance(guardrails, dict):
        names: dict[str, Loc] = {}
        for stage in ("input", "output", "tool"):
            for index, spec in enumerate(_list(guardrails.get(stage))):
                if not isinstance(spec, dict):
                    continue
                loc: Loc = ("guardrails", stage, index)
                name = spec.get("name") if spec.get("type") != "python" else None
                if isinstance(name, str):
                    if name in names:
                        found.append(((*loc, "name"), f"two guardrails are named {name!r} ({format_loc(names[name])} too)"))
                    else:
                        names[name] = loc
                if spec.get("type") == "classifier" and spec.get("agent") == data.get("name"):
                    found.append(((*loc, "agent"), "an agent cannot be its own classifier"))
    return found


def _cache_checks(data: dict[str, Any]) -> list[tuple[Loc, str]]:
    """``ResultCaching``'s rules for the definition's own tools (``Agent.cache_refusal`` checks the
    built agent the same way; the agents it hands off to are checked per run)."""
    cache = data.get("cache")
    if not isinstance(cache, dict):
        return []
    found: list[tuple[Loc, str]] = []
    for index, tool in enumerate(_list(data.get("tools"))):
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "caller":
            found.append((("tools", index), "a caller tool makes runs wait for the caller, so they are never cached; "
                                            "drop cache or the tool"))
        elif tool.get("needs_approval") is True:
            found.append((("tools", index, "needs_approval"), "a tool needing approval makes runs wait for the caller, "
                                                              "so they are never cached; drop cache or the approval"))
    for index, server in enumerate(_list(data.get("mcp_servers"))):
        if isinstance(server, dict) and server.get("require_approval", "never") != "never":
            found.append((("mcp_servers", index, "require_approval"),
                          "approvals make runs wait for the caller, so they are never cached; drop cache or set "
                          'require_approval to "never"'))
    if cache.get("allow_tools") is not True:
        kinds = [kind for kind, key in (("tools", "tools"), ("MCP servers", "mcp_servers"),
                                        ("hosted tools", "hosted_tools")) if _list(data.get(key))]
        if kinds:
            found.append((("cache", "allow_tools"),
                          f"the agent has {' and '.join(kinds)}, which may have side effects and a cache hit does not "
                          "run; set allow_tools: true if they are safe to skip, or drop cache"))
    return found


def reference_violations(
    data: dict[str, Any],
    *,
    app_tools: Mapping[str, FunctionTool] | None,
    known_agents: Collection[str] | None,
    allow_imports: bool,
    app_guardrails: Mapping[str, object] | None = None,
) -> list[tuple[Loc, str]]:
    """Python tool refs that do not resolve (with ``app_tools``), python guardrail refs that do not
    (with ``app_guardrails``), handoff and classifier targets that do not exist (with
    ``known_agents``), a ``tool_choice`` naming no tool, and (with ``app_tools``, without
    ``allow_imports``) stdio MCP servers."""
    found: list[tuple[Loc, str]] = []
    if app_tools is not None and not allow_imports:  # checked with the context, as python refs are
        for index, server in enumerate(_list(data.get("mcp_servers"))):
            if isinstance(server, dict) and server.get("type") == "stdio":
                found.append((
                    ("mcp_servers", index, "type"),
                    "a stdio MCP server starts a process, which only agent files and the app module may do; "
                    "use a streamable_http server",
                ))
    names: set[str] = set()
    resolved_all = app_tools is not None
    for index, tool in enumerate(_list(data.get("tools"))):
        if not isinstance(tool, dict):
            continue
        if tool.get("type") == "caller" and isinstance(tool.get("name"), str):
            names.add(tool["name"])
        elif tool.get("type") == "python" and isinstance(tool.get("ref"), str) and app_tools is not None:
            if not PYTHON_REF_RE.match(tool["ref"]):
                resolved_all = False
                continue  # pydantic says so
            try:
                names.add(resolve_python_tool(tool["ref"], app_tools, allow_imports=allow_imports).name)
            except LookupError as exc:
                resolved_all = False
                found.append((("tools", index, "ref"), str(exc.args[0])))
    handoffs = [h for h in _list(data.get("handoffs")) if isinstance(h, str)]
    if known_agents is not None:
        known = set(known_agents)
        if isinstance(data.get("name"), str):
            known.add(data["name"])
        for index, target in enumerate(_list(data.get("handoffs"))):
            if isinstance(target, str) and AGENT_NAME_RE.match(target) and target not in known:
                found.append((("handoffs", index), _unknown_agent(target, known)))
        guardrails = data.get("guardrails")
        if isinstance(guardrails, dict):
            for stage in ("input", "output", "tool"):
                for index, spec in enumerate(_list(guardrails.get(stage))):
                    if isinstance(spec, dict) and spec.get("type") == "classifier":
                        agent = spec.get("agent")
                        if isinstance(agent, str) and AGENT_NAME_RE.match(agent) and agent not in known:
                            found.append((("guardrails", stage, index, "agent"), _unknown_agent(agent, known)))
    settings = data.get("model_settings")
    choice = settings.get("tool_choice") if isinstance(settings, dict) else None
    imports = any(
        isinstance(t, dict) and t.get("type") == "python" and ":" in str(t.get("ref")) for t in _list(data.get("tools"))
    )
    # Without imported tools every name is known as written: agent_checks checks the choice.
    if resolved_all and imports and isinstance(choice, str) and choice not in TOOL_CHOICES:
        everything = names | {handoff_tool_name(h) for h in handoffs}
        if choice not in everything:
            found.append((("model_settings", "tool_choice"), _unknown_choice(choice, sorted(everything))))
    guardrails = data.get("guardrails")
    if app_guardrails is not None and isinstance(guardrails, dict):
        for stage in ("input", "output", "tool"):
            for index, spec in enumerate(_list(guardrails.get(stage))):
                ref = spec.get("ref") if isinstance(spec, dict) and spec.get("type") == "python" else None
                if isinstance(ref, str) and GUARDRAIL_REF_RE.match(ref):
                    try:
                        resolve_python_guardrail(ref, app_guardrails, stage=stage, allow_imports=allow_imports)
                    except LookupError as exc:
                        found.append((("guardrails", stage, index, "ref"), str(exc.args[0])))
    return found


def resolve_python_tool(ref: str, app_tools: Mapping[str, FunctionTool], *, allow_imports: bool) -> FunctionTool:
    """The tool ``ref`` names; ``LookupError`` (with a message) when it names none."""
    if ":" not in ref:
        tool = app_tools.get(ref)
        if tool is None:
            raise LookupError(f"the app module has no tool named {ref!r}{_suggest(ref, app_tools)}")
        return tool
    tool = _import_ref(ref, allow_imports=allow_imports, what="tool")
    if not isinstance(tool, FunctionTool):
        raise LookupError(f"{ref!r} is a {type(tool).__name__}, not a tool; decorate it with @function_tool")
    return tool


def resolve_python_guardrail(
    ref: str, app_guardrails: Mapping[str, object], *, stage: str, allow_imports: bool
) -> Guardrail:
    """The guardrail ``ref`` names (a name in ``App.guardrails``, or ``module:attribute``), which must
    serve ``stage`` ("input", "output" or "tool"); ``LookupError`` (with a message) otherwise."""
    if ":" not in ref:
        guardrail = app_guardrails.get(ref)
        if guardrail is None:
            raise LookupError(f"the app has no guardrail named {ref!r} (App.guardrails){_suggest(ref, app_guardrails)}")
    else:
        guardrail = _import_ref(ref, allow_imports=allow_imports, what="guardrail")
    if not isinstance(guardrail, Guardrail):
        raise LookupError(f"{ref!r} is a {type(guardrail).__name__}, not a guardrail")
    if stage not in guardrail.list_kinds:
        serves = ", ".join(sorted(guardrail.list_kinds))
        raise LookupError(f"guardrail {ref!r} checks {serves}; it cannot be one of the {stage} guardrails")
    return guardrail


def _import_ref(ref: str, *, allow_imports: bool, what: str) -> Any:
    if not allow_imports:
        raise LookupError(
            f"{ref!r} would import Python code, which only agent files and the app module may do; "
            f"name a {what} the app module defines instead"
        )
    module_name, _, attribute = ref.partition(":")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the module's own failure as it runs
        raise LookupError(f"cannot import {module_name!r}: {type(exc).__name__}: {exc}") from None
    value = getattr(module, attribute, None)
    if value is None:
        raise LookupError(f"module {module_name!r} has no attribute {attribute!r}")
    return value


# -- JSON schemas ---------------------------------------------------------------------------

_UNKNOWN = object()


def schema_violations(schema: dict[str, Any], loc: Loc, *, require_object: bool) -> list[tuple[Loc, str]]:
    """Why ``schema`` is not a usable JSON Schema (valid under its meta-schema, JSON, only local
    references that resolve; of type "object" with ``require_object``), at the exact place."""
    problem = _not_json(schema)
    if problem is not None:
        return [(loc + problem[0], problem[1])]
    validator: Any = jsonschema.Draft202012Validator
    if "$schema" in schema:
        if isinstance(schema["$schema"], str):
            validator = jsonschema.validators.validator_for(schema, default=_UNKNOWN)
        if validator is _UNKNOWN or not isinstance(schema["$schema"], str):
            return [(
                (*loc, "$schema"),
                f"unknown $schema {schema['$schema']!r}; name a JSON Schema draft's meta-schema, or leave "
                "it out for draft 2020-12",
            )]
    try:
        validator.check_schema(schema)  # type: ignore[attr-defined]
    except jsonschema.SchemaError as exc:
        return [((*loc, *exc.absolute_path), f"not a valid JSON Schema: {exc.message}")]
    except RecursionError:
        return [(loc, "nests too deeply")]
    found: list[tuple[Loc, str]] = []
    for ref_loc, ref in _refs(schema):
        if not ref.startswith("#"):
            found.append(((*loc, *ref_loc), f"$ref {ref!r}: only local references (#/...) are allowed"))
        elif ref.startswith("#/") or ref == "#":
            if not _pointer_resolves(schema, ref[1:]):
                found.append(((*loc, *ref_loc), f"$ref {ref!r} points at nothing in this schema"))
    if require_object and schema.get("type") != "object":
        found.append(((*loc, "type"), 'tool parameters must be a JSON Schema of "type": "object"'))
    return found


def _not_json(value: Any) -> tuple[Loc, str] | None:
    stack: list[tuple[Loc, Any]] = [((), value)]
    while stack:
        loc, node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if not isinstance(key, str):
                    return loc, f"key {key!r} is not a string"
                stack.append(((*loc, key), child))
        elif isinstance(node, list):
            stack.extend(((*loc, i), child) for i, child in enumerate(node))
        elif node is not None and not isinstance(node, (str, int, float, bool)):
            return loc, f"a {type(node).__name__} is not JSON"
    problem = json_problem(value)
    return ((), problem) if problem is not None else None


def _refs(schema: Any) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    stack: list[tuple[Loc, Any]] = [((), schema)]
    while stack:
        loc, node = stack.pop()
        if isinstance(node, dict):
            for key, child in node.items():
                if key == "$ref" and isinstance(child, str):
                    found.append(((*loc, key), child))
                elif key not in ("enum", "const", "default", "examples"):  # data, not schemas
                    stack.append(((*loc, key), child))
        elif isinstance(node, list):
            stack.extend(((*loc, i), child) for i, child in enumerate(node))
    return found


def _pointer_resolves(schema: Any, pointer: str) -> bool:
    node = schema
    for token in pointer.split("/")[1:] if pointer else []:
        token = token.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False
    return True


# -- pydantic's errors as violations ----------------------------------------------------------


def _from_pydantic(exc: ValidationError) -> list[tuple[Loc, str]]:
    found: list[tuple[Loc, str]] = []
    for error in exc.errors(include_url=False):
        kind = error["type"]
        if kind == _CHECKS_ERROR:
            continue  # reported field by field by agent_checks / schema_violations
        loc, annotation = _clean_loc(error["loc"])
        message = error["msg"]
        if kind == "extra_forbidden":
            parent = _model_of(_clean_loc(error["loc"][:-1])[1])
            key = str(loc[-1]) if loc else ""
            message = f"unknown field {key!r}"
            if parent is not None:
                allowed = list(parent.model_fields)
                close = difflib.get_close_matches(key, allowed, n=1)
                message += (f"; did you mean {close[0]!r}?" if close else "") + f" (allowed: {', '.join(allowed)})"
        elif kind in ("union_tag_not_found", "union_tag_invalid"):
            tags = ", ".join(repr(t) for t in _union_tags(annotation))
            loc = (*loc, "type")
            if kind == "union_tag_not_found":
                message = f"'type' is required: one of {tags}"
            else:
                message = f"unknown type {error.get('ctx', {}).get('tag')!r}: one of {tags}"
        elif kind == "missing":
            message = "is required"
        elif kind == "value_error":
            message = message.removeprefix("Value error, ")
        elif kind in ("model_type", "model_attributes_type", "dict_type") and not loc:
            message = f"an agent definition is a mapping of fields, not a {type(error['input']).__name__}"
        elif kind == "string_pattern_mismatch" and loc and loc[-1] == "name" and len(loc) == 1:
            message = (
                "must be lowercase letters, digits, _ or -, starting with a letter or digit, at most 64 "
                "characters (it is a resource id)"
            )
        found.append((loc, message))
    return found


def _unwrap(annotation: Any) -> Any:
    while True:
        origin = get_origin(annotation)
        if origin is Annotated:
            annotation = get_args(annotation)[0]
            continue
        if origin in (Union, types.UnionType):
            args = [a for a in get_args(annotation) if a is not type(None)]
            if len(args) == 1:
                annotation = args[0]
                continue
        return annotation


def _union_members(annotation: Any) -> dict[str, type[BaseModel]] | None:
    if get_origin(annotation) not in (Union, types.UnionType):
        return None
    members: dict[str, type[BaseModel]] = {}
    for member in get_args(annotation):
        if not (isinstance(member, type) and issubclass(member, BaseModel) and "type" in member.model_fields):
            return None
        for tag in get_args(member.model_fields["type"].annotation):
            members[tag] = member
    return members


def _union_tags(annotation: Any) -> list[str]:
    return list(_union_members(_unwrap(annotation)) or {})


def _model_of(annotation: Any) -> type[BaseModel] | None:
    annotation = _unwrap(annotation)
    return annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None


def _clean_loc(loc: tuple[Any, ...]) -> tuple[Loc, Any]:
    """Pydantic's error location without the tags of discriminated unions (``tools.0.caller.name``
    → ``tools[0].name``), and the annotation at that place."""
    annotation: Any = AgentDefinition
    out: list[str | int] = []
    for part in loc:
        annotation = _unwrap(annotation)
        members = _union_members(annotation)
        if members is not None and isinstance(part, str) and part in members:
            annotation = members[part]
            continue
        out.append(part)
        model = _model_of(annotation)
        if model is not None:
            field = model.model_fields.get(part) if isinstance(part, str) else None
            annotation = field.annotation if field is not None else None
        elif get_origin(annotation) is list and isinstance(part, int):
            annotation = get_args(annotation)[0]
        else:
            annotation = None
    return tuple(out), annotation


# -- helpers ----------------------------------------------------------------------------------


def _raise_checks(found: list[tuple[Loc, str]]) -> None:
    if found:
        problems = "; ".join(f"{format_loc(loc)}: {message}" if loc else message for loc, message in found)
        raise PydanticCustomError(_CHECKS_ERROR, "{problems}", {"problems": problems})


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _suggest(name: str, choices: Collection[str]) -> str:
    close = difflib.get_close_matches(name, list(choices), n=1)
    return f"; did you mean {close[0]!r}?" if close else ""


def _unknown_agent(name: str, known: Collection[str]) -> str:
    return f"there is no agent named {name!r}{_suggest(name, known)}"


def _unknown_choice(choice: str, names: list[str]) -> str:
    listed = ", ".join(repr(n) for n in names) or "none"
    return f'tool_choice {choice!r} is not "auto", "required", "none" or one of the agent\'s tools ({listed})'
