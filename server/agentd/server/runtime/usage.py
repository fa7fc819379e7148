"""Token accounting and cost, summed per model call and per run.

A model provider fills in the token counts of one call; the run loop prices the call
(``agentd.server.pricing``, the operator's price table) and adds it to the run's usage.
A call is *priced* when the table names its model: its exact cost is in ``cost_usd``.
Otherwise it is *unpriced* (``unpriced_calls`` counts it) and adds nothing to ``cost_usd``:
an unknown cost is never guessed, so ``cost_usd`` is None until some call was priced, and a
run with priced and unpriced calls has a partial cost (a lower bound) and a non-zero
``unpriced_calls``. A call whose endpoint reported no token counts at all is unpriced too.
"""

from __future__ import annotations

from dataclasses import dataclass
from decimal import Decimal


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    # Of the output tokens, those a reasoning model spent thinking (0 when not reported).
    reasoning_tokens: int = 0
    # Of the input tokens, those the provider read from its prompt cache (0 when not reported).
    cached_input_tokens: int = 0
    # US dollars, exact (not rounded), over the priced calls; None when no call was priced.
    cost_usd: Decimal | None = None
    # Calls whose model the price table does not name (or that reported no tokens).
    unpriced_calls: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: "Usage") -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.requests += other.requests
        self.reasoning_tokens += other.reasoning_tokens
        self.cached_input_tokens += other.cached_input_tokens
        if other.cost_usd is not None:
            self.cost_usd = other.cost_usd if self.cost_usd is None else self.cost_usd + other.cost_usd
        self.unpriced_calls += other.unpriced_calls

    def copy(self) -> "Usage":
        return Usage(self.input_tokens, self.output_tokens, self.requests, self.reasoning_tokens,
                     self.cached_input_tokens, self.cost_usd, self.unpriced_calls)
