"""AgentService: agent discovery, runs, and the Run / StreamRun / WatchRun streams.

Runs belong to the tenant of the caller that started them: a run of another tenant
answers NOT_FOUND with the same message as a missing one, request ids and session ids
are qualified by the tenant (``tenancy.scoped``), and the run carries its starter's
principal to the tools.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from typing import Any, AsyncIterator, Sequence, TypeVar

import grpc

from agentd.server.agents.catalog import AgentCatalog
from agentd.server.agents.store.base import AgentStore
from agentd.server.auth.principal import current_principal
from agentd.server.runs.manager import RunManager
from agentd.server.runs.records import DuplicateRunError, RunNotFoundError, RunRecord, SessionPolicy, action_key
from agentd.server.runtime.items import FilePart, ImagePart, MessageItem
from agentd.server.runtime.run_loop import RunInput
from agentd.server.services import status, validation
from agentd.server.services.convert import dict_from_struct, item_from_proto, run_to_proto, write_run_event
from agentd.server.services.agents_api import AgentResources, agent_ref
from agentd.server.services.errors import HANDLED, abort, unary_errors
from agentd.server.services.status import Problem
from agentd.server.services.validation import InvalidArgument
from agentd.server.tenancy import local, scoped
from agentd.v1 import agent_service_pb2 as pb
from agentd.v1 import agent_service_pb2_grpc as pb_grpc

log = logging.getLogger("agentd.service.agents")

DEFAULT_RUN_PAGE = 100


class AgentService(AgentResources, pb_grpc.AgentServiceServicer):
    """Runs (this module) and agent resources (``agents_api.AgentResources``) of one gRPC service."""

    def __init__(
        self,
        catalog: AgentCatalog,
        runs: RunManager,
        *,
        max_input_chars: int,
        agent_store: AgentStore | None = None,
        mcp_allowed_hosts: Sequence[str] = (),
    ) -> None:
        self._catalog = catalog
        self._mcp_allowed_hosts = frozenset(h.lower() for h in mcp_allowed_hosts)
        self._agent_store = agent_store
        self._runs = runs
        self._max_input_chars = max_input_chars

    async def StreamRun(
        self, request: pb.StreamRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamRunResponse]:
        record = await self._start_attached(request.start, "start", context)
        async for response in self._stream(record.run_id, 0, pb.StreamRunResponse, context,
                                           detached=request.start.detached):
            yield response

    async def Run(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("action") != "start":
            await status.abort(context, status.invalid_argument(
                "start", "the first message on a Run stream must set 'start'"
            ))
        record = await self._start_attached(first.start, "start", context)
        reader = asyncio.create_task(_read_controls(request_iterator, record.run_id, self._runs))
        try:
            async for response in self._stream(record.run_id, 0, pb.RunResponse, context,
                                               detached=first.start.detached):
                yield response
        finally:
            reader.cancel()

    @unary_errors
    async def CreateRun(self, request: pb.CreateRunRequest, context: grpc.aio.ServicerContext) -> pb.CreateRunResponse:
        spec = await self._run_input(request.start, "start", _traceparent(context))
        created = await self._runs.create(spec, _policy(request.start.session_policy))
        return pb.CreateRunResponse(run=run_to_proto(created.record))

    @unary_errors
    async def GetRun(self, request: pb.GetRunRequest, context: grpc.aio.ServicerContext) -> pb.GetRunResponse:
        return pb.GetRunResponse(run=run_to_proto(await self._owned_run(_run_id("name", request.name))))

    @unary_errors
    async def ListRuns(self, request: pb.ListRunsRequest, context: grpc.aio.ServicerContext) -> pb.ListRunsResponse:
        local_id = validation.session_id("session", request.session)
        session_id = scoped(current_principal().tenant, local_id)
        size = validation.page_size(request.page_size, DEFAULT_RUN_PAGE)
        cursor = validation.decode_page_token("runs", request.page_token, scope=session_id)
        try:
            records, next_cursor = await self._runs.list_runs(session_id, size, cursor)
        except ValueError:  # a cursor the run store cannot read
            raise validation.corrupted_token() from None
        response = pb.ListRunsResponse(runs=[run_to_proto(r) for r in records])
        if next_cursor is not None:
            response.next_page_token = validation.encode_page_token("runs", next_cursor, scope=session_id)
        return response

    @unary_errors
    async def CancelRun(self, request: pb.CancelRunRequest, context: grpc.aio.ServicerContext) -> pb.CancelRunResponse:
        run_name = _run_id("name", request.name)
        reason = validation.check_text("reason", request.reason)
        run_id = (await self._owned_run(run_name)).run_id
        record = await self._runs.cancel(run_id, reason or "cancelled by the client")
        return pb.CancelRunResponse(run=run_to_proto(record))

    @unary_errors
    async def SubmitToolOutputs(
        self, request: pb.SubmitToolOutputsRequest, context: grpc.aio.ServicerContext
    ) -> pb.SubmitToolOutputsResponse:
        run_id = _run_id("name", request.name)
        answers = _output_answers(request.outputs, "outputs")
        await self._owned_run(run_id)
        return pb.SubmitToolOutputsResponse(run=run_to_proto(await self._runs.answer(run_id, answers)))

    @unary_errors
    async def ApproveToolCall(
        self, request: pb.ApproveToolCallRequest, context: grpc.aio.ServicerContext
    ) -> pb.ApproveToolCallResponse:
        run_id = _run_id("name", request.name)
        answers = [_approval_answer(request.approval, "approval")]
        await self._owned_run(run_id)
        return pb.ApproveToolCallResponse(run=run_to_proto(await self._runs.answer(run_id, answers)))

    async def WatchRun(
        self, request: pb.WatchRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.WatchRunResponse]:
        try:
            run_id = _run_id("name", request.name)
            if request.after_sequence < 0:
                raise InvalidArgument("after_sequence", f"must be 0 or more, got {request.after_sequence}")
            await self._owned_run(run_id)
        except HANDLED as exc:
            await abort(context, exc)
        async for response in self._stream(run_id, request.after_sequence, pb.WatchRunResponse, context,
                                           detached=True):
            yield response

    async def _owned_run(self, run_id: str) -> RunRecord:
        """The run, if the caller's tenant owns it; otherwise exactly what a missing run answers."""
        record = await self._runs.get(run_id)
        if record.spec.tenant != current_principal().tenant:
            raise RunNotFoundError(run_id)
        return record

    async def _start_attached(self, start: pb.StartRun, field: str, context: grpc.aio.ServicerContext) -> RunRecord:
        """Create the run of a Run/StreamRun stream; a known request id is ALREADY_EXISTS, not a second run."""
        try:
            spec = await self._run_input(start, field, _traceparent(context))
            created = await self._runs.create(spec, _policy(start.session_policy))
            if not created.created:
                raise DuplicateRunError(spec.request_id, created.record.run_id, created.record.status.value)
        except HANDLED as exc:
            await abort(context, exc)
        return created.record

    async def _stream(
        self,
        run_id: str,
        after: int,
        response_type: type[Response],
        context: grpc.aio.ServicerContext,
        *,
        detached: bool,
    ) -> AsyncIterator[Response]:
        """The run's events as responses. Unless ``detached``, a caller that goes away (cancel,
        disconnect, deadline) cancels the run.

        A client that reads slower than the run emits is not buffered for without bound: while the
        run executes here, once it is ``max_stream_lag`` events further ahead of what the stream has
        handed to gRPC than when the stream attached, the stream ends with RESOURCE_EXHAUSTED saying
        where to re-attach (WatchRun after the last sequence it got), and the run goes on (even an
        attached one: its caller is still there, only slow). Checked after each of the run's writes
        while a response waits for gRPC to take it (a stream starved by a busy server is not the
        client's fault), once the stream's first response went out, so a client that never reads is
        ended too. A stream reading a run from the store (executing
        elsewhere, or ended) holds one batch at a time and is not limited."""
        limit = self._runs.max_stream_lag
        sent = after
        slack = limit  # how far ahead the run may get: the limit, plus the backlog at attach
        behind = ""
        handler = asyncio.current_task()
        ender: asyncio.Task[None] | None = None
        head = after
        in_send = False  # a response is with gRPC, not yet taken: only then is the client the one behind

        async def end_behind() -> None:
            try:
                await status.abort(context, Problem(
                    grpc.StatusCode.RESOURCE_EXHAUSTED, "STREAM_LAGGED", behind,
                    {"run": f"runs/{local(run_id)}", "last_sequence": str(sent)},
                ))
            except BaseException:  # AbortError: the status is on its way
                pass
            if handler is not None and not handler.done():
                handler.cancel()  # it may be stuck handing a message to a client that never reads

        def progressed(durable: int) -> None:
            nonlocal behind, ender, head
            if durable > head:  # (called for every event a run writes: kept cheap)
                head = durable
            # Not while the first response is with gRPC (sent == after): its batch carries the
            # call's initial metadata, and an abort now would repeat it, which gRPC refuses
            # (TOO_MANY_OPERATIONS) after marking the call aborted: no status would ever be sent.
            if in_send and not behind and sent > after and head - sent > slack:
                behind = (f"stream fell {head - sent} events behind run {run_id} (the limit is {limit});"
                          " re-attach with WatchRun(after_sequence=<the last sequence received>)")
                log.info("run %s: %s", run_id, behind)
                if ender is None:
                    ender = asyncio.create_task(end_behind())

        subscription = self._runs.on_progress(run_id, progressed)
        unsubscribe = subscription[0] if subscription is not None else None
        if subscription is not None:
            head = subscription[1]
            slack = limit + max(head - after, 0)
        finished = False
        try:
            async for batch in self._runs.watch(run_id, after):
                last = batch[-1]
                # Consumed destructively, so a stream stuck on a send holds only what it has not sent.
                batch.reverse()
                while batch and not behind:
                    event = batch.pop()
                    sequence = event.sequence
                    response = response_type()
                    write_run_event(event, response.event)
                    del event
                    in_send = True
                    yield response
                    in_send = False
                    sent = sequence
                del batch
                if behind:
                    break
                finished = last.is_terminal
        except HANDLED as exc:
            await abort(context, exc)
        finally:
            if unsubscribe is not None:
                unsubscribe()
            if not behind and not finished and not detached:
                await self._runs.cancel_attached(
                    run_id, "the client went away (cancelled, disconnected or past its deadline)"
                )
        if ender is not None:
            await asyncio.wait({ender})  # it sends the status and ends this call

    async def _run_input(self, start: pb.StartRun, field: str, traceparent: str = "") -> RunInput:
        agent, rest = agent_ref(f"{field}.agent", start.agent)
        validation.check_text(f"{field}.input", start.input)
        input_items = _input_items(start, field)
        if not start.input.strip() and (start.input or not input_items):
            raise InvalidArgument(f"{field}.input", "must not be empty" if input_items else
                                  "must not be empty (or set input_items)")
        if len(start.input) > self._max_input_chars:
            raise InvalidArgument(
                f"{field}.input", f"is {len(start.input)} characters; the limit is {self._max_input_chars}"
            )
        if start.max_turns < 0 or start.max_turns > 1000:
            raise InvalidArgument(f"{field}.max_turns", f"must be between 0 and 1000, got {start.max_turns}")
        if start.session_policy not in _POLICIES:
            raise InvalidArgument(f"{field}.session_policy", f"unknown value {start.session_policy}")
        validation.request_id(f"{field}.request_id", start.request_id)
        if start.HasField("context"):
            validation.check_struct(f"{field}.context", start.context)
        validation.check_id(f"{field}.trace.workflow_name", start.trace.workflow_name)
        validation.check_id(f"{field}.trace.group_id", start.trace.group_id)
        trace_metadata = validation.check_string_map(f"{field}.trace.metadata", start.trace.metadata)
        principal = current_principal()
        local_session = None
        if start.session:
            local_session = validation.session_id(f"{field}.session", start.session)
        session_id = scoped(principal.tenant, local_session) if local_session else None
        entry = await self.resolve_agent(f"{field}.agent", agent, rest, local_session)
        return RunInput(
            run_id=new_run_id(),
            agent=agent,
            input=start.input,
            session_id=session_id,
            context=dict_from_struct(start.context) if start.HasField("context") else {},
            max_turns=start.max_turns or None,
            request_id=scoped(principal.tenant, start.request_id) if start.request_id else "",
            workflow_name=start.trace.workflow_name or "agentd run",
            group_id=start.trace.group_id or (local_session or ""),
            trace_metadata=trace_metadata,
            traceparent=traceparent,
            principal=principal,
            agent_version=entry.version,
            input_items=input_items,
        )


