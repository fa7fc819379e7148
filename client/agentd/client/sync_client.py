"""The blocking client, for scripts and CLIs; same calls as ``AgentdClient``."""

from __future__ import annotations

from typing import Any, Iterator

import grpc

from agentd.client._requests import final_output_of, session_name, start_run
from agentd.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_event_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    trace_service_pb2,
    trace_service_pb2_grpc,
)


class SyncRunStream:
    """Iterate for ``RunEvent`` messages; ``cancel()`` (from any thread) cancels the call and so the run."""

    def __init__(self, call: Any) -> None:
        self._call = call

    def __iter__(self) -> Iterator[run_event_pb2.RunEvent]:
        for response in self._call:
            yield response.event

    def cancel(self) -> None:
        self._call.cancel()

    def final_output(self) -> Any:
        for event in self:
            done, output = final_output_of(event)
            if done:
                return output
        raise RuntimeError("the run stream ended without a terminal event")


class SyncAgentdClient:
    def __init__(self, target: str = "127.0.0.1:50051") -> None:
        self._channel = grpc.insecure_channel(target)
        self.agents = agent_service_pb2_grpc.AgentServiceStub(self._channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(self._channel)
        self.traces = trace_service_pb2_grpc.TraceServiceStub(self._channel)

    def __enter__(self) -> "SyncAgentdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._channel.close()

    def list_agents(self) -> list[agent_service_pb2.Agent]:
        return list(self.agents.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=1000)).agents)

    def run(self, agent: str, input: str, *, timeout: float | None = None, **options: Any) -> SyncRunStream:
        request = agent_service_pb2.StreamRunRequest(start=start_run(agent, input, **options))
        return SyncRunStream(self.agents.StreamRun(request, timeout=timeout))

    def run_final_output(self, agent: str, input: str, **options: Any) -> Any:
        return self.run(agent, input, **options).final_output()

    def get_session(self, session_id: str) -> session_service_pb2.Session:
        return self.sessions.GetSession(session_service_pb2.GetSessionRequest(name=session_name(session_id))).session

    def list_sessions(self, page_size: int = 0, page_token: str = "") -> session_service_pb2.ListSessionsResponse:
        return self.sessions.ListSessions(
            session_service_pb2.ListSessionsRequest(page_size=page_size, page_token=page_token)
        )

    def list_items(
        self, session_id: str, *, newest_first: bool = False, page_size: int = 0, page_token: str = ""
    ) -> session_service_pb2.ListSessionItemsResponse:
        order = session_service_pb2.ITEM_ORDER_NEWEST_FIRST if newest_first else session_service_pb2.ITEM_ORDER_OLDEST_FIRST
        return self.sessions.ListSessionItems(
            session_service_pb2.ListSessionItemsRequest(
                parent=session_name(session_id), page_size=page_size, page_token=page_token, order=order
            )
        )

    def clear_items(self, session_id: str) -> int:
        return self.sessions.ClearSessionItems(
            session_service_pb2.ClearSessionItemsRequest(parent=session_name(session_id))
        ).deleted_count

    def delete_session(self, session_id: str) -> None:
        self.sessions.DeleteSession(session_service_pb2.DeleteSessionRequest(name=session_name(session_id)))

    def list_traces(
        self,
        *,
        workflow_name: str = "",
        group_id: str = "",
        agent: str = "",
        status: int = trace_service_pb2.SPAN_STATUS_UNSPECIFIED,
        page_size: int = 0,
    ) -> trace_service_pb2.ListTracesResponse:
        return self.traces.ListTraces(
            trace_service_pb2.ListTracesRequest(
                workflow_name=workflow_name, group_id=group_id, agent=agent, status=status, page_size=page_size
            )
        )

    def get_trace(self, trace_id: str) -> trace_service_pb2.GetTraceResponse:
        return self.traces.GetTrace(trace_service_pb2.GetTraceRequest(name=f"traces/{trace_id}"))
