"""Guardrails: checks on a run's input, its final output and its tool calls, with tripwires.

Three stages, as in the OpenAI Agents SDK:

- **input** (``Agent.input_guardrails``): the run's input, once, on the starting agent's
  first turn. ``input_guardrail_mode="parallel"`` (the default) runs them concurrently
  with the first model call: a trip cancels the call in flight, and a call that finished
  first waits for the verdict before anything of its turn (tools included) happens.
  ``"blocking"`` runs them before the first model call: a tripped run never calls the model.
- **output** (``Agent.output_guardrails``): the final output of the agent that produces
  it, before it is saved: a tripped output never reaches the session (earlier whole
  steps stay).
- **tool** (``Agent.tool_guardrails``): each call of one of the agent's function tools
  (not handoffs). ``before`` checks the call's arguments before the tool runs (and before
  an approval is asked): allow, or trip (the tool does not run). ``after`` checks the
  result: allow, replace the content the model reads (``GuardrailResult.replacement``: it
  is also what the session stores and ``tool_output`` shows), or trip.

A trip ends the run: ``GuardrailTripped`` (guardrail, stage, its output), then
``RunFailed`` with ``RunErrorCode.GUARDRAIL_TRIPPED``. A guardrail that raises fails the
run like any app code (INTERNAL); a classifier whose model fails fails it with the
model's error code.

A guardrail is app code (``@input_guardrail``, ``@output_guardrail``, ``@tool_guardrail``:
sync functions run on a worker thread, like tools) or declarative, usable at any stage on
the text there (the input; the final output, as JSON text when structured; a call's
arguments, JSON text; a tool's result): ``RegexGuardrail``, ``DenyListGuardrail`` and
``ClassifierGuardrail`` (asks an agent's model for a ``{tripwire, reason}`` verdict; its
usage counts in the run's). Declarative agent definitions name them through
``compile_guardrail``; an agent's lists may also name an ``App.guardrails`` entry.

Plain domain types: nothing here knows protobuf.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
import json
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Iterable, Literal, Mapping, Sequence, Union

import regex

from agentd.server.models.base import ModelProvider, ModelRequest, ModelResponse, OutputSchema
from agentd.server.runtime.context import RunContext
from agentd.server.runtime.errors import AppConfigError, ModelError, ModelUnavailableError
from agentd.server.runtime.items import MessageItem, json_problem
from agentd.server.runtime.usage import Usage
from agentd.server.tracing.base import SpanHandle, SpanKind, TraceHandle

if TYPE_CHECKING:
    from agentd.server.runtime.agent import Agent, CompiledAgent

Stage = Literal["input", "output", "tool_before", "tool_after"]
STAGES: tuple[Stage, ...] = ("input", "output", "tool_before", "tool_after")
# Where an agent lists a guardrail: its input, output or tool guardrails.
ListKind = Literal["input", "output", "tool"]
# When input guardrails run: concurrently with the first model call, or before it.
InputGuardrailMode = Literal["parallel", "blocking"]

GUARDRAIL_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")

# What a tripwire's ``output`` keeps of a matched text, at most.
MATCH_PREVIEW_CHARS = 200


@dataclass(slots=True, frozen=True)
class GuardrailResult:
    """A guardrail's verdict.

    ``tripwire``: the run must end. ``reason``: why, for people (it is in the run's
    ``guardrail_tripped`` event and failure message). ``output``: what the guardrail
    found, JSON-able (the event carries it). ``replacement`` (tool ``after`` checks only):
    the content the model reads instead of the tool's result.
    """

    tripwire: bool
    reason: str = ""
    output: dict[str, Any] | None = None
    replacement: str | None = None


GuardrailReturn = Union[GuardrailResult, bool, None]
GuardrailFn = Callable[..., Union[GuardrailReturn, Awaitable[GuardrailReturn]]]


@dataclass(slots=True, frozen=True)
class GuardrailSubject:
    """What one check looks at."""

    stage: Stage
    agent: str  # the agent whose input, output or tool call it is
    text: str  # the input; the final output (JSON text when structured); a call's arguments; a tool's result
    value: Any = None  # the final output as the agent produced it (output stage)
    tool_name: str = ""
    call_id: str = ""


@dataclass(slots=True)
class GuardrailEnv:
    """What a check may use of its run (the loop builds one per check)."""

    models: ModelProvider
    # An agent of the run's app by name, as handoffs find them (a classifier's agent); raises when unknown.
    resolve_agent: Callable[[str], "CompiledAgent"]
    trace: TraceHandle
    span: SpanHandle  # the check's own span: parent of a classifier's model call
    # Called after a classifier's model call with (agent, model, the call's usage): the run adds it.
    on_usage: Callable[[str, str, Usage], None]


class Guardrail:
    """Base of every guardrail: a ``name`` (in events, spans and metrics) and the stages it serves."""

    name: str
    # The lists of an agent it may be in ("input", "output", "tool").
    list_kinds: frozenset[str] = frozenset({"input", "output", "tool"})

    def checks(self, stage: Stage) -> bool:
        """Whether it has a check for ``stage`` (a tool guardrail may check only before or after)."""
        return True

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        raise NotImplementedError


def _check_name(kind: str, name: str) -> None:
    if not isinstance(name, str) or not GUARDRAIL_NAME_RE.match(name):
        raise ValueError(f"{kind} name {name!r} must match {GUARDRAIL_NAME_RE.pattern}")


async def _call_app(fn: GuardrailFn, *args: Any) -> GuardrailReturn:
    """Call app code: a coroutine function on the loop, a sync one on a worker thread (as tools)."""
    if inspect.iscoroutinefunction(fn):
        value = await fn(*args)
    else:
        value = await asyncio.to_thread(functools.partial(fn, *args))
    if inspect.isawaitable(value):
        value = await value
    return value  # type: ignore[return-value]


def as_result(name: str, value: Any) -> GuardrailResult:
    """A guardrail function's answer as a result: a ``GuardrailResult``, or a bool (True: trip), or None (pass)."""
    if isinstance(value, GuardrailResult):
        return value
    if value is None or isinstance(value, bool):
        return GuardrailResult(tripwire=bool(value))
    raise TypeError(f"guardrail {name!r} returned {type(value).__name__}; return a GuardrailResult or a bool")