Response = TypeVar("Response", pb.RunResponse, pb.StreamRunResponse, pb.WatchRunResponse)

MAX_INPUT_ITEMS = 100
MAX_INPUT_DATA_BYTES = 4 * 1024 * 1024  # image and file data (and data: URLs) of one StartRun, in all


def _input_items(start: pb.StartRun, field: str) -> tuple[MessageItem, ...]:
    """StartRun.input_items as messages, validated; INVALID_ARGUMENT names the offending field."""
    if len(start.input_items) > MAX_INPUT_ITEMS:
        raise InvalidArgument(f"{field}.input_items",
                              f"has {len(start.input_items)} items; the limit is {MAX_INPUT_ITEMS}")
    items: list[MessageItem] = []
    total = 0
    for index, message in enumerate(start.input_items):
        path = f"{field}.input_items[{index}]"
        if message.WhichOneof("content") != "message":
            raise InvalidArgument(path, "must be a message (Item.message)")
        item = item_from_proto(message, path)
        assert isinstance(item, MessageItem)
        if not item.parts and not item.text.strip():
            raise InvalidArgument(f"{path}.message", "needs a non-empty text or parts")
        for part in item.parts:
            if isinstance(part, (ImagePart, FilePart)):
                total += len(part.data) + (len(part.url) if isinstance(part, ImagePart) and
                                           part.url[:5].lower() == "data:" else 0)
        if total > MAX_INPUT_DATA_BYTES:
            raise InvalidArgument(f"{path}.message.parts",
                                  f"brings image and file data to {total} bytes; the limit is "
                                  f"{MAX_INPUT_DATA_BYTES} in all")
        items.append(MessageItem(item.role, item.text, parts=item.parts))  # user input: no agent
    return tuple(items)

