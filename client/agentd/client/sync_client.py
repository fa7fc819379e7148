"""The blocking client, for scripts and CLIs; same calls as ``AgentdClient``."""

from __future__ import annotations

import logging
import threading
import time
import weakref
from typing import Any, Iterator, Sequence

import grpc

from agentd.client._channel import channel_options, channel_target
from agentd.client._security import Token, TlsConfig, sync_channel, resolve_tls
from agentd.client._requests import (
    approval_request,
    final_output_of,
    new_request_id,
    run_id_of,
    run_name,
    session_name,
    start_run,
    tool_output_request,
)
from agentd.client._resume import CANCEL_TIMEOUT_S, DEFAULT_RESUME_TIMEOUT_S, EventLog, Reconnects, is_stream_break
from agentd.client.errors import converted, raises_agentd_errors
from agentd.v1 import (
    agent_service_pb2,
    agent_service_pb2_grpc,
    run_event_pb2,
    session_service_pb2,
    session_service_pb2_grpc,
    trace_service_pb2,
    trace_service_pb2_grpc,
)

log = logging.getLogger("agentd.client")


@raises_agentd_errors
class SyncRunStream:
    """Iterate for ``RunEvent`` messages; ``cancel()`` (from any thread) stops the run.

    With resume on (the default) the run is made with ``CreateRun`` (detached, with a
    request_id, so the call is safe to repeat) and followed with ``WatchRun``; after a
    break the stream re-attaches from the last event seen, as ``RunStream`` does, so
    the caller sees every event once, in order. A blocking client cannot write on a
    bidirectional stream while it reads it, so it does not use ``Run``: with the run
    id known from the start, ``cancel()`` is a ``CancelRun`` call that works from any
    thread and on any replica, and iteration then ends with the run_cancelled event.
    Leaving the loop early (break, exception, Ctrl-C) or closing the client cancels
    the run, which would otherwise outlive the stream. A ``watch_run`` stream only
    watches: leaving it leaves the run alone.

    With resume off it is the plain ``StreamRun`` call: ``cancel()`` cancels the call
    and so the run, and a break is raised.
    """

    def __init__(
        self,
        client: "SyncAgentdClient",
        *,
        start: agent_service_pb2.StartRun | None = None,
        run_id: str = "",
        after_sequence: int = 0,
        resume: bool = True,
        timeout: float | None = None,
        resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S,
    ) -> None:
        if start is None and not run_id:
            raise ValueError("a SyncRunStream needs a run to start or the id of a run to watch")
        self._client = client
        self._agents = client.agents
        self._start = start
        self._resume = resume
        self._owns_run = start is not None and resume
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._resume_timeout_s = resume_timeout_s
        self._log = EventLog(run_id_of(run_id), after_sequence)
        self._lock = threading.Lock()
        self._call: Any = None  # the StreamRun call (resume off) or the current WatchRun call
        self._released = False
        self._closing = False  # set before this client cancels its own call: CANCELLED is then no break
        self._gave_up = False  # no replica answered within the resume budget
        if start is not None and not resume:
            self._call = self._agents.StreamRun(agent_service_pb2.StreamRunRequest(start=start), timeout=timeout)

    @property
    def run_id(self) -> str:
        return self._log.run_id

    @property
    def last_sequence(self) -> int:
        return self._log.last_sequence

    @property
    def request_id(self) -> str:
        return self._start.request_id if self._start is not None else ""

    def __iter__(self) -> Iterator[run_event_pb2.RunEvent]:
        if self._start is not None and not self._resume:
            return self._plain_events()
        return self._events()

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    def _plain_events(self) -> Iterator[run_event_pb2.RunEvent]:
        try:
            for response in self._call:
                self._log.run_id = response.event.run_id
                self._log.last_sequence = response.event.sequence
                yield response.event
        except grpc.RpcError as exc:
            raise converted(exc) from None

    def _ensure_created(self) -> str:
        """The run's id, creating the run first if needed (idempotent by request_id; any thread)."""
        with self._lock:
            if not self._log.run_id:
                assert self._start is not None
                response = self._agents.CreateRun(
                    agent_service_pb2.CreateRunRequest(start=self._start), timeout=self._remaining()
                )
                self._log.run_id = run_id_of(response.run.name)
                if self._owns_run:
                    self._client._live.add(self)
            return self._log.run_id

    def _events(self) -> Iterator[run_event_pb2.RunEvent]:
        failure: BaseException | None = None
        reconnects = Reconnects(self._resume_timeout_s)
        try:
            while True:
                if failure is not None:
                    delay = reconnects.delay_after(self._deadline)
                    if delay is None:
                        self._gave_up = True
                        raise self._log.gave_up(failure, self._resume_timeout_s) from failure
                    time.sleep(delay)
                reconnects.attempt()
                try:
                    run_id = self._ensure_created() if self._start is not None else self._log.run_id
                    self._call = self._agents.WatchRun(
                        agent_service_pb2.WatchRunRequest(name=run_name(run_id), after_sequence=self._log.last_sequence),
                        timeout=self._remaining(),
                    )
                    for response in self._call:
                        if self._log.admit(response.event):
                            reconnects.progressed()
                            yield response.event
                            if self._log.terminal:
                                return
                    failure = self._log.ended_early()
                except grpc.RpcError as exc:
                    if self._closing or not (self._resume and self._log.resumable and is_stream_break(exc)):
                        raise converted(exc) from None
                    failure = exc
                if not self._resume:
                    return
                log.info("run %s: stream broke after event %d; resuming", self._log.run_id, self._log.last_sequence)
        finally:
            self._client._live.discard(self)
            if not self._log.terminal:
                self._abandon("the client stopped reading the run's events")

    def _abandon(self, reason: str) -> None:
        """Cancel the run the caller walked away from, once (best effort), and drop the live call."""
        try:
            if self._released or self._log.terminal or not self._owns_run or not self._log.run_id:
                return
            self._released = True
            self._agents.CancelRun(
                agent_service_pb2.CancelRunRequest(name=run_name(self._log.run_id), reason=reason),
                timeout=CANCEL_TIMEOUT_S,
                # Right after a break every connection may be re-dialling: worth a short wait,
                # unless the stream already gave up on reaching any replica.
                wait_for_ready=not self._gave_up,
            )
        except grpc.RpcError as exc:
            log.warning("could not cancel run %s (%s): it may keep running until it ends", self._log.run_id, exc)
        finally:
            call = self._call
            if call is not None and not self._log.terminal:
                self._closing = True
                call.cancel()

    def cancel(self, reason: str = "cancelled by the client") -> None:
        """Stop the run (from any thread); iteration then ends with its run_cancelled event.

        With resume off this cancels the call instead, which cancels the run on the server.
        """
        if self._start is not None and not self._resume:
            self._call.cancel()
            return
        if self._log.terminal or self._released:
            return
        run_id = self._ensure_created() if self._start is not None else self._log.run_id
        self._agents.CancelRun(
            agent_service_pb2.CancelRunRequest(name=run_name(run_id), reason=reason),
            timeout=CANCEL_TIMEOUT_S,
            wait_for_ready=True,  # every connection may be re-dialling right after a break
        )

    def final_output(self) -> Any:
        for event in self:
            done, output = final_output_of(event)
            if done:
                return output
        raise RuntimeError("the run stream ended without a terminal event")


