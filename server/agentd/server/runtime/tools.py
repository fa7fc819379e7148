"""Function tools: a Python function, its strict JSON schema, and a safe way to call it.

``@function_tool`` reads the signature (types) and the docstring (descriptions) once,
at import time. At run time ``FunctionTool.invoke`` never raises for a tool's own
problems: bad JSON, arguments that fail validation, exceptions and timeouts all become
an error output the model can read and recover from.
"""

from __future__ import annotations

import asyncio
import copy
import functools
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import Any, Awaitable, Callable, get_type_hints, overload

import docstring_parser
import pydantic
from pydantic import BaseModel, ConfigDict, Field, create_model

from agentd.server.redaction import redact
from agentd.server.runtime.context import RunContext, ToolContext

TOOL_NAME_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


@dataclass(slots=True, frozen=True)
class ToolResult:
    output: str
    is_error: bool
    # The failure without content (a tool's exception message may hold personal data): what
    # a trace keeps unless it records content. "" means ``output`` is content-free already.
    error_summary: str = ""


@dataclass(slots=True, eq=False)
class FunctionTool:
    name: str
    description: str
    parameters: dict[str, Any]
    strict: bool
    timeout_s: float | None
    fn: Callable[..., Any]
    args_model: type[BaseModel]
    takes_context: bool
    # Parameters with a default whose type does not admit None: a strict schema makes
    # them nullable, and a null from the model means "use the default".
    null_means_default: frozenset[str]
    # The caller executes the tool (the function only declares its schema); the run waits
    # for the output. ``needs_approval``: each call waits for the caller's approval first.
    caller_executed: bool = False
    needs_approval: bool = False
    # Instead of ``fn``: an async function given the call's context and its JSON arguments as
    # they are (a dict), returning the ToolResult itself; for tools whose schema is not a Python
    # signature (MCP tools: ``agentd.server.mcp.tools``). Timeouts apply as to ``fn``.
    invoker: Callable[[ToolContext, dict[str, Any]], Awaitable[ToolResult]] | None = None
    # Extra attributes of the tool's spans (an MCP tool's ``mcp_server``).
    trace_attributes: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def caller_executed_from_schema(
        cls,
        name: str,
        description: str,
        parameters: dict[str, Any],
        *,
        needs_approval: bool = False,
        timeout_s: float | None = None,
    ) -> "FunctionTool":
        """A tool the caller executes, declared by a JSON schema instead of a Python function
        (declarative agents: ``agents.definition.CallerTool``).

        The schema is offered in strict mode when that changes nothing a valid call may hold
        (``strict_schema_for``), else as given, non-strict. The model's arguments are forwarded
        to the caller as the model wrote them, unvalidated: the caller executes the tool and
        checks them against the same schema (an invalid call is answered with an error output
        the model can recover from). ``timeout_s``: how long the run waits for the caller's
        output (None: without limit), as with ``function_tool(caller_executed=True)``.
        """
        if not TOOL_NAME_RE.match(name):
            raise ValueError(f"tool name {name!r} must match {TOOL_NAME_RE.pattern}")
        schema, strict = strict_schema_for(parameters)

        def executed_by_the_caller(**_: Any) -> Any:
            raise RuntimeError(f"tool {name!r} is executed by the caller, never by agentd")

        return cls(
            name=name,
            description=description,
            parameters=schema,
            strict=strict,
            timeout_s=timeout_s,
            fn=executed_by_the_caller,
            args_model=_CallerArguments,
            takes_context=False,
            null_means_default=frozenset(),
            caller_executed=True,
            needs_approval=needs_approval,
        )

    async def invoke(self, ctx: ToolContext, raw_arguments: str, default_timeout_s: float | None) -> ToolResult:
        try:
            arguments = json.loads(raw_arguments) if raw_arguments.strip() else {}
        except json.JSONDecodeError as exc:
            return _error(f"the arguments for tool {self.name!r} are not valid JSON ({exc.msg} at char {exc.pos}); "
                          "call it again with a JSON object that matches its schema")
        except (ValueError, RecursionError) as exc:  # nesting too deep to parse, an int past the digit limit
            problem = "nest too deeply" if isinstance(exc, RecursionError) else "hold a number too large"
            return _error(f"the arguments for tool {self.name!r} {problem} to parse; "
                          "call it again with a JSON object that matches its schema")
        if not isinstance(arguments, dict):
            return _error(f"the arguments for tool {self.name!r} must be a JSON object, got {type(arguments).__name__}")
        if self.invoker is not None:
            return await self._forward(ctx, arguments, default_timeout_s)
        for key in self.null_means_default.intersection(arguments):
            if arguments[key] is None:
                del arguments[key]
        try:
            parsed = self.args_model.model_validate(arguments)
        except RecursionError:
            return _error(f"the arguments for tool {self.name!r} nest too deeply; "
                          "call it again with a JSON object that matches its schema")
        except pydantic.ValidationError as exc:
            problems = "; ".join(
                f"{'.'.join(str(p) for p in err['loc']) or '(arguments)'}: {err['msg']}" for err in exc.errors()
            )
            return _error(f"invalid arguments for tool {self.name!r}: {problems}")
        kwargs = {name: getattr(parsed, name) for name in type(parsed).model_fields}
        timeout = self.timeout_s if self.timeout_s is not None else default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                result = await self._call(ctx, kwargs)
        except TimeoutError:
            return _error(f"tool {self.name!r} timed out after {timeout:g}s")
        except Exception as exc:  # the tool's own failure is the model's to handle
            failed = f"tool {self.name!r} failed: {type(exc).__name__}"
            return _error(f"{failed}: {redact(str(exc))}", summary=failed)
        return ToolResult(output=_render_output(result), is_error=False)

    async def _forward(self, ctx: ToolContext, arguments: dict[str, Any], default_timeout_s: float | None) -> ToolResult:
        """An ``invoker`` tool's call: the arguments go as they are, the invoker makes the result."""
        assert self.invoker is not None
        timeout = self.timeout_s if self.timeout_s is not None else default_timeout_s
        try:
            async with asyncio.timeout(timeout):
                return await self.invoker(ctx, arguments)
        except TimeoutError:
            return _error(f"tool {self.name!r} timed out after {timeout:g}s")
        except Exception as exc:  # the invoker's own failure is the model's to handle
            failed = f"tool {self.name!r} failed: {type(exc).__name__}"
            return _error(f"{failed}: {redact(str(exc))}", summary=failed)

    async def _call(self, ctx: ToolContext, kwargs: dict[str, Any]) -> Any:
        args = (ctx,) if self.takes_context else ()
        if inspect.iscoroutinefunction(self.fn):
            return await self.fn(*args, **kwargs)
        # Sync tools run on a worker thread so they never block the event loop. A thread
        # cannot be interrupted: on timeout or cancellation the run moves on and the
        # thread finishes in the background.
        return await asyncio.to_thread(functools.partial(self.fn, *args, **kwargs))


