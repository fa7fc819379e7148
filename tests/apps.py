"""The app the integration tests serve: every agent's model name picks its script on the scripted server."""

from __future__ import annotations

import asyncio
import time

from pydantic import BaseModel

from agentd.server import Agent, App, RunContext, function_tool
from agentd.server.auth.principal import Scope


class ToolLog:
    """What the tools saw, for tests to assert on (started/finished/cancelled calls)."""

    def __init__(self) -> None:
        self.started: list[str] = []
        self.finished: list[str] = []
        self.cancelled: list[str] = []

    def clear(self) -> None:
        self.started.clear()
        self.finished.clear()
        self.cancelled.clear()


tool_log = ToolLog()


@function_tool
def get_weather(city: str) -> dict:
    """Current weather for a city.

    Args:
        city: City name.
    """
    return {"city": city, "temperature_c": 21 if city == "Paris" else 12, "sky": "clear"}


@function_tool
async def wait(ctx: RunContext, seconds: float, label: str) -> str:
    """Wait, then answer (stands in for a slow API).

    Args:
        seconds: How long to wait.
        label: Echoed back.
    """
    tool_log.started.append(label)
    try:
        await asyncio.sleep(seconds)
    except asyncio.CancelledError:
        tool_log.cancelled.append(label)
        raise
    tool_log.finished.append(label)
    return f"{label} done after {seconds}s at {time.monotonic():.3f}"


@function_tool
def explode(reason: str) -> str:
    """Always fails."""
    raise RuntimeError(f"boom: {reason}")


class WeatherReport(BaseModel):
    city: str
    temperature_c: float
    summary: str


specialist = Agent(
    name="specialist",
    model="specialist",
    description="Answers hard weather questions.",
    instructions="You are the specialist.",
    tools=[get_weather],
)


@function_tool
def whoami(ctx: RunContext) -> dict:
    """Who the run acts for (a tool enforcing its own data rules reads this)."""
    principal = ctx.principal
    return {
        "subject": principal.subject if principal else None, "tenant": ctx.tenant, "session": ctx.session_id,
        "can_write_runs": bool(principal and principal.allows(Scope.RUNS_WRITE)),
    }


def _assistant_instructions(ctx: RunContext, agent: Agent) -> str:
    if ctx.context.get("break_instructions"):  # app code failing with personal data in its message
        raise LookupError("profile of alice@example.com (card 4111 1111 1111 1111) is locked")
    user = ctx.context.get("user", "someone")
    return f"You help {user}. Use tools; hand hard questions to the specialist."


assistant = Agent(
    name="assistant",
    model="assistant",
    description="General assistant.",
    instructions=_assistant_instructions,
    tools=[get_weather, wait, explode, whoami],
    handoffs=[specialist],
)

reporter = Agent(
    name="reporter",
    model="reporter",
    instructions="Report the weather as JSON.",
    tools=[get_weather],
    output_type=WeatherReport,
)

@function_tool(caller_executed=True)
def lookup_customer(customer_id: str) -> str:
    """Look a customer up in the caller's CRM (the calling service executes this).

    Args:
        customer_id: The customer's id.
    """
    raise AssertionError("a caller-executed tool never runs on the server")


refunds: list[str] = []


@function_tool(needs_approval=True)
def issue_refund(order_id: str, amount_eur: float) -> str:
    """Refund an order (a person approves each call first).

    Args:
        order_id: The order.
        amount_eur: How much.
    """
    refunds.append(order_id)
    return f"refunded {amount_eur:.2f} EUR for {order_id}"


operator = Agent(
    name="operator",
    model="operator",
    instructions="Look customers up and issue refunds.",
    tools=[lookup_customer, issue_refund],
)

app = App(agents=[assistant, reporter, operator])
