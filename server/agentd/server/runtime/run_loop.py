"""The agent loop: model turn → tools / handoff / final output, until the run ends.

One ``AgentRunner`` serves every run of a server. A run reads its session history (a
bounded window of its newest items: ``_read_window``), then loops: call the model
(streaming text deltas out as events), run the requested tools concurrently, follow a
handoff, or finish. Each completed step's items are appended to the session in one
atomic write, so a session only ever holds whole steps: a tool call is stored together
with its result, never alone.

Every way a run can end produces exactly one terminal event — ``RunCompleted``,
``RunFailed`` (max turns, model, store, output or internal errors, guardrail tripwires) or
``RunCancelled`` (the task was cancelled) — and the run never raises to its caller.

Guardrails (``runtime.guardrails``). The starting agent's input guardrails are checked on
a new run's first turn, before it ("blocking") or concurrently with its model call
("parallel": a tripwire cancels the call; an answer that came first waits for the
verdict), so every checkpoint comes after they passed and a resumed run does not check
its input again. Output guardrails check a final output before its step is checkpointed;
tool guardrails check each function tool call before it runs and its result after. A
tripwire raises a ``_RunFailure`` carrying the ``GuardrailTripped`` event, emitted just
before the run's ``RunFailed``: exactly one per run, even when concurrent checks trip.

Checkpoints. After every completed step the loop hands the sink a ``Checkpoint`` and
waits until it is durable, *then* appends the step to the session. Given a
checkpoint, ``run`` resumes: it re-appends the checkpointed step (idempotent by its
request id), rebuilds the conversation from the session history and the
checkpoint, and carries on with the next turn. Work after the checkpoint (a model
call in flight) is done again. The model turn that asks for tools is a checkpoint of its
own, durable before any of its tools starts, so a resumed run executes the very calls
that were in flight (same ``call_id``), and a call whose output the run's log already
holds (its tool finished before the takeover) is not executed again: its logged output
is used (``Resume.tool_outputs``).

Cancellation. A run ends with ``RunCancelled`` when its task is cancelled, and at its
next step boundary at the latest once ``sink.cancel_requested`` is set (a task can
swallow a ``CancelledError``: Python 3.11's ``asyncio.wait_for`` drops one that lands as
its inner call finishes). The flag is checked before each model turn, after it, and
before any tool starts, so no tool starts after a cancel was recorded.

Cost. Every model call (turns, history compaction, classifier guardrails) is priced as it
returns, with the price table as it is then (``agentd.server.pricing``; ``_priced``): its
``Usage`` carries its exact cost, or counts as unpriced when the table does not name its
model (never a guessed 0). The run's usage sums them, is checkpointed with them (a takeover
resumes the cost too), and goes out on ``usage_updated`` and the terminal event. Spans carry
the cost rounded to nano-dollars: each turn's and compaction's GENERATION span ``cost_usd``
(when priced; a classifier guardrail's span has ended when ``guardrails`` reports its usage,
so its cost is in the run's figures only), and the RUN span the run's ``cost_usd`` and
``unpriced_calls`` (kept current after each model turn), cached and reasoning tokens,
``ttft_ms`` and, on failure, ``error_code`` (what StatsService aggregates).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING, Any, Protocol

import pydantic

from agentd.server.app import App
from agentd.server.auth.principal import Principal
from agentd.server.models.base import ModelHostedCall, ModelProvider, ModelRequest, ModelResponse
from agentd.server.pricing import PriceFile, PriceTable, nano_dollars
from agentd.server.runtime.agent import CompiledAgent
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.context import RunContext, ToolContext
from agentd.server.runtime.errors import (
    AgentdError,
    ModelError,
    ModelUnavailableError,
    SessionNotFoundError,
    StoreUnavailableError,
    TemplateKeyError,
)
from agentd.server.runtime.events import (
    ActionRequired,
    AgentUpdated,
    GuardrailTripped,
    Handoff,
    HistoryCompacted,
    HostedToolCall,
    MessageOutput,
    Payload,
    RunCancelled,
    RunCompleted,
    RunErrorCode,
    RunFailed,
    RunResumed,
    RunStarted,
    TextDelta,
    ToolCalled,
    ToolOutput,
    UsageUpdated,
)
from agentd.server.runtime.guardrails import (
    Guardrail,
    GuardrailEnv,
    GuardrailResult,
    GuardrailSubject,
    Stage,
    jsonable_output,
    subject_text,
    trip_message,
)
from agentd.server.runtime.history import history_view, plan_compaction, transcript, window_start
from agentd.server.runtime.items import (
    Item,
    MessageItem,
    ReasoningItem,
    SummaryItem,
    ToolCallItem,
    ToolResultItem,
    json_problem,
)
from agentd.server.runtime.tools import FunctionTool, ToolResult
from agentd.server.runtime.usage import Usage
from agentd.server.sessions.base import History, SessionStore
from agentd.server.tenancy import DEFAULT_TENANT, local
from agentd.server.tracing.base import SpanHandle, SpanKind, TraceHandle, Tracer

if TYPE_CHECKING:
    from agentd.server.agents.catalog import AgentCatalog

log = logging.getLogger("agentd.run")

# The history window when neither the agent (history_limit) nor the server
# (AGENTD_HISTORY_MAX_ITEMS) sets one: a run sends at most this many newest session items.
DEFAULT_HISTORY_MAX_ITEMS = 200

# A step that cannot be saved is retried once (with the same request id) before the run fails.
SAVE_ATTEMPTS = 2
SAVE_RETRY_DELAY_S = 0.2


@dataclass(slots=True, frozen=True)
class RunInput:
    run_id: str
    agent: str
    input: str
    session_id: str | None = None
    context: dict[str, Any] = field(default_factory=dict)
    max_turns: int | None = None
    request_id: str = ""
    workflow_name: str = "agentd run"
    group_id: str = ""
    trace_metadata: dict[str, str] = field(default_factory=dict)
    traceparent: str = ""  # the caller's W3C trace context, continued by the run's trace
    # Who started the run: its tenant owns the run, and tools see the principal (RunContext.principal).
    principal: Principal | None = None
    # The starting agent's version (agents.catalog): 0 for app-module and file agents.
    agent_version: int = 0
    # StartRun.input_items: messages sent (and stored) before ``input``, in order; ``input`` may
    # then be empty (no user text message of its own).
    input_items: tuple[MessageItem, ...] = ()

    def input_messages(self) -> list[MessageItem]:
        """The run's input as items: ``input_items``, then ``input`` as a user message when set."""
        return [*self.input_items, *([MessageItem("user", self.input)] if self.input else [])]

    def input_text(self) -> str:
        """The input's text, as input guardrails check it: the texts of the input messages joined."""
        if not self.input_items:
            return self.input
        return "\n".join(item.text for item in self.input_messages() if item.text)

    @property
    def tenant(self) -> str:
        return self.principal.tenant if self.principal is not None else DEFAULT_TENANT


