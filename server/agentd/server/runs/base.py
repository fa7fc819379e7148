"""The shared state of runs, behind two interfaces every engine implements.

``RunStore`` holds run records, their ordered event logs, the work queue and leases.
Event appends and checkpoints live in the same interface on purpose: a step's events
and its checkpoint are written in one atomic call (one round trip), fenced by the
writer's attempt number, so a replica whose lease was taken over can never write
again, and a log never holds events a checkpoint does not account for.

``ControlBus`` carries messages (cancel) to whichever replica executes a run. It is
fire-and-forget (Redis pub/sub, Postgres NOTIFY); a cancel is also recorded on the run
and seen at the next lease renewal, so a lost message only delays it.

Implementations: ``memory`` (one process, the embedded default), ``redis`` (Streams,
consumer groups, pub/sub) and ``postgres`` (SKIP LOCKED, LISTEN/NOTIFY). All pass
``tests/test_run_stores.py``. Times are unix seconds passed in by the caller (``now``)
so every replica's decisions use the same clock semantics as the session stores.
"""

from __future__ import annotations

import abc
import asyncio
from typing import Any, AsyncIterator, Coroutine, Generator, Sequence, TypeVar

from agentd.server.runs.records import (
    Answered,
    Control,
    CreatedRun,
    RenewOutcome,
    RunRecord,
    SessionPolicy,
    TenantLimits,
)
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.events import RunEvent
from agentd.server.runtime.run_loop import RunInput

T = TypeVar("T")