# -- app code -------------------------------------------------------------------------------


@dataclass(eq=False)
class InputGuardrail(Guardrail):
    """``fn(ctx, input_text)`` → ``GuardrailResult`` or bool (True trips), sync or async."""

    name: str
    fn: GuardrailFn
    list_kinds = frozenset({"input"})

    def __post_init__(self) -> None:
        _check_name("input guardrail", self.name)

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        return as_result(self.name, await _call_app(self.fn, ctx, subject.text))


@dataclass(eq=False)
class OutputGuardrail(Guardrail):
    """``fn(ctx, agent_name, final_output)`` → ``GuardrailResult`` or bool, sync or async.
    ``final_output`` is the text, or the dict of an agent with an ``output_type``."""

    name: str
    fn: GuardrailFn
    list_kinds = frozenset({"output"})

    def __post_init__(self) -> None:
        _check_name("output guardrail", self.name)

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        return as_result(self.name, await _call_app(self.fn, ctx, subject.agent, subject.value))


@dataclass(eq=False)
class ToolGuardrail(Guardrail):
    """Checks the calls of an agent's function tools. ``before(ctx, tool_name, arguments_json)``
    runs before the tool (allow or trip); ``after(ctx, tool_name, output)`` on its result
    (allow, trip, or a ``GuardrailResult`` with a ``replacement`` for the model to read).
    ``ctx`` is the call's ``ToolContext`` (``call_id``...). Either may be None."""

    name: str
    before: GuardrailFn | None = None
    after: GuardrailFn | None = None
    list_kinds = frozenset({"tool"})

    def __post_init__(self) -> None:
        _check_name("tool guardrail", self.name)
        if self.before is None and self.after is None:
            raise ValueError(f"tool guardrail {self.name!r} has neither a before nor an after check")

    def checks(self, stage: Stage) -> bool:
        return (self.before if stage == "tool_before" else self.after if stage == "tool_after" else None) is not None

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        fn = self.before if subject.stage == "tool_before" else self.after
        assert fn is not None
        result = as_result(self.name, await _call_app(fn, ctx, subject.tool_name, subject.text))
        if result.replacement is not None and subject.stage == "tool_before":
            raise TypeError(
                f"tool guardrail {self.name!r}: a before check allows or trips; only an after check "
                "can replace (the tool's result)"
            )
        return result


