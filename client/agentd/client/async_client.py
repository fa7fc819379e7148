"""The async client: typed run events, sessions and traces over one channel to one or many replicas."""

from __future__ import annotations

import asyncio
import logging
import random
import time
import weakref
from typing import Any, AsyncIterator, Awaitable, Callable, Mapping, Sequence, TypeVar

import grpc

from agentd.client._channel import INITIAL_BACKOFF_S, MAX_ATTEMPTS, MAX_BACKOFF_S, channel_options, channel_target
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
from agentd.client._security import Token, TlsConfig, async_channel, resolve_tls
from agentd.client.errors import converted, raises_agentd_errors
from agentd.client._resume import (
    CANCEL_TIMEOUT_S,
    DEFAULT_RESUME_TIMEOUT_S,
    TERMINAL_EVENTS,
    EventLog,
    Reconnects,
    is_stream_break,
)
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

log = logging.getLogger("agentd.client")

T = TypeVar("T")
Metadata = Sequence[tuple[str, str]]


@raises_agentd_errors
class RunStream:
    """A run's events: iterate it for ``RunEvent`` messages; ``cancel()`` asks the server to stop the run.

    Iteration ends after the terminal event (run_completed, run_failed or run_cancelled).

    With resume on (``AgentdClient(resume=True)``, the default) the run is started
    *detached* over the bidirectional ``Run`` stream, so it does not die with the
    connection, and the iterator hides broken connections: after UNAVAILABLE, a
    transport CANCELLED, an HTTP/2 reset or a stream that closed before the terminal
    event, it re-attaches with ``WatchRun(run, after_sequence=last seen)`` (a new
    call, which ``round_robin`` sends to another replica), retrying with backoff for
    up to ``resume_timeout_s`` per outage. Events already seen are dropped and a gap
    raises ``RunStreamGapError``, so the caller sees sequences 1..N exactly once, in
    order. If the stream broke before the first event (the run id is unknown), the
    run is found or created through ``CreateRun`` with the same ``request_id``.
    Answers (INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS,
    RESOURCE_EXHAUSTED, DEADLINE_EXCEEDED past ``timeout``, ...) are raised at once.

    Because a detached run outlives its stream, leaving the loop early (break,
    exception, ``aclose()``) or closing the client cancels the run explicitly: with
    a ``cancel`` message on the live Run stream while it is open (confirmed by the
    run_cancelled event), otherwise with the ``CancelRun`` RPC. A stream from
    ``watch_run`` only watches: leaving it leaves the run alone (``cancel()`` still
    stops it).

    With resume off the stream is the plain ``Run`` call: not detached, so leaving
    the loop cancels the call and the server cancels the run; a break is raised.
    """

    def __init__(
        self,
        client: "AgentdClient",
        *,
        start: agent_service_pb2.StartRun | None = None,
        run_id: str = "",
        after_sequence: int = 0,
        resume: bool = True,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        resume_timeout_s: float = DEFAULT_RESUME_TIMEOUT_S,
    ) -> None:
        if start is None and not run_id:
            raise ValueError("a RunStream needs a run to start or the id of a run to watch")
        self._client = client
        self._agents = client.agents
        self._start = start
        self._resume = resume
        # A stream that started its run owns it: walking away cancels it. A watcher does not.
        self._owns_run = start is not None and resume
        self._deadline = None if timeout is None else time.monotonic() + timeout
        self._metadata = tuple(metadata) if metadata else None
        self._resume_timeout_s = resume_timeout_s
        self._log = EventLog(run_id_of(run_id), after_sequence)
        self._call: grpc.aio.StreamStreamCall | None = None  # the Run stream (runs only)
        self._call_open = False  # the Run stream can still carry a cancel message
        self._reading = False  # the iterator is waiting for the Run stream's next message
        self._started = False
        self._watch: grpc.aio.UnaryStreamCall | None = None
        self._cancel_reason: str | None = None
        # Cancelling the run the caller walked away from: one task, awaited by whoever asks
        # (the iterator's clean-up and ``AgentdClient.close`` may both do).
        self._release: asyncio.Future[None] | None = None
        self._gave_up = False  # no replica answered within the resume budget
        # The server answered the start with an error: per the contract no run was created,
        # so there is nothing to cancel (and the request_id may name somebody else's run).
        self._rejected = False
        self._ended = asyncio.Event()  # the iterator has stopped reading

    @property
    def run_id(self) -> str:
        """The run's id (``run_…``), once the first event arrived or the run was looked up."""
        return self._log.run_id

    @property
    def last_sequence(self) -> int:
        """Sequence of the last event handed to the caller (where a re-attach resumes from)."""
        return self._log.last_sequence

    @property
    def request_id(self) -> str:
        """The run's idempotency key (generated when the caller gave none and resume is on)."""
        return self._start.request_id if self._start is not None else ""

    def __aiter__(self) -> AsyncIterator[run_event_pb2.RunEvent]:
        if self._start is not None and not self._resume:
            return self._plain_events()
        return self._events()

    # Starting and reading

    def _remaining(self) -> float | None:
        return None if self._deadline is None else max(0.0, self._deadline - time.monotonic())

    async def _ensure_started(self) -> None:
        if self._started or self._start is None:
            return
        self._started = True
        self._call = self._agents.Run(timeout=self._remaining(), metadata=self._metadata)
        self._call_open = True
        if self._owns_run:
            self._client._live.add(self)
        try:
            await self._call.write(agent_service_pb2.RunRequest(start=self._start))
        except asyncio.InvalidStateError:
            pass  # the call already ended: reading it raises its status

    async def _plain_events(self) -> AsyncIterator[run_event_pb2.RunEvent]:
        """resume=False: the Run call as it is; leaving early cancels the call and so the run."""
        await self._ensure_started()
        assert self._call is not None
        finished = False
        responses = self._call.__aiter__()
        try:
            async for response in responses:
                event = response.event
                self._log.run_id = event.run_id
                self._log.last_sequence = event.sequence
                finished = event.WhichOneof("payload") in TERMINAL_EVENTS
                yield event
                if finished:
                    break
        except grpc.RpcError as exc:
            raise converted(exc) from None
        finally:
            if finished:
                await _close(responses)
                await self._call.done_writing()
            else:
                self._call.cancel()

    async def _events(self) -> AsyncIterator[run_event_pb2.RunEvent]:
        """The live Run stream (when this stream started the run), then WatchRun after the last event
        seen, again after each break. One generator (not one wrapping another): a hop less per event."""
        try:
            failure: BaseException | None = None
            if self._start is not None:
                # 1. The live Run stream that started the run.
                try:
                    await self._ensure_started()
                    assert self._call is not None
                    responses = self._call.__aiter__()
                    log_ = self._log
                    self._reading = True
                    async for response in responses:
                        self._reading = False
                        event = response.event
                        if log_.admit(event):
                            yield event
                            if log_.terminal:
                                await _close(responses)
                                return
                        self._reading = True
                    self._reading = False
                    failure = self._log.ended_early()
                except grpc.RpcError as exc:
                    self._reading = False
                    self._call_open = False
                    if not (self._log.resumable and is_stream_break(exc)):
                        raise
                    failure = exc
                self._call_open = False
                if not self._log.resumable:
                    raise failure
                log.info("run %s: stream broke after event %d (%s); resuming",
                         self._log.run_id or self.request_id, self._log.last_sequence, _describe(failure))
            # 2. WatchRun from the last event seen, again after each break.
            reconnects = Reconnects(self._resume_timeout_s)
            while True:
                if failure is not None:
                    delay = reconnects.delay_after(self._deadline)
                    if delay is None:
                        self._gave_up = True
                        raise self._log.gave_up(failure, self._resume_timeout_s) from failure
                    await asyncio.sleep(delay)
                reconnects.attempt()
                try:
                    if not self._log.run_id:
                        await self._create_run()
                        if self._cancel_reason is not None:
                            await self._cancel_by_rpc(self._cancel_reason)
                    self._watch = self._agents.WatchRun(
                        agent_service_pb2.WatchRunRequest(
                            name=run_name(self._log.run_id), after_sequence=self._log.last_sequence
                        ),
                        timeout=self._remaining(),
                        metadata=self._metadata,
                    )
                    watched = self._watch.__aiter__()
                    async for response in watched:
                        if self._log.admit(response.event):
                            reconnects.progressed()
                            yield response.event
                            if self._log.terminal:
                                await _close(watched)
                                return
                    failure = self._log.ended_early()
                except grpc.RpcError as exc:
                    if not (self._resume and self._log.resumable and is_stream_break(exc)):
                        raise
                    failure = exc
                if not self._resume:
                    return  # a plain watch ends with its call
                log.info("run %s: watch broke after event %d (%s); resuming",
                         self._log.run_id, self._log.last_sequence, _describe(failure))
        except grpc.RpcError as exc:
            if not self._log.run_id and not is_stream_break(exc) and exc.code() != grpc.StatusCode.DEADLINE_EXCEEDED:
                self._rejected = True
            raise converted(exc) from None
        finally:
            await self._finish()

    async def _create_run(self, timeout: float | None = None, wait_for_ready: bool = False) -> str:
        """Find (or, if the first attempt never got there, create) the run by its request_id."""
        assert self._start is not None
        response = await self._agents.CreateRun(
            agent_service_pb2.CreateRunRequest(start=self._start),
            timeout=self._remaining() if timeout is None else timeout,
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,  # when cancelling: see _cancel_by_rpc
        )
        self._log.run_id = self._log.run_id or run_id_of(response.run.name)
        return self._log.run_id

    async def _finish(self) -> None:
        self._client._live.discard(self)
        self._ended.set()
        try:
            if self._log.terminal:
                # Nothing to half-close: the server ends the call with the terminal event, and
                # its status is on its way (waiting to close our side would cost a round trip).
                pass
            elif self._owns_run:
                await self._abandon(self._cancel_reason or "the client stopped reading the run's events")
        except (grpc.RpcError, asyncio.InvalidStateError):
            pass
        finally:
            self._cancel_calls(keep_finished_run_call=self._log.terminal)

    def _cancel_calls(self, keep_finished_run_call: bool = False) -> None:
        if self._call is not None and not keep_finished_run_call and not self._call.done():
            self._call.cancel()
        if self._watch is not None and not self._watch.done():
            self._watch.cancel()

    # Cancelling

    async def cancel(self, reason: str = "cancelled by the client") -> None:
        """Ask the server to stop the run; iteration then ends with its run_cancelled event.

        On the live Run stream when it is open (which also works before any event
        arrived), otherwise with the ``CancelRun`` RPC. Cancelling an ended run does
        nothing. Starts the run first if iteration has not (as the plain client did).
        """
        if self._start is not None and not self._resume:
            await self._ensure_started()
            assert self._call is not None
            await self._call.write(agent_service_pb2.RunRequest(cancel=agent_service_pb2.CancelRun(reason=reason)))
            return
        self._cancel_reason = reason
        if self._log.terminal:
            return
        if self._start is not None:
            try:
                await self._ensure_started()
                if self._call is not None and self._call_open:
                    await self._call.write(
                        agent_service_pb2.RunRequest(cancel=agent_service_pb2.CancelRun(reason=reason))
                    )
                    return
            except (grpc.RpcError, asyncio.InvalidStateError):
                pass  # the stream is gone: cancel by id
        await self._cancel_by_rpc(reason)

    async def _cancel_by_rpc(self, reason: str, *, wait_for_ready: bool = True) -> None:
        run_id = self._log.run_id
        if not run_id:
            if self._start is None or not self._started:
                return  # nothing was ever sent: there is no run
            run_id = await self._create_run(timeout=CANCEL_TIMEOUT_S, wait_for_ready=wait_for_ready)
        # wait_for_ready: right after a break every connection may still be re-dialling;
        # stopping the run is worth waiting (CANCEL_TIMEOUT_S at most) for one to come up.
        await self._agents.CancelRun(
            agent_service_pb2.CancelRunRequest(name=run_name(run_id), reason=reason),
            timeout=CANCEL_TIMEOUT_S,
            metadata=self._metadata,
            wait_for_ready=wait_for_ready,
        )

    async def _abandon(self, reason: str) -> None:
        """Cancel the run the caller walked away from (once, however many ask); best effort, bounded."""
        if self._release is None:
            if self._rejected or self._log.terminal or not self._owns_run or not self._started:
                return
            self._release = asyncio.ensure_future(self._release_run(reason))
        await asyncio.shield(self._release)

    async def _release_run(self, reason: str) -> None:
        try:
            if self._call is not None and self._call_open:
                try:
                    if await asyncio.wait_for(self._cancel_on_stream(reason), CANCEL_TIMEOUT_S):
                        return
                except (grpc.RpcError, asyncio.InvalidStateError, asyncio.TimeoutError):
                    pass
            await self._cancel_by_rpc(reason, wait_for_ready=not self._gave_up)
        except Exception as exc:  # the caller has left; all that is left to do is say so
            log.warning("could not cancel run %s (%s): it may keep running until it ends",
                        self._log.run_id or f"with request_id {self.request_id}", _describe(exc))
        finally:
            self._cancel_calls()

    async def _cancel_on_stream(self, reason: str) -> bool:
        """Send ``cancel`` on the Run stream and wait for the run_cancelled (or other terminal) event."""
        call = self._call
        assert call is not None
        await call.write(agent_service_pb2.RunRequest(cancel=agent_service_pb2.CancelRun(reason=reason)))
        await call.done_writing()
        if self._reading:
            # Another task is reading this stream (the client is closing under it): let it see the end.
            await self._ended.wait()
            if self._log.terminal:
                return True
        async for response in call:
            if response.event.WhichOneof("payload") in TERMINAL_EVENTS:
                return True
        return False

    async def final_output(self) -> Any:
        """Consume the stream; return the final output or raise RunFailedError/RunCancelledError."""
        async for event in self:
            done, output = final_output_of(event)
            if done:
                return output
        raise RuntimeError("the run stream ended without a terminal event")


