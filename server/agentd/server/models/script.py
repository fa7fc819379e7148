"""Scripts: deterministic model behaviour for tests, demos and benchmarks.

A script is a list of turns. Which turn answers a request is decided from the
request alone: the number of assistant turns since the last user message. That keeps
scripted models stateless, so any number of concurrent runs (and a session's second
run) each walk the script from the start of their own exchange.

The count runs across agents: after a handoff the receiving agent continues at the
turn the conversation has reached, so one script plays a whole handoff chain (give
every agent in the chain the same script).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable


@dataclass(slots=True, frozen=True)
class ScriptedToolCall:
    name: str
    # A dict is sent as JSON; a str is sent verbatim (to script malformed arguments).
    arguments: dict[str, Any] | str = field(default_factory=dict)

    @property
    def arguments_json(self) -> str:
        if isinstance(self.arguments, str):
            return self.arguments
        return json.dumps(self.arguments, separators=(",", ":"))


@dataclass(slots=True, frozen=True)
class ScriptedTurn:
    text: str = ""
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    # Seconds to wait before answering (simulates model latency).
    delay_s: float = 0.0


def say(text: str, *, delay_s: float = 0.0) -> ScriptedTurn:
    """A turn that answers with text (a final output unless tools are also called)."""
    return ScriptedTurn(text=text, delay_s=delay_s)


def call(name: str, arguments: dict[str, Any] | str | None = None, /, **kwargs: Any) -> ScriptedToolCall:
    """One tool call: ``call("get_weather", city="Paris")`` or ``call("x", '{bad json')``."""
    if arguments is None:
        arguments = kwargs
    return ScriptedToolCall(name=name, arguments=arguments)


def calls(*tool_calls: ScriptedToolCall, text: str = "", delay_s: float = 0.0) -> ScriptedTurn:
    """A turn that calls one or more tools (concurrently, as a model would in one turn)."""
    return ScriptedTurn(text=text, tool_calls=tuple(tool_calls), delay_s=delay_s)


class ScriptExhaustedError(LookupError):
    pass


@dataclass(slots=True, frozen=True)
class Script:
    turns: tuple[ScriptedTurn, ...]

    @classmethod
    def of(cls, *turns: ScriptedTurn) -> "Script":
        return cls(tuple(turns))

    def turn(self, index: int) -> ScriptedTurn:
        if index >= len(self.turns):
            raise ScriptExhaustedError(
                f"the script has {len(self.turns)} turn(s) but the conversation asks for turn {index + 1}"
            )
        return self.turns[index]


def count_assistant_turns(roles: Iterable[str]) -> int:
    """Count assistant turns after the last user message.

    ``roles`` is the conversation as a sequence of "user", "assistant" or "tool"
    markers; consecutive assistant entries (text plus its tool calls) are one turn.
    """
    turns = 0
    previous = ""
    for role in roles:
        if role == "user":
            turns = 0
        elif role == "assistant" and previous != "assistant":
            turns += 1
        previous = role
    return turns