def input_guardrail(
    fn: GuardrailFn | None = None, /, *, name: str | None = None
) -> InputGuardrail | Callable[[GuardrailFn], InputGuardrail]:
    """``@input_guardrail`` (or ``@input_guardrail(name=...)``) on ``fn(ctx, input_text)``."""

    def build(f: GuardrailFn) -> InputGuardrail:
        return InputGuardrail(name or f.__name__, f)

    return build(fn) if fn is not None else build


def output_guardrail(
    fn: GuardrailFn | None = None, /, *, name: str | None = None
) -> OutputGuardrail | Callable[[GuardrailFn], OutputGuardrail]:
    """``@output_guardrail`` (or ``@output_guardrail(name=...)``) on ``fn(ctx, agent_name, final_output)``."""

    def build(f: GuardrailFn) -> OutputGuardrail:
        return OutputGuardrail(name or f.__name__, f)

    return build(fn) if fn is not None else build


def tool_guardrail(
    fn: GuardrailFn | None = None, /, *, name: str | None = None, when: Literal["before", "after"] = "before"
) -> ToolGuardrail | Callable[[GuardrailFn], ToolGuardrail]:
    """``@tool_guardrail`` on ``fn(ctx, tool_name, arguments_json)`` (checked before the tool runs),
    or ``@tool_guardrail(when="after")`` on ``fn(ctx, tool_name, output)`` (checked on its result).
    For both in one guardrail, build ``ToolGuardrail(name, before=..., after=...)``."""
    if when not in ("before", "after"):
        raise ValueError(f"tool_guardrail(when={when!r}): must be 'before' or 'after'")

    def build(f: GuardrailFn) -> ToolGuardrail:
        if when == "before":
            return ToolGuardrail(name or f.__name__, before=f)
        return ToolGuardrail(name or f.__name__, after=f)

    return build(fn) if fn is not None else build


# -- declarative ----------------------------------------------------------------------------

_FLAG_NAMES = {
    "i": re.IGNORECASE, "ignorecase": re.IGNORECASE,
    "m": re.MULTILINE, "multiline": re.MULTILINE,
    "s": re.DOTALL, "dotall": re.DOTALL,
    "x": re.VERBOSE, "verbose": re.VERBOSE,
    "a": re.ASCII, "ascii": re.ASCII,
}


# How long one regex guardrail may search one text, in seconds (a catastrophic pattern trips).
REGEX_TIMEOUT_S = 0.05


def _regex_engine_flags(re_flags: int) -> int:
    """``re`` flag bits as the ``regex`` engine's (ASCII differs: 256 in re, 128 in regex)."""
    value = 0
    for name in ("IGNORECASE", "MULTILINE", "DOTALL", "VERBOSE", "ASCII"):
        if re_flags & getattr(re, name):
            value |= getattr(regex, name)
    return value


def regex_flags(flags: int | str | Iterable[str] | None) -> int:
    """``re`` flags from an int, letters ("im") or names (["IGNORECASE", "MULTILINE"] or ["i"])."""
    if flags is None:
        return 0
    if isinstance(flags, int):
        return flags
    words = [flags] if isinstance(flags, str) else list(flags)
    value = 0
    for word in words:
        key = str(word).strip().lower().removeprefix("re.")
        if key in _FLAG_NAMES:
            value |= _FLAG_NAMES[key]
        elif key and all(c in _FLAG_NAMES for c in key):  # letters: "im"
            for c in key:
                value |= _FLAG_NAMES[c]
        elif key:
            raise ValueError(f"unknown regex flag {word!r}; use i, m, s, x, a or their names")
    return value