async def _close(responses: AsyncIterator[Any]) -> None:
    """Close a call's response iterator that is done with (after the terminal event): left
    suspended, it would be closed by the event loop's finalizer hook, a wake-up through the
    loop's self-pipe per stream."""
    aclose = getattr(responses, "aclose", None)
    if aclose is not None:
        await aclose()


def _describe(error: BaseException | None) -> str:
    if isinstance(error, grpc.RpcError) and callable(getattr(error, "code", None)):
        return f"{error.code().name}: {error.details()}"  # type: ignore[attr-defined]
    return repr(error)


@raises_agentd_errors
class AgentdClient:
    """``async with AgentdClient("127.0.0.1:50051") as client: ...``

    ``target``: one address (``"host:port"`` or any gRPC target such as
    ``"dns:///agentd.internal:50051"``) or several replicas. A list of IP literals
    (``["10.0.0.1:50051", "10.0.0.2:50051"]``, or ``"[::1]:50051"`` for IPv6) becomes one
    channel over all of them (``ipv4:…``/``ipv6:…``). Host names cannot be listed that
    way: give one DNS name with an A/AAAA record per replica, ``dns:///name:port``
    (e.g. a Kubernetes headless Service). Calls are spread with ``round_robin``.

    ``retry``: repeat idempotent unary calls that failed with UNAVAILABLE on another
    replica (see ``agentd.client._channel`` for which and why).

    ``resume``: run streams survive broken connections and replicas going away (see
    ``RunStream``); ``resume_timeout_s`` bounds each outage.

    ``tls``: ``True`` (the system's CA roots) or a ``TlsConfig`` (a CA bundle, and a
    client certificate for mutual TLS); unset: plaintext. ``token``: sent as
    ``authorization: Bearer <token>`` on every call (an API key or a JWT); a callable is
    called per call, so it can hand out refreshed tokens.

    ``channel``: use this channel as is (``target``, ``retry``, ``tls`` and ``token`` are then ignored).
    """

    def __init__(
        self,
        target: str | Sequence[str] = "127.0.0.1:50051",
        *,
        channel: grpc.aio.Channel | None = None,
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
        self._channel = channel or async_channel(self.target, channel_options(retry), resolve_tls(tls), token)
        self.agents = agent_service_pb2_grpc.AgentServiceStub(self._channel)
        self.sessions = session_service_pb2_grpc.SessionServiceStub(self._channel)
        self.traces = trace_service_pb2_grpc.TraceServiceStub(self._channel)
        # Run streams whose runs this client owns, to cancel on close.
        self._live: weakref.WeakSet[RunStream] = weakref.WeakSet()

    async def __aenter__(self) -> "AgentdClient":
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def close(self) -> None:
        """Cancel the runs of unfinished ``run()`` streams (detached runs would outlive us), then close."""
        owned = [s for s in list(self._live) if not s._log.terminal]  # after a break: not yet finalized
        if owned:
            await asyncio.gather(*(s._abandon("the client closed") for s in owned), return_exceptions=True)
        await self._channel.close()

    async def _idempotent(self, call: Callable[[], Awaitable[T]]) -> T:
        """Repeat a write that carries an idempotency key after UNAVAILABLE (a service config cannot tell)."""
        for attempt in range(MAX_ATTEMPTS):
            try:
                return await call()
            except grpc.aio.AioRpcError as exc:
                if not self.retry or exc.code() != grpc.StatusCode.UNAVAILABLE or attempt == MAX_ATTEMPTS - 1:
                    raise
            await asyncio.sleep(random.uniform(0, min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2**attempt)))
        raise AssertionError("unreachable")

    # Agents

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

    # Runs

    def run(
        self,
        agent: str,
        input: str,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> RunStream:
        """Start a run and stream its events (see ``RunStream``).

        Options: session_id, context, max_turns, request_id, workflow_name, group_id,
        trace_metadata, session_policy ("reject" or "enqueue"), input_items (``item_pb2.Item``
        messages sent before ``input``, which may then be ""; their content parts carry
        images and files). With resume on, a
        request_id is generated when none is given: it is how a stream that broke
        before its first event finds its run again.

        ``timeout``: seconds for the whole run, across re-attaches; past it the stream
        raises DEADLINE_EXCEEDED and the run is cancelled.
        ``metadata``: gRPC call metadata for every call of the stream, e.g.
        ``[("traceparent", "00-…")]`` to make the run's trace a child of the caller's span.
        """
        if self.resume:
            options["request_id"] = options.get("request_id") or new_request_id()
            start = start_run(agent, input, detached=True, **options)
        else:
            start = start_run(agent, input, **options)
        return RunStream(
            self, start=start, resume=self.resume, timeout=timeout, metadata=metadata,
            resume_timeout_s=self.resume_timeout_s,
        )

    async def run_final_output(self, agent: str, input: str, **options: Any) -> Any:
        return await self.run(agent, input, **options).final_output()

    async def create_run(
        self,
        agent: str,
        input: str,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
        **options: Any,
    ) -> agent_service_pb2.RunInfo:
        """Create a background run and return it at once (queued or running); options as ``run()``.

        Always sends a request_id (a uuid4 unless given), which makes the call safe to
        retry: a repeat returns the run the first call created. Follow it with
        ``watch_run``, stop it with ``cancel_run``.
        """
        options["request_id"] = options.get("request_id") or new_request_id()
        request = agent_service_pb2.CreateRunRequest(start=start_run(agent, input, detached=True, **options))
        return (await self.agents.CreateRun(request, timeout=timeout, metadata=metadata)).run

    async def get_run(self, run_id: str) -> agent_service_pb2.RunInfo:
        """``run_id``: ``run_…`` (as events carry it) or ``runs/run_…``."""
        return (await self.agents.GetRun(agent_service_pb2.GetRunRequest(name=run_name(run_id)))).run

    async def list_runs(
        self, session_id: str, page_size: int = 0, page_token: str = ""
    ) -> agent_service_pb2.ListRunsResponse:
        """A session's runs, newest first, a page at a time."""
        return await self.agents.ListRuns(
            agent_service_pb2.ListRunsRequest(
                session=session_name(session_id), page_size=page_size, page_token=page_token
            )
        )

    async def cancel_run(self, run_id: str, reason: str = "") -> agent_service_pb2.RunInfo:
        """Cancel a run wherever it executes; an ended run is returned unchanged."""
        request = agent_service_pb2.CancelRunRequest(name=run_name(run_id), reason=reason)
        return (await self.agents.CancelRun(request)).run

    async def submit_tool_output(
        self, run_id: str, call_id: str, output: str, *, is_error: bool = False
    ) -> agent_service_pb2.RunInfo:
        """Answer an ``action_required`` TOOL_OUTPUT: the result of a caller-executed tool call."""
        request = tool_output_request(run_id, call_id, output, is_error)
        return (await self.agents.SubmitToolOutputs(request)).run

    async def approve_tool_call(
        self, run_id: str, call_id: str, approved: bool, reason: str = ""
    ) -> agent_service_pb2.RunInfo:
        """Answer an ``action_required`` APPROVAL; a denied call gives the model an error naming ``reason``."""
        request = approval_request(run_id, call_id, approved, reason)
        return (await self.agents.ApproveToolCall(request)).run

    def watch_run(
        self,
        run_id: str,
        after_sequence: int = 0,
        *,
        timeout: float | None = None,
        metadata: Metadata | None = None,
    ) -> RunStream:
        """Stream a run's events after ``after_sequence`` (0: all), then its live tail, to its terminal event.

        Re-attaches after breaks like ``run()`` when resume is on. Leaving the loop early
        only stops watching; ``cancel()`` on the stream stops the run.
        """
        return RunStream(
            self, run_id=run_id, after_sequence=after_sequence, resume=self.resume, timeout=timeout,
            metadata=metadata, resume_timeout_s=self.resume_timeout_s,
        )

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
        """``ttl_s``: idle expiry in seconds (None: the server default, 0: never).

        With a ``request_id`` and no ``session_id`` the call is repeated after UNAVAILABLE
        (the server derives the id from the request id, so a repeat is harmless).
        """
        session = session_service_pb2.Session(metadata=dict(metadata or {}))
        if state:
            session.state.update(dict(state))
        if ttl_s is not None:
            session.ttl.FromNanoseconds(round(ttl_s * 1e9))
        request = session_service_pb2.CreateSessionRequest(session_id=session_id, session=session, request_id=request_id)
        if request_id and not session_id:
            # The server derives the id from request_id: a repeat returns the same session.
            return (await self._idempotent(lambda: self.sessions.CreateSession(request))).session
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
        """``request_id``: idempotency key; with one, a call that failed with UNAVAILABLE is repeated."""
        request = session_service_pb2.AddSessionItemsRequest(
            parent=session_name(session_id), items=list(items), request_id=request_id
        )
        if request_id:
            return list((await self._idempotent(lambda: self.sessions.AddSessionItems(request))).items)
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
        agent_version: int | None = None,
    ) -> trace_service_pb2.ListTracesResponse:
        """Newest first; filters combine (status: a ``trace_service_pb2.SPAN_STATUS_*`` value;
        agent_version: the starting agent's version, None for any, 0 for app-module and file agents)."""
        return await self.traces.ListTraces(
            trace_service_pb2.ListTracesRequest(
                workflow_name=workflow_name,
                group_id=group_id,
                agent=agent,
                status=status,
                page_size=page_size,
                page_token=page_token,
                agent_version=agent_version,
            )
        )

    async def get_trace(self, trace_id: str) -> trace_service_pb2.GetTraceResponse:
        return await self.traces.GetTrace(trace_service_pb2.GetTraceRequest(name=f"traces/{trace_id}"))
