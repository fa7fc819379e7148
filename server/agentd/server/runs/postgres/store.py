"""``PostgresRunStore``: runs, their event logs, the work queue and leases in Postgres (see
the package docstring)."""

from __future__ import annotations

import logging
import time
from typing import Any, Awaitable, Callable, NoReturn, Sequence

import asyncpg

from agentd.server.postgres_common import DRIVER_ERRORS, PING_TIMEOUT_S, PostgresEngine
from agentd.server.runs.base import RunStore
from agentd.server.runs.codec import decode_event, encode_action, encode_checkpoint, encode_payload, encode_spec
from agentd.server.runs.postgres.listen import Listener, Signal
from agentd.server.runs.postgres.schema import (
    LEASE_LOST,
    MIGRATIONS,
    QUEUE_FULL,
    RUN_EXISTS,
    SEQUENCE_GAP,
    SESSION_BUSY,
    TENANT_LIMIT,
    channel_name,
)
from agentd.server.runs.postgres.statements import encoded_events, run_record, statements
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
    answer_identity,
    check_answers,
    terminal_status,
)
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.events import RunEvent
from agentd.server.runtime.run_loop import RunInput

__all__ = ["PostgresRunStore"]

_SWEEP_BATCH = 1000
_FALLBACK_POLL_S = 1.0  # a missed notification costs at most this much