class EventSink(Protocol):
    """Where a run's events go. ``emit`` must not block; ``cancel_reason`` explains a cancellation.

    A sink may also have ``cancel_requested`` (a bool, sticky): once True the loop stops at its
    next step boundary even if its task never saw the ``CancelledError``, and ``event_count``
    (the sequence of its last event), which the loop puts in each checkpoint's ``sequence``
    so that a sink finding it right need not copy the checkpoint to fill it in."""

    trace_id: str
    cancel_reason: str

    def emit(self, payload: Payload) -> None: ...

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        """Make the checkpoint (and every event emitted before it) durable; the sink fills in ``sequence``."""
        ...

    async def wait_action(self, key: str) -> dict[str, Any]:
        """The caller's answer for ``key`` (``approval:<call id>`` or ``output:<call id>``), once it came."""
        ...


@dataclass(slots=True, frozen=True)
class Resume:
    """How to continue a run another execution started."""

    attempt: int
    reason: str  # the cause, as RunResumed reports it: "lease expired" or "handed off"
    checkpoint: Checkpoint | None  # None: the first execution died before its first completed step
    trace_id: str = ""  # the trace earlier executions recorded (kept when there is no checkpoint)
    # Results of the checkpoint's pending calls that the run's log already holds (a ToolOutput
    # event, by call id): those tools finished before the takeover and are not run again.
    tool_outputs: dict[str, ToolResultItem] = field(default_factory=dict)
    # Pending handoff calls whose Handoff (and AgentUpdated) event the log already holds.
    handoffs_logged: frozenset[str] = frozenset()