class _CallerArguments(BaseModel):
    """The arguments of a caller-executed tool declared by a schema: anything (the caller checks them)."""

    model_config = ConfigDict(extra="allow")


def _error(message: str, summary: str = "") -> ToolResult:
    return ToolResult(output=f"Error: {message}", is_error=True, error_summary=f"Error: {summary}" if summary else "")


def _render_output(result: Any) -> str:
    if isinstance(result, str):
        return result
    if isinstance(result, BaseModel):
        return result.model_dump_json()
    if result is None:
        return ""
    try:
        return json.dumps(result, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        return str(result)


@overload
def function_tool(fn: Callable[..., Any], /) -> FunctionTool: ...


@overload
def function_tool(
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    caller_executed: bool = False,
    needs_approval: bool = False,
) -> Callable[[Callable[..., Any]], FunctionTool]: ...


def function_tool(
    fn: Callable[..., Any] | None = None,
    /,
    *,
    name: str | None = None,
    description: str | None = None,
    timeout_s: float | None = None,
    caller_executed: bool = False,
    needs_approval: bool = False,
) -> FunctionTool | Callable[[Callable[..., Any]], FunctionTool]:
    """Turn a sync or async function into a tool the model can call.

    The first parameter may be annotated ``RunContext``/``ToolContext`` to receive the
    run's context; it is not part of the schema. Argument descriptions come from the
    docstring (Google, Sphinx or NumPy style). ``timeout_s`` overrides the server's
    default tool timeout.

    ``caller_executed=True``: the service calling agentd runs the tool (it owns the
    data or the side effect); the function only declares the schema and is never
    called. The run emits ``action_required`` and waits for ``SubmitToolOutputs``
    (without a timeout unless ``timeout_s`` is given). ``needs_approval=True``: every
    call waits for ``ApproveToolCall``; a denied call gives the model an error output.
    """

    def build(f: Callable[..., Any]) -> FunctionTool:
        tool = build_function_tool(f, name=name, description=description, timeout_s=timeout_s)
        tool.caller_executed = caller_executed
        tool.needs_approval = needs_approval
        return tool

    return build(fn) if fn is not None else build


def build_function_tool(
    fn: Callable[..., Any], *, name: str | None = None, description: str | None = None, timeout_s: float | None = None
) -> FunctionTool:
    tool_name = name or fn.__name__
    if not TOOL_NAME_RE.match(tool_name):
        raise ValueError(f"tool name {tool_name!r} must match {TOOL_NAME_RE.pattern}")
    doc = docstring_parser.parse(inspect.getdoc(fn) or "")
    arg_docs = {p.arg_name: (p.description or "") for p in doc.params}
    hints = get_type_hints(fn, include_extras=True)
    fields: dict[str, Any] = {}
    null_means_default: set[str] = set()
    takes_context = False
    for index, (pname, param) in enumerate(inspect.signature(fn).parameters.items()):
        annotation = hints.get(pname, Any)
        if index == 0 and inspect.isclass(annotation) and issubclass(annotation, RunContext):
            takes_context = True
            continue
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            raise TypeError(f"tool {tool_name!r}: *args/**kwargs parameters cannot be described to a model")
        if param.default is param.empty:
            fields[pname] = (annotation, Field(description=arg_docs.get(pname) or None))
        else:
            fields[pname] = (annotation, Field(default=param.default, description=arg_docs.get(pname) or None))
            if not _admits_none(annotation):
                null_means_default.add(pname)
    args_model = create_model(f"{tool_name}_arguments", __config__=ConfigDict(extra="forbid"), **fields)
    schema, strict = strict_json_schema(args_model.model_json_schema())
    text = description if description is not None else _describe(doc)
    return FunctionTool(
        name=tool_name,
        description=text,
        parameters=schema,
        strict=strict,
        timeout_s=timeout_s,
        fn=fn,
        args_model=args_model,
        takes_context=takes_context,
        null_means_default=frozenset(null_means_default),
    )


def _describe(doc: docstring_parser.Docstring) -> str:
    parts = [p for p in (doc.short_description, doc.long_description) if p]
    return "\n\n".join(parts)


def _admits_none(annotation: Any) -> bool:
    if annotation is Any or annotation is None or annotation is type(None):
        return True
    try:
        pydantic.TypeAdapter(annotation).validate_python(None)
    except pydantic.ValidationError:
        return False
    except Exception:
        return False
    return True


def strict_json_schema(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """Make a pydantic JSON schema follow OpenAI's strict-mode rules.

    Every object lists all its properties as required and forbids extras; a property
    that was optional becomes nullable instead. Returns the schema and whether it could
    be made strict (free-form objects such as ``dict[str, Any]`` cannot; the tool is
    then offered non-strict with the schema as pydantic wrote it).
    """
    strict = copy.deepcopy(schema)
    ok = _strictify(strict)
    if not ok:
        return schema, False
    return strict, True


def _strictify(node: Any) -> bool:
    if isinstance(node, list):
        return all(_strictify(child) for child in node)
    if not isinstance(node, dict):
        return True
    node.pop("title", None)
    ok = True
    if node.get("type") == "object":
        properties = node.get("properties")
        if properties is None or node.get("additionalProperties") not in (None, False):
            return False
        node["additionalProperties"] = False
        required = set(node.get("required", ()))
        for key, prop in properties.items():
            if key not in required:
                properties[key] = _nullable(prop)
        node["required"] = list(properties)
    node.pop("default", None)
    for key in ("properties", "$defs"):
        if key in node:
            ok = all(_strictify(child) for child in node[key].values()) and ok
    for key in ("items", "anyOf", "allOf", "prefixItems"):
        if key in node:
            ok = _strictify(node[key]) and ok
    return ok


# The keywords OpenAI's strict mode accepts (its "supported schemas"); a hand-written schema
# using any other is offered non-strict.
_STRICT_KEYWORDS = frozenset({
    "type", "properties", "required", "additionalProperties", "items", "anyOf", "enum", "const",
    "description", "title", "default", "$defs", "$ref", "pattern", "format", "minimum", "maximum",
    "exclusiveMinimum", "exclusiveMaximum", "multipleOf", "minItems", "maxItems",
})


def strict_schema_for(schema: dict[str, Any]) -> tuple[dict[str, Any], bool]:
    """A hand-written JSON schema (an agent definition's tool parameters or output schema) in
    OpenAI's strict mode when strict mode changes nothing a valid value may hold, else as given.

    ``strict_json_schema`` turns optional properties into required nullable ones; for a
    pydantic model the runtime maps the nulls back, for a hand-written schema nothing would,
    and the caller would get nulls its schema forbids. So a schema is made strict only when
    every object already requires all its properties (and allows no others, or says nothing
    about others), and it uses only keywords strict mode supports. Returns the schema and
    whether it is strict.
    """
    if not isinstance(schema, dict) or schema.get("type") != "object" or not _strict_as_written(schema):
        return schema, False
    return strict_json_schema(schema)


def _strict_as_written(node: Any) -> bool:
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, list):
            stack.extend(node)
            continue
        if not isinstance(node, dict):
            return False
        if not _STRICT_KEYWORDS.issuperset(node):
            return False
        if isinstance(node.get("type"), list) and "object" in node["type"]:
            return False  # a nullable object: strict mode wants "anyOf" with a plain object
        if node.get("type") == "object" or "properties" in node:
            properties = node.get("properties")
            if not isinstance(properties, dict) or node.get("additionalProperties", False) is not False:
                return False
            if not set(properties) <= set(node.get("required", ())):
                return False
            stack.extend(properties.values())
        if isinstance(node.get("$defs"), dict):
            stack.extend(node["$defs"].values())
        for key in ("items", "anyOf"):
            if key in node:
                stack.append(node[key])
    return True


def _nullable(prop: dict[str, Any]) -> dict[str, Any]:
    options = prop.get("anyOf")
    if options is not None and any(o.get("type") == "null" for o in options):
        return prop
    description = prop.pop("description", None)
    wrapped: dict[str, Any] = {"anyOf": [prop, {"type": "null"}]}
    if description:
        wrapped["description"] = description
    return wrapped