_POLICIES = {
    pb.SESSION_POLICY_UNSPECIFIED: SessionPolicy.REJECT,
    pb.SESSION_POLICY_REJECT: SessionPolicy.REJECT,
    pb.SESSION_POLICY_ENQUEUE: SessionPolicy.ENQUEUE,
}


def _policy(value: int) -> SessionPolicy:
    try:
        return _POLICIES[value]
    except KeyError:
        raise InvalidArgument("start.session_policy", f"unknown value {value}") from None


def new_run_id() -> str:
    return f"run_{uuid.uuid4().hex}"


def _output_answers(outputs: Sequence[pb.ToolOutputSubmission], field: str) -> list[tuple[str, dict[str, Any]]]:
    if not outputs:
        raise InvalidArgument(field, "needs at least one output")
    answers = []
    for index, output in enumerate(outputs):
        if not output.call_id:
            raise InvalidArgument(f"{field}[{index}].call_id", "is required: the call_id of the action_required event")
        validation.check_id(f"{field}[{index}].call_id", output.call_id)
        validation.check_text(f"{field}[{index}].output", output.output)
        answers.append((action_key("output", output.call_id), {"output": output.output, "is_error": output.is_error}))
    return answers


def _approval_answer(approval: pb.ToolApproval, field: str) -> tuple[str, dict[str, Any]]:
    if not approval.call_id:
        raise InvalidArgument(f"{field}.call_id", "is required: the call_id of the action_required event")
    validation.check_id(f"{field}.call_id", approval.call_id)
    validation.check_text(f"{field}.reason", approval.reason)
    return action_key("approval", approval.call_id), {"approved": approval.approved, "reason": approval.reason}