def _preview(text: str) -> str:
    return text if len(text) <= MATCH_PREVIEW_CHARS else text[: MATCH_PREVIEW_CHARS - 1] + "…"


@dataclass(eq=False)
class RegexGuardrail(Guardrail):
    """Trips when ``pattern`` matches anywhere in the text.

    Patterns may come from API callers, so matching runs under a time budget
    (``REGEX_TIMEOUT_S``, with the ``regex`` engine, which can stop a search; Python's ``re``
    cannot): a pattern that backtracks catastrophically fails closed — it trips, saying so —
    instead of stalling the server."""

    name: str
    pattern: str
    flags: int | str | Sequence[str] = 0
    _regex: Any = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_name("regex guardrail", self.name)
        try:
            re.compile(self.pattern, regex_flags(self.flags))  # the documented dialect: Python's re
            self._regex = regex.compile(self.pattern, _regex_engine_flags(regex_flags(self.flags)))
        except (re.error, regex.error) as exc:
            raise ValueError(f"regex guardrail {self.name!r}: invalid pattern {self.pattern!r}: {exc}") from exc

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        try:
            match = self._regex.search(subject.text, timeout=REGEX_TIMEOUT_S)
        except TimeoutError:
            return GuardrailResult(
                True, f"the pattern of guardrail {self.name!r} took longer than {REGEX_TIMEOUT_S}s to match "
                "(it fails closed); simplify the pattern", {"pattern": self.pattern, "timeout_s": REGEX_TIMEOUT_S},
            )
        if match is None:
            return GuardrailResult(False)
        return GuardrailResult(
            True, f"the text matches the pattern of guardrail {self.name!r}",
            {"pattern": self.pattern, "match": _preview(match.group(0))},
        )


@dataclass(eq=False)
class DenyListGuardrail(Guardrail):
    """Trips when one of ``words`` occurs in the text as a whole word (or phrase): "ass" does
    not match "class". Case-insensitive unless ``case_sensitive``."""

    name: str
    words: Sequence[str]
    case_sensitive: bool = False
    _regex: re.Pattern[str] | None = field(init=False, repr=False)
    _by_key: dict[str, str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        _check_name("deny list guardrail", self.name)
        if isinstance(self.words, str):
            raise ValueError(f"deny list guardrail {self.name!r}: words must be a list of strings, not one string")
        words = [w for w in (str(w).strip() for w in self.words) if w]
        self.words = tuple(words)
        self._by_key = {self._key(w): w for w in words}
        if not words:
            self._regex = None
            return
        alternatives = "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True))
        flags = 0 if self.case_sensitive else re.IGNORECASE
        self._regex = re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)", flags)

    def _key(self, word: str) -> str:
        return word if self.case_sensitive else word.casefold()

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        match = self._regex.search(subject.text) if self._regex is not None else None
        if match is None:
            return GuardrailResult(False)
        word = self._by_key.get(self._key(match.group(0)), match.group(0))
        return GuardrailResult(True, f"the text contains a denied word ({word!r})", {"word": word})


# The verdict a classifier's model must answer with (strict structured output).
VERDICT_SCHEMA = OutputSchema(
    name="guardrail_verdict",
    schema={
        "type": "object",
        "properties": {"tripwire": {"type": "boolean"}, "reason": {"type": "string"}},
        "required": ["tripwire", "reason"],
        "additionalProperties": False,
    },
    strict=True,
)

_SUBJECT_DESCRIPTIONS: dict[str, str] = {
    "input": "a user's input to an AI agent",
    "output": "an AI agent's final answer",
    "tool_before": "the JSON arguments of a tool call an AI agent wants to make",
    "tool_after": "the result of a tool an AI agent called",
}


