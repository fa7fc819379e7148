"""The tool schema builder and safe invocation."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Literal

import pytest
from pydantic import BaseModel

from agentd.server import RunContext, ToolContext, function_tool
from agentd.server.runtime.tools import strict_json_schema


def ctx() -> ToolContext:
    return ToolContext("run_1", "agent", None, {"tenant": "acme"}, call_id="call_1", tool_name="t")


class Address(BaseModel):
    street: str
    city: str


@function_tool
def plan_trip(city: str, days: int, mode: Literal["train", "car"] = "train", address: Address | None = None) -> dict:
    """Plan a trip.

    More words about planning.

    Args:
        city: Where to go.
        days: How many days, at least 1.
        mode: How to travel.
        address: Where to start from.
    """
    return {"city": city, "days": days, "mode": mode, "from": address.city if address else None}


def test_schema_is_strict_and_described():
    schema = plan_trip.parameters
    assert plan_trip.strict is True
    assert plan_trip.description == "Plan a trip.\n\nMore words about planning."
    assert schema["type"] == "object"
    assert schema["additionalProperties"] is False
    assert schema["required"] == ["city", "days", "mode", "address"]
    assert schema["properties"]["city"] == {"type": "string", "description": "Where to go."}
    assert schema["properties"]["days"]["type"] == "integer"
    # An optional parameter becomes nullable, keeps its description, loses its default.
    mode = schema["properties"]["mode"]
    assert mode["description"] == "How to travel."
    assert {"type": "null"} in mode["anyOf"]
    assert "default" not in json.dumps(schema)
    # Nested models are strict too.
    nested = schema["$defs"]["Address"]
    assert nested["additionalProperties"] is False and nested["required"] == ["street", "city"]


async def test_invoke_validates_and_applies_defaults():
    result = await plan_trip.invoke(ctx(), json.dumps({"city": "Lyon", "days": 2, "mode": None, "address": None}), 5)
    assert not result.is_error
    assert json.loads(result.output) == {"city": "Lyon", "days": 2, "mode": "train", "from": None}
    nested = await plan_trip.invoke(
        ctx(), json.dumps({"city": "Lyon", "days": "3", "mode": "car", "address": {"street": "x", "city": "Paris"}}), 5
    )
    assert json.loads(nested.output)["from"] == "Paris" and json.loads(nested.output)["days"] == 3


@pytest.mark.parametrize(
    ("arguments", "expected"),
    [
        ("{not json", "not valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ('{"city": "Lyon"}', "days: Field required"),
        ('{"city": "Lyon", "days": "many"}', "days: Input should be a valid integer"),
        ('{"city": "Lyon", "days": 1, "extra": 1}', "extra: Extra inputs are not permitted"),
    ],
)
async def test_bad_arguments_become_error_output(arguments, expected):
    result = await plan_trip.invoke(ctx(), arguments, 5)
    assert result.is_error
    assert result.output.startswith("Error: ")
    assert expected in result.output


async def test_context_parameter_is_injected_and_hidden_from_schema():
    @function_tool
    async def whoami(context: RunContext, greeting: str) -> str:
        """Say who calls."""
        assert isinstance(context, ToolContext)
        return f"{greeting} {context.context['tenant']} {context.call_id}"

    assert list(whoami.parameters["properties"]) == ["greeting"]
    assert whoami.takes_context
    result = await whoami.invoke(ctx(), '{"greeting": "hi"}', 5)
    assert result.output == "hi acme call_1"


async def test_sync_tools_run_off_the_event_loop():
    loop_thread = threading.get_ident()

    @function_tool
    def blocking(seconds: float) -> str:
        time.sleep(seconds)
        return "slept" if threading.get_ident() != loop_thread else "ON THE LOOP"

    # While the sync tool sleeps, the loop keeps ticking.
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    result = await blocking.invoke(ctx(), '{"seconds": 0.2}', 5)
    task.cancel()
    assert result.output == "slept"
    assert ticks >= 5  # ~20 when idle; the loop was never blocked for the whole 0.2 s


async def test_exceptions_and_timeouts_are_reported_not_raised():
    @function_tool
    def broken(x: int) -> int:
        raise ValueError(f"cannot handle {x}")

    @function_tool(timeout_s=0.05)
    async def slow() -> str:
        await asyncio.sleep(5)
        return "late"

    failed = await broken.invoke(ctx(), '{"x": 3}', 5)
    assert failed.is_error and "ValueError: cannot handle 3" in failed.output
    started = time.perf_counter()
    timed_out = await slow.invoke(ctx(), "{}", 5)
    assert time.perf_counter() - started < 1
    assert timed_out.is_error and "timed out after 0.05s" in timed_out.output
    # The server-wide default applies when the tool sets none.
    @function_tool
    async def slow_default() -> str:
        await asyncio.sleep(5)
        return "late"

    assert "timed out after 0.05s" in (await slow_default.invoke(ctx(), "", 0.05)).output


async def test_outputs_are_rendered_as_text():
    @function_tool(name="model_out")
    def model_out() -> Address:
        return Address(street="1 rue", city="Nice")

    @function_tool
    def nothing() -> None:
        return None

    assert json.loads((await model_out.invoke(ctx(), "{}", 5)).output) == {"street": "1 rue", "city": "Nice"}
    assert (await nothing.invoke(ctx(), "{}", 5)).output == ""


def test_free_form_objects_fall_back_to_non_strict():
    @function_tool
    def free(payload: dict) -> str:
        """Takes anything."""
        return "ok"

    assert free.strict is False
    schema, strict = strict_json_schema({"type": "object", "properties": {"a": {"type": "object"}}})
    assert strict is False and schema == {"type": "object", "properties": {"a": {"type": "object"}}}


def test_bad_tool_definitions_fail_at_import_time():
    with pytest.raises(ValueError, match="must match"):
        function_tool(name="has space")(lambda: None)
    with pytest.raises(TypeError, match=r"\*args"):

        @function_tool
        def variadic(*values: int) -> int:
            return sum(values)
