"""In-process runs: the embedded default, and the reference for the shared engines.

Nothing survives the process and no other process sees these runs, so ``shared`` is
False: a draining server cancels its runs instead of handing them off. Every method
is free of awaits between its checks and its writes, which makes each one atomic on
the event loop.

Per-tenant limits (``TenantLimits``) are counted exactly from two indexes kept at every
transition, whatever limits the caller passes: each tenant's unfinished runs (added at
creation, removed when the run ends) and its runs waiting in the queue (added whenever a
run becomes claimable, removed when claimed or ended). Start buckets are a dict by tenant;
``sweep`` drops the ones that are full again.
"""

from __future__ import annotations

import asyncio
import dataclasses
import operator
from collections import deque
from typing import Any, AsyncIterator, Callable, Sequence

from agentd.server.runs import codec
from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.records import (
    Answered,
    Control,
    CreatedRun,
    HANDED_OFF,
    LEASE_EXPIRED,
    LeaseLostError,
    QueueFullError,
    RenewOutcome,
    RunNotWaitingError,
    RunRecord,
    RunStatus,
    SessionBusyError,
    SessionPolicy,
    TENANT_MAX_ACTIVE_RUNS,
    TENANT_MAX_QUEUED_RUNS,
    TENANT_START_RATE,
    TenantLimitError,
    TenantLimits,
    check_answers,
    same_answer,
    terminal_status,
)
from agentd.server.runtime import events as ev
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.events import Payload, RunCancelled, RunEvent
from agentd.server.runtime.items import Item, MessageItem, ReasoningItem, SummaryItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage


def take_token(
    bucket: tuple[float, float] | None, limits: TenantLimits, now: float
) -> tuple[float, float, float | None]:
    """A token bucket's take at ``now``: ``bucket`` is (tokens, time of the last take), None when full.
    Returns (tokens, time) after the take, or (tokens, time, seconds until a token) when empty
    (third item None on success). A clock behind the bucket's refills nothing."""
    rate, burst = limits.start_rate, float(limits.start_burst)
    tokens, at = bucket if bucket is not None else (burst, now)
    at_now = max(now, at)
    tokens = min(burst, tokens + (at_now - at) * rate)
    if tokens < 1:
        return tokens, at, (1 - tokens) / rate
    return tokens - 1, at_now, None


# What one event costs in memory beyond its text (the RunEvent, its payload object, their
# fields): measured at ~270 bytes for a text delta on CPython 3.11.
EVENT_OVERHEAD_BYTES = 256
# Ended runs kept at most (oldest forgotten first), unless told otherwise.
DEFAULT_MAX_ENDED_RUNS = 10_000
DEFAULT_MAX_ENDED_BYTES = 64 * 1024 * 1024


def _item_chars(item: Item) -> int:
    """The characters (and bytes of content-part data) an item holds, by its variable fields."""
    if type(item) is MessageItem:
        chars = len(item.text)
        for part in item.parts:
            chars += len(getattr(part, "text", "")) + len(getattr(part, "url", "")) + len(getattr(part, "data", b""))
        return chars
    if type(item) is ToolCallItem:
        return len(item.arguments) + len(item.call_id) + len(item.tool_name)
    if type(item) is ToolResultItem:
        return len(item.output) + len(item.call_id) + len(item.tool_name)
    if type(item) is SummaryItem:
        return len(item.text)
    assert type(item) is ReasoningItem
    return len(item.id) + len(item.encrypted_content) + sum(len(part) for part in item.summary)


# The characters a payload holds beyond its fixed fields, per type: the common events are
# counted from their text fields (no encoding per event: this runs for every event written).
_PAYLOAD_CHARS: dict[type, Callable[[Any], int]] = {
    ev.TextDelta: lambda p: len(p.text),
    ev.MessageOutput: lambda p: _item_chars(p.item),
    ev.ToolCalled: lambda p: _item_chars(p.item),
    ev.ToolOutput: lambda p: _item_chars(p.item),
    ev.ActionRequired: lambda p: _item_chars(p.item),
    ev.UsageUpdated: lambda p: len(p.model),
    ev.RunStarted: lambda p: len(p.session_id) + len(p.request_id),
    ev.AgentUpdated: lambda p: 0,
    ev.Handoff: lambda p: len(p.call_id),
    ev.RunResumed: lambda p: len(p.reason),
    ev.RunFailed: lambda p: len(p.message),
    ev.RunCancelled: lambda p: len(p.reason),
    ev.RunCompleted: lambda p: (len(p.final_output) if type(p.final_output) is str
                                else len(codec.encode_payload(p))),
}


