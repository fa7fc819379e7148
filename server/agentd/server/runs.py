"""Live runs on this server: starting them, streaming their events, cancelling them.

Each run is an asyncio task executing ``AgentRunner.run``; its events are stamped with
a gap-free sequence and buffered until the stream that watches the run takes them (in
batches: one wake-up per burst, not per event). A session runs one run at a time: a
second start on a busy session is refused rather than queued, so a client never waits
behind a run it cannot see.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from typing import AsyncIterator

from agentd.server.runtime.events import TERMINAL_PAYLOADS, Payload, RunEvent
from agentd.server.runtime.run_loop import AgentRunner, RunInput

log = logging.getLogger("agentd.runs")


class SessionBusyError(Exception):
    def __init__(self, session_id: str, run_id: str) -> None:
        super().__init__(
            f"session {session_id!r} already has an active run ({run_id}); "
            "wait for it to finish or cancel it, then start again"
        )


class DuplicateRunError(Exception):
    def __init__(self, request_id: str, run_id: str) -> None:
        super().__init__(f"request_id {request_id!r} already started run {run_id}, which is still running")


class ServerDrainingError(Exception):
    pass


class CapacityError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"this server is already running {limit} runs (AGENTD_MAX_ACTIVE_RUNS); retry later or on another replica"
        )


class ActiveRun:
    """One run in flight: the ``EventSink`` its loop writes to and the stream its client reads."""

    def __init__(self, run_input: RunInput) -> None:
        self.input = run_input
        self.run_id = run_input.run_id
        self.trace_id = ""
        self.cancel_reason = ""
        self.task: asyncio.Task[None] | None = None
        self._sequence = 0
        self._buffer: list[RunEvent] = []
        self._waiter: asyncio.Future[None] | None = None
        self._finished = False
        self.last_payload: Payload | None = None

    @property
    def event_count(self) -> int:
        return self._sequence

    # EventSink
    def emit(self, payload: Payload) -> None:
        self._sequence += 1
        event = RunEvent(self.run_id, self._sequence, time.time_ns(), self.trace_id, payload)
        self._buffer.append(event)
        if isinstance(payload, TERMINAL_PAYLOADS):
            self._finished = True
            self.last_payload = payload
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def events(self) -> AsyncIterator[list[RunEvent]]:
        """Batches of events in sequence order, ending after the terminal event."""
        while True:
            if self._buffer:
                batch, self._buffer = self._buffer, []
                yield batch
                if batch[-1].is_terminal:
                    return
                continue
            if self._finished or (self.task is not None and self.task.done()):
                return
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    def cancel(self, reason: str) -> None:
        if self.task is not None and not self.task.done() and not self._finished:
            self.cancel_reason = self.cancel_reason or reason
            self.task.cancel()

    async def wait(self) -> None:
        if self.task is not None:
            await asyncio.wait({self.task})

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()


class RunManager:
    def __init__(self, runner: AgentRunner, *, max_active_runs: int = 1000) -> None:
        self._runner = runner
        self._max_active_runs = max_active_runs
        self._runs: dict[str, ActiveRun] = {}
        self._by_session: dict[str, ActiveRun] = {}
        self._by_request: dict[str, ActiveRun] = {}
        self._draining = False

    @staticmethod
    def new_run_id() -> str:
        return f"run_{uuid.uuid4().hex}"

    def active_run_for_session(self, session_id: str) -> ActiveRun | None:
        return self._by_session.get(session_id)

    def start(self, run_input: RunInput) -> ActiveRun:
        if self._draining:
            raise ServerDrainingError("the server is shutting down and accepts no new runs; retry on another replica")
        if len(self._runs) >= self._max_active_runs:
            raise CapacityError(self._max_active_runs)
        session_id = run_input.session_id
        if session_id is not None and session_id in self._by_session:
            raise SessionBusyError(session_id, self._by_session[session_id].run_id)
        if run_input.request_id and run_input.request_id in self._by_request:
            raise DuplicateRunError(run_input.request_id, self._by_request[run_input.request_id].run_id)
        run = ActiveRun(run_input)
        self._runs[run.run_id] = run
        if session_id is not None:
            self._by_session[session_id] = run
        if run_input.request_id:
            self._by_request[run_input.request_id] = run
        run.task = asyncio.create_task(self._execute(run), name=run.run_id)
        return run

    async def _execute(self, run: ActiveRun) -> None:
        started = time.perf_counter()
        try:
            await self._runner.run(run.input, run)
        finally:
            if log.isEnabledFor(logging.INFO):
                outcome = type(run.last_payload).__name__ if run.last_payload is not None else "ended"
                log.info(
                    "run %s %s", run.run_id, outcome,
                    extra={
                        "run_id": run.run_id,
                        "agent": run.input.agent,
                        "session_id": run.input.session_id,
                        "outcome": outcome,
                        "events": run.event_count,
                        "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                    },
                )
            self._runs.pop(run.run_id, None)
            if run.input.session_id is not None:
                self._by_session.pop(run.input.session_id, None)
            if run.input.request_id:
                self._by_request.pop(run.input.request_id, None)

    @property
    def active_count(self) -> int:
        return len(self._runs)

    async def drain(self, grace_s: float) -> None:
        """Refuse new runs, give active ones ``grace_s`` to finish, then cancel the rest."""
        self._draining = True
        runs = list(self._runs.values())
        if not runs:
            return
        log.info("draining %d active run(s), grace %.1fs", len(runs), grace_s)
        _, pending = await asyncio.wait({r.task for r in runs if r.task is not None}, timeout=grace_s)
        if pending:
            log.warning("cancelling %d run(s) still active after the grace period", len(pending))
            for run in runs:
                run.cancel("server shutting down")
            await asyncio.wait(pending, timeout=5)