class PostgresRunStore(PostgresEngine, RunStore):
    """Runs in a Postgres schema, shared by every replica that points at it.

    Pool, calls (``_call``: reads, renewals and sweeps are the idempotent ones), migrations
    and ping: ``PostgresEngine``'s; ``open`` and ``close`` add the LISTEN connection.
    """

    shared = True
    _what = "run store"
    _application = "agentd-runs"
    _tables = "run tables"
    _version_table = "run_schema_version"
    _migrations = MIGRATIONS
    _own_sqlstate = "AGR"
    _log = logging.getLogger("agentd.runs")

    def __init__(
        self,
        *,
        url: str,
        schema: str = "agentd",
        min_size: int = 2,
        max_size: int = 10,
        statement_cache_size: int = 256,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
        auto_migrate: bool = True,
    ) -> None:
        super().__init__(
            url=url, schema=schema, min_size=min_size, max_size=max_size, statement_cache_size=statement_cache_size,
            connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s, auto_migrate=auto_migrate,
        )
        self._sql = statements(self._quoted)
        self._listener: Listener | None = None
        self._closed = False
        self._work = Signal()
        self._appended: dict[str, Signal] = {}
        self._work_channel = channel_name(schema, "run_work")
        self._events_channel = channel_name(schema, "run_events")

    # --- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._pool is not None:
            return
        self._closed = False
        pool = await self._create_pool()
        try:
            # Before the pool is the store's: the tables are prepared on a connection of their own.
            await self._prepare()
            listener = Listener(
                lambda: self._connect("agentd-runs-listen"),
                {self._work_channel: self._on_work, self._events_channel: self._on_appended},
                self._on_gap,
                self._where,
                min(PING_TIMEOUT_S, self._command_timeout_s),
            )
            try:
                await listener.start()
            except DRIVER_ERRORS as exc:
                raise self._cannot_connect(exc) from exc
        except BaseException:
            pool.terminate()
            raise
        self._pool, self._listener = pool, listener

    async def close(self) -> None:
        self._closed = True
        listener, self._listener = self._listener, None
        pool, self._pool = self._pool, None
        self._on_gap()  # pending waits see _closed and end
        if listener is not None:
            await listener.close(self._command_timeout_s)
        await self._close_pool(pool)

    # --- notifications --------------------------------------------------------------

    def _on_work(self, _payload: str) -> None:
        self._work.fire()

    def _on_appended(self, run_id: str) -> None:
        signal = self._appended.get(run_id)
        if signal is not None:
            signal.fire()

    def _on_gap(self) -> None:
        """Notifications may have been lost: every waiter checks again."""
        self._work.fire()
        for signal in list(self._appended.values()):
            signal.fire()

    # --- schema ---------------------------------------------------------------------

    async def schema_version(self) -> int:
        """The run tables' version in the schema (0: none yet)."""
        return await self._table_version()

    async def migrate(self) -> int:
        """Bring the run tables to ``LATEST_VERSION`` and return the version."""
        return await self._migrate()

    # --- records --------------------------------------------------------------------

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
        lim = limits or TenantLimits()
        args = (
            spec.run_id,
            spec.session_id,
            spec.request_id or None,
            encode_spec(spec),
            policy is SessionPolicy.REJECT,
            owner,
            now + lease_s,
            max_queued,
            now,
            lim.max_active,
            lim.max_queued,
            float(lim.start_rate),
            lim.start_burst,
        )
        try:
            row = await self._call(lambda conn: conn.fetchrow(self._sql["create"], *args))
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == SESSION_BUSY:
                raise SessionBusyError(spec.session_id or "", exc.detail or "") from None
            if exc.sqlstate == QUEUE_FULL:
                raise QueueFullError(max_queued) from None
            if exc.sqlstate == TENANT_LIMIT:
                raise self._tenant_limit(spec.tenant, lim, exc.detail or "") from None
            if exc.sqlstate == RUN_EXISTS:
                raise ValueError(f"run id {spec.run_id!r} is already taken") from None
            raise self._unavailable(exc) from exc
        assert row is not None
        created = bool(row[0])
        record = run_record(row[1:], spec if created else None)
        if created and record.status is RunStatus.QUEUED:
            self._work.fire()  # a claimer of this replica need not wait for the notification
        return CreatedRun(record, created)

    @staticmethod
    def _tenant_limit(tenant: str, limits: TenantLimits, detail: str) -> TenantLimitError:
        if detail == "active":
            return TenantLimitError(TENANT_MAX_ACTIVE_RUNS, tenant, limits.max_active)
        if detail == "queued":
            return TenantLimitError(TENANT_MAX_QUEUED_RUNS, tenant, limits.max_queued)
        _, _, wait = detail.partition(":")
        return TenantLimitError(TENANT_START_RATE, tenant, limits.start_rate, float(wait or 0),
                                burst=limits.start_burst)

    async def get_run(self, run_id: str) -> RunRecord | None:
        now = time.time()
        row = await self._call(lambda conn: conn.fetchrow(self._sql["get"], run_id, now), idempotent=True)
        return run_record(row) if row is not None else None

    async def list_runs(self, session_id: str, limit: int, cursor: str | None = None) -> tuple[list[RunRecord], str | None]:
        if limit <= 0:
            return [], None
        now = time.time()
        if cursor is None:
            sql, args = self._sql["list_first"], (session_id, now, limit + 1)
        else:
            sql, args = self._sql["list_after"], (session_id, now, limit + 1, cursor)
        rows = await self._call(lambda conn: conn.fetch(sql, *args), idempotent=True)
        page = [run_record(row) for row in rows[:limit]]
        return page, (page[-1].run_id if len(rows) > limit else None)

    async def active_run(self, session_id: str) -> str | None:
        run_id: str | None = await self._call(
            lambda conn: conn.fetchval(self._sql["active"], session_id), idempotent=True
        )
        return run_id

    # --- execution ------------------------------------------------------------------

    async def claim(self, owner: str, max_runs: int, *, lease_s: float, now: float, wait_s: float) -> list[RunRecord]:
        if max_runs <= 0:
            return []
        started = time.monotonic()
        while True:
            seen = self._work.gen
            # A claim made after waiting leases from when it is made, not from ``now``.
            at = now + (time.monotonic() - started)
            args = (owner, max_runs, at + lease_s, at)
            rows = await self._call(lambda conn: conn.fetch(self._sql["claim"], *args))
            if rows:
                return [run_record(row[1:]) for row in sorted(rows, key=lambda r: r[0])]
            remaining = wait_s - (time.monotonic() - started)
            if remaining <= 0 or self._closed:
                return []
            await self._work.wait(seen, min(remaining, _FALLBACK_POLL_S))
            if self._closed:
                return []

    async def renew(self, owner: str, leases: dict[str, int], *, lease_s: float, now: float) -> RenewOutcome:
        if not leases:
            return RenewOutcome(frozenset(), {})
        ids = sorted(leases)  # one lock order for every renewal
        args = (owner, ids, [leases[i] for i in ids], now + lease_s)
        rows = await self._call(lambda conn: conn.fetch(self._sql["renew"], *args), idempotent=True)
        held = {run_id for run_id, _ in rows}
        return RenewOutcome(frozenset(set(leases) - held), {run_id: reason for run_id, reason in rows if reason})

    async def record_progress(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> str:
        first, texts, trace = encoded_events(run_id, events)
        cp = encode_checkpoint(checkpoint) if checkpoint is not None else None
        args = (run_id, attempt, first, texts, trace, cp, now, self._events_channel)
        row = await self._fenced(lambda conn: conn.fetchrow(self._sql["progress"], *args), run_id, attempt)
        if row is None:
            await self._progress_refused(run_id, attempt, first, bool(texts))
        if texts:
            self._on_appended(run_id)
        return row[0] or ""

    async def _progress_refused(self, run_id: str, attempt: int, first: int, appending: bool) -> NoReturn:
        """Raise why a progress write changed nothing: the lease is gone, or (this attempt
        still executing the run) its events do not follow the log."""
        row = await self._call(lambda conn: conn.fetchrow(self._sql["progress_refused"], run_id, attempt),
                               idempotent=True)
        if row is not None and row[0] and appending:
            raise ValueError(f"run {run_id}: event {first} does not follow {row[1]}")
        raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}")

    async def finish(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        if not events or not events[-1].is_terminal:
            raise ValueError("finish needs the run's terminal event last")
        final = events[-1].payload
        first, texts, trace = encoded_events(run_id, events)
        args = (run_id, attempt, first, texts, trace, terminal_status(final).value, encode_payload(final),
                now + retention_s, now)
        row = await self._fenced(lambda conn: conn.fetchrow(self._sql["finish"], *args), run_id, attempt)
        self._on_appended(run_id)
        if row[1]:
            self._work.fire()  # the session's next run may have become claimable

    async def _fenced(self, op: Callable[[asyncpg.Connection], Awaitable[Any]], run_id: str, attempt: int) -> Any:
        try:
            return await self._call(op)
        except asyncpg.PostgresError as exc:
            if exc.sqlstate == LEASE_LOST:
                raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}") from None
            if exc.sqlstate == SEQUENCE_GAP:
                raise ValueError(exc.args[0] if exc.args else str(exc)) from None
            raise self._unavailable(exc) from exc

    async def release(self, run_id: str, attempt: int, *, now: float) -> bool:
        released = bool(await self._call(lambda conn: conn.fetchval(self._sql["release"], run_id, attempt, now)))
        if released:
            self._work.fire()
        return released

    async def requeue_expired(self, *, now: float) -> list[str]:
        rows = await self._call(lambda conn: conn.fetch(self._sql["requeue"], now))
        if rows:
            self._work.fire()
        return [run_id for (run_id,) in rows]

    async def cancel(self, run_id: str, reason: str, *, event_time_ns: int, retention_s: float, now: float) -> RunRecord | None:
        args = (run_id, reason, event_time_ns, now + retention_s, now)
        row = await self._call(lambda conn: conn.fetchrow(self._sql["cancel"], *args))
        if row is None:
            return None
        record = run_record(row)
        if record.status is RunStatus.CANCELLED:
            self._on_appended(run_id)
            self._work.fire()
        return record

    async def submit_action(self, run_id: str, key: str, action: dict[str, Any], *, now: float) -> RunRecord | None:
        args = (run_id, key, encode_action(action), now)
        # A repeat (the connection died after the commit) changes nothing: the first answer stays.
        row = await self._call(lambda conn: conn.fetchrow(self._sql["submit_action"], *args), idempotent=True)
        return run_record(row) if row is not None else None

    async def submit_answers(
        self, run_id: str, answers: Sequence[tuple[str, dict[str, Any]]], *, now: float
    ) -> Answered | None:
        check_answers(answers)
        args = (
            run_id, [key for key, _ in answers], [encode_action(action) for _, action in answers],
            [answer_identity(key, action) for key, action in answers], now,
        )
        # A retry after the commit (its reply lost) finds its own answers recorded: repeats, taken again.
        row = await self._call(lambda conn: conn.fetchrow(self._sql["submit_answers"], *args), idempotent=True)
        if row is None:
            return None
        code, refused, recorded = row[0], row[1], row[2]
        record = run_record(row[3:])
        if code != 0:
            key, action = answers[refused]
            raise RunNotWaitingError.refusing(record, key, action)
        return Answered(record, tuple(answers[i][0] for i in recorded))

    async def sweep(self, *, now: float) -> int:
        await self._call(lambda conn: conn.execute(self._sql["sweep_buckets"], now), idempotent=True)
        removed = 0
        while True:
            # One batch per statement (and transaction): short locks, bounded deletes.
            batch: int = await self._call(
                lambda conn: conn.fetchval(self._sql["sweep"], now, _SWEEP_BATCH), idempotent=True
            )
            removed += batch
            if batch < _SWEEP_BATCH:
                return removed

    # --- event log ------------------------------------------------------------------

    async def read_events(self, run_id: str, after_sequence: int, limit: int) -> list[RunEvent]:
        if limit <= 0:
            return []
        args = (run_id, max(after_sequence, 0), limit, time.time())
        rows = await self._call(lambda conn: conn.fetch(self._sql["read"], *args), idempotent=True)
        return [decode_event(run_id, data) for (data,) in rows]

    async def wait_events(self, run_id: str, after_sequence: int, *, limit: int, timeout_s: float) -> list[RunEvent]:
        signal = self._appended.get(run_id)
        if signal is None:
            signal = self._appended[run_id] = Signal()
        signal.users += 1
        try:
            started = time.monotonic()
            while True:
                seen = signal.gen
                events = await self.read_events(run_id, after_sequence, limit)
                remaining = timeout_s - (time.monotonic() - started)
                if events or remaining <= 0 or self._closed:
                    return events
                await signal.wait(seen, min(remaining, _FALLBACK_POLL_S))
                if self._closed:
                    return []
        finally:
            signal.users -= 1
            if signal.users == 0 and self._appended.get(run_id) is signal:
                del self._appended[run_id]
