"""Token accounting, summed per model call and per run."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class Usage:
    input_tokens: int = 0
    output_tokens: int = 0
    requests: int = 0
    # Of the output tokens, those a reasoning model spent thinking (0 when not reported).
    reasoning_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.input_tokens + self.output_tokens

    def add(self, other: "Usage") -> None:
        self.input_tokens += other.input_tokens
        self.output_tokens += other.output_tokens
        self.requests += other.requests
        self.reasoning_tokens += other.reasoning_tokens

    def copy(self) -> "Usage":
        return Usage(self.input_tokens, self.output_tokens, self.requests, self.reasoning_tokens)