def _run_id(field: str, name: str) -> str:
    """The run id of ``runs/{run}`` or a bare run id (``validation.resource_id``)."""
    return validation.resource_id(field, name, "runs")


async def _read_controls(request_iterator: AsyncIterator[pb.RunRequest], run_id: str, runs: RunManager) -> None:
    """Apply control messages the caller sends while the run streams."""
    try:
        async for message in request_iterator:
            try:
                await _apply_control(message, run_id, runs)
            except HANDLED as exc:  # the stream has no reply for a control message: log it, keep reading
                log.warning("run %s: %s message refused: %s", run_id, message.WhichOneof("action"), exc)
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass
    except Exception:  # a broken request stream must not take the run down with an unhandled error
        log.debug("request stream of %s ended with an error", run_id, exc_info=True)


async def _apply_control(message: pb.RunRequest, run_id: str, runs: RunManager) -> None:
    action = message.WhichOneof("action")
    if action == "cancel":
        # No reply carries a refusal here, and a cancel must not be lost: a NUL (which no
        # store keeps) is replaced rather than refused.
        reason = message.cancel.reason.replace("\x00", "\ufffd")
        await runs.cancel(run_id, reason or "cancelled by the client")
    elif action == "tool_outputs":
        await runs.answer(run_id, _output_answers(message.tool_outputs.outputs, "tool_outputs.outputs"))
    elif action == "approval":
        await runs.answer(run_id, [_approval_answer(message.approval, "approval")])
    elif action == "start":
        await runs.cancel(run_id, "protocol error: a Run stream carries one run; 'start' may only be the first message")


def _traceparent(context: grpc.aio.ServicerContext) -> str:
    """The caller's W3C ``traceparent`` from the call metadata ("" when none)."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""
