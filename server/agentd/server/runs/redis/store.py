"""``RedisRunStore``: runs, their event logs, the queue and leases in Redis (see the package
docstring for the keys and the scripts)."""

from __future__ import annotations

import asyncio
import json
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from redis.exceptions import ResponseError

from agentd.server.redis_common import RedisClient, RedisEngine, close_client, text, utf8
from agentd.server.runs import codec
from agentd.server.runs.base import RunStore
from agentd.server.runs.records import (
    Answered,
    CreatedRun,
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
    answer_fields,
    check_answers,
    terminal_status,
)
from agentd.server.runs.redis import lua
from agentd.server.runs.redis.values import (
    ACTION,
    event_args,
    record_from_hash,
    record_from_reply,
    retention_ms,
    stream_entries,
)
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.events import RunCancelled, RunEvent
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage

__all__ = ["GROUP", "RedisRunStore"]

T = TypeVar("T")

GROUP = "workers"  # the queue's consumer group, as the scripts name it
_BATCH = 500  # runs per script in requeue_expired and sweep


class Closed(Exception):
    """A blocking wait ended because the store closed."""


class RedisRunStore(RedisEngine, RunStore):
    """Runs in Redis; any number of replicas share one prefix.

    ``client`` serves every short command; ``blocking_client`` only the blocking reads
    (XREADGROUP BLOCK in ``claim``, XREAD BLOCK in ``wait_events``). Build both with
    ``connect_redis`` (no per-command retries); give the blocking one no socket timeout
    (``socket_timeout_s=None``: each blocking call is bounded by its own wait plus
    ``timeout_s``) and room for every concurrent waiter. The store owns and closes both.
    """

    shared = True

    def __init__(
        self,
        client: RedisClient,
        blocking_client: RedisClient,
        *,
        prefix: str = "agentd",
        location: str = "",
        timeout_s: float = 5.0,
        reclaim_idle_s: float = 5.0,
    ) -> None:
        super().__init__(
            client, what="redis run store", lua=lua, prefix=prefix, location=location, timeout_s=timeout_s
        )
        self._blocking = blocking_client
        self._reclaim_idle_ms = max(1, int(reclaim_idle_s * 1000))
        base = f"{prefix}:{{{prefix}:runs}}:"
        self._base_str = base
        self._base = utf8(base)
        self._queue = self._base + b"queue"
        self._leases = self._base + b"leases"
        self._expiries = self._base + b"expiries"
        self._waits: set[asyncio.Future[Any]] = set()

    # --- keys -------------------------------------------------------------------------

    @property
    def key_base(self) -> str:
        """Every run key starts with this (it carries the one hash tag)."""
        return self._base_str

    def _run_key(self, run_id: str) -> bytes:
        return self._base + b"run:" + utf8(run_id)

    def _events_key(self, run_id: str) -> bytes:
        return self._base + b"events:" + utf8(run_id)

    def _tenant_key(self, tenant: str, what: str) -> bytes:
        """A tenant's ``active`` or ``queued`` index, or its start ``bucket`` (as ``tenant_key`` in Lua)."""
        return self._base + b"tenant:" + utf8(tenant) + b":" + what.encode()

    # --- plumbing ---------------------------------------------------------------------

    async def _wait(self, call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """A blocking command, bounded by ``timeout_s`` (its client has no socket timeout) and
        ended by ``close`` (raising ``Closed``). Cancelling it drops its connection."""
        task = asyncio.ensure_future(call())
        self._waits.add(task)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._waits.discard(task)
        if not done:
            task.cancel()
            await asyncio.wait((task,))  # let it drop its connection
            raise asyncio.TimeoutError(f"no reply within {timeout_s:.1f}s")
        if task.cancelled():
            raise Closed()
        return task.result()

    async def _ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- lifecycle --------------------------------------------------------------------

    # open and ping: RedisEngine's; open also creates the queue's consumer group

    async def _on_connect(self) -> None:
        await self._ensure_group()

    async def close(self) -> None:
        self._open = False
        for waiting in list(self._waits):  # pending waits end (and return nothing)
            waiting.cancel()
        try:
            await close_client(self._blocking)
        finally:
            await close_client(self._client)

    # --- records ----------------------------------------------------------------------

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
        sid = spec.session_id
        lease_expires = now + lease_s
        tenant = spec.tenant
        lim = limits or TenantLimits()
        args = (
            self._base, spec.run_id, "" if sid is None else utf8(sid), "0" if sid is None else "1",
            utf8(spec.request_id), "reject" if policy is SessionPolicy.REJECT else "enqueue", owner or "",
            repr(lease_expires), max_queued, repr(now), utf8(codec.encode_spec(spec)),
            utf8(tenant), lim.max_active, lim.max_queued, repr(float(lim.start_rate)), lim.start_burst,
        )
        keys = (
            self._run_key(spec.run_id), self._tenant_key(tenant, "active"), self._tenant_key(tenant, "queued"),
            self._tenant_key(tenant, "bucket"),
        )
        reply = await self._run(lambda: self._eval(lua.CREATE, keys, args), idempotent=True)
        code = reply[0]
        if code == 3:
            if reply[1] == b"running":
                record = RunRecord(spec.run_id, spec, RunStatus.RUNNING, now, now, owner or "", 1, lease_expires)
            else:
                record = RunRecord(spec.run_id, spec, RunStatus.QUEUED, now, now)
            return CreatedRun(record, True)
        if code == 0:
            record = record_from_reply(reply[1], reply[2])
            # Our own run id: an earlier attempt of this very call created it.
            return CreatedRun(record, record.run_id == spec.run_id)
        if code == 1:
            raise SessionBusyError(sid or "", text(reply[1]))
        if code == 4:
            if reply[1] == b"active":
                raise TenantLimitError(TENANT_MAX_ACTIVE_RUNS, tenant, lim.max_active)
            raise TenantLimitError(TENANT_MAX_QUEUED_RUNS, tenant, lim.max_queued)
        if code == 5:
            raise TenantLimitError(TENANT_START_RATE, tenant, lim.start_rate, float(reply[1]), burst=lim.start_burst)
        raise QueueFullError(max_queued)

    async def get_run(self, run_id: str) -> RunRecord | None:
        key = self._run_key(run_id)
        fields = await self._run(lambda: self._client.hgetall(key), idempotent=True)
        return record_from_hash(run_id, fields) if fields else None

    async def list_runs(self, session_id: str, limit: int, cursor: str | None = None) -> tuple[list[RunRecord], str | None]:
        if limit <= 0:
            return [], None
        score, member = "", b""
        if cursor is not None:
            text_score, sep, run_id = cursor.partition("|")
            if not sep:
                raise ValueError(f"invalid cursor {cursor!r}")
            score, member = repr(float(text_score)), utf8(run_id)
        keys = (self._base + b"session:" + utf8(session_id),)
        args = (self._base, limit, score, member)
        reply = await self._run(lambda: self._eval(lua.LIST, keys, args), idempotent=True)
        records = [record_from_reply(reply[i], reply[i + 1]) for i in range(1, len(reply), 2)]
        next_cursor = f"{records[-1].create_time!r}|{records[-1].run_id}" if reply[0] and records else None
        return records, next_cursor

    async def active_run(self, session_id: str) -> str | None:
        key = self._base + b"active:" + utf8(session_id)
        head = await self._run(lambda: self._client.lindex(key, 0), idempotent=True)
        return text(head) if head is not None else None

    # --- execution --------------------------------------------------------------------

    async def claim(self, owner: str, max_runs: int, *, lease_s: float, now: float, wait_s: float) -> list[RunRecord]:
        if max_runs <= 0:
            return []
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + max(wait_s, 0.0)
        keys = (self._queue,)
        head = [self._base, utf8(owner), max_runs]

        def args_at(*entries: Any) -> list[Any]:
            # The caller's clock moved on while we waited: leases count from the claim.
            return [*head, repr(now + (loop.time() - started) + lease_s), repr(now + (loop.time() - started)),
                    self._reclaim_idle_ms, *entries]

        async def script(entries: Sequence[Any] = ()) -> Any:
            args = args_at(*entries)
            try:
                return await self._eval(lua.CLAIM, keys, args)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # the queue was deleted under us (the script wrote nothing)
                return await self._eval(lua.CLAIM, keys, args)

        while True:
            reply = await self._run(script, idempotent=False)
            if reply:
                return self._claimed(reply)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            block_ms = max(1, int(remaining * 1000))

            async def read() -> Any:
                try:
                    return await self._wait(
                        lambda: self._blocking.xreadgroup(
                            GROUP, owner, {self._queue: ">"}, count=max_runs, block=block_ms
                        ),
                        remaining + self._timeout_s,
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._ensure_group()
                    return None

            try:
                entries = stream_entries(await self._run(read, idempotent=False))
            except (Closed, StoreUnavailableError):
                if not self._open:  # closed while waiting
                    return []
                raise
            if entries:
                # Read, hence pending on this owner: claimed now, or reclaimed by anyone later.
                pairs = [value for entry_id, fields in entries for value in (entry_id, fields[b"r"])]
                reply = await self._run(lambda: script(pairs), idempotent=False)
                if reply:
                    return self._claimed(reply)
            elif loop.time() >= deadline:
                return []

    @staticmethod
    def _claimed(reply: list[Any]) -> list[RunRecord]:
        return [record_from_reply(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]

    async def renew(self, owner: str, leases: dict[str, int], *, lease_s: float, now: float) -> RenewOutcome:
        if not leases:
            return RenewOutcome(frozenset(), {})
        args: list[Any] = [self._base, utf8(owner), repr(now + lease_s)]
        for run_id, attempt in leases.items():
            args.append(utf8(run_id))
            args.append(str(attempt))
        lost, cancel = await self._run(lambda: self._eval(lua.RENEW, (self._leases,), args), idempotent=True)
        return RenewOutcome(
            frozenset(text(run_id) for run_id in lost),
            {text(cancel[i]): text(cancel[i + 1]) for i in range(0, len(cancel), 2)},
        )

    async def record_progress(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> str:
        args = [
            self._base, str(attempt), repr(now),
            utf8(codec.encode_checkpoint(checkpoint)) if checkpoint is not None else b"",
            utf8(json.dumps(list(checkpoint.awaiting), ensure_ascii=False)) if checkpoint is not None else b"",
            events[0].trace_id if events else "",
            *event_args(events),
        ]
        keys = (self._run_key(run_id), self._events_key(run_id))
        reply = await self._run(lambda: self._eval(lua.PROGRESS, keys, args), idempotent=False)
        if isinstance(reply, bytes):
            return text(reply)  # written; a cancel was recorded on the run
        if reply != 0:
            self._refused(run_id, attempt, events, reply)
        return ""

    async def finish(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        if not events or not events[-1].is_terminal:
            raise ValueError("finish needs the run's terminal event last")
        payload = events[-1].payload
        args = [
            self._base, utf8(run_id), str(attempt), repr(now), retention_ms(retention_s), repr(now + retention_s),
            terminal_status(payload).value, utf8(codec.encode_payload(payload)), events[0].trace_id,
            *event_args(events),
        ]
        keys = (self._run_key(run_id), self._events_key(run_id))
        reply = await self._run(lambda: self._eval(lua.FINISH, keys, args), idempotent=False)
        if reply != 0:
            self._refused(run_id, attempt, events, reply)

    @staticmethod
    def _refused(run_id: str, attempt: int, events: Sequence[RunEvent], reply: Any) -> None:
        if reply == -1:
            raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}")
        raise ValueError(f"run {run_id}: event {events[0].sequence} does not follow {int(reply[0])}")

    async def release(self, run_id: str, attempt: int, *, now: float) -> bool:
        args = (self._base, utf8(run_id), str(attempt), repr(now))
        reply = await self._run(lambda: self._eval(lua.RELEASE, (self._run_key(run_id),), args), idempotent=False)
        return reply == 1

    async def requeue_expired(self, *, now: float) -> list[str]:
        args = (self._base, repr(now), _BATCH)
        requeued: list[str] = []
        for _ in range(100):  # bounded, even if leases keep expiring under us
            reply = await self._run(lambda: self._eval(lua.REQUEUE, (self._leases,), args), idempotent=True)
            requeued += [text(run_id) for run_id in reply[1:]]
            if reply[0] < _BATCH:
                break
        return requeued

    async def cancel(
        self, run_id: str, reason: str, *, event_time_ns: int, retention_s: float, now: float
    ) -> RunRecord | None:
        keys = (self._run_key(run_id), self._events_key(run_id))
        base_args = [self._base, utf8(run_id), utf8(reason), repr(now), retention_ms(retention_s),
                     repr(now + retention_s)]
        args = base_args
        for _ in range(20):
            reply = await self._run(lambda: self._eval(lua.CANCEL, keys, args), idempotent=True)
            if reply == 0:
                return None
            code, flat = reply
            record = record_from_reply(run_id, flat)
            if code == 1:
                return record
            # QUEUED: ended here with a RunCancelled event built for exactly this record.
            cp = record.checkpoint
            payload = RunCancelled(reason, cp.usage if cp is not None else Usage(), cp.turns if cp is not None else 0)
            sequence = record.last_sequence + 1
            event = RunEvent(run_id, sequence, event_time_ns, record.trace_id, payload)
            args = [*base_args, str(record.attempt), str(record.last_sequence), sequence,
                    utf8(codec.encode_event(event)), utf8(codec.encode_payload(payload))]
        raise StoreUnavailableError(f"redis run store at {self._location}: run {run_id} kept changing during cancel")

    async def submit_action(self, run_id: str, key: str, action: dict[str, Any], *, now: float) -> RunRecord | None:
        args = (self._base, ACTION + utf8(key), utf8(codec.encode_action(action)), repr(now))
        keys = (self._run_key(run_id),)
        reply = await self._run(lambda: self._eval(lua.SUBMIT, keys, args), idempotent=True)
        return record_from_reply(run_id, reply) if reply != 0 else None

    async def submit_answers(
        self, run_id: str, answers: Sequence[tuple[str, dict[str, Any]]], *, now: float
    ) -> Answered | None:
        check_answers(answers)
        args: list[Any] = [self._base, repr(now)]
        for key, action in answers:
            args += [utf8(key), ACTION + utf8(key), utf8(codec.encode_action(action)),
                     ",".join(answer_fields(key, action))]
        keys = (self._run_key(run_id),)
        # A retry after a reply was lost finds its own answers recorded: repeats, taken again.
        reply = await self._run(lambda: self._eval(lua.ANSWER, keys, args), idempotent=True)
        if reply == 0:
            return None
        code, detail, flat = reply
        record = record_from_reply(run_id, flat)
        if code != 0:
            key, action = answers[int(detail)]
            raise RunNotWaitingError.refusing(record, key, action)
        return Answered(record, tuple(answers[int(i)][0] for i in detail))

    async def sweep(self, *, now: float) -> int:
        args = (self._base, repr(now), _BATCH)
        deleted = 0
        for _ in range(100):
            removed = await self._run(lambda: self._eval(lua.SWEEP, (self._expiries,), args), idempotent=True)
            deleted += removed
            if removed < _BATCH:
                break
        return deleted

    # --- event log --------------------------------------------------------------------

    async def read_events(self, run_id: str, after_sequence: int, limit: int) -> list[RunEvent]:
        if limit <= 0:
            return []
        key = self._events_key(run_id)
        low = f"(0-{after_sequence}" if after_sequence > 0 else "-"
        entries = await self._run(lambda: self._client.xrange(key, min=low, max="+", count=limit), idempotent=True)
        return [codec.decode_event(run_id, text(fields[b"e"])) for _, fields in entries]

    async def wait_events(self, run_id: str, after_sequence: int, *, limit: int, timeout_s: float) -> list[RunEvent]:
        if limit <= 0:
            return []
        if timeout_s <= 0:
            return await self.read_events(run_id, after_sequence, limit)
        key = self._events_key(run_id)
        streams = {key: f"0-{max(after_sequence, 0)}"}
        block_ms = max(1, int(timeout_s * 1000))

        async def read() -> Any:
            return await self._wait(
                lambda: self._blocking.xread(streams, count=limit, block=block_ms), timeout_s + self._timeout_s
            )

        try:
            reply = await self._run(read, idempotent=True)
        except (Closed, StoreUnavailableError):
            if not self._open:  # closed while waiting
                return []
            raise
        return [codec.decode_event(run_id, text(fields[b"e"])) for _, fields in stream_entries(reply)]