class RunStore(abc.ABC):
    """Run records, event logs, the queue and leases. Errors reaching the engine raise StoreUnavailableError."""

    #: True when other processes see the same runs (Redis, Postgres): drained runs are
    #: handed off and expired leases taken over. False for the in-memory store.
    shared: bool = True

    #: True when no call suspends but those that wait on purpose (``claim``, ``wait_events``):
    #: nothing waits for I/O (the in-memory store), so a call can neither be cancelled halfway
    #: nor lose its reply. Writers then make their calls inline, on the spot, instead of in tasks
    #: of their own: ``record_progress_now`` and ``finish_now``, which an inline engine must
    #: implement, and ``start_now`` for the others. Engines doing I/O leave it False.
    inline: bool = False

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the runs live, for logs and errors (never a password)."""

    async def open(self) -> None:
        """Connect, create or migrate what is needed; raise StoreUnavailableError when unreachable."""

    async def close(self) -> None:
        """Release connections; pending waits end."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Raise StoreUnavailableError unless the engine answers."""

    # -- records -------------------------------------------------------------------------

    @abc.abstractmethod
    async def create_run(
        self,
        spec: RunInput,
        *,
        policy: SessionPolicy,
        owner: str | None,
        lease_s: float,
        max_queued: int,
        now: float,
        limits: TenantLimits | None = None,
    ) -> CreatedRun:
        """Record a new run, atomically with these checks, in this order:

        1. ``spec.request_id`` set and naming a known run: return it (``created=False``), change nothing
           (never refused by any limit).
        2. ``spec.session_id`` with an active (QUEUED/RUNNING/REQUIRES_ACTION) run: REJECT raises
           ``SessionBusyError(session_id, oldest active run id)``; ENQUEUE stores the run QUEUED but not
           claimable until every earlier active run of the session has ended (then it becomes
           claimable in creation order, without the caller doing anything).
        3. ``owner`` given: stored RUNNING with that owner, ``attempt=1`` and a lease until
           ``now + lease_s`` (the creating replica executes it at once, with no queue hop).
        4. Otherwise QUEUED and claimable. A run stored QUEUED (claimable, or behind its session under
           ENQUEUE) raises ``QueueFullError(max_queued)`` when ``max_queued`` runs are already QUEUED,
           claimable or behind their session alike; a run created RUNNING is never refused by it.

        With ``limits`` (per tenant, ``spec.tenant``; see ``TenantLimits``), after the session check
        and before the queue's: ``TenantLimitError(TENANT_MAX_ACTIVE_RUNS)`` when the tenant has
        ``limits.max_active`` unfinished runs; ``TenantLimitError(TENANT_MAX_QUEUED_RUNS)`` when the run
        would join the queue and the tenant has ``limits.max_queued`` runs there; and last, when every
        other check passed, one token of the tenant's start bucket is taken, or
        ``TenantLimitError(TENANT_START_RATE, retry_after_s=...)`` when it is empty. A refused run
        changes nothing (no record, no token). The state behind these checks lives in the store, so
        every replica sharing it enforces one limit per tenant.
        """

    @abc.abstractmethod
    async def get_run(self, run_id: str) -> RunRecord | None:
        """The run, or None when unknown or past retention."""

    @abc.abstractmethod
    async def list_runs(self, session_id: str, limit: int, cursor: str | None = None) -> tuple[list[RunRecord], str | None]:
        """A session's runs newest first (by create time, then run id), and the cursor of the next page."""

    @abc.abstractmethod
    async def active_run(self, session_id: str) -> str | None:
        """The id of the session's oldest active run, or None."""

    # -- execution -----------------------------------------------------------------------

    @abc.abstractmethod
    async def claim(self, owner: str, max_runs: int, *, lease_s: float, now: float, wait_s: float) -> list[RunRecord]:
        """Take up to ``max_runs`` claimable QUEUED runs, oldest first: RUNNING, ``owner``, ``attempt + 1``,
        lease until ``now + lease_s``. Each run goes to exactly one claimer. When none is claimable, wait up
        to ``wait_s`` for one (on the engine's own primitive, not a busy poll) and return [] on timeout."""

    @abc.abstractmethod
    async def renew(self, owner: str, leases: dict[str, int], *, lease_s: float, now: float) -> RenewOutcome:
        """Extend the leases of ``{run_id: attempt}`` this owner executes to ``now + lease_s``; report the
        runs it no longer holds (other owner or attempt, released, ended, gone) and cancel requests."""

    @abc.abstractmethod
    async def record_progress(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> str:
        """Append ``events`` (their sequences continue the log exactly: the first is ``last_sequence + 1``)
        and, when given, replace the checkpoint — atomically. Raise ``LeaseLostError`` and change nothing
        unless the run is RUNNING with this ``attempt``. ``events`` may be empty (checkpoint only).

        Returns the run's recorded ``cancel_reason`` as of the write ("" when none): the writer
        learns of a cancel recorded before its write even when the control message was lost, so
        the loop, which makes the turn asking for tools durable before any tool starts, starts no
        tool after a cancel was recorded."""

    def record_progress_now(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> str:
        """``record_progress``, done on the spot: inline engines only (``inline``)."""
        raise NotImplementedError(f"{type(self).__name__} is not inline")

    def finish_now(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        """``finish``, done on the spot: inline engines only (``inline``)."""
        raise NotImplementedError(f"{type(self).__name__} is not inline")

    @abc.abstractmethod
    async def finish(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        """Like ``record_progress`` with the run's final events (the last one terminal), and atomically:
        status from the terminal payload, ``result`` = that payload, owner and lease cleared, the session's
        next queued run (if any) made claimable, and the record, its log and its request id deleted
        ``retention_s`` after ``now``. ``LeaseLostError`` as for ``record_progress``."""

    @abc.abstractmethod
    async def release(self, run_id: str, attempt: int, *, now: float) -> bool:
        """Hand a RUNNING run back (drain): QUEUED and claimable at once, checkpoint kept, ``requeue_reason``
        ``HANDED_OFF``. False (and no change) unless it is RUNNING with this attempt."""

    @abc.abstractmethod
    async def requeue_expired(self, *, now: float) -> list[str]:
        """Make every RUNNING run whose lease expired before ``now`` QUEUED and claimable (checkpoint kept,
        ``requeue_reason`` ``LEASE_EXPIRED``); return their ids. Safe to call from every replica at once:
        each run is requeued once."""

    @abc.abstractmethod
    async def cancel(self, run_id: str, reason: str, *, event_time_ns: int, retention_s: float, now: float) -> RunRecord | None:
        """Ask for a run to be cancelled; return the run afterwards (None if unknown).

        - Terminal: unchanged.
        - QUEUED: ended here, atomically: status CANCELLED, one ``RunCancelled(reason, Usage(), turns)`` event
          appended (sequence ``last_sequence + 1``, time ``event_time_ns``, turns from its checkpoint or 0),
          result set, session released and retention started, as ``finish`` does.
        - RUNNING: ``cancel_reason`` recorded (first reason wins); its owner sees it in ``renew`` (the caller
          also publishes a ``Control`` for a prompt stop).
        """

    @abc.abstractmethod
    async def submit_action(self, run_id: str, key: str, action: dict[str, Any], *, now: float) -> RunRecord | None:
        """Record the caller's answer ``action`` under ``key`` in ``RunRecord.actions`` when the run is
        active (QUEUED or RUNNING) and has no answer under ``key`` yet; otherwise change nothing (the
        first answer wins). Return the run afterwards (None if unknown). ``get_run``, ``claim`` and
        every other record read return the recorded actions; they go with the run's retention.

        The bare write, checking neither what the run waits for nor whether a repeat matches:
        callers answering for the caller use ``submit_answers``."""

    @abc.abstractmethod
    async def submit_answers(
        self, run_id: str, answers: Sequence[tuple[str, dict[str, Any]]], *, now: float
    ) -> Answered | None:
        """Take the caller's answers (``(action key, action)``, distinct keys, else ValueError) for a
        run, deciding from the run as stored, atomically with the write (one script, one
        transaction), so the outcome never depends on when an executing replica picks an answer up:

        - unknown run (or past retention): None, nothing changes;
        - each answer, in order, is
          - a *repeat* when the key already has an answer equal to it (``records.same_answer``:
            the same output and is_error; the same approve/deny decision): taken, nothing changes,
            whatever the run does now (waits for it, moved on, ended);
          - a *conflict* when the key already has a different answer: refused;
          - *new* when the run is active (QUEUED or RUNNING) and its checkpoint's ``awaiting``
            holds the key: recorded in ``RunRecord.actions`` (as ``submit_action``);
          - else (unknown call, the wrong kind of answer for it, an ended run) refused.
        - One refused answer refuses the call: ``RunNotWaitingError.refusing(record, key, action)``
          for the first one, from the record as it was when refused, and nothing is recorded.
        - Otherwise returns ``Answered``: the record afterwards and the keys recorded by this call
          (repeats are not), so of two identical answers sent at once, from any replicas, both
          are taken and exactly one records it.
        """

    @abc.abstractmethod
    async def sweep(self, *, now: float) -> int:
        """Delete runs (with their logs and request ids) whose retention ended; engines that expire keys
        by themselves may return 0. Returns how many were deleted."""

    # -- event log -----------------------------------------------------------------------

    @abc.abstractmethod
    async def read_events(self, run_id: str, after_sequence: int, limit: int) -> list[RunEvent]:
        """Up to ``limit`` events with sequence > ``after_sequence``, in order."""

    @abc.abstractmethod
    async def wait_events(self, run_id: str, after_sequence: int, *, limit: int, timeout_s: float) -> list[RunEvent]:
        """Like ``read_events``, but when there are none yet, wait up to ``timeout_s`` for some to be
        appended (blocking on the engine: XREAD BLOCK, LISTEN, a condition) and return [] on timeout."""


def start_now(call: Coroutine[Any, Any, T]) -> asyncio.Future[T]:
    """An inline store's call (``RunStore.inline``), run on the spot: a future that is done
    already, with no task and no trip through the event loop. Should the call suspend after all
    (an instrumented store), a task carries it on from where it stopped (``_CarriedOn``), as
    ``asyncio.ensure_future`` would have run it, so it can still be shielded from a cancelled
    caller. Not for engines doing I/O: what their call binds to the current task on its first
    step (``asyncio.timeout``) would stay with the caller's task."""
    loop = asyncio.get_running_loop()
    try:
        yielded = call.send(None)
    except StopIteration as done:
        future: asyncio.Future[T] = loop.create_future()
        future.set_result(done.value)
        return future
    except Exception as exc:
        future = loop.create_future()
        future.set_exception(exc)
        return future
    return asyncio.ensure_future(_carry_on(call, yielded))


async def _carry_on(call: Coroutine[Any, Any, T], yielded: Any) -> T:
    return await _CarriedOn(call, yielded)


class _CarriedOn:
    """Awaiting it continues a coroutine whose first step already ran (and yielded ``yielded``),
    delegating to it exactly as ``await`` does: what it yields goes to the task, what the task
    sends or throws goes back to it."""

    __slots__ = ("_call", "_yielded")

    def __init__(self, call: Coroutine[Any, Any, Any], yielded: Any) -> None:
        self._call, self._yielded = call, yielded

    def __await__(self) -> Generator[Any, Any, Any]:
        call, yielded = self._call, self._yielded
        while True:
            try:
                sent = yield yielded
            except BaseException as exc:  # thrown in by the task (a cancellation)
                try:
                    yielded = call.throw(exc)
                except StopIteration as done:
                    return done.value
            else:
                try:
                    yielded = call.send(sent)
                except StopIteration as done:
                    return done.value


class ControlBus(abc.ABC):
    """Best-effort broadcast of ``Control`` messages to every replica."""

    async def open(self) -> None:
        """Connect; after this returns, published messages reach ``subscribe()`` iterators started before."""

    async def close(self) -> None:
        """Disconnect; ``subscribe()`` iterators end."""

    @abc.abstractmethod
    async def publish(self, message: Control) -> None:
        """Send to every replica's subscriber (at most once; lost if no replica listens)."""

    @abc.abstractmethod
    def subscribe(self) -> AsyncIterator[Control]:
        """Every message published after the subscription is established, until ``close``. Reconnects after
        an engine failure (messages sent meanwhile are lost)."""
