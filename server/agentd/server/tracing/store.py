"""The trace store TraceService queries: live traces in memory, ended ones in an archive.

Running traces are recorded and served by ``InMemoryTraceStore``. When a trace ends it
is queued here and one writer task hands whatever accumulated to the ``TraceArchive``
every ``flush_interval_s`` (sooner once ``batch_size`` traces wait). The run loop only
appends to a bounded queue: it never waits on the database, and a database that fails
costs a logged warning and the traces of that batch, never a run. When the queue is
full the oldest waiting trace is dropped (counted in ``dropped`` and logged).

Tenants: every trace is its run's tenant's. ``list_traces`` answers one tenant
(``TraceQuery.tenant``) from both sides; ``get_trace`` with a tenant finds only that
tenant's trace (another tenant's is None, as a missing one).

Queries: ``get_trace`` looks in memory first, then in the archive. ``list_traces``
takes the top ``limit`` of the same (filters, keyset cursor) query from both memory and
the archive, merges them newest first by ``(start_ns, trace_id)`` and drops duplicates
(a recently ended trace is in both; memory's copy wins). The top ``limit`` of the union
is always within the union of each side's top ``limit``, so pages are exact, and "more"
is exact too: either side having more, or the merge exceeding ``limit``.

Retention: the archive keeps the newest ``retention.max_traces`` traces and, when
``retention.max_age_s`` is set, only those started within it; a sweep every
``sweep_interval_s`` deletes the rest.

Run stats (``stats``): with an archive, the archive's SQL aggregates over every replica's
ended runs (a run counts once its trace is written, within ``flush_interval_s`` of its end:
adding memory's not-yet-written traces would count some runs twice); without one, memory's
ended traces, aggregated in Python.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.tracing.archive import Retention, TraceArchive
from agentd.server.tracing.memory import GroupStats, InMemoryTraceStore, StatsQuery, TraceQuery, TraceRecord

log = logging.getLogger("agentd.tracing")

_REOPEN_INTERVAL_S = 5.0


class TraceStore:
    """``InMemoryTraceStore`` in front of an optional ``TraceArchive``."""

    def __init__(
        self,
        memory: InMemoryTraceStore,
        archive: TraceArchive | None = None,
        *,
        retention: Retention | None = None,
        flush_interval_s: float = 0.15,
        batch_size: int = 200,
        max_queued: int = 10_000,
        sweep_interval_s: float = 300.0,
    ) -> None:
        self.memory = memory
        self.archive = archive
        self._retention = retention
        self._flush_interval_s = flush_interval_s
        self._batch_size = batch_size
        self._queue: collections.deque[TraceRecord] = collections.deque()
        self._max_queued = max_queued
        self._wakeup = asyncio.Event()
        self._closing = False
        self._writer: asyncio.Task[None] | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self._next_open_attempt = 0.0
        self._sweep_interval_s = sweep_interval_s
        # Traces that never reached the archive (queue overflow or a failed write).
        self.dropped = 0
        self.written = 0
        if archive is not None:
            memory.on_trace_end = self._ended

    # --- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        """Open the archive and start writing; an archive that cannot be opened is retried, never fatal."""
        if self.archive is None:
            return
        await self._try_open()
        self._writer = asyncio.create_task(self._write_loop(), name="agentd-trace-writer")
        if self._retention is not None:
            self._sweeper = asyncio.create_task(self._sweep_loop(), name="agentd-trace-sweep")

    async def close(self, timeout_s: float = 10.0) -> None:
        """Write what is queued (within ``timeout_s``), then close the archive."""
        if self.archive is None:
            return
        self._closing = True
        self._wakeup.set()
        if self._sweeper is not None:
            self._sweeper.cancel()
            await asyncio.gather(self._sweeper, return_exceptions=True)
        if self._writer is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self._writer), timeout_s)
            except asyncio.TimeoutError:
                self._writer.cancel()
                await asyncio.gather(self._writer, return_exceptions=True)
        if self._queue:
            self._drop(len(self._queue), "the archive did not take them before shutdown")
            self._queue.clear()
        await self.archive.close()

    async def _try_open(self) -> bool:
        assert self.archive is not None
        if self.archive.is_open:
            return True
        if time.monotonic() < self._next_open_attempt:
            return False
        try:
            await self.archive.open()
        except StoreUnavailableError as exc:
            self._next_open_attempt = time.monotonic() + _REOPEN_INTERVAL_S
            log.warning("trace archive unavailable; ended traces stay in memory only until it is back: %s", exc)
            return False
        except Exception:
            self._next_open_attempt = time.monotonic() + _REOPEN_INTERVAL_S
            log.exception("trace archive (%s) failed to open", self.archive.location)
            return False
        log.info("trace archive: %s", self.archive.location)
        return True

    # --- writing --------------------------------------------------------------------

    def _ended(self, trace: TraceRecord) -> None:
        """Called by the run loop as a trace ends: only queues it."""
        if self._closing and (self._writer is None or self._writer.done()):
            self._drop(1, "the trace store is closed")
            return
        if len(self._queue) >= self._max_queued:
            self._queue.popleft()
            self._drop(1, f"the trace archive queue is full ({self._max_queued})")
        self._queue.append(trace)
        if len(self._queue) >= self._batch_size:
            self._wakeup.set()

    def _drop(self, count: int, why: str) -> None:
        self.dropped += count
        log.warning("dropped %d trace(s) from the archive (%d in total): %s", count, self.dropped, why)

    async def _write_loop(self) -> None:
        while True:
            if not self._closing:
                try:
                    await asyncio.wait_for(self._wakeup.wait(), self._flush_interval_s)
                except asyncio.TimeoutError:
                    pass
            self._wakeup.clear()
            while self._queue:
                await self.flush_once()
                if not self._closing and len(self._queue) < self._batch_size:
                    break
            if self._closing and not self._queue:
                return

    async def flush_once(self) -> None:
        """Write one batch of what is queued (used by the writer; tests may call it)."""
        assert self.archive is not None
        batch = [self._queue.popleft() for _ in range(min(len(self._queue), self._batch_size))]
        if not batch:
            return
        if not await self._try_open():
            self._drop(len(batch), "the trace archive is unavailable")
            return
        try:
            await self.archive.write(batch)
        except StoreUnavailableError as exc:
            self._drop(len(batch), f"writing to the trace archive failed: {exc}")
        except Exception as exc:
            log.exception("writing to the trace archive failed unexpectedly")
            self._drop(len(batch), f"{type(exc).__name__}: {exc}")
        else:
            self.written += len(batch)

    async def flush(self) -> None:
        """Write everything queued now (tests; shutdown goes through ``close``)."""
        while self._queue and self.archive is not None:
            await self.flush_once()

    # --- retention ------------------------------------------------------------------

    async def sweep(self) -> int:
        if self.archive is None or self._retention is None or not await self._try_open():
            return 0
        return await self.archive.sweep(self._retention)

    async def _sweep_loop(self) -> None:
        while True:
            try:
                removed = await self.sweep()
                if removed:
                    log.info("trace retention: deleted %d archived trace(s)", removed)
            except StoreUnavailableError as exc:
                log.warning("trace retention sweep skipped: %s", exc)
            except Exception:
                log.exception("trace retention sweep failed unexpectedly")
            await asyncio.sleep(self._sweep_interval_s)

    # --- queries --------------------------------------------------------------------

    async def get_trace(self, trace_id: str, tenant: str | None = None) -> TraceRecord | None:
        """``tenant``'s trace ``trace_id`` (with no tenant, any tenant's): None when there is none."""
        trace = self.memory.get_trace(trace_id, tenant)
        if trace is not None or self.archive is None:
            return trace
        if not await self._try_open():
            raise StoreUnavailableError(f"{self.archive.location}: unavailable")
        return await self.archive.get(trace_id, tenant)

    async def list_traces(self, query: TraceQuery) -> tuple[list[TraceRecord], bool]:
        """Newest first, keyset-paged by ``(start_ns, trace_id)``: the page and whether more match."""
        live, live_more = self.memory.list_traces(query)
        # Only ended traces are archived: an in-progress listing is memory's alone.
        if self.archive is None or query.status == "in_progress":
            return live, live_more
        if not await self._try_open():
            raise StoreUnavailableError(f"{self.archive.location}: unavailable")
        archived, archived_more = await self.archive.list(query)
        merged: dict[str, TraceRecord] = {t.trace_id: t for t in archived}
        merged.update((t.trace_id, t) for t in live)  # memory's copy wins
        ordered = sorted(merged.values(), key=lambda t: (t.start_ns, t.trace_id), reverse=True)
        return ordered[: query.limit], live_more or archived_more or len(ordered) > query.limit

    async def stats(self, query: StatsQuery) -> tuple[list[GroupStats], bool]:
        """A page of run stats (see ``StatsQuery``) and whether more groups follow."""
        if self.archive is None:
            return self.memory.stats(query)
        if not await self._try_open():
            raise StoreUnavailableError(f"{self.archive.location}: unavailable")
        return await self.archive.stats(query)