@dataclass(eq=False)
class ClassifierGuardrail(Guardrail):
    """Asks a classifier agent's model whether to trip: the agent's model, settings and
    instructions, then ``instructions``, get the text as the user message, and answer with
    the structured verdict ``{"tripwire": bool, "reason": str}``; ``tripwire: true`` trips.

    ``agent`` is an agent of the app (its name, or the ``Agent``: one given as an object is
    served by the app like a handoff target given as an object). The call is one model call
    of the run (a GENERATION span with ``purpose="guardrail"``, a ``usage_updated`` event,
    counted in the run's usage). It fails closed: an answer that is not a verdict trips.
    """

    name: str
    agent: Union[str, "Agent", "CompiledAgent"]
    instructions: str = ""

    def __post_init__(self) -> None:
        _check_name("classifier guardrail", self.name)
        if not self.agent_name:
            raise ValueError(f"classifier guardrail {self.name!r} names no agent")

    @property
    def agent_name(self) -> str:
        return self.agent if isinstance(self.agent, str) else getattr(self.agent, "name", "")

    def _compiled(self, env: GuardrailEnv) -> "CompiledAgent":
        if hasattr(self.agent, "tool_specs"):  # compiled already (compile_guardrail's resolve_agent)
            return self.agent  # type: ignore[return-value]
        return env.resolve_agent(self.agent_name)

    async def check(self, env: GuardrailEnv, ctx: RunContext, subject: GuardrailSubject) -> GuardrailResult:
        agent = self._compiled(env)
        parts = [
            await agent.agent.resolve_instructions(ctx),
            self.instructions,
            f"The user message is {_SUBJECT_DESCRIPTIONS[subject.stage]}. Answer with tripwire true if it "
            "must be blocked, false otherwise, and a short reason.",
        ]
        request = ModelRequest(
            model=agent.model,
            instructions="\n\n".join(p for p in parts if p),
            items=(MessageItem("user", subject.text),),
            settings=agent.agent.model_settings,
            output_schema=VERDICT_SCHEMA,
        )
        span = env.trace.span(
            SpanKind.GENERATION, agent.model, env.span, model=agent.model, agent=agent.name, purpose="guardrail"
        )
        response: ModelResponse | None = None
        try:
            async for chunk in env.models.get_model(agent.model).stream(request):
                if type(chunk) is not str:
                    response = chunk  # type: ignore[assignment]
        except (ModelUnavailableError, ModelError) as exc:
            span.end(error=str(exc))
            raise
        except BaseException as exc:
            span.end(error=f"{type(exc).__name__}: {exc}")
            raise
        if response is None:
            span.end(error="no response")
            raise ModelError(f"model {agent.model!r} ended its stream without a response")
        span.end(finish_reason=response.finish_reason, input_tokens=response.usage.input_tokens,
                 output_tokens=response.usage.output_tokens)
        env.on_usage(agent.name, agent.model, response.usage)
        return _verdict(self.name, response.text)


def _verdict(name: str, text: str) -> GuardrailResult:
    try:
        verdict = json.loads(text)
    except (ValueError, RecursionError):
        verdict = None
    if not isinstance(verdict, dict) or not isinstance(verdict.get("tripwire"), bool):
        return GuardrailResult(
            True, f"classifier guardrail {name!r} gave no {{tripwire, reason}} verdict (it fails closed)",
            {"error": "no verdict", "answer": _preview(text)},
        )
    reason = verdict.get("reason")
    reason = reason if isinstance(reason, str) else ""
    return GuardrailResult(verdict["tripwire"], reason, {"tripwire": verdict["tripwire"], "reason": reason})


# -- agents' lists --------------------------------------------------------------------------


def _spec_get(spec: Any, key: str, default: Any = None) -> Any:
    if isinstance(spec, Mapping):
        return spec.get(key, default)
    return getattr(spec, key, default)