class _RunFailure(Exception):
    def __init__(self, code: RunErrorCode, message: str, event: Payload | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.event = event  # emitted just before the RunFailed (a GuardrailTripped): one per run


class AgentRunner:
    # The result cache's hooks (runs/cached.py: replay before a new run executes, store before
    # RunCompleted), set by the server; None: nothing is cached.
    result_cache: Any = None

    def __init__(
        self,
        app: App | AgentCatalog,
        models: ModelProvider,
        sessions: SessionStore,
        tracer: Tracer,
        *,
        tool_timeout_s: float | None = 60.0,
        history_max_items: int = DEFAULT_HISTORY_MAX_ITEMS,
        prices: PriceTable | PriceFile | None = None,
    ) -> None:
        """``prices``: the price table model calls are priced with (a ``PriceFile`` is read again
        when it changes, so a new price applies from the next call on); None: every call unpriced."""
        if history_max_items < 0:
            raise ValueError(f"history_max_items must be >= 0 (0: the whole session), got {history_max_items}")
        self._history_max_items = history_max_items
        if isinstance(app, App):
            from agentd.server.agents.catalog import AgentCatalog

            app = AgentCatalog(app)
        self._agents = app
        self._models = models
        self._sessions = sessions
        self._tracer = tracer
        self._tool_timeout_s = tool_timeout_s
        self._prices = prices

    async def run(self, run: RunInput, sink: EventSink, resume: Resume | None = None) -> None:
        started = time.perf_counter()
        cp = resume.checkpoint if resume is not None else None
        try:
            # The version the run started with, even if the agent changed since (a takeover).
            starting = (await self._agents.get(run.tenant, run.agent, run.agent_version)).compiled
            agent = starting if cp is None or cp.agent == run.agent else self._agents.handoff(run.tenant, cp.agent)
        except AgentdError as exc:  # deleted meanwhile, or no longer builds: nothing ran yet
            sink.emit(RunFailed(RunErrorCode.INTERNAL, f"agent {run.agent!r} cannot run: {exc}", Usage(), 0))
            return
        if resume is None and self.result_cache is not None and await self.result_cache.replay(run, starting, sink):
            return  # answered from the result cache: no model call, no tools (runs/cached.py)
        max_turns = run.max_turns or starting.agent.max_turns
        usage = cp.usage.copy() if cp is not None else Usage()
        turns = cp.turns if cp is not None else 0
        ctx = RunContext(
            run.run_id, agent.name, local(run.session_id) if run.session_id else None, run.context, usage,
            run.principal,
        )
        traceparent = run.traceparent
        if cp is not None and cp.trace_id and cp.span_id:
            traceparent = f"00-{cp.trace_id}-{cp.span_id}-01"  # the resumed execution joins the run's trace
        elif resume is not None and resume.trace_id:
            # No checkpoint names the run's root span: join the same trace under a fresh parent id.
            traceparent = f"00-{resume.trace_id}-{os.urandom(8).hex()}-01"
        trace = self._tracer.start_trace(
            run_id=run.run_id,
            workflow_name=run.workflow_name,
            group_id=run.group_id,
            metadata=run.trace_metadata,
            agent=agent.name,
            traceparent=traceparent,
            tenant=run.tenant,
            agent_version=run.agent_version,
        )
        sink.trace_id = trace.trace_id
        run_span = trace.span(
            SpanKind.RUN, run.workflow_name, None, run_id=run.run_id, agent=agent.name, agent_version=run.agent_version
        )
        agent_span = None
        # The time to the run's first model token: measured by an execution that starts the run (a
        # run resumed from a checkpoint had its first token in an earlier execution).
        first_token = _FirstToken(started if cp is None else None)
        if cp is not None:  # the run's cost so far, as its checkpoint has it (the live trace shows it)
            run_span.set(**_cost_attributes(usage))
        try:
            if resume is not None:
                sink.emit(RunResumed(resume.attempt, resume.reason, turns))
            if cp is None:
                history, history_len, omitted = await self._read_window(run.session_id, agent)
                if resume is None:  # a resumed run's log already begins with its run_started
                    sink.emit(RunStarted(
                        agent.name, run.session_id or "", len(history), run.request_id, omitted, run.agent_version
                    ))
                if agent.agent.compaction is not None and run.session_id is not None:
                    compacted = await self._compact(run, agent, history, usage, sink, trace, run_span)
                    if compacted is not None:
                        history, history_len = compacted
                run_items: list[Item] = list(run.input_messages())
                unsaved: list[Item] = list(run_items)  # saved with the first completed step
            else:
                # Redo the checkpointed step's session write (a no-op if the previous execution
                # got that far: same request id), then rebuild from the history the run started with.
                history = await self._resume_history(run.session_id, cp)
                run_items, unsaved, history_len = list(cp.run_items), list(cp.unsaved), cp.history_items
                if cp.done:
                    sink.emit(RunCompleted(cp.final_output, agent.name, usage.copy(), turns,
                                           time.perf_counter() - started))
                    run_span.end(turns=turns, **_run_attributes(usage, first_token))
                    trace.end()
                    return
            items: list[Item] = [*history, *run_items]
            pending: list[Item] = list(cp.pending) if cp is not None else []
            logged_outputs = dict(resume.tool_outputs) if resume is not None else {}
            logged_handoffs = resume.handoffs_logged if resume is not None else frozenset()
            agent_span = trace.span(SpanKind.AGENT, agent.name, run_span, agent=agent.name)
            # Checked on the first turn; a checkpoint exists only once they passed (see checkpoint.py).
            input_guardrails = agent.input_guardrails if cp is None else ()
            while True:
                _stop_if_cancelled(sink)
                ctx.agent_name = agent.name
                done: dict[str, ToolResultItem] = {}
                if pending:  # resuming a turn whose tools had not finished: the same calls, not again if done
                    step, pending = pending, []
                    done, logged_outputs = logged_outputs, {}
                else:
                    if turns >= max_turns:
                        raise _RunFailure(
                            RunErrorCode.MAX_TURNS_EXCEEDED,
                            f"agent {agent.name!r} gave no final output within max_turns={max_turns}; "
                            "raise max_turns on the agent or in the request",
                        )
                    if input_guardrails and agent.agent.input_guardrail_mode == "blocking":
                        await self._guard(input_guardrails, GuardrailSubject("input", agent.name, run.input_text()), ctx,
                                          sink, trace, agent_span)  # before the model is called at all
                        input_guardrails = ()
                    turns += 1
                    if input_guardrails:  # "parallel": checked while the model answers; the answer waits
                        response = await self._raced_turn(agent, ctx, items, run.input_text(), sink, trace, agent_span,
                                                          first_token)
                        input_guardrails = ()
                    else:
                        response = await self._model_turn(agent, ctx, items, sink, trace, agent_span, first_token)
                    usage.add(response.usage)
                    run_span.set(**_cost_attributes(usage))  # the live trace's cost so far
                    sink.emit(UsageUpdated(agent.name, agent.model, response.usage, usage.copy()))
                    _stop_if_cancelled(sink)  # cancelled during the turn: its answer is not acted on
                    # Reasoning first, as the model produced it: kept with its step, sent back next turns.
                    step = [ReasoningItem(r.id, r.summary, r.encrypted_content, agent.name) for r in response.reasoning]
                    if response.text:
                        message = MessageItem("assistant", response.text, agent.name)
                        step.append(message)
                        sink.emit(MessageOutput(agent.name, message))
                    if not response.tool_calls:
                        final_output = self._final_output(agent, response.text)
                        if agent.output_guardrails:  # a rejected output is never checkpointed nor saved
                            subject = GuardrailSubject("output", agent.name, subject_text(final_output), final_output)
                            await self._guard(agent.output_guardrails, subject, ctx, sink, trace, agent_span)
                        step_id = f"{run.run_id}/{turns}"
                        run_items.extend(step)
                        await sink.checkpoint(Checkpoint(
                            agent.name, turns, usage.copy(), history_len, tuple(run_items), tuple(unsaved + step),
                            step_id, _sequence(sink), trace.trace_id, run_span.span_id, final_output, True,
                        ))
                        await self._save(run.session_id, unsaved + step, step_id)
                        completed = RunCompleted(final_output, agent.name, usage.copy(), turns,
                                                 time.perf_counter() - started)
                        if self.result_cache is not None:  # kept before anyone sees it complete (runs/cached.py)
                            await self.result_cache.store(run, starting, completed, sink)
                        agent_span.end()
                        sink.emit(completed)
                        run_span.end(turns=turns, **_run_attributes(usage, first_token))
                        trace.end()
                        return
                    for c in response.tool_calls:
                        tool_call = ToolCallItem(c.call_id, c.name, c.arguments, agent.name)
                        step.append(tool_call)
                        sink.emit(ToolCalled(agent.name, tool_call))
                    # The model turn is a step: a replica resuming from here runs these very calls.
                    await sink.checkpoint(Checkpoint(
                        agent.name, turns, usage.copy(), history_len, tuple(run_items), (), "", _sequence(sink),
                        trace.trace_id, run_span.span_id, pending=tuple(step), unsaved=tuple(unsaved),
                        awaiting=_awaited_actions(agent, step),
                    ))
                step_id = f"{run.run_id}/{turns}"
                next_agent, handoff_logged = await self._tool_step(
                    agent, ctx, step, sink, trace, agent_span, done, logged_handoffs
                )
                items.extend(step)
                run_items.extend(step)
                if next_agent is not None and not handoff_logged:
                    sink.emit(AgentUpdated(next_agent.name))
                await sink.checkpoint(Checkpoint(
                    (next_agent or agent).name, turns, usage.copy(), history_len, tuple(run_items),
                    tuple(unsaved + step), step_id, _sequence(sink), trace.trace_id, run_span.span_id,
                ))
                await self._save(run.session_id, unsaved + step, step_id)
                unsaved = []
                if next_agent is not None:
                    agent_span.end()
                    agent = next_agent
                    agent_span = trace.span(SpanKind.AGENT, agent.name, run_span, agent=agent.name)
        except asyncio.CancelledError:
            reason = sink.cancel_reason or "cancelled"
            self._end_spans(trace, run_span, agent_span, f"cancelled: {reason}",
                            turns=turns, **_run_attributes(usage, first_token))
            sink.emit(RunCancelled(reason, usage.copy(), turns))
        except _RunFailure as failure:
            self._end_spans(trace, run_span, agent_span, failure.message, turns=turns,
                            error_code=failure.code.value, **_run_attributes(usage, first_token))
            if failure.event is not None:
                sink.emit(failure.event)
            sink.emit(RunFailed(failure.code, failure.message, usage.copy(), turns))
        except Exception as exc:  # app code (dynamic instructions...) or an agentd bug
            log.exception("run %s failed unexpectedly", run.run_id)
            # The exception's text may hold anything the app had at hand (personal data,
            # secrets): the caller and the trace get its type, the server log the rest.
            message = f"internal error: {type(exc).__name__} (details in the server log, run {run.run_id})"
            self._end_spans(trace, run_span, agent_span, message, turns=turns,
                            error_code=RunErrorCode.INTERNAL.value, **_run_attributes(usage, first_token))
            sink.emit(RunFailed(RunErrorCode.INTERNAL, message, usage.copy(), turns))

    async def _read_history(self, session_id: str, limit: int | None) -> History:
        try:
            return await self._sessions.read_history(session_id, create=True, limit=limit)
        except StoreUnavailableError as exc:
            raise _RunFailure(RunErrorCode.SESSION_UNAVAILABLE, f"could not read session history: {exc}") from exc

    async def _read_window(self, session_id: str | None, agent: CompiledAgent) -> tuple[list[Item], int, int]:
        """The history a new run sends to the model, how many of the session's newest items it
        spans, and how many older session items it does not send verbatim.

        The history window: the session's newest ``history_limit`` items (the starting agent's,
        else the server's ``history_max_items``; 0 reads the whole session). The store reads
        only those, however long the session. A window that was cut must not begin inside a
        step: its leading items are dropped until none of them is a tool result whose call was
        cut off (see ``window_start``), and those count as omitted too. A compacted session's
        newest summary then stands for the items before those it kept (``history_view``):
        they are omitted as well.
        """
        if session_id is None:
            return [], 0, 0
        limit = agent.agent.history_limit
        if limit is None:
            limit = self._history_max_items
        history = await self._read_history(session_id, limit or None)
        start = window_start(history) if history.omitted else 0
        window = history[start:]
        view = history_view(window)
        return view, len(window), history.omitted + start + len(window) - len(view)

    async def _compact(
        self,
        run: RunInput,
        agent: CompiledAgent,
        view: list[Item],
        usage: Usage,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
    ) -> tuple[list[Item], int] | None:
        """Compact the history under the agent's policy when it is over the trigger: the new
        history and the number of the session's newest items it spans; None when nothing changed.

        The summary is appended to the session with a request id of the run's, so an execution
        that takes the run over appends nothing twice (and finds the history short already).
        Compaction fails open: a model or store failure leaves the history as it was (the
        span records why) and the run goes on with it; only a cancel stops the run.
        """
        policy = agent.agent.compaction
        assert policy is not None and run.session_id is not None
        plan = plan_compaction(view, policy)
        if plan is None:
            return None
        model = policy.model or agent.model
        request = ModelRequest(
            model, policy.instructions, (MessageItem("user", transcript(plan.fold)),), api=agent.model_api
        )
        span = trace.span(SpanKind.GENERATION, model, parent, model=model, agent=agent.name, purpose="compaction")
        response: ModelResponse | None = None
        try:
            async for chunk in self._models.get_model(model).stream(request):
                if isinstance(chunk, ModelResponse):
                    response = chunk
        except (ModelUnavailableError, ModelError) as exc:
            span.end(error=str(exc))
            log.warning("run %s: history compaction skipped, the model failed: %s", run.run_id, exc)
            return None
        except BaseException as exc:
            span.end(error=f"{type(exc).__name__}: {exc}")
            raise
        if response is None or not response.text.strip():
            span.end(error="the model wrote no summary")
            return None
        response = dataclasses.replace(response, usage=self._priced(model, response.usage))
        span.end(finish_reason=response.finish_reason, **_usage_attributes(response.usage))
        usage.add(response.usage)
        summary = SummaryItem(response.text, plan.summarised_items, plan.keep, agent.name)
        try:
            appended = await self._sessions.append_items(
                run.session_id, [summary], request_id=f"{run.run_id}/compaction"
            )
            if not appended:  # a replay whose summary a later compaction dropped: nothing to add
                return None
            stored = appended[0]
            dropped = 0
            if policy.drop_originals:
                older = await self._sessions.list_items(
                    run.session_id, plan.keep + 1, newest_first=True, before_sequence=stored.sequence
                )
                if len(older) == plan.keep + 1:  # the newest item the summary stands for, and all before it
                    dropped = await self._sessions.drop_items_through(run.session_id, older[-1].sequence)
        except (StoreUnavailableError, SessionNotFoundError) as exc:
            log.warning("run %s: history compaction not saved: %s", run.run_id, exc)
            sink.emit(UsageUpdated(agent.name, model, response.usage, usage.copy()))
            return None
        sink.emit(HistoryCompacted(
            agent.name, run.session_id, summary, stored.sequence, len(plan.fold), plan.keep, dropped,
        ))
        sink.emit(UsageUpdated(agent.name, model, response.usage, usage.copy()))
        kept = view[len(view) - plan.keep :] if plan.keep else []
        return [summary, *kept], plan.keep + 1

    async def _resume_history(self, session_id: str | None, cp: Checkpoint) -> list[Item]:
        """Redo the checkpoint's session write, then read the history the run started with.

        The session holds that history followed by the run's saved items (its input and
        completed steps), nothing else: the window is the ``cp.history_items`` items before
        those, read as the newest ``history_items + saved`` items, so a resumed run sends the
        model what its first execution did without reading the whole session.
        """
        if session_id is None:
            return []
        try:
            await self._save(session_id, list(cp.step_items), cp.step_request_id)
        except SessionNotFoundError:  # gone since (expired or deleted): it starts again, empty
            await self._read_history(session_id, 1)
            await self._save(session_id, list(cp.step_items), cp.step_request_id)
        saved = len(cp.run_items) - len(cp.unsaved)  # every run item but those not saved yet
        history = await self._read_history(session_id, max(1, cp.history_items + saved))
        return history_view(history[: cp.history_items])

    async def _save(self, session_id: str | None, items: list[Item], step_id: str) -> None:
        """Append one step, retrying once after a store failure.

        A networked store can fail after it committed (the reply was lost), so the
        step carries a request id: the retry then returns what the first attempt
        stored instead of storing it twice, and a retry on a fresh connection rides
        out a database restart or failover.
        """
        if session_id is None or not items:
            return
        for attempt in range(1, SAVE_ATTEMPTS + 1):
            try:
                await self._sessions.append_items(session_id, items, request_id=step_id)
                return
            except StoreUnavailableError as exc:
                if attempt == SAVE_ATTEMPTS:
                    raise _RunFailure(
                        RunErrorCode.SESSION_UNAVAILABLE,
                        f"could not save the run's step to session {session_id!r} ({attempt} attempts); "
                        f"the session keeps only whole steps: {exc}",
                    ) from exc
                await asyncio.sleep(SAVE_RETRY_DELAY_S)

    async def _model_turn(
        self,
        agent: CompiledAgent,
        ctx: RunContext,
        items: list[Item],
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
        first_token: _FirstToken | None = None,
    ) -> ModelResponse:
        """One model call of the agent's: its text streams out as events; the response's usage
        comes back priced. ``first_token`` notes when the run's first model output arrived."""
        try:
            instructions = await agent.agent.resolve_instructions(ctx)
        except TemplateKeyError as exc:  # a declarative agent's template and the run's context disagree
            raise _RunFailure(RunErrorCode.INVALID_CONTEXT, str(exc)) from exc
        request = ModelRequest(
            model=agent.model,
            instructions=instructions,
            items=items,
            tools=await agent.turn_tool_specs(),  # its MCP servers' tools as they are now
            settings=agent.agent.model_settings,
            output_schema=agent.output_schema,
            api=agent.model_api,
            hosted_tools=agent.hosted_tools,
        )
        span = trace.span(SpanKind.GENERATION, agent.model, parent, model=agent.model, agent=agent.name)
        response: ModelResponse | None = None
        first = first_token if first_token is not None and first_token.waiting else None
        try:
            async for chunk in self._models.get_model(agent.model).stream(request):
                if first is not None:  # the run's first model output (a text delta, or a whole answer)
                    first.arrived()
                    first = None
                if type(chunk) is str:
                    sink.emit(TextDelta(agent.name, chunk))
                elif type(chunk) is ModelHostedCall:
                    sink.emit(HostedToolCall(agent.name, chunk.tool, chunk.call_id, chunk.status, chunk.details))
                else:
                    response = chunk  # type: ignore[assignment]
        except ModelUnavailableError as exc:
            span.end(error=str(exc))
            raise _RunFailure(RunErrorCode.MODEL_UNAVAILABLE, str(exc)) from exc
        except ModelError as exc:
            span.end(error=str(exc))
            raise _RunFailure(RunErrorCode.MODEL_ERROR, str(exc)) from exc
        except BaseException as exc:
            span.end(error=f"{type(exc).__name__}: {exc}")
            raise
        if response is None:
            span.end(error="no response")
            raise _RunFailure(RunErrorCode.MODEL_ERROR, f"model {agent.model!r} ended its stream without a response")
        response = dataclasses.replace(response, usage=self._priced(agent.model, response.usage))
        span.end(finish_reason=response.finish_reason, **_usage_attributes(response.usage))
        return response

    def _priced(self, model: str, usage: Usage) -> Usage:
        """One call's usage with its cost: exact when the price table names ``model``; else (no
        table, a model it does not name, or a call that reported no token counts) unpriced."""
        priced = usage.copy()
        prices = self._prices
        table = prices.table if isinstance(prices, PriceFile) else prices
        cost = None
        if table is not None and (usage.input_tokens or usage.output_tokens):
            cost = table.cost(model, usage.input_tokens, usage.output_tokens, usage.cached_input_tokens,
                              usage.reasoning_tokens)
        priced.cost_usd = cost
        priced.unpriced_calls = 0 if cost is not None else max(usage.requests, 1)
        return priced

    async def _tool_step(
        self,
        agent: CompiledAgent,
        ctx: RunContext,
        step: list[Item],
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
        done: dict[str, ToolResultItem] | None = None,
        logged_handoffs: frozenset[str] = frozenset(),
    ) -> tuple[CompiledAgent | None, bool]:
        """Run the step's tool calls concurrently, appending their results to ``step``; returns the
        agent to hand off to, if any, and whether the log already holds that handoff (a resumed
        step). Calls in ``done`` (results an earlier execution logged) are not executed again."""
        calls = [item for item in step if isinstance(item, ToolCallItem)]
        handoff_call = next((c for c in calls if c.tool_name in agent.handoffs_by_tool), None)
        done = done or {}
        if len(calls) == 1:  # (most turns) in this task: no task, no gather, no trips through the loop
            call = calls[0]
            step.append(await self._run_call(
                agent, ctx, call, call is handoff_call, sink, trace, parent, done.get(call.call_id)
            ))
        else:
            tasks = [
                asyncio.ensure_future(
                    self._run_call(agent, ctx, call, call is handoff_call, sink, trace, parent, done.get(call.call_id))
                )
                for call in calls
            ]
            try:
                results = await asyncio.gather(*tasks)
            except BaseException:
                # One call stopped the step (a cancel seen before its tool started): none of the others
                # may run on after the run ended.
                for task in tasks:
                    task.cancel()
                await asyncio.wait(tasks)
                raise
            step.extend(results)
        if handoff_call is None:
            return None, False
        target = self._agents.handoff(ctx.tenant, agent.handoffs_by_tool[handoff_call.tool_name])
        span = trace.span(SpanKind.HANDOFF, f"{agent.name} -> {target.name}", parent, from_agent=agent.name,
                          to_agent=target.name)
        span.end()
        logged = handoff_call.call_id in logged_handoffs
        if not logged:
            sink.emit(Handoff(agent.name, target.name, handoff_call.call_id))
        return target, logged

    async def _run_call(
        self,
        agent: CompiledAgent,
        ctx: RunContext,
        call: ToolCallItem,
        is_handoff: bool,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
        logged: ToolResultItem | None = None,
    ) -> ToolResultItem:
        if logged is not None:  # the tool finished in an earlier execution: its ToolOutput is in the log
            return logged
        _stop_if_cancelled(sink)
        started = time.perf_counter()
        target = agent.handoffs_by_tool.get(call.tool_name)
        if target is not None:
            if is_handoff:
                output, is_error = f"Transferred to {target}. Continue as {target}.", False
            else:
                output, is_error = "Error: only the first handoff of a turn is followed; this one was ignored", True
        else:
            tool = await agent.find_tool(call.tool_name)
            if tool is None:
                available = ", ".join(agent.tool_names()) or "none"
                output = f"Error: there is no tool named {call.tool_name!r}; available tools: {available}"
                is_error = True
                trace.span(
                    SpanKind.FUNCTION, call.tool_name, parent, call_id=call.call_id, arguments=call.arguments
                ).end(error=output)
            else:
                tool_ctx = ToolContext(
                    ctx.run_id, agent.name, ctx.session_id, ctx.context, ctx.usage, ctx.principal, call.call_id,
                    tool.name,
                )
                if agent.tool_guardrails:  # before the tool runs, and before its approval is asked
                    await self._guard_call(agent, tool_ctx, call, "tool_before", call.arguments, sink, trace, parent)
                span = trace.span(SpanKind.FUNCTION, tool.name, parent, call_id=call.call_id, arguments=call.arguments,
                                  **tool.trace_attributes)
                try:
                    result = await self._call_tool(agent, tool, tool_ctx, call, sink)
                except BaseException:
                    span.end(error="cancelled")
                    raise
                output, is_error = result.output, result.is_error
                try:
                    if agent.tool_guardrails:  # on the result: the model reads a replacement, if one is given
                        output = await self._guard_call(agent, tool_ctx, call, "tool_after", output, sink, trace,
                                                        parent)
                finally:
                    # The span's error is the failure's content-free summary; recorders keep the full
                    # ``error_detail`` (an exception message, a caller's text) only when tracing content.
                    span.end(
                        error=(result.error_summary or output) if is_error else "",
                        error_detail=output if is_error else "",
                        output=output,
                    )
        item = ToolResultItem(call.call_id, call.tool_name, output, is_error, agent.name)
        sink.emit(ToolOutput(agent.name, item, time.perf_counter() - started))
        return item

    async def _call_tool(
        self, agent: CompiledAgent, tool: FunctionTool, ctx: ToolContext, call: ToolCallItem, sink: EventSink
    ) -> ToolResult:
        """Execute one call: after the caller's approval when the tool needs it, by the caller when
        the caller executes it, else here."""
        if tool.needs_approval:
            sink.emit(ActionRequired("approval", agent.name, call))
            answer = await self._wait_action(sink, f"approval:{call.call_id}", tool)
            if answer is None:
                return ToolResult(f"Error: no approval for {tool.name!r} arrived within {tool.timeout_s:g}s", True)
            if not answer.get("approved"):
                reason = answer.get("reason") or "no reason given"
                denied = f"Error: the call of {tool.name!r} was not approved"
                return ToolResult(f"{denied}: {reason}", True, denied)
        if tool.caller_executed:
            sink.emit(ActionRequired("tool_output", agent.name, call))
            answer = await self._wait_action(sink, f"output:{call.call_id}", tool)
            if answer is None:
                return ToolResult(
                    f"Error: tool {tool.name!r} timed out after {tool.timeout_s:g}s waiting for the caller", True
                )
            is_error = bool(answer.get("is_error", False))
            summary = f"Error: the caller reported a failure of tool {tool.name!r}" if is_error else ""
            return ToolResult(str(answer.get("output", "")), is_error, summary)
        _stop_if_cancelled(sink)  # an approval may have taken long: the tool starts only if the run goes on
        return await tool.invoke(ctx, call.arguments, self._tool_timeout_s)

    @staticmethod
    async def _wait_action(sink: EventSink, key: str, tool: FunctionTool) -> dict[str, Any] | None:
        """The caller's answer; None after the tool's own timeout (caller tools have none by default)."""
        try:
            async with asyncio.timeout(tool.timeout_s):
                return await sink.wait_action(key)
        except TimeoutError:
            return None

    async def _raced_turn(
        self,
        agent: CompiledAgent,
        ctx: RunContext,
        items: list[Item],
        text: str,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
        first_token: _FirstToken | None = None,
    ) -> ModelResponse:
        """The run's first model turn with its input guardrails checked concurrently ("parallel").

        A tripwire cancels the model call if it is still going; an answer that came first waits
        for the verdict, so nothing of its turn (tools, checkpoint) happens before the input
        passed. A model failure that comes first ends the run as it would without guardrails.
        """
        subject = GuardrailSubject("input", agent.name, text)
        checks = asyncio.ensure_future(self._first_trip(agent.input_guardrails, subject, ctx, sink, trace, parent))
        turn = asyncio.ensure_future(self._model_turn(agent, ctx, items, sink, trace, parent, first_token))
        try:
            await asyncio.wait((checks, turn), return_when=asyncio.FIRST_COMPLETED)
            response: ModelResponse | None = None
            if not checks.done():
                response = turn.result()  # the model answered first (or failed: the run ends here)
                trip = await checks
            else:
                trip = checks.result()
                if trip is None:
                    return await turn
                if turn.done() and not turn.cancelled() and turn.exception() is None:
                    response = turn.result()
            if trip is None:
                assert response is not None
                return response
            if response is not None:  # the call was made: it counts in the run's usage
                ctx.usage.add(response.usage)
                sink.emit(UsageUpdated(agent.name, agent.model, response.usage, ctx.usage.copy()))
            raise trip
        finally:
            # A tripwire cancels the call in flight (and ends its text deltas) before the run reports it.
            remaining = [t for t in (checks, turn) if not t.done()]
            for task in remaining:
                task.cancel()
            if remaining:
                await asyncio.wait(remaining)

    async def _guard(
        self,
        guardrails: tuple[Guardrail, ...],
        subject: GuardrailSubject,
        ctx: RunContext,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
    ) -> None:
        """Check ``subject`` with every guardrail, concurrently: a tripwire ends the run."""
        trip = await self._first_trip(guardrails, subject, ctx, sink, trace, parent)
        if trip is not None:
            raise trip

    async def _first_trip(
        self,
        guardrails: tuple[Guardrail, ...],
        subject: GuardrailSubject,
        ctx: RunContext,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
    ) -> _RunFailure | None:
        """The checks run concurrently; the first tripwire cancels the others and is returned as
        the run's failure, None when all passed. A check that raises ends them all."""
        if len(guardrails) == 1:
            result = await self._check(guardrails[0], subject, ctx, sink, trace, parent)
            return _tripped(guardrails[0], subject, result) if result.tripwire else None
        tasks = {asyncio.ensure_future(self._check(g, subject, ctx, sink, trace, parent)): g for g in guardrails}
        try:
            while tasks:
                finished, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                # In list order among those that finished together, so the verdict is deterministic.
                for task in sorted(finished, key=lambda t: guardrails.index(tasks[t])):
                    guardrail = tasks.pop(task)
                    result = task.result()
                    if result.tripwire:
                        return _tripped(guardrail, subject, result)
            return None
        finally:
            remaining = [t for t in tasks if not t.done()]
            for task in remaining:
                task.cancel()
            if remaining:
                await asyncio.wait(remaining)

    async def _guard_call(
        self,
        agent: CompiledAgent,
        ctx: ToolContext,
        call: ToolCallItem,
        stage: Stage,
        text: str,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
    ) -> str:
        """A tool call's checks at ``stage`` ("tool_before": its arguments, "tool_after": its result),
        in the agent's order: a tripwire ends the run; the text the model reads is returned (after,
        each replacement is what the next check sees)."""
        subject = GuardrailSubject(stage, agent.name, text, tool_name=call.tool_name, call_id=call.call_id)
        for guardrail in agent.tool_guardrails:
            if not guardrail.checks(subject.stage):
                continue
            result = await self._check(guardrail, subject, ctx, sink, trace, parent)
            if result.tripwire:
                raise _tripped(guardrail, subject, result)
            if result.replacement is not None:
                subject = dataclasses.replace(subject, text=result.replacement)
        return subject.text

    async def _check(
        self,
        guardrail: Guardrail,
        subject: GuardrailSubject,
        ctx: RunContext,
        sink: EventSink,
        trace: TraceHandle,
        parent: SpanHandle,
    ) -> GuardrailResult:
        """One guardrail check, as a GUARDRAIL span (its verdict in ``tripwire``)."""
        attributes: dict[str, Any] = {"guardrail": guardrail.name, "stage": subject.stage, "agent": subject.agent}
        if subject.tool_name:
            attributes.update(tool_name=subject.tool_name, call_id=subject.call_id)
        span = trace.span(SpanKind.GUARDRAIL, guardrail.name, parent, **attributes)

        def on_usage(agent_name: str, model: str, call_usage: Usage) -> None:  # a classifier's model call
            call_usage = self._priced(model, call_usage)
            ctx.usage.add(call_usage)
            sink.emit(UsageUpdated(agent_name, model, call_usage, ctx.usage.copy()))

        env = GuardrailEnv(self._models, lambda name: self._agents.handoff(ctx.tenant, name), trace, span, on_usage)
        try:
            result = await guardrail.check(env, ctx, subject)
        except asyncio.CancelledError:
            span.end(error="cancelled")
            raise
        except (ModelUnavailableError, ModelError) as exc:  # a classifier's model: the run fails with its code
            span.end(error=str(exc))
            code = RunErrorCode.MODEL_ERROR if isinstance(exc, ModelError) else RunErrorCode.MODEL_UNAVAILABLE
            raise _RunFailure(code, f"guardrail {guardrail.name!r} could not check: {exc}") from exc
        except BaseException as exc:  # app code: the trace keeps the type, the server log the rest
            span.end(error=type(exc).__name__)
            raise
        replaced = result.replacement is not None and not result.tripwire and subject.stage == "tool_after"
        span.end(tripwire=result.tripwire, **({"replaced": True} if replaced else {}))
        return result

    def _final_output(self, agent: CompiledAgent, text: str) -> Any:
        output_type = agent.agent.output_type
        if output_type is None and agent.agent.output_schema is not None:
            return _schema_output(agent.name, agent.agent.output_schema, text)
        if output_type is None:
            return text
        try:
            output = output_type.model_validate_json(text).model_dump(mode="json")
        except pydantic.ValidationError as exc:
            raise _RunFailure(
                RunErrorCode.INVALID_OUTPUT,
                f"agent {agent.name!r}'s final output does not match {output_type.__name__}: "
                f"{exc.error_count()} error(s), first: {exc.errors()[0]['msg']}",
            ) from exc
        # The output travels as a protobuf Value and is stored as JSON: it must be both.
        problem = json_problem(output)
        if problem is not None:
            raise _RunFailure(RunErrorCode.INVALID_OUTPUT, f"agent {agent.name!r}'s final output {problem}")
        return output

    @staticmethod
    def _end_spans(
        trace: TraceHandle, run_span: SpanHandle, agent_span: SpanHandle | None, error: str, **run_attributes: Any
    ) -> None:
        """End a run that did not complete; the run span gets ``run_attributes`` (its usage, cost,
        time to first token and, when it failed, ``error_code``: the ``RunErrorCode`` value)."""
        if agent_span is not None:
            agent_span.end(error=error)
        run_span.end(error=error, **run_attributes)
        trace.end(error=error)


def _schema_output(agent: str, schema: dict[str, Any], text: str) -> Any:
    """The final output of an agent with a raw JSON ``output_schema``: the text parsed as JSON and
    valid under the schema. The failure message names the first problem's place and the schema
    keyword it breaks, never the output's content."""
    import json

    import jsonschema

    try:
        output = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _RunFailure(
            RunErrorCode.INVALID_OUTPUT, f"agent {agent!r}'s final output is not JSON ({exc.msg} at char {exc.pos})"
        ) from exc
    except (ValueError, RecursionError) as exc:
        raise _RunFailure(RunErrorCode.INVALID_OUTPUT, f"agent {agent!r}'s final output cannot be parsed") from exc
    # The output travels as a protobuf Value and is stored as JSON: it must be both (and this
    # bounds its depth before the validator recurses into it).
    problem = json_problem(output)
    if problem is not None:
        raise _RunFailure(RunErrorCode.INVALID_OUTPUT, f"agent {agent!r}'s final output {problem}")
    validator = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator)(schema)
    errors = [error for _, error in zip(range(100), validator.iter_errors(output))]
    if errors:
        first = jsonschema.exceptions.best_match(errors)
        assert first is not None
        expected = json.dumps(first.validator_value, ensure_ascii=False)
        expected = expected if len(expected) <= 200 else expected[:200] + "..."
        raise _RunFailure(
            RunErrorCode.INVALID_OUTPUT,
            f"agent {agent!r}'s final output does not match its output schema: "
            f"{len(errors)}{'+' if len(errors) == 100 else ''} error(s), first: at {first.json_path}, "
            f"fails {first.validator!r}: {expected}",
        )
    return output


