"""The async client: typed run events, sessions and traces over one channel."""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping, Sequence

import grpc

from agentd.client._requests import final_output_of, session_name, start_run
from agentd.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    item_pb2,
    run_event_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    trace_service_pb2,
    trace_service_pb2_grpc,
)


class RunStream:
    """A live run: iterate it for ``RunEvent`` messages; ``cancel()`` asks the server to stop it.

    Iteration ends after the terminal event (run_completed, run_failed or run_cancelled).
    Leaving the loop early (break, exception) cancels the call and so the run.
    """

    def __init__(self, call: grpc.aio.StreamStreamCall, start: agent_service_pb2.StartRun) -> None:
        self._call = call
        self._start = start
        self._started = False
        self.run_id = ""

    async def _ensure_started(self) -> None:
        if not self._started:
            self._started = True
            await self._call.write(agent_service_pb2.RunRequest(start=self._start))

    def __aiter__(self) -> AsyncIterator[run_event_pb2.RunEvent]:
        return self._events()

    async def _events(self) -> AsyncIterator[run_event_pb2.RunEvent]:
        await self._ensure_started()
        finished = False
        try:
            async for response in self._call:
                event = response.event
                self.run_id = event.run_id
                kind = event.WhichOneof("payload")
                finished = kind in ("run_completed", "run_failed", "run_cancelled")
                yield event
                if finished:
                    break
        finally:
            if finished:
                await self._call.done_writing()
            else:
                self._call.cancel()

    async def cancel(self, reason: str = "cancelled by the client") -> None:
        await self._ensure_started()
        await self._call.write(agent_service_pb2.RunRequest(cancel=agent_service_pb2.CancelRun(reason=reason)))

    async def final_output(self) -> Any:
        """Consume the stream; return the final output or raise RunFailedError/RunCancelledError."""
        async for event in self:
            done, output = final_output_of(event)
            if done:
                return output
        raise RuntimeError("the run stream ended without a terminal event")


class AgentdClient:
    """``async with AgentdClient("127.0.0.1:50051") as client: ...``"""

    def __init__(self, target: str = "127.0.0.1:50051", *, channel: grpc.aio.Channel | None = None) -> None:
        self._channel = channel or grpc.aio.insecure_channel(target)
        self.agents = agent_service_pb2_grpc.AgentServiceStub(self._channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(self._channel)
        self.traces = trace_service_pb2_grpc.TraceServiceStub(self._channel)

    async def __aenter__(self) -> "AgentdClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        await self._channel.close()

    # Agents and runs

    async def list_agents(self) -> list[agent_service_pb2.Agent]:
        agents: list[agent_service_pb2.Agent] = []
        token = ""
        while True:
            page = await self.agents.ListAgents(agent_service_pb2.ListAgentsRequest(page_token=token))
            agents.extend(page.agents)
            token = page.next_page_token
            if not token:
                return agents

    async def get_agent(self, name: str) -> agent_service_pb2.Agent:
        name = name if name.startswith("agents/") else f"agents/{name}"
        return (await self.agents.GetAgent(agent_service_pb2.GetAgentRequest(name=name))).agent

    def run(
        self,
        agent: str,
        input: str,
        *,
        timeout: float | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
        **options: Any,
    ) -> RunStream:
        """Start a run; options: session_id, context, max_turns, request_id, workflow_name, group_id, trace_metadata.

        ``metadata``: gRPC call metadata, e.g. ``[("traceparent", "00-…")]`` to make the
        run's trace a child of the caller's span.
        """
        return RunStream(self.agents.Run(timeout=timeout, metadata=metadata), start_run(agent, input, **options))

    async def run_final_output(self, agent: str, input: str, **options: Any) -> Any:
        return await self.run(agent, input, **options).final_output()

    # Sessions

    async def create_session(
        self,
        session_id: str = "",
        *,
        metadata: Mapping[str, str] | None = None,
        state: Mapping[str, Any] | None = None,
        request_id: str = "",
        ttl_s: float | None = None,
    ) -> session_service_pb2.Session:
        """``ttl_s``: idle expiry in seconds (None: the server default, 0: never)."""
        session = session_service_pb2.Session(metadata=dict(metadata or {}))
        if state:
            session.state.update(dict(state))
        if ttl_s is not None:
            session.ttl.FromNanoseconds(round(ttl_s * 1e9))
        request = session_service_pb2.CreateSessionRequest(session_id=session_id, session=session, request_id=request_id)
        return (await self.sessions.CreateSession(request)).session

    async def get_session(self, session_id: str) -> session_service_pb2.Session:
        request = session_service_pb2.GetSessionRequest(name=session_name(session_id))
        return (await self.sessions.GetSession(request)).session

    async def list_sessions(
        self, page_size: int = 0, page_token: str = ""
    ) -> session_service_pb2.ListSessionsResponse:
        return await self.sessions.ListSessions(
            session_service_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token)
        )

    async def delete_session(self, session_id: str) -> None:
        await self.sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(name=session_name(session_id)))

    async def list_items(
        self, session_id: str, *, newest_first: bool = False, page_size: int = 0, page_token: str = ""
    ) -> session_service_pb2.ListSessionItemsResponse:
        order = session_service_pb2.ITEM_ORDER_NEWEST_FIRST if newest_first else session_service_pb2.ITEM_ORDER_OLDEST_FIRST
        return await self.sessions.ListSessionItems(
            session_service_pb2.ListSessionItemsRequest(
                parent=session_name(session_id), page_size=page_size, page_token=page_token, order=order
            )
        )

    async def all_items(self, session_id: str) -> list[item_pb2.Item]:
        items: list[item_pb2.Item] = []
        token = ""
        while True:
            page = await self.list_items(session_id, page_size=1000, page_token=token)
            items.extend(page.items)
            token = page.next_page_token
            if not token:
                return items

    async def add_items(
        self, session_id: str, items: Sequence[item_pb2.Item], *, request_id: str = ""
    ) -> list[item_pb2.Item]:
        request = session_service_pb2.AddSessionItemsRequest(
            parent=session_name(session_id), items=list(items), request_id=request_id
        )
        return list((await self.sessions.AddSessionItems(request)).items)

    async def pop_item(self, session_id: str) -> item_pb2.Item | None:
        response = await self.sessions.PopSessionItem(
            session_service_pb2.PopSessionItemRequest(parent=session_name(session_id))
        )
        return response.item if response.HasField("item") else None

    async def clear_items(self, session_id: str) -> int:
        response = await self.sessions.ClearSessionItems(
            session_service_pb2.ClearSessionItemsRequest(parent=session_name(session_id))
        )
        return response.deleted_count

    # Traces

    async def list_traces(
        self,
        *,
        workflow_name: str = "",
        group_id: str = "",
        agent: str = "",
        status: int = trace_service_pb2.SPAN_STATUS_UNSPECIFIED,
        page_size: int = 0,
        page_token: str = "",
    ) -> trace_service_pb2.ListTracesResponse:
        """Newest first; filters combine (status: a ``trace_service_pb2.SPAN_STATUS_*`` value)."""
        return await self.traces.ListTraces(
            trace_service_pb2.ListTracesRequest(
                workflow_name=workflow_name,
                group_id=group_id,
                agent=agent,
                status=status,
                page_size=page_size,
                page_token=page_token,
            )
        )

    async def get_trace(self, trace_id: str) -> trace_service_pb2.GetTraceResponse:
        return await self.traces.GetTrace(trace_service_pb2.GetTraceRequest(name=f"traces/{trace_id}"))