def _is_spec(item: Any) -> bool:
    return not isinstance(item, Guardrail) and isinstance(_spec_get(item, "type"), str)


def compile_guardrail(
    spec: Any,
    *,
    stage: ListKind,
    app_guardrails: Mapping[str, object],
    resolve_agent: Callable[[str], Any],
) -> Guardrail:
    """A runtime guardrail from a declarative spec (an object or mapping with ``type``):

    - ``python``: ``ref``, the name of a guardrail of the app (``App.guardrails``);
    - ``regex``: ``name``, ``pattern``, ``flags`` (letters "im", names, or an int);
    - ``deny_list``: ``name``, ``words``, ``case_sensitive``;
    - ``classifier``: ``name``, ``agent`` (resolved with ``resolve_agent``), ``instructions``.

    ``stage`` is the agent list it is for ("input", "output" or "tool"). Raises
    ``AppConfigError`` for an unknown type, a missing ref or agent, or a ref that does not
    serve the stage.
    """
    kind = _spec_get(spec, "type")
    if kind == "python":
        ref = _spec_get(spec, "ref") or _spec_get(spec, "name")
        guardrail = app_guardrails.get(ref) if isinstance(ref, str) else None
        if guardrail is None:
            known = ", ".join(sorted(app_guardrails)) or "none"
            raise AppConfigError(f"guardrail ref {ref!r} names no guardrail of the app (App.guardrails: {known})")
        _check_list_kind(guardrail, stage, f"guardrail {ref!r}")
        return guardrail  # type: ignore[return-value]
    name = _spec_get(spec, "name")
    try:
        if kind == "regex":
            return RegexGuardrail(name, _spec_get(spec, "pattern"), _spec_get(spec, "flags") or 0)
        if kind == "deny_list":
            return DenyListGuardrail(name, tuple(_spec_get(spec, "words") or ()),
                                     bool(_spec_get(spec, "case_sensitive", False)))
        if kind == "classifier":
            agent_name = _spec_get(spec, "agent")
            if not isinstance(agent_name, str) or not agent_name:
                raise ValueError(f"classifier guardrail {name!r} names no agent")
            try:
                agent = resolve_agent(agent_name)
            except (KeyError, LookupError) as exc:
                raise AppConfigError(f"classifier guardrail {name!r}: unknown agent {agent_name!r}") from exc
            if agent is None:
                raise AppConfigError(f"classifier guardrail {name!r}: unknown agent {agent_name!r}")
            return ClassifierGuardrail(name, agent, _spec_get(spec, "instructions") or "")
    except (ValueError, TypeError) as exc:
        raise AppConfigError(str(exc)) from exc
    raise AppConfigError(f"unknown guardrail type {kind!r} (python, regex, deny_list or classifier)")


def _check_list_kind(guardrail: object, kind: ListKind, what: str) -> None:
    if not isinstance(guardrail, Guardrail):
        raise AppConfigError(
            f"{what} is not a guardrail ({type(guardrail).__name__}); decorate it with @{kind}_guardrail "
            "or use RegexGuardrail, DenyListGuardrail or ClassifierGuardrail"
        )
    if kind not in guardrail.list_kinds:
        serves = ", ".join(sorted(guardrail.list_kinds))
        raise AppConfigError(f"{what} checks {serves}, it cannot be one of the {kind} guardrails")