def event_bytes(event: RunEvent) -> int:
    """An estimate of what ``event`` holds in memory: the fixed overhead plus the characters of
    its text fields for the common events, the encoded size for the rest."""
    payload = event.payload
    if type(payload) is ev.TextDelta:  # most events
        return EVENT_OVERHEAD_BYTES + len(payload.text)
    count = _PAYLOAD_CHARS.get(type(payload))
    if count is not None:
        return EVENT_OVERHEAD_BYTES + count(payload)
    return EVENT_OVERHEAD_BYTES + len(codec.encode_payload(payload))


class MemoryRunStore(RunStore):
    """Runs in this process. An ended run is kept for its retention, but ended runs are also
    bounded by count (``max_ended_runs``) and by the estimated size of their events
    (``max_ended_bytes``): beyond either, the oldest ended runs are forgotten first, exactly as
    if their retention had passed (GetRun/WatchRun: NOT_FOUND; the request id is free again).
    The run that just ended is never forgotten for them, so its callers can still read it."""

    shared = False
    inline = True  # nothing is awaited but the waits of claim and wait_events

    def __init__(
        self, *, max_ended_runs: int = DEFAULT_MAX_ENDED_RUNS, max_ended_bytes: int = DEFAULT_MAX_ENDED_BYTES
    ) -> None:
        self._max_ended = max_ended_runs
        self._max_ended_bytes = max_ended_bytes
        self._bytes: dict[str, int] = {}  # run -> estimated size of its events
        self._ended_bytes = 0  # the sum of _bytes over ended (not yet forgotten) runs
        self._runs: dict[str, RunRecord] = {}
        self._events: dict[str, list[RunEvent]] = {}
        self._by_request: dict[str, str] = {}
        self._by_session: dict[str, list[str]] = {}  # every run of the session, creation order
        self._active: dict[str, deque[str]] = {}  # session -> its active runs, creation order
        self._queue: deque[str] = deque()  # claimable QUEUED runs, oldest first
        self._behind: set[str] = set()  # QUEUED runs waiting behind their session's active run
        self._expires: dict[str, float] = {}  # ended run -> when retention ends, in the order they ended
        # True while _expires is in the order of its times too (retention is one setting, so it
        # normally is): expiring then reads only the runs that expired, not every ended run.
        self._expires_ordered = True
        self._latest_expiry = float("-inf")
        self._unfinished: dict[str, set[str]] = {}  # tenant -> its QUEUED/RUNNING runs
        self._queued_of: dict[str, set[str]] = {}  # tenant -> its claimable QUEUED runs
        self._buckets: dict[str, tuple[float, float, float]] = {}  # tenant -> (tokens, last take, full again at)
        self._work = asyncio.Event()
        self._appended: dict[str, asyncio.Event] = {}

    @property
    def location(self) -> str:
        return "memory"

    async def ping(self) -> None:
        return None

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
        self._expire(now)
        if spec.request_id and spec.request_id in self._by_request:
            return CreatedRun(self._runs[self._by_request[spec.request_id]], False)
        behind = False
        sid = spec.session_id
        if sid is not None and self._active.get(sid):
            if policy is SessionPolicy.REJECT:
                raise SessionBusyError(sid, self._active[sid][0])
            behind = True
        joins_queue = owner is None and not behind
        tenant = spec.tenant
        bucket: tuple[float, float, float] | None = None
        if limits is not None:
            if limits.max_active and len(self._unfinished.get(tenant, ())) >= limits.max_active:
                raise TenantLimitError(TENANT_MAX_ACTIVE_RUNS, tenant, limits.max_active)
            if joins_queue and limits.max_queued and len(self._queued_of.get(tenant, ())) >= limits.max_queued:
                raise TenantLimitError(TENANT_MAX_QUEUED_RUNS, tenant, limits.max_queued)
        # Runs queued behind their session count too: they are queued, only not claimable yet.
        if (joins_queue or behind) and len(self._queue) + len(self._behind) >= max_queued:
            raise QueueFullError(max_queued)
        if limits is not None and limits.start_rate:
            held = self._buckets.get(tenant)
            tokens, at, retry_after = take_token((held[0], held[1]) if held is not None else None, limits, now)
            if retry_after is not None:
                raise TenantLimitError(TENANT_START_RATE, tenant, limits.start_rate, retry_after,
                                       burst=limits.start_burst)
            bucket = (tokens, at, at + (limits.start_burst - tokens) / limits.start_rate)
        record = RunRecord(spec.run_id, spec, RunStatus.QUEUED, now, now)
        if owner is not None and not behind:
            record.status, record.owner, record.attempt, record.lease_expires = RunStatus.RUNNING, owner, 1, now + lease_s
        self._runs[spec.run_id] = record
        self._events[spec.run_id] = []
        self._bytes[spec.run_id] = 0
        self._unfinished.setdefault(tenant, set()).add(spec.run_id)
        if bucket is not None:
            self._buckets[tenant] = bucket
        if spec.request_id:
            self._by_request[spec.request_id] = spec.run_id
        if sid is not None:
            self._by_session.setdefault(sid, []).append(spec.run_id)
            self._active.setdefault(sid, deque()).append(spec.run_id)
        if record.status is RunStatus.QUEUED and not behind:
            self._enqueue(spec.run_id)
        elif behind:
            self._behind.add(spec.run_id)
        return CreatedRun(_copy(record), True)

    async def get_run(self, run_id: str) -> RunRecord | None:
        record = self._runs.get(run_id)
        return _copy(record) if record is not None else None

    async def list_runs(self, session_id: str, limit: int, cursor: str | None = None) -> tuple[list[RunRecord], str | None]:
        ids = [i for i in self._by_session.get(session_id, []) if i in self._runs]
        ordered = sorted(ids, key=lambda i: (self._runs[i].create_time, i), reverse=True)
        if cursor is not None:
            ordered = ordered[ordered.index(cursor) + 1:] if cursor in ordered else []
        page = ordered[:limit]
        next_cursor = page[-1] if len(ordered) > limit else None
        return [_copy(self._runs[i]) for i in page], next_cursor

    async def active_run(self, session_id: str) -> str | None:
        active = self._active.get(session_id)
        return active[0] if active else None

    async def claim(self, owner: str, max_runs: int, *, lease_s: float, now: float, wait_s: float) -> list[RunRecord]:
        if not self._queue and wait_s > 0:
            self._work.clear()
            try:
                await asyncio.wait_for(self._work.wait(), wait_s)
            except asyncio.TimeoutError:
                return []
        claimed = []
        while self._queue and len(claimed) < max_runs:
            record = self._runs.get(self._queue.popleft())
            if record is None or record.status is not RunStatus.QUEUED:
                continue
            self._unindex(self._queued_of, record)
            record.status, record.owner, record.lease_expires = RunStatus.RUNNING, owner, now + lease_s
            record.attempt += 1
            record.update_time = now
            claimed.append(_copy(record))
        return claimed

    async def renew(self, owner: str, leases: dict[str, int], *, lease_s: float, now: float) -> RenewOutcome:
        lost, cancel = set(), {}
        for run_id, attempt in leases.items():
            record = self._runs.get(run_id)
            if record is None or not _holds(record, owner, attempt):
                lost.add(run_id)
                continue
            record.lease_expires = now + lease_s
            if record.cancel_reason:
                cancel[run_id] = record.cancel_reason
        return RenewOutcome(frozenset(lost), cancel)

    async def record_progress(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> str:
        return self.record_progress_now(run_id, attempt, events, checkpoint, now=now)

    async def finish(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        self.finish_now(run_id, attempt, events, retention_s=retention_s, now=now)

    def record_progress_now(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> str:
        record = self._runs.get(run_id)  # (_fenced, inlined: this runs for every event of a run)
        if record is None or record.status is not RunStatus.RUNNING or record.attempt != attempt:
            raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}")
        if events:
            self._append(record, events)
        if checkpoint is not None:
            record.checkpoint = checkpoint
        record.update_time = now
        return record.cancel_reason

    def finish_now(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        record = self._fenced(run_id, attempt)
        if not events or not events[-1].is_terminal:
            raise ValueError("finish needs the run's terminal event last")
        self._append(record, events)
        self._end(record, events[-1].payload, retention_s, now)

    async def release(self, run_id: str, attempt: int, *, now: float) -> bool:
        record = self._runs.get(run_id)
        if record is None or record.status is not RunStatus.RUNNING or record.attempt != attempt:
            return False
        self._requeue(record, now, HANDED_OFF)
        return True

    async def requeue_expired(self, *, now: float) -> list[str]:
        expired = [r for r in self._runs.values() if r.status is RunStatus.RUNNING and r.lease_expires < now]
        for record in expired:
            self._requeue(record, now, LEASE_EXPIRED)
        return [r.run_id for r in expired]

    async def cancel(
        self, run_id: str, reason: str, *, event_time_ns: int, retention_s: float, now: float
    ) -> RunRecord | None:
        record = self._runs.get(run_id)
        if record is None:
            return None
        if record.status is RunStatus.QUEUED:
            turns = record.checkpoint.turns if record.checkpoint is not None else 0
            usage = record.checkpoint.usage if record.checkpoint is not None else Usage()
            payload = RunCancelled(reason, usage, turns)
            self._append(record, [RunEvent(run_id, record.last_sequence + 1, event_time_ns, record.trace_id, payload)])
            self._end(record, payload, retention_s, now)
        elif not record.status.is_terminal and not record.cancel_reason:
            record.cancel_reason = reason
            record.update_time = now
        return _copy(record)

    async def submit_action(self, run_id: str, key: str, action: dict[str, Any], *, now: float) -> RunRecord | None:
        record = self._runs.get(run_id)
        if record is None:
            return None
        if not record.status.is_terminal and key not in record.actions:
            record.actions = {**record.actions, key: dict(action)}
            record.update_time = now
        return _copy(record)

    async def submit_answers(
        self, run_id: str, answers: Sequence[tuple[str, dict[str, Any]]], *, now: float
    ) -> Answered | None:
        check_answers(answers)
        record = self._runs.get(run_id)
        if record is None:
            return None
        awaiting = record.checkpoint.awaiting if record.checkpoint is not None else ()
        new: dict[str, dict[str, Any]] = {}
        for key, action in answers:
            recorded = record.actions.get(key)
            if recorded is not None:
                if same_answer(key, recorded, action):
                    continue  # a repeat
            elif not record.status.is_terminal and key in awaiting:
                new[key] = dict(action)
                continue
            raise RunNotWaitingError.refusing(_copy(record), key, action)
        if new:
            record.actions = {**record.actions, **new}
            record.update_time = now
        return Answered(_copy(record), tuple(new))

    async def sweep(self, *, now: float) -> int:
        for tenant in [t for t, (_, _, full_at) in self._buckets.items() if full_at <= now]:
            del self._buckets[tenant]  # full again: as good as none
        return self._expire(now)

    async def read_events(self, run_id: str, after_sequence: int, limit: int) -> list[RunEvent]:
        log = self._events.get(run_id, [])
        # Sequences are 1..n with no gaps, so event k sits at index k - 1.
        return log[max(after_sequence, 0): max(after_sequence, 0) + limit]

    async def wait_events(self, run_id: str, after_sequence: int, *, limit: int, timeout_s: float) -> list[RunEvent]:
        events = await self.read_events(run_id, after_sequence, limit)
        if events or timeout_s <= 0:
            return events
        appended = self._appended.setdefault(run_id, asyncio.Event())
        try:
            await asyncio.wait_for(appended.wait(), timeout_s)
        except asyncio.TimeoutError:
            return []
        return await self.read_events(run_id, after_sequence, limit)

    # -- internals -----------------------------------------------------------------------

    def _enqueue(self, run_id: str) -> None:
        self._behind.discard(run_id)
        self._queue.append(run_id)
        self._queued_of.setdefault(self._runs[run_id].spec.tenant, set()).add(run_id)
        self._work.set()

    @staticmethod
    def _unindex(index: dict[str, set[str]], record: RunRecord) -> None:
        tenant = record.spec.tenant
        runs = index.get(tenant)
        if runs is not None:
            runs.discard(record.run_id)
            if not runs:
                del index[tenant]

    def _fenced(self, run_id: str, attempt: int) -> RunRecord:
        record = self._runs.get(run_id)
        if record is None or record.status is not RunStatus.RUNNING or record.attempt != attempt:
            raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}")
        return record

    def _append(self, record: RunRecord, events: Sequence[RunEvent]) -> None:
        if not events:
            return
        if events[0].sequence != record.last_sequence + 1:
            raise ValueError(f"run {record.run_id}: event {events[0].sequence} does not follow {record.last_sequence}")
        self._events[record.run_id].extend(events)
        size = event_bytes(events[0]) if len(events) == 1 else sum(event_bytes(e) for e in events)
        self._bytes[record.run_id] = self._bytes.get(record.run_id, 0) + size
        if record.run_id in self._expires:  # not so far: a run's events all come before it ends
            self._ended_bytes += size
        record.last_sequence = events[-1].sequence
        if not record.trace_id:
            record.trace_id = events[0].trace_id
        appended = self._appended.pop(record.run_id, None)
        if appended is not None:
            appended.set()

    def _requeue(self, record: RunRecord, now: float, why: str) -> None:
        record.status, record.owner, record.lease_expires, record.update_time = RunStatus.QUEUED, "", 0.0, now
        record.requeue_reason = why
        self._enqueue(record.run_id)

    def _end(self, record: RunRecord, payload: Payload, retention_s: float, now: float) -> None:
        record.status = terminal_status(payload)
        record.result = payload
        self._unindex(self._unfinished, record)
        self._unindex(self._queued_of, record)
        self._behind.discard(record.run_id)
        record.owner, record.lease_expires, record.update_time = "", 0.0, now
        expires = now + retention_s
        if expires < self._latest_expiry:
            self._expires_ordered = False
        else:
            self._latest_expiry = expires
        self._expires[record.run_id] = expires
        self._ended_bytes += self._bytes.get(record.run_id, 0)
        # Bounded by count and by size: the oldest ended runs go first (never this one).
        while len(self._expires) > 1 and (
            len(self._expires) > self._max_ended or self._ended_bytes > self._max_ended_bytes
        ):
            self._forget(next(iter(self._expires)))
        sid = record.session_id
        if sid is not None:
            active = self._active.get(sid)
            if active is not None:
                try:
                    active.remove(record.run_id)
                except ValueError:
                    pass
                if not active:
                    del self._active[sid]
                else:  # the session's next run may go now
                    head = self._runs.get(active[0])
                    if head is not None and head.status is RunStatus.QUEUED and head.run_id not in self._queue:
                        self._enqueue(head.run_id)

    def _expire(self, now: float) -> int:
        if self._expires_ordered:  # the expired ones lead: stop at the first that is not
            gone = []
            for run_id, at in self._expires.items():
                if at > now:
                    break
                gone.append(run_id)
        else:
            gone = [run_id for run_id, at in self._expires.items() if at <= now]
        for run_id in gone:
            self._forget(run_id)
        if not self._expires:
            self._expires_ordered, self._latest_expiry = True, float("-inf")
        return len(gone)

    def _forget(self, run_id: str) -> None:
        ended = self._expires.pop(run_id, None) is not None
        size = self._bytes.pop(run_id, 0)
        if ended:
            self._ended_bytes -= size
        record = self._runs.pop(run_id, None)
        self._events.pop(run_id, None)
        appended = self._appended.pop(run_id, None)
        if appended is not None:  # nothing more comes: let a waiter look (and find the run gone)
            appended.set()
        if record is None:
            return
        self._unindex(self._unfinished, record)
        self._unindex(self._queued_of, record)
        if record.spec.request_id and self._by_request.get(record.spec.request_id) == run_id:
            del self._by_request[record.spec.request_id]
        sid = record.session_id
        if sid is not None and sid in self._by_session:
            self._by_session[sid] = [i for i in self._by_session[sid] if i != run_id]
            if not self._by_session[sid]:
                del self._by_session[sid]


def _holds(record: RunRecord, owner: str, attempt: int) -> bool:
    return record.status is RunStatus.RUNNING and record.owner == owner and record.attempt == attempt


_RECORD_FIELDS = operator.attrgetter(*(f.name for f in dataclasses.fields(RunRecord)))


def _copy(record: RunRecord) -> RunRecord:
    """A shallow copy (``dataclasses.replace`` without its per-call field walk)."""
    return RunRecord(*_RECORD_FIELDS(record))


class MemoryControlBus(ControlBus):
    def __init__(self) -> None:
        self._subscribers: list[asyncio.Queue[Control | None]] = []

    async def publish(self, message: Control) -> None:
        for queue in self._subscribers:
            queue.put_nowait(message)

    async def close(self) -> None:
        for queue in self._subscribers:
            queue.put_nowait(None)

    async def subscribe(self) -> AsyncIterator[Control]:  # type: ignore[override]
        queue: asyncio.Queue[Control | None] = asyncio.Queue()
        self._subscribers.append(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._subscribers.remove(queue)