def _tripped(guardrail: Guardrail, subject: GuardrailSubject, result: GuardrailResult) -> _RunFailure:
    """The run's failure for a tripwire, with its GuardrailTripped event."""
    event = GuardrailTripped(
        guardrail.name, subject.stage, subject.agent, result.reason, jsonable_output(result.output),
        subject.tool_name, subject.call_id,
    )
    return _RunFailure(RunErrorCode.GUARDRAIL_TRIPPED, trip_message(guardrail.name, subject, result.reason), event)


def _sequence(sink: EventSink) -> int:
    """The sequence of the sink's last event, when it tells (``event_count``); else 0, for it to fill in."""
    return getattr(sink, "event_count", 0)


def _stop_if_cancelled(sink: EventSink) -> None:
    """A step boundary: a cancelled run ends here, whether or not its task saw the CancelledError."""
    if getattr(sink, "cancel_requested", False):
        raise asyncio.CancelledError()


def _awaited_actions(agent: CompiledAgent, step: list[Item]) -> tuple[str, ...]:
    """The answers this step's calls need from the caller, as action keys."""
    keys: list[str] = []
    for item in step:
        if isinstance(item, ToolCallItem):
            tool = agent.tool(item.tool_name)
            if tool is not None and tool.needs_approval:
                keys.append(f"approval:{item.call_id}")
            if tool is not None and tool.caller_executed:
                keys.append(f"output:{item.call_id}")
    return tuple(keys)