def resolve_guardrails(
    agent: "Agent", kind: ListKind, items: Iterable[object], registry: Mapping[str, object]
) -> tuple[Guardrail, ...]:
    """An agent's list as guardrails: names resolve in ``registry`` (``App.guardrails``),
    declarative specs compile (``compile_guardrail``); each must serve ``kind``; names are unique."""
    resolved: list[Guardrail] = []
    for item in items:
        if isinstance(item, str):
            guardrail = registry.get(item)
            if guardrail is None:
                known = ", ".join(sorted(registry)) or "none"
                raise AppConfigError(
                    f"agent {agent.name!r}: {kind} guardrail {item!r} is not in App.guardrails (known: {known})"
                )
        elif _is_spec(item):
            guardrail = compile_guardrail(item, stage=kind, app_guardrails=registry, resolve_agent=lambda n: n)
        else:
            guardrail = item  # type: ignore[assignment]
        _check_list_kind(guardrail, kind, f"agent {agent.name!r}: {kind} guardrail {item!r}")
        if any(g.name == guardrail.name for g in resolved):  # type: ignore[union-attr]
            raise AppConfigError(f"agent {agent.name!r} has two {kind} guardrails named {guardrail.name!r}")  # type: ignore[union-attr]
        resolved.append(guardrail)  # type: ignore[arg-type]
    return tuple(resolved)


def guardrail_registry(guardrails: Iterable[object]) -> dict[str, Guardrail]:
    """``App.guardrails`` by name (a guardrail list of any kind; names unique)."""
    registry: dict[str, Guardrail] = {}
    for guardrail in guardrails:
        if not isinstance(guardrail, Guardrail):
            raise AppConfigError(f"App.guardrails: {guardrail!r} is not a guardrail")
        if guardrail.name in registry:
            raise AppConfigError(f"App.guardrails has two guardrails named {guardrail.name!r}")
        registry[guardrail.name] = guardrail
    return registry


def guardrail_agents(items: Iterable[object]) -> list["Agent"]:
    """The agents given as objects to the classifier guardrails among ``items`` (the app serves them)."""
    from agentd.server.runtime.agent import Agent

    return [g.agent for g in items if isinstance(g, ClassifierGuardrail) and isinstance(g.agent, Agent)]


def check_classifier_agents(compiled: Mapping[str, "CompiledAgent"], extra: Iterable[object] = ()) -> None:
    """Every classifier guardrail of the app names one of its agents (raised at load, not mid-run)."""
    for agent in compiled.values():
        for guardrail in (*agent.input_guardrails, *agent.output_guardrails, *agent.tool_guardrails, *extra):
            if (isinstance(guardrail, ClassifierGuardrail) and not hasattr(guardrail.agent, "tool_specs")
                    and guardrail.agent_name not in compiled):
                raise AppConfigError(
                    f"classifier guardrail {guardrail.name!r} names agent {guardrail.agent_name!r}, "
                    "which the app does not have"
                )


def trip_message(guardrail: str, subject: GuardrailSubject, reason: str) -> str:
    """The run's failure message for a tripwire."""
    if subject.stage == "input":
        where = "the run's input"
    elif subject.stage == "output":
        where = f"the final output of agent {subject.agent!r}"
    elif subject.stage == "tool_before":
        where = f"the call {subject.call_id} of tool {subject.tool_name!r} (the tool did not run)"
    else:
        where = f"the result of tool {subject.tool_name!r} (call {subject.call_id})"
    return f"guardrail {guardrail!r} tripped on {where}" + (f": {reason}" if reason else "")


def jsonable_output(output: Any) -> dict[str, Any]:
    """A guardrail's ``output`` as the event can carry it: a JSON object within the Struct limits."""
    if output is None:
        return {}
    try:
        value = json.loads(json.dumps(output, default=str))
    except (TypeError, ValueError, RecursionError):
        return {"value": _preview(repr(output))}
    if not isinstance(value, dict):
        value = {"value": value}
    if json_problem(value) is not None:
        return {"value": _preview(json.dumps(value, default=str))}
    return value


def subject_text(value: Any) -> str:
    """The text a declarative guardrail checks for a final output: itself, or its JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


__all__ = [
    "ClassifierGuardrail",
    "DenyListGuardrail",
    "Guardrail",
    "GuardrailEnv",
    "GuardrailResult",
    "GuardrailSubject",
    "InputGuardrail",
    "OutputGuardrail",
    "RegexGuardrail",
    "Stage",
    "ToolGuardrail",
    "compile_guardrail",
    "input_guardrail",
    "output_guardrail",
    "tool_guardrail",
]
