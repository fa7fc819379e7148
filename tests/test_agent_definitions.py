"""Agent definitions as data: the pydantic model, every violation at once with its field path,
runtime agents built from definitions (templates, caller tools, output schemas, model settings,
guardrails), and runs of them — in process with the scripted model and over a real server."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, AsyncIterator

import pydantic
import pytest
from google.protobuf.json_format import MessageToDict

from agentd.client import AgentdClient
from agentd.server import App, Script, call, calls, function_tool, say
from agentd.server.agents.build import TemplateInstructions, agent_from_definition
from agentd.server.agents.definition import (
    AgentDefinition,
    CallerTool,
    DefinitionError,
    definition_errors,
    parse_definition,
)
from agentd.server.agents.template import parse_template
from agentd.server.models.base import ModelRequest, ModelSettings
from agentd.server.models.openai_chat import OpenAIProvider, _chat_params
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.runtime import events as ev
from agentd.server.runtime import guardrails as rg
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.items import MessageItem
from agentd.server.runtime.run_loop import AgentRunner, RunInput
from agentd.server.serve import start_server
from agentd.server.sessions.memory import MemorySessionStore
from agentd.server.settings import Settings
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import run_event_pb2
from tests.conftest import Harness
from tests.runs_util import assert_well_formed, collect, kinds, of_kind, wait_for_action


@function_tool
def double(n: int) -> int:
    """Double a number."""
    return n * 2


@function_tool(needs_approval=False)
def refund(order_id: str) -> str:
    """Refund an order."""
    return f"refunded {order_id}"


APP_TOOLS = {"double": double, "refund": refund}

LOOKUP = {
    "type": "caller",
    "name": "lookup_order",
    "description": "Look an order up.",
    "parameters": {
        "type": "object",
        "properties": {"order_id": {"type": "string"}},
        "required": ["order_id"],
        "additionalProperties": False,
    },
}


def errors(data: Any, **context: Any) -> dict[str, str]:
    """The violations by path (one per path expected in these tests)."""
    found = definition_errors(data, **context)
    paths = [path for path, _ in found]
    assert len(paths) == len(set(paths)), found
    return dict(found)


def only(data: Any, path: str, fragment: str, **context: Any) -> None:
    found = errors(data, **context)
    assert list(found) == [path], found
    assert fragment in found[path], found[path]


# -- the model and its violations --------------------------------------------------------------


def test_a_valid_definition_has_no_violations_and_round_trips_through_its_json() -> None:
    data = {
        "name": "triage",
        "description": "Routes customers.",
        "instructions": "Help {user} with order {order}. Literal braces: {{like this}}.",
        "model": "gpt-4o-mini",
        "model_settings": {"temperature": 0.2, "top_p": 0.9, "max_output_tokens": 500, "reasoning_effort": "low",
                           "tool_choice": "auto", "parallel_tool_calls": False},
        "tools": [LOOKUP, {"type": "python", "ref": "double"}],
        "handoffs": ["billing"],
        "output_schema": {"type": "object", "properties": {"answer": {"type": "string"}}, "required": ["answer"]},
        "max_turns": 5,
        "history_limit": 50,
        "guardrails": {
            "input": [{"type": "regex", "name": "no-cards", "pattern": r"\b\d{16}\b"}],
            "output": [{"type": "deny_list", "name": "rude", "words": ["idiot"]}],
            "tool": [{"type": "classifier", "name": "judge", "agent": "billing"}],
            "input_mode": "blocking",
        },
        "tenants": ["acme", "globex"],
    }
    assert definition_errors(data, app_tools=APP_TOOLS, known_agents=["billing"]) == []
    definition = parse_definition(data, app_tools=APP_TOOLS, known_agents=["billing"])
    assert definition.context_keys == ("user", "order")
    # What a store keeps (the catalog dumps definitions so) parses back to the same definition.
    dumped = definition.model_dump(mode="json", exclude_none=True)
    assert parse_definition(json.loads(json.dumps(dumped))) == definition


def test_every_violation_is_reported_at_once_with_its_path() -> None:
    data = {
        "name": "Triage",
        "instructions": "Hi {user.name}",
        "colour": "blue",
        "model_settings": {"temperature": 2.5, "reasoning_effort": "extreme", "tool_choice": "nothing"},
        "tools": [
            {**LOOKUP, "parameters": {"type": "object", "properties": {"order_id": {"type": "strng"}}}},
            {"type": "caller", "name": "lookup_order"},
            {"type": "python", "ref": "no_such_tool"},
            {"type": "shell", "command": "rm"},
        ],
        "handoffs": ["billing", "nobody"],
        "output_schema": {"type": "object", "properties": {"a": {"minLength": -1}}},
        "max_turns": 0,
        "guardrails": {"input": [{"type": "regex", "name": "r", "pattern": "(open"}]},
        "tenants": ["acme", "not a tenant"],
    }
    found = errors(data, app_tools=APP_TOOLS, known_agents=["billing"])
    assert set(found) == {
        "name",
        "instructions",
        "colour",
        "model_settings.temperature",
        "model_settings.reasoning_effort",
        "model_settings.tool_choice",
        "tools[0].parameters.properties.order_id.type",
        "tools[1].name",
        "tools[2].ref",
        "tools[3].type",
        "handoffs[1]",
        "output_schema.properties.a.minLength",
        "max_turns",
        "guardrails.input[0].pattern",
        "tenants[1]",
    }, found
    assert "not a valid JSON Schema" in found["tools[0].parameters.properties.order_id.type"]
    assert "two tools are named 'lookup_order'" in found["tools[1].name"]
    assert "no tool named 'no_such_tool'" in found["tools[2].ref"]
    assert "unknown type 'shell'" in found["tools[3].type"]
    assert "no agent named 'nobody'" in found["handoffs[1]"]
    assert "unknown field 'colour'" in found["colour"]
    # As an exception: the same list, and a message naming every field.
    with pytest.raises(DefinitionError) as caught:
        parse_definition(data, app_tools=APP_TOOLS, known_agents=["billing"])
    assert dict(caught.value.violations) == found
    assert all(path in str(caught.value) for path in found)


def test_unknown_fields_are_named_with_a_suggestion_at_any_depth() -> None:
    only({"name": "a", "instruction": "x"}, "instruction", "did you mean 'instructions'?")
    only({"name": "a", "tools": [{**LOOKUP, "descripton": "x"}]}, "tools[0].descripton", "did you mean 'description'?")
    only({"name": "a", "model_settings": {"max_tokens": 5}}, "model_settings.max_tokens", "unknown field")
    only({"name": "a", "guardrails": {"inputs": []}}, "guardrails.inputs", "did you mean 'input'?")
    only({"name": "a", "guardrails": {"input": [{"type": "deny_list", "name": "d", "words": ["x"], "regex": "y"}]}},
         "guardrails.input[0].regex", "unknown field")


def test_a_definition_must_be_a_mapping_with_a_valid_name() -> None:
    only(["name", "a"], "", "mapping")
    only({}, "name", "required")
    only({"name": "UPPER"}, "name", "resource id")
    only({"name": "a" * 65}, "name", "resource id")


@pytest.mark.parametrize("ref, context, fragment", [
    ("missing", {}, "the app module has no tool named 'missing'"),
    ("doubel", {}, "did you mean 'double'?"),
    ("json:dumps", {}, "would import Python code"),  # a definition from the API may not import
    ("json:dumps", {"allow_imports": True}, "not a tool"),
    ("json:nothing_here", {"allow_imports": True}, "has no attribute 'nothing_here'"),
    ("agentd_no_such_module:tool", {"allow_imports": True}, "cannot import 'agentd_no_such_module'"),
])
def test_python_tool_refs_must_name_a_tool(ref: str, context: dict[str, Any], fragment: str) -> None:
    only({"name": "a", "tools": [{"type": "python", "ref": ref}]}, "tools[0].ref", fragment,
         app_tools=APP_TOOLS, **context)


def test_a_python_tool_by_import_path_resolves_when_imports_are_allowed() -> None:
    data = {"name": "a", "tools": [{"type": "python", "ref": "tests.test_agent_definitions:double"}],
            "model_settings": {"tool_choice": "double"}}
    assert definition_errors(data, app_tools={}, allow_imports=True) == []
    agent = agent_from_definition(parse_definition(data), app_tools={}, known_agents=(), allow_imports=True)
    # (pytest imported this module under its own name: the import gives a twin of ``double``)
    assert [(t.name, t.fn.__qualname__, t.caller_executed) for t in agent.tools] == [("double", "double", False)]
    with pytest.raises(DefinitionError, match="would import Python code"):
        agent_from_definition(parse_definition(data), app_tools={}, known_agents=())


def test_handoff_targets_must_exist_but_cycles_are_fine() -> None:
    only({"name": "a", "handoffs": ["b", "ghost"]}, "handoffs[1]", "no agent named 'ghost'", known_agents=["b"])
    only({"name": "a", "handoffs": ["b", "b"]}, "handoffs[1]", "twice")
    only({"name": "a", "handoffs": ["Bad Name"]}, "handoffs[0]", "pattern")
    # a → b → a, and an agent handing off to itself: all fine.
    a = agent_from_definition(parse_definition({"name": "a", "handoffs": ["b", "a"]}), app_tools={}, known_agents=["b"])
    b = agent_from_definition(parse_definition({"name": "b", "handoffs": ["a"]}), app_tools={}, known_agents=["a"])
    app = App(agents=[a, b])
    assert set(app.compiled["a"].handoffs_by_tool.values()) == {"a", "b"}
    with pytest.raises(DefinitionError, match="no agent named 'c'"):
        agent_from_definition(parse_definition({"name": "a", "handoffs": ["c"]}), app_tools={}, known_agents=["b"])


def test_a_handoff_may_not_collide_with_a_tool_and_tool_choice_must_name_one() -> None:
    only({"name": "a", "handoffs": ["b"], "tools": [{**LOOKUP, "name": "transfer_to_b"}]}, "handoffs[0]",
         "the handoff to 'b' is the tool 'transfer_to_b'")
    only({"name": "a", "tools": [LOOKUP], "model_settings": {"tool_choice": "lookup"}},
         "model_settings.tool_choice", "'lookup_order'")
    assert definition_errors({"name": "a", "tools": [LOOKUP], "handoffs": ["b"],
                              "model_settings": {"tool_choice": "transfer_to_b"}}) == []
    # With a tool by import path the choice is checked once its name is known.
    data = {"name": "a", "tools": [{"type": "python", "ref": "tests.test_agent_definitions:double"}],
            "model_settings": {"tool_choice": "triple"}}
    assert definition_errors(data) == []
    only(data, "model_settings.tool_choice", "'double'", app_tools={}, allow_imports=True)


@pytest.mark.parametrize("schema, path, fragment", [
    ({"type": "strng"}, "tools[0].parameters.type", "not a valid JSON Schema"),
    ({"type": "object", "properties": {"a": {"type": "integer", "minimum": "zero"}}},
     "tools[0].parameters.properties.a.minimum", "not a valid JSON Schema"),
    ({"type": "object", "required": "a"}, "tools[0].parameters.required", "not a valid JSON Schema"),
    ({"type": "array", "items": {"type": "string"}}, "tools[0].parameters.type", '"type": "object"'),
    ({"properties": {}}, "tools[0].parameters.type", '"type": "object"'),
    ({"type": "object", "properties": {"a": {"$ref": "https://example.com/a.json"}}},
     "tools[0].parameters.properties.a.$ref", "only local references"),
    ({"type": "object", "properties": {"a": {"$ref": "#/$defs/missing"}}},
     "tools[0].parameters.properties.a.$ref", "points at nothing"),
    ({"$schema": "https://example.com/my-draft", "type": "object"}, "tools[0].parameters.$schema", "unknown $schema"),
    ({"type": "object", "properties": {"a": {"type": "number", "maximum": float("nan")}}},
     "tools[0].parameters", "NaN"),
])
def test_tool_parameters_must_be_a_valid_json_schema_object(schema: dict, path: str, fragment: str) -> None:
    only({"name": "a", "tools": [{**LOOKUP, "parameters": schema}]}, path, fragment)


def test_the_output_schema_must_be_a_valid_json_schema() -> None:
    only({"name": "a", "output_schema": {"type": "object", "properties": {"n": {"type": "integr"}}}},
         "output_schema.properties.n.type", "not a valid JSON Schema")
    only({"name": "a", "output_schema": {"$ref": "other.json"}}, "output_schema.$ref", "only local references")
    only({"name": "a", "output_schema": "a string"}, "output_schema", "valid dictionary")
    # Any valid schema will do, object or not; an explicit older draft is checked as that draft.
    assert definition_errors({"name": "a", "output_schema": {"type": "array", "items": {"type": "integer"}}}) == []
    assert definition_errors({"name": "a", "output_schema": {
        "$schema": "http://json-schema.org/draft-07/schema#", "type": "object",
        "definitions": {"n": {"type": "integer"}}, "properties": {"n": {"$ref": "#/definitions/n"}},
    }}) == []


@pytest.mark.parametrize("template, fragment", [
    ("Hello {}", "positional"),
    ("Hello {0}", "positional"),
    ("Hello {user.name}", "attribute or index access"),
    ("Hello {users[0]}", "attribute or index access"),
    ("Hello {user!r}", "conversion or format spec"),
    ("Hello {user:>10}", "conversion or format spec"),
    ("Hello {user", "bad template"),
    ("Hello user}", "bad template"),
    ('Answer as {"type": "x"}', "not a context key name"),
    ("Hello {first name}", "not a context key name"),
])
def test_bad_templates_are_refused_with_the_reason(template: str, fragment: str) -> None:
    only({"name": "a", "instructions": template}, "instructions", fragment)


def test_templates_keep_their_keys_and_render_context_values() -> None:
    template = parse_template("{{literal}} {user} owes {amount} for {order}; again {user} ({flags}) {missing_ok}")
    assert template.keys == ("user", "amount", "order", "flags", "missing_ok")
    context = {"user": "Ada", "amount": 49.0, "order": {"id": "A-1", "n": 2}, "flags": [True, None],
               "missing_ok": 1.5}
    assert template.render(context) == (
        '{literal} Ada owes 49 for {"id": "A-1", "n": 2}; again Ada ([true, null]) 1.5'
    )
    assert template.missing({"user": "x"}) == ["amount", "order", "flags", "missing_ok"]


@pytest.mark.parametrize("spec, path, fragment", [
    ({"type": "regex", "name": "r", "pattern": "(unclosed"}, "guardrails.input[0].pattern", "not a valid regular expression"),
    ({"type": "regex", "name": "r", "pattern": "x", "flags": "iq"}, "guardrails.input[0].flags", "pattern"),
    ({"type": "regex", "name": "r", "pattern": "x", "flags": "ii"}, "guardrails.input[0].flags", "repeat"),
    ({"type": "regex", "name": "r", "pattern": ""}, "guardrails.input[0].pattern", "at least 1"),
    ({"type": "regex", "pattern": "x"}, "guardrails.input[0].name", "required"),
    ({"type": "deny_list", "name": "d", "words": []}, "guardrails.input[0].words", "at least 1"),
    ({"type": "deny_list", "name": "d", "words": ["ok", "  "]}, "guardrails.input[0].words", "words[1] is blank"),
    ({"type": "deny_list", "name": "-d", "words": ["x"]}, "guardrails.input[0].name", "pattern"),
    ({"type": "classifier", "name": "c", "agent": "ghost"}, "guardrails.input[0].agent", "no agent named 'ghost'"),
    ({"type": "classifier", "name": "c", "agent": "a"}, "guardrails.input[0].agent", "its own classifier"),
    ({"type": "python", "ref": "not_registered"}, "guardrails.input[0].ref", "no guardrail named 'not_registered'"),
    ({"type": "python", "ref": "only_output"}, "guardrails.input[0].ref", "cannot be one of the input guardrails"),
    ({"type": "python", "ref": "json:dumps"}, "guardrails.input[0].ref", "would import Python code"),
    ({"type": "llm", "name": "x"}, "guardrails.input[0].type", "unknown type 'llm'"),
    ({"name": "x"}, "guardrails.input[0].type", "'type' is required"),
])
def test_bad_guardrail_specs_are_refused(spec: dict, path: str, fragment: str) -> None:
    registry = {"only_output": rg.OutputGuardrail("only_output", lambda ctx, agent, output: False)}
    only({"name": "a", "guardrails": {"input": [spec]}}, path, fragment, known_agents=["judge"],
         app_guardrails=registry)


def test_guardrail_names_are_unique_across_stages_and_the_mode_is_checked() -> None:
    only({"name": "a", "guardrails": {
        "input": [{"type": "regex", "name": "g", "pattern": "x"}],
        "output": [{"type": "deny_list", "name": "g", "words": ["y"]}],
    }}, "guardrails.output[0].name", "two guardrails are named 'g'")
    only({"name": "a", "guardrails": {"input_mode": "eventually"}}, "guardrails.input_mode", "'parallel' or 'blocking'")


def test_settings_limits_and_tenants() -> None:
    only({"name": "a", "model_settings": {"top_p": 1.5}}, "model_settings.top_p", "less than or equal to 1")
    only({"name": "a", "model_settings": {"max_output_tokens": 0}}, "model_settings.max_output_tokens", "greater")
    only({"name": "a", "max_turns": 101}, "max_turns", "less than or equal to 100")
    only({"name": "a", "history_limit": -1}, "history_limit", "greater than or equal to 0")
    only({"name": "a", "tenants": []}, "tenants", "at least 1")
    only({"name": "a", "tenants": ["acme", "acme"]}, "tenants[1]", "listed twice")
    only({"name": "a", "tools": [{**LOOKUP, "timeout_s": 0}]}, "tools[0].timeout_s", "greater than 0")


def test_constructing_the_model_directly_runs_the_same_checks() -> None:
    with pytest.raises(pydantic.ValidationError, match="not a valid JSON Schema"):
        CallerTool(type="caller", name="t", parameters={"type": "strng"})
    with pytest.raises(pydantic.ValidationError, match="hands off to 'b' twice"):
        AgentDefinition(name="a", handoffs=["b", "b"])
    with pytest.raises(pydantic.ValidationError, match="Extra inputs"):
        AgentDefinition(name="a", colour="blue")  # type: ignore[call-arg]


# -- building runtime agents ---------------------------------------------------------------------


def test_a_definition_builds_a_runtime_agent() -> None:
    registry = {"pii": rg.InputGuardrail("pii", lambda ctx, text: False)}
    definition = parse_definition({
        "name": "triage",
        "description": "Routes.",
        "instructions": "Help {user}.",
        "model": "m1",
        "model_settings": {"temperature": 0.3, "top_p": 0.5, "max_output_tokens": 77, "reasoning_effort": "high",
                           "tool_choice": "required", "parallel_tool_calls": False},
        "tools": [
            LOOKUP,
            {"type": "caller", "name": "search", "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
             "needs_approval": True, "timeout_s": 30},
            {"type": "python", "ref": "refund", "needs_approval": True},
            {"type": "python", "ref": "double"},
        ],
        "handoffs": ["billing"],
        "output_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]},
        "max_turns": 4,
        "history_limit": 20,
        "guardrails": {
            "input": [{"type": "python", "ref": "pii"}, {"type": "regex", "name": "cards", "pattern": "card", "flags": "i"}],
            "output": [{"type": "deny_list", "name": "rude", "words": ["idiot"], "case_sensitive": True}],
            "tool": [{"type": "classifier", "name": "judge", "agent": "billing", "instructions": "Be strict."}],
            "input_mode": "blocking",
        },
    })
    agent = agent_from_definition(definition, app_tools=APP_TOOLS, known_agents=["billing"], app_guardrails=registry)
    assert isinstance(agent.instructions, TemplateInstructions) and agent.instructions.keys == ("user",)
    assert (agent.name, agent.description, agent.model, agent.max_turns, agent.history_limit) == (
        "triage", "Routes.", "m1", 4, 20)
    assert agent.model_settings == ModelSettings(temperature=0.3, top_p=0.5, max_tokens=77, tool_choice="required",
                                                 parallel_tool_calls=False, reasoning_effort="high")
    lookup, search, refund_tool, double_tool = agent.tools
    # Caller tools: the caller executes them; strict mode only when it changes nothing.
    assert lookup.caller_executed and not lookup.needs_approval and lookup.strict and lookup.timeout_s is None
    assert lookup.parameters["required"] == ["order_id"]
    assert search.caller_executed and search.needs_approval and not search.strict and search.timeout_s == 30
    assert search.parameters == {"type": "object", "properties": {"q": {"type": "string"}}}  # as written
    # Python tools are the app's; an approval override is a copy, the app's tool is unchanged.
    assert refund_tool is not refund and refund_tool.needs_approval and not refund.needs_approval
    assert refund_tool.fn is refund.fn and double_tool is double
    assert agent.handoffs == ["billing"]
    assert agent.input_guardrail_mode == "blocking"
    assert agent.input_guardrails[0] is registry["pii"]
    assert isinstance(agent.input_guardrails[1], rg.RegexGuardrail)
    assert isinstance(agent.output_guardrails[0], rg.DenyListGuardrail) and agent.output_guardrails[0].case_sensitive
    judge = agent.tool_guardrails[0]
    assert isinstance(judge, rg.ClassifierGuardrail) and judge.agent_name == "billing"
    billing = agent_from_definition(parse_definition({"name": "billing"}), app_tools={}, known_agents=[])
    compiled = App(agents=[agent, billing]).compiled["triage"]
    assert compiled.output_schema is not None and compiled.output_schema.name == "triage_output"
    assert compiled.output_schema.strict  # every property required: strict mode changes nothing
    assert [spec.name for spec in compiled.tool_specs] == [
        "lookup_order", "search", "refund", "double", "transfer_to_billing"]


def test_an_instructions_template_without_keys_is_a_plain_string() -> None:
    agent = agent_from_definition(parse_definition({"name": "a", "instructions": "Use {{json}}."}),
                                  app_tools={}, known_agents=[])
    assert agent.instructions == "Use {json}."


def test_an_output_schema_with_optional_properties_is_sent_non_strict() -> None:
    schema = {"type": "object", "properties": {"a": {"type": "string"}, "b": {"type": "integer"}}, "required": ["a"]}
    agent = agent_from_definition(parse_definition({"name": "a", "output_schema": schema}), app_tools={}, known_agents=[])
    compiled = App(agents=[agent]).compiled["a"]
    assert compiled.output_schema is not None
    assert (compiled.output_schema.schema, compiled.output_schema.strict) == (schema, False)
    # A long agent name still gives a response format name within OpenAI's 64 characters.
    long = agent_from_definition(parse_definition({"name": "x" * 64, "output_schema": schema}), app_tools={},
                                 known_agents=[])
    assert len(App(agents=[long]).compiled["x" * 64].output_schema.name) <= 64  # type: ignore[union-attr]


def test_the_openai_model_sends_the_reasoning_effort() -> None:
    request = ModelRequest(model="o4-mini", instructions="", items=[MessageItem("user", "hi")],
                           settings=ModelSettings(reasoning_effort="minimal", max_tokens=10))
    params = _chat_params("o4-mini", request)
    assert (params["reasoning_effort"], params["max_completion_tokens"]) == ("minimal", 10)
    assert "reasoning_effort" not in _chat_params("m", ModelRequest(model="m", instructions="", items=[]))


# -- runs, in process --------------------------------------------------------------------------


class Provider(ScriptedProvider):
    """Scripted models that keep every request (instructions included)."""

    def __init__(self, script: Script) -> None:
        super().__init__(default=script)
        self.requests: list[ModelRequest] = []

    def get_model(self, name: str) -> Any:
        model, requests = super().get_model(name), self.requests

        class Recording:
            async def stream(self, request: ModelRequest) -> AsyncIterator[Any]:
                requests.append(request)
                async for chunk in model.stream(request):
                    yield chunk

        return Recording()


class Sink:
    trace_id = ""
    cancel_reason = ""

    def __init__(self, answers: dict[str, dict] | None = None) -> None:
        self.payloads: list[Any] = []
        self.answers = answers or {}

    def emit(self, payload: Any) -> None:
        self.payloads.append(payload)

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        pass

    async def wait_action(self, key: str) -> dict:
        return self.answers[key.split(":", 1)[0]]

    @property
    def last(self) -> Any:
        return self.payloads[-1]


async def run_definitions(definitions: list[dict], script: Script, agent: str, context: dict | None = None,
                          answers: dict[str, dict] | None = None) -> tuple[Sink, Provider]:
    names = [d["name"] for d in definitions]
    agents = [agent_from_definition(parse_definition(d), app_tools=APP_TOOLS, known_agents=names)
              for d in definitions]
    provider = Provider(script)
    sink = Sink(answers)
    runner = AgentRunner(App(agents=agents), provider, MemorySessionStore(), InMemoryTraceStore())
    await runner.run(RunInput("run_1", agent, "hello", context=context or {}), sink)
    return sink, provider


async def test_the_template_is_rendered_from_the_run_context_at_every_turn() -> None:
    definition = {"name": "helper", "instructions": "Help {user} (tier {tier}). {{x}}", "tools": [{"type": "python", "ref": "double"}]}
    sink, provider = await run_definitions(
        [definition], Script.of(calls(call("double", n=2)), say("4")), "helper", {"user": "Ada", "tier": 2.0})
    assert isinstance(sink.last, ev.RunCompleted) and sink.last.final_output == "4"
    assert [r.instructions for r in provider.requests] == ["Help Ada (tier 2). {x}"] * 2


async def test_a_missing_context_key_fails_the_run_with_a_clear_error() -> None:
    definition = {"name": "helper", "instructions": "Help {user} with {order}."}
    sink, provider = await run_definitions([definition], Script.of(say("never")), "helper", {"order": "A-1"})
    failed = sink.last
    assert isinstance(failed, ev.RunFailed) and failed.code == ev.RunErrorCode.INVALID_CONTEXT
    assert "agent 'helper'" in failed.message and "'user'" in failed.message and "'order'" in failed.message
    assert "internal error" not in failed.message
    assert provider.requests == []  # no model call without instructions


async def test_a_missing_key_in_a_handoff_targets_template_fails_at_the_handoff() -> None:
    triage = {"name": "triage", "instructions": "Route.", "handoffs": ["billing"]}
    billing = {"name": "billing", "instructions": "Bill {account}."}
    script = Script.of(calls(call("transfer_to_billing")), say("done"))
    sink, _ = await run_definitions([triage, billing], script, "triage")
    assert isinstance(sink.last, ev.RunFailed) and "'account'" in sink.last.message
    assert any(isinstance(p, ev.Handoff) for p in sink.payloads)


OUTPUT_SCHEMA = {
    "type": "object",
    "properties": {"verdict": {"enum": ["refund", "deny"]}, "amount": {"type": "number", "minimum": 0}},
    "required": ["verdict", "amount"],
    "additionalProperties": False,
}


async def test_an_output_schema_validates_the_final_output() -> None:
    definition = {"name": "judge", "output_schema": OUTPUT_SCHEMA}
    sink, provider = await run_definitions([definition], Script.of(say('{"verdict": "refund", "amount": 49}')), "judge")
    assert isinstance(sink.last, ev.RunCompleted) and sink.last.final_output == {"verdict": "refund", "amount": 49}
    sent = provider.requests[0].output_schema
    assert sent is not None and sent.name == "judge_output" and sent.strict

    sink, _ = await run_definitions([definition], Script.of(say('{"verdict": "maybe", "amount": -1}')), "judge")
    failed = sink.last
    assert isinstance(failed, ev.RunFailed) and failed.code == ev.RunErrorCode.INVALID_OUTPUT
    assert "does not match its output schema: 2 error(s)" in failed.message
    assert "maybe" not in failed.message  # the message names the place and the rule, not the content

    sink, _ = await run_definitions([definition], Script.of(say("a refund, I think")), "judge")
    assert isinstance(sink.last, ev.RunFailed) and sink.last.code == ev.RunErrorCode.INVALID_OUTPUT
    assert "is not JSON" in sink.last.message


async def test_a_caller_tool_waits_for_the_callers_output() -> None:
    definition = {"name": "clerk", "tools": [LOOKUP]}
    script = Script.of(calls(call("lookup_order", order_id="A-1")), say("found it"))
    sink, provider = await run_definitions([definition], script, "clerk",
                                           answers={"output": {"output": '{"status": "shipped"}'}})
    assert isinstance(sink.last, ev.RunCompleted) and sink.last.final_output == "found it"
    asked = [p for p in sink.payloads if isinstance(p, ev.ActionRequired)]
    assert [(a.kind, a.item.tool_name, json.loads(a.item.arguments)) for a in asked] == [
        ("tool_output", "lookup_order", {"order_id": "A-1"})]
    outputs = [p.item.output for p in sink.payloads if isinstance(p, ev.ToolOutput)]
    assert outputs == ['{"status": "shipped"}']


# -- over a real server -------------------------------------------------------------------------


@pytest.fixture
async def declarative(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    definitions = [
        {"name": "desk", "model": "desk", "instructions": "You serve {customer} of {company}.",
         "tools": [LOOKUP, {"type": "python", "ref": "double"}], "handoffs": ["verdict"]},
        {"name": "verdict", "model": "verdict", "description": "Decides refunds.", "output_schema": OUTPUT_SCHEMA,
         "handoffs": ["desk"]},
    ]
    names = [d["name"] for d in definitions]
    agents = [agent_from_definition(parse_definition(d), app_tools=APP_TOOLS, known_agents=names) for d in definitions]
    config = Settings(port=0, store="sqlite", sqlite_path=tmp_path / "agentd.db", tool_timeout_s=5,  # type: ignore[call-arg]
                      shutdown_grace_s=1)
    provider = OpenAIProvider(api_key="test-key", base_url=model_server.base_url, timeout_s=10, max_retries=2)
    server = await start_server(config, App(agents=agents), models=provider)
    h = Harness(server, AgentdClient(server.target), model_server)
    try:
        yield h
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_declarative_agents_over_a_real_server(declarative: Harness) -> None:
    client, model = declarative.client, declarative.model
    # Scripts play by the assistant turns since the user's message: the verdict agent answers the 4th.
    script = Script.of(calls(call("lookup_order", order_id="A-9")), calls(call("double", n=21)),
                       calls(call("transfer_to_verdict")), say('{"verdict": "refund", "amount": 42}'))
    model.set_script("desk", script)
    model.set_script("verdict", script)
    run = await client.create_run("desk", "refund A-9?", context={"customer": "Ada", "company": "Acme"})
    run_id = run.name.removeprefix("runs/")
    call_id = await wait_for_action(client, run_id)
    await client.submit_tool_output(run_id, call_id, '{"order_id": "A-9", "total": 42}')
    events = [event async for event in client.watch_run(run_id)]
    assert_well_formed(events)
    assert kinds(events)[-1] == "run_completed", of_kind(events, "run_failed")
    done = events[-1].run_completed
    assert done.last_agent == "verdict"
    assert MessageToDict(done.final_output) == {"verdict": "refund", "amount": 42}
    desk_requests = [r for r in model.requests if r["model"] == "desk"]
    assert desk_requests[0]["messages"][0] == {"role": "system", "content": "You serve Ada of Acme."}
    tools = {t["function"]["name"]: t["function"] for t in desk_requests[0]["tools"]}
    assert tools["lookup_order"]["parameters"] == {**LOOKUP["parameters"]} and tools["lookup_order"]["strict"]
    verdict_request = [r for r in model.requests if r["model"] == "verdict"][0]
    assert verdict_request["response_format"]["json_schema"]["name"] == "verdict_output"
    # GetAgent shows the raw output schema.
    agent = await client.get_agent("verdict")
    assert MessageToDict(agent.output_schema) == OUTPUT_SCHEMA

    # Without the context keys the template needs, the run fails and says which.
    model.set_script("desk", Script.of(say("never")))
    events = await collect(client.run("desk", "hi", context={"customer": "Ada"}))
    failed = of_kind(events, "run_failed")
    assert len(failed) == 1 and failed[0].code == run_event_pb2.RUN_ERROR_CODE_INVALID_CONTEXT
    assert "'company'" in failed[0].message and "desk" in failed[0].message

    # An output the schema refuses fails the run with INVALID_OUTPUT.
    model.set_script("verdict", Script.of(say('{"verdict": "refund"}')))
    events = await collect(client.run("verdict", "decide"))
    failed = of_kind(events, "run_failed")
    assert len(failed) == 1 and failed[0].code == run_event_pb2.RUN_ERROR_CODE_INVALID_OUTPUT
    assert "'required'" in failed[0].message