def _usage_attributes(usage: Usage) -> dict[str, Any]:
    """A model call's span attributes: its tokens and, when it was priced, ``cost_usd``."""
    attributes: dict[str, Any] = {
        "input_tokens": usage.input_tokens,
        "output_tokens": usage.output_tokens,
        "cached_input_tokens": usage.cached_input_tokens,
        "reasoning_tokens": usage.reasoning_tokens,
    }
    if usage.cost_usd is not None:
        attributes["cost_usd"] = _span_cost(usage.cost_usd)
    return attributes


def _span_cost(cost: Decimal) -> float:
    """A cost as spans carry it: US dollars rounded to whole nano-dollars (half to even), as a
    number (exactly that decimal read back, below a million dollars)."""
    return nano_dollars(cost) / 1_000_000_000


def _cost_attributes(usage: Usage) -> dict[str, Any]:
    """The run's cost so far, as its run span carries it: ``cost_usd`` (absent: no call priced) and
    ``unpriced_calls``."""
    if usage.cost_usd is None:
        return {"unpriced_calls": usage.unpriced_calls}
    return {"cost_usd": _span_cost(usage.cost_usd), "unpriced_calls": usage.unpriced_calls}


def _run_attributes(usage: Usage, first_token: "_FirstToken") -> dict[str, Any]:
    """What the run span says about the run as it ends (StatsService reads it from the trace):
    its tokens, its cost, its unpriced calls and, when a model token came, ``ttft_ms``."""
    attributes = {**_usage_attributes(usage), "unpriced_calls": usage.unpriced_calls}
    if first_token.ms is not None:
        attributes["ttft_ms"] = first_token.ms
    return attributes


class _FirstToken:
    """When a run's first model output arrived (its time to first token, TTFT), in ms from the
    start of the execution; ``started`` None: not measured (a resumed run had it earlier)."""

    __slots__ = ("started", "ms")

    def __init__(self, started: float | None) -> None:
        self.started = started
        self.ms: float | None = None

    @property
    def waiting(self) -> bool:
        return self.started is not None and self.ms is None

    def arrived(self) -> None:
        if self.started is not None and self.ms is None:
            self.ms = round((time.perf_counter() - self.started) * 1000, 3)
