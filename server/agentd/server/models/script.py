"""Scripts: deterministic model behaviour for tests, demos and benchmarks.

A script is a list of turns. Which turn answers a request is decided from the
request alone: the number of assistant turns since the last user message. That keeps
scripted models stateless, so any number of concurrent runs (and a session's second
run) each walk the script from the start of their own exchange.

The count runs across agents: after a handoff the receiving agent continues at the
turn the conversation has reached, so one script plays a whole handoff chain (give
every agent in the chain the same script).

A turn may also script what only the Responses API shows: ``reason("...")`` (a reasoning
item with that summary) and ``hosted("web_search", query="...")`` (a hosted tool call the
provider ran), given to ``say`` or ``calls`` before the text and function calls:
``say("Sunny.", reason("Look it up"), hosted("web_search", query="weather Paris"))``.
They come first in the answer, in the order given; the Chat Completions path shows
neither (a reasoning turn still costs its reasoning tokens there).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Iterable, Union


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
class ScriptedReasoning:
    """A reasoning item: its summary parts (the encrypted content is made up per answer)."""

    summary: tuple[str, ...]


# What a scripted hosted call reports: its ``details`` keys per tool ("query" for a web search...).
_HOSTED_DETAIL_KEYS = {
    "web_search": ("query", "sources"),
    "file_search": ("queries", "results"),
    "code_interpreter": ("code", "logs"),
    "image_generation": ("prompt",),
}


@dataclass(slots=True, frozen=True)
class ScriptedHostedCall:
    """A hosted tool call the provider runs: ``tool`` is "web_search", "file_search",
    "code_interpreter" or "image_generation"; ``action`` what it did (``query`` of a search,
    ``queries``/``results`` of a file search, ``code``/``logs`` of code, ``prompt`` of an
    image); ``status`` as the provider reports it."""

    tool: str
    action: dict[str, Any] = field(default_factory=dict)
    status: str = "completed"


ScriptedStep = Union[ScriptedReasoning, ScriptedHostedCall]


@dataclass(slots=True, frozen=True)
class ScriptedTurn:
    text: str = ""
    tool_calls: tuple[ScriptedToolCall, ...] = ()
    # Seconds to wait before answering (simulates model latency: the time to first token).
    delay_s: float = 0.0
    # Reasoning and hosted tool calls, before the text and function calls, in order.
    steps: tuple[ScriptedStep, ...] = ()
    # Seconds between two streamed text chunks (a model's pace once it has started; 0: at once).
    chunk_delay_s: float = 0.0

    @property
    def reasoning(self) -> tuple[ScriptedReasoning, ...]:
        return tuple(step for step in self.steps if isinstance(step, ScriptedReasoning))

    @property
    def hosted_calls(self) -> tuple[ScriptedHostedCall, ...]:
        return tuple(step for step in self.steps if isinstance(step, ScriptedHostedCall))


def reason(*summary: str) -> ScriptedReasoning:
    """A reasoning step with these summary parts: ``say("42", reason("Add them up"))``."""
    return ScriptedReasoning(tuple(summary))


def hosted(tool: str, *, status: str = "completed", **action: Any) -> ScriptedHostedCall:
    """A hosted tool call: ``hosted("web_search", query="weather Paris")``,
    ``hosted("code_interpreter", code="print(6*7)", logs="42")``."""
    from agentd.server.models.base import HOSTED_TOOL_TYPES

    if tool not in HOSTED_TOOL_TYPES:
        raise ValueError(f"hosted tool {tool!r} is not one of {', '.join(HOSTED_TOOL_TYPES)}")
    unknown = set(action) - set(_HOSTED_DETAIL_KEYS[tool])
    if unknown:
        takes = ", ".join(_HOSTED_DETAIL_KEYS[tool])
        raise ValueError(f"hosted {tool} takes {takes}, not {', '.join(sorted(unknown))}")
    return ScriptedHostedCall(tool, dict(action), status)


def say(text: str, *steps: ScriptedStep, delay_s: float = 0.0, chunk_delay_s: float = 0.0) -> ScriptedTurn:
    """A turn that answers with text (a final output unless tools are also called), after
    any reasoning and hosted steps given; ``delay_s`` before the first chunk, then
    ``chunk_delay_s`` between word-sized chunks."""
    return ScriptedTurn(text=text, delay_s=delay_s, steps=_steps(steps), chunk_delay_s=chunk_delay_s)


def call(name: str, arguments: dict[str, Any] | str | None = None, /, **kwargs: Any) -> ScriptedToolCall:
    """One tool call: ``call("get_weather", city="Paris")`` or ``call("x", '{bad json')``."""
    if arguments is None:
        arguments = kwargs
    return ScriptedToolCall(name=name, arguments=arguments)


def calls(
    *tool_calls: ScriptedToolCall | ScriptedStep, text: str = "", delay_s: float = 0.0
) -> ScriptedTurn:
    """A turn that calls one or more tools (concurrently, as a model would in one turn);
    reasoning and hosted steps among them come first, in their order."""
    functions = tuple(c for c in tool_calls if isinstance(c, ScriptedToolCall))
    steps = _steps(tuple(c for c in tool_calls if not isinstance(c, ScriptedToolCall)))
    return ScriptedTurn(text=text, tool_calls=functions, delay_s=delay_s, steps=steps)


def _steps(steps: tuple[Any, ...]) -> tuple[ScriptedStep, ...]:
    for step in steps:
        if not isinstance(step, (ScriptedReasoning, ScriptedHostedCall)):
            raise TypeError(f"a scripted turn's steps are reason(...) or hosted(...), not {step!r}")
    return steps


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
