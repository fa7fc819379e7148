"""AgentService: agent discovery and the Run / StreamRun streams."""

from __future__ import annotations

import asyncio
import logging
from typing import AsyncIterator, TypeVar

import grpc

from agentd.server.app import App
from agentd.server.runs import ActiveRun, RunManager
from agentd.server.runtime.agent import CompiledAgent
from agentd.server.runtime.run_loop import RunInput
from agentd.server.services import validation
from agentd.server.services.convert import dict_from_struct, struct_from_dict, write_run_event
from agentd.server.services.errors import HANDLED, NotFound, abort, unary_errors
from agentd.server.services.validation import InvalidArgument
from agentd.v1 import agent_service_pb2 as pb
from agentd.v1 import agent_service_pb2_grpc as pb_grpc

log = logging.getLogger("agentd.service.agents")

DEFAULT_AGENT_PAGE = 100


class AgentService(pb_grpc.AgentServiceServicer):
    def __init__(self, app: App, runs: RunManager, *, max_input_chars: int) -> None:
        self._app = app
        self._runs = runs
        self._max_input_chars = max_input_chars
        self._agents = {name: _agent_to_proto(compiled) for name, compiled in app.compiled.items()}
        self._agent_order = sorted(self._agents)

    @unary_errors
    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext) -> pb.ListAgentsResponse:
        size = validation.page_size(request.page_size, DEFAULT_AGENT_PAGE)
        after = validation.decode_page_token("agents", request.page_token) or ""
        names = [n for n in self._agent_order if n > after][: size + 1]
        response = pb.ListAgentsResponse(agents=[self._agents[n] for n in names[:size]])
        if len(names) > size:
            response.next_page_token = validation.encode_page_token("agents", names[size - 1])
        return response

    @unary_errors
    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.GetAgentResponse:
        name = validation.resource_id("name", request.name, "agents")
        return pb.GetAgentResponse(agent=self._agent_proto(name, "name"))

    async def StreamRun(
        self, request: pb.StreamRunRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.StreamRunResponse]:
        run = await self._start(request.start, "start", context)
        async for response in _stream(run, pb.StreamRunResponse):
            yield response

    async def Run(
        self, request_iterator: AsyncIterator[pb.RunRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.RunResponse]:
        first = await anext(aiter(request_iterator), None)
        if first is None or first.WhichOneof("action") != "start":
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, "start: the first message on a Run stream must set 'start'"
            )
        run = await self._start(first.start, "start", context)
        reader = asyncio.create_task(_read_controls(request_iterator, run))
        try:
            async for response in _stream(run, pb.RunResponse):
                yield response
        finally:
            reader.cancel()

    async def _start(self, start: pb.StartRun, field: str, context: grpc.aio.ServicerContext) -> ActiveRun:
        try:
            return self._runs.start(self._run_input(start, field, _traceparent(context)))
        except HANDLED as exc:
            await abort(context, exc)

    def _run_input(self, start: pb.StartRun, field: str, traceparent: str = "") -> RunInput:
        agent = validation.resource_id(f"{field}.agent", start.agent, "agents", allow_bare=True)
        self._agent_proto(agent, f"{field}.agent")
        if not start.input.strip():
            raise InvalidArgument(f"{field}.input", "must not be empty")
        if len(start.input) > self._max_input_chars:
            raise InvalidArgument(
                f"{field}.input", f"is {len(start.input)} characters; the limit is {self._max_input_chars}"
            )
        if start.max_turns < 0 or start.max_turns > 1000:
            raise InvalidArgument(f"{field}.max_turns", f"must be between 0 and 1000, got {start.max_turns}")
        session_id = None
        if start.session:
            session_id = validation.session_id(f"{field}.session", start.session, allow_bare=True)
        return RunInput(
            run_id=self._runs.new_run_id(),
            agent=agent,
            input=start.input,
            session_id=session_id,
            context=dict_from_struct(start.context) if start.HasField("context") else {},
            max_turns=start.max_turns or None,
            request_id=start.request_id,
            workflow_name=start.trace.workflow_name or "agentd run",
            group_id=start.trace.group_id or (session_id or ""),
            trace_metadata=dict(start.trace.metadata),
            traceparent=traceparent,
        )

    def _agent_proto(self, name: str, field: str) -> pb.Agent:
        agent = self._agents.get(name)
        if agent is None:
            known = ", ".join(self._agent_order)
            raise NotFound(f"{field}: agent {name!r} does not exist; this server hosts: {known}")
        return agent


Response = TypeVar("Response", pb.RunResponse, pb.StreamRunResponse)


async def _stream(run: ActiveRun, response_type: type[Response]) -> AsyncIterator[Response]:
    """The run's events as responses; a caller that goes away (cancel, disconnect, deadline) cancels the run."""
    try:
        async for batch in run.events():
            for event in batch:
                response = response_type()
                write_run_event(event, response.event)
                yield response
    finally:
        if not run.done:
            run.cancel("the client went away (cancelled, disconnected or past its deadline)")
            await run.wait()


async def _read_controls(request_iterator: AsyncIterator[pb.RunRequest], run: ActiveRun) -> None:
    """Apply control messages the caller sends while the run streams."""
    try:
        async for message in request_iterator:
            action = message.WhichOneof("action")
            if action == "cancel":
                run.cancel(message.cancel.reason or "cancelled by the client")
            elif action == "start":
                run.cancel("protocol error: a Run stream carries one run; 'start' may only be the first message")
    except (asyncio.CancelledError, grpc.aio.AioRpcError):
        pass
    except Exception:  # a broken request stream must not take the run down with an unhandled error
        log.debug("request stream of %s ended with an error", run.run_id, exc_info=True)


def _agent_to_proto(compiled: CompiledAgent) -> pb.Agent:
    agent = compiled.agent
    message = pb.Agent(
        name=f"agents/{agent.name}",
        description=agent.description,
        model=compiled.model,
        handoffs=[f"agents/{h}" for h in agent.handoff_names],
        max_turns=agent.max_turns,
    )
    for tool in compiled.agent.tools:
        message.tools.append(
            pb.Tool(name=tool.name, description=tool.description, parameters=struct_from_dict(tool.parameters),
                    strict=tool.strict)
        )
    if compiled.output_schema is not None:
        message.output_schema.update(compiled.output_schema.schema)
    return message


def _traceparent(context: grpc.aio.ServicerContext) -> str:
    """The caller's W3C ``traceparent`` from the call metadata ("" when none)."""
    for key, value in context.invocation_metadata() or ():
        if key == "traceparent":
            return value if isinstance(value, str) else value.decode("ascii", "replace")
    return ""
