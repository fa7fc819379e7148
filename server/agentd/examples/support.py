"""A customer-support app: a triage agent that looks orders up and hands billing questions over.

It is the default app: ``agentd serve`` (``--app agentd.examples.support:app``) and
``agentd demo`` serve it. It ships inside the package, so it works from any directory
after ``pip install 'agentd[server]'``. With OPENAI_API_KEY set the agents call the real
model; without it the built-in scripted model plays ``offline_script`` (a tool call, a
handoff, a refund, a streamed answer).
"""

from __future__ import annotations

from typing import Literal

from agentd.server import Agent, App, RunContext, Script, call, calls, function_tool, say

_ORDERS = {
    "A-1001": {"item": "espresso machine", "status": "delivered", "total_eur": 249.0},
    "A-1002": {"item": "milk frother", "status": "in transit", "total_eur": 39.5},
}


@function_tool
def lookup_order(order_id: str) -> dict:
    """Look up an order by its id.

    Args:
        order_id: The order id, e.g. "A-1001".
    """
    order = _ORDERS.get(order_id.strip().upper())
    if order is None:
        raise KeyError(f"no order {order_id!r}")
    return {"order_id": order_id, **order}


@function_tool
async def issue_refund(ctx: RunContext, order_id: str, amount_eur: float, reason: Literal["damaged", "late", "other"]) -> str:
    """Refund (part of) an order.

    Args:
        order_id: The order to refund.
        amount_eur: Amount in euros; at most the order total.
        reason: Why the customer is refunded.
    """
    order = _ORDERS.get(order_id.strip().upper())
    if order is None:
        raise KeyError(f"no order {order_id!r}")
    if amount_eur <= 0 or amount_eur > order["total_eur"]:
        raise ValueError(f"amount must be between 0 and {order['total_eur']}")
    return f"refund of {amount_eur:.2f} EUR for {order_id} ({reason}) issued in run {ctx.run_id}"


billing = Agent(
    name="billing",
    description="Handles refunds, invoices and payment questions.",
    instructions="You are the billing specialist. Use issue_refund for refunds; confirm what you did in one sentence.",
    tools=[issue_refund],
)

triage = Agent(
    name="triage",
    description="First contact: understands the request and routes it.",
    instructions=(
        "You are a customer-support triage agent. Look orders up with lookup_order. "
        "Hand refund and payment questions to the billing agent."
    ),
    tools=[lookup_order],
    handoffs=[billing],
)

app = App(
    agents=[triage, billing],
    offline_script=Script.of(
        calls(call("lookup_order", order_id="A-1001")),
        calls(call("transfer_to_billing")),
        calls(call("issue_refund", order_id="A-1001", amount_eur=49.0, reason="damaged")),
        say("I've refunded 49.00 EUR for your damaged espresso machine (order A-1001). "
            "The money will be back on your card within 3-5 business days."),
    ),
)