@raises_agentd_errors
class SyncAgentdClient:
    """Blocking twin of ``AgentdClient``: same ``target`` forms, ``retry``, ``resume`` and run methods."""

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        channel: grpc.Channel | None = None,
        retry: bool = True,
        resume: bool = True,
        resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S,
        tls: TlsConfig | bool | None = None,
        token: Token | None = None,
    ) -> None:
        self.target = channel_target(target) if channel is None else ""
        self.retry = retry
        self.resume = resume
        self.resume_timeout_s = resume_timeout_s
        self._channel = channel or sync_channel(self.target, channel_options(retry), resolve_tls(tls), token)
        self.agents = agent_service_pb2_grpc.AgentServiceStub(self._channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(self._channel)
        self.traces = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        self._live: weakref.WeakSet[SyncRunStream] = weakref.WeakSet()

    def __enter__(self) -> "SyncAgentdClient":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        """Cancel the runs of unfinished ``run()`` streams (detached runs would outlive us), then close."""
        for stream in list(self._live):
            stream._abandon("the client closed")
        self._channel.close()

    def list_agents(self) -> list[agent_service_pb2.Agent]:
        return list(self.agents.ListAgents(agent_service_pb2.ListAgentsRequest(page_size=1000)).agents)

    def run(self, agent: str, input: str, *, timeout: float | None = None, **options: Any) -> SyncRunStream:
        """Start a run and stream its events; options as ``AgentdClient.run``; ``timeout`` covers the whole run."""
        if self.resume:
            options["request_id"] = options.get("request_id") or new_request_id()
            start = start_run(agent, input, detached=True, **options)
        else:
            start = start_run(agent, input, **options)
        return SyncRunStream(
            self, start=start, resume=self.resume, timeout=timeout, resume_timeout_s=self.resume_timeout_s
        )

    def run_final_output(self, agent: str, input: str, **options: Any) -> Any:
        return self.run(agent, input, **options).final_output()

    def create_run(
        self, agent: str, input: str, *, timeout: float | None = None, **options: Any
    ) -> agent_service_pb2.RunInfo:
        """Create a background run (always with a request_id, so it is safe to retry); see ``AgentdClient``."""
        options["request_id"] = options.get("request_id") or new_request_id()
        request = agent_service_pb2.CreateRunRequest(start=start_run(agent, input, detached=True, **options))
        return self.agents.CreateRun(request, timeout=timeout).run

    def get_run(self, run_id: str) -> agent_service_pb2.RunInfo:
        return self.agents.GetRun(agent_service_pb2.GetRunRequest(name=run_name(run_id))).run

    def list_runs(self, session_id: str, page_size: int = 0, page_token: str = "") -> agent_service_pb2.ListRunsResponse:
        return self.agents.ListRuns(
            agent_service_pb2.ListRunsRequest(session=session_name(session_id), page_size=page_size, page_token=page_token)
        )

    def cancel_run(self, run_id: str, reason: str = "") -> agent_service_pb2.RunInfo:
        return self.agents.CancelRun(agent_service_pb2.CancelRunRequest(name=run_name(run_id), reason=reason)).run

    def submit_tool_output(
        self, run_id: str, call_id: str, output: str, *, is_error: bool = False
    ) -> agent_service_pb2.RunInfo:
        request = tool_output_request(run_id, call_id, output, is_error)
        return self.agents.SubmitToolOutputs(request).run

    def approve_tool_call(self, run_id: str, call_id: str, approved: bool, reason: str = "") -> agent_service_pb2.RunInfo:
        request = approval_request(run_id, call_id, approved, reason)
        return self.agents.ApproveToolCall(request).run

    def watch_run(self, run_id: str, after_sequence: int = 0, *, timeout: float | None = None) -> SyncRunStream:
        """Follow a run's events after ``after_sequence``; leaving the loop leaves the run alone."""
        return SyncRunStream(
            self, run_id=run_id, after_sequence=after_sequence, resume=self.resume, timeout=timeout,
            resume_timeout_s=self.resume_timeout_s,
        )

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
        agent_version: int | None = None,
    ) -> trace_service_pb2.ListTracesResponse:
        """``agent_version``: the starting agent's version; None for any (0: app-module and file agents)."""
        return self.traces.ListTraces(
            trace_service_pb2.ListTracesRequest(
                workflow_name=workflow_name, group_id=group_id, agent=agent, status=status, page_size=page_size,
                agent_version=agent_version,
            )
        )

    def get_trace(self, trace_id: str) -> trace_service_pb2.GetTraceResponse:
        return self.traces.GetTrace(trace_service_pb2.GetTraceRequest(name=f"traces/{trace_id}"))
