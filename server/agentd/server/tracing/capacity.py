"""Capacity metrics: what one replica executes, the shared queue as it sees it, the leases it
holds, the runs it took over or handed off, and how long its event-log writes take.

Exported over OTLP beside the span-derived metrics (``metrics.py``), on the same meter
provider, so they exist exactly when those do (OTLP export on, ``OTEL_METRICS_EXPORTER`` not
``none``). Every one carries ``agentd.replica``: the replica id its run leases name as owner
(``AGENTD_REPLICA_ID``, else ``hostname-pid``).

=========================================  =========  ===========  ============================
metric                                     unit       kind         what
=========================================  =========  ===========  ============================
``agentd.runs.active``                     {run}      gauge        runs executing on the replica
                                                                   (waiting for the caller too)
``agentd.runs.max_active``                 {run}      gauge        ``AGENTD_MAX_ACTIVE_RUNS``
``agentd.runs.queued``                     {run}      gauge        the shared queue's depth, as
                                                                   the replica reads it
``agentd.leases.held``                     {lease}    gauge        run leases the replica renews
``agentd.runs.taken_over``                 {run}      counter      runs it claimed after another
                                                                   replica's lease expired
``agentd.runs.handed_off``                 {run}      counter      runs its SIGTERM drain released
                                                                   to the other replicas
``agentd.leases.renewal_failures``         {failure}  counter      lease renewal rounds that failed
                                                                   (the run store did not answer)
``agentd.run_store.write.duration``        s          histogram    one event-log write (a batch of
                                                                   events, and checkpoint) to the
                                                                   shared run store
=========================================  =========  ===========  ============================

Nothing here costs a run anything but the event-write timing. The gauges are observable:
the SDK calls their callbacks when it collects (each export interval), and they read the
run manager's state then. The counters change on rare events (a takeover, a hand-off, a
failed renewal); they start at 0 so that the first increment shows in ``rate()``/``increase()``.
An event-log write appends its duration to a bounded queue (two clock reads and an append,
once per batch, not per event); the queue is recorded into the histogram at collection time,
off the event loop. Writes of the in-memory run store happen inline, per event, without I/O:
they are not timed.

The queue's depth is the count ``create_run`` compares with ``AGENTD_MAX_QUEUED_RUNS``:
runs QUEUED in the shared store, claimable or waiting behind their session's active run.
Every replica sharing the store sees the same queue, so dashboards take ``max`` over
replicas, never the sum. It is read from the store when it is collected (``QueueDepth``): one
round trip (Redis: ``XLEN`` of the queue stream and ``SCARD`` of the runs behind their session,
pipelined; Postgres: a count over the ``runs_queued`` partial index; memory: two lengths).
A store that does not answer within ``QUEUE_READ_TIMEOUT_S`` leaves the gauge without a value
for that collection (no data point, rather than a stale one).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import threading
import time
from typing import TYPE_CHECKING, Any, Iterable

from agentd.server.runtime.errors import StoreUnavailableError

if TYPE_CHECKING:
    from opentelemetry.metrics import CallbackOptions, MeterProvider, Observation

    from agentd.server.runs.base import RunStore
    from agentd.server.runs.manager import RunManager

log = logging.getLogger("agentd.tracing")

REPLICA = "agentd.replica"
# An event-log write is a round trip to Redis or Postgres: from sub-millisecond to the store's timeout.
WRITE_DURATION_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
# Write durations waiting for the next collection; beyond this many (no collection for a long
# time) the oldest are dropped.
MAX_PENDING_WRITES = 100_000
QUEUE_READ_TIMEOUT_S = 2.0


class QueueDepth:
    """Reads how many runs are QUEUED in the run store (see the module doc), cheaply and without
    changing it; ``None`` when it cannot be read.

    A store with a ``queued_count()`` coroutine is asked that. Otherwise the engines agentd ships
    are read the way their ``create_run`` counts toward ``max_queued``.
    """

    def __init__(self, store: "RunStore") -> None:
        self._store = store
        self._loop: asyncio.AbstractEventLoop | None = None
        self._last: tuple[float, int] | None = None  # (monotonic time, depth) of the last good read
        self._pending: asyncio.Future[int | None] | None = None
        self._failed_once = False

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """The event loop the store lives on (``read_blocking`` runs reads there)."""
        self._loop = loop

    @property
    def last(self) -> int | None:
        return self._last[1] if self._last is not None else None

    async def read(self) -> int | None:
        """The depth now; None when the store does not answer. Reads asked for while one is in flight
        share it (every replica's GetLiveStats and a metric collection at once cost one round trip)."""
        if self._pending is None or self._pending.done():
            self._pending = asyncio.ensure_future(self._read_now())
        return await asyncio.shield(self._pending)

    async def _read_now(self) -> int | None:
        try:
            async with asyncio.timeout(QUEUE_READ_TIMEOUT_S):
                depth = await self._count()
        except (StoreUnavailableError, TimeoutError) as exc:
            # The store is down (its other users say so) or closed (the last export at shutdown).
            log.debug("cannot read the run queue's depth: %s", str(exc) or type(exc).__name__)
            return None
        except Exception as exc:  # noqa: BLE001 (a store that cannot be read: no value)
            if not self._failed_once:
                self._failed_once = True
                log.warning("cannot read the run queue's depth (%s); further failures are not logged",
                            str(exc) or type(exc).__name__)
            return None
        self._last = (time.monotonic(), depth)
        return depth

    async def _count(self) -> int:
        store = self._store
        counter = getattr(store, "queued_count", None)
        if callable(counter):
            return int(await counter())
        module = type(store).__module__
        if module.startswith("agentd.server.runs.memory"):
            return len(store._queue) + len(store._behind)  # type: ignore[attr-defined]
        if module.startswith("agentd.server.runs.redis"):
            return await _redis_depth(store)
        if module.startswith("agentd.server.runs.postgres"):
            return await _postgres_depth(store)
        raise TypeError(f"no way to read the queue of a {type(store).__name__}")

    def read_blocking(self, timeout_s: float = QUEUE_READ_TIMEOUT_S + 0.5) -> int | None:
        """``read`` from another thread (the metric reader's), waiting at most ``timeout_s``; on the
        loop's own thread (it cannot wait for itself) the last value read."""
        loop = self._loop
        if loop is None or loop.is_closed():
            return None
        try:
            if asyncio.get_running_loop() is loop:
                return self.last
        except RuntimeError:
            pass  # no loop in this thread: the reader's
        try:
            return asyncio.run_coroutine_threadsafe(self.read(), loop).result(timeout_s)
        except Exception:  # noqa: BLE001 (timed out, loop stopped: no value this time)
            return None


async def _redis_depth(store: Any) -> int:
    """``XLEN`` of the queue stream (claimable runs: entries are deleted when claimed) plus ``SCARD``
    of the runs waiting behind their session, in one pipelined round trip, as create.lua counts."""
    client = store._client
    base = store._base

    async def count() -> int:
        async with client.pipeline(transaction=False) as pipe:
            pipe.xlen(base + b"queue")
            pipe.scard(base + b"behind")
            claimable, behind = await pipe.execute()
        return int(claimable) + int(behind)

    return await store._run(count, idempotent=True)


async def _postgres_depth(store: Any) -> int:
    """QUEUED runs (the ``runs_queued`` partial index), as ``create_run`` compares with ``max_queued``."""
    sql = f"SELECT count(*) FROM {store._quoted}.runs WHERE status = 'queued'"
    return int(await store._call(lambda conn: conn.fetchval(sql), idempotent=True))


class CapacityMetrics:
    """The capacity instruments of one replica, fed by its ``RunManager``'s hooks and state.

    It does not own ``meter_provider`` (the tracer provider's shutdown flushes it).
    """

    def __init__(self, meter_provider: "MeterProvider", runs: "RunManager", queue: QueueDepth) -> None:
        from opentelemetry.metrics import Observation  # (OpenTelemetry is imported only when exporting)

        self._observation = Observation
        self._runs = runs
        self._queue = queue
        self._attributes = {REPLICA: runs.replica_id}
        self._writes: collections.deque[float] = collections.deque(maxlen=MAX_PENDING_WRITES)
        self._lock = threading.Lock()
        meter = meter_provider.get_meter("agentd")
        meter.create_observable_gauge(
            "agentd.runs.active", callbacks=[self._active], unit="{run}",
            description="Runs executing on this replica now (runs waiting for the caller included).",
        )
        meter.create_observable_gauge(
            "agentd.runs.max_active", callbacks=[self._max_active], unit="{run}",
            description="The most runs this replica executes at once (AGENTD_MAX_ACTIVE_RUNS).",
        )
        meter.create_observable_gauge(
            "agentd.runs.queued", callbacks=[self._queued], unit="{run}",
            description="Runs waiting in the shared queue, as this replica reads it (the same queue for every "
                        "replica sharing the run store: take the max over replicas, not the sum).",
        )
        meter.create_observable_gauge(
            "agentd.leases.held", callbacks=[self._leases], unit="{lease}",
            description="Run leases this replica holds and renews.",
        )
        self._taken_over = meter.create_counter(
            "agentd.runs.taken_over", unit="{run}",
            description="Runs this replica took over after another replica's lease on them expired.",
        )
        self._handed_off = meter.create_counter(
            "agentd.runs.handed_off", unit="{run}",
            description="Runs this replica released to the other replicas while draining (SIGTERM).",
        )
        self._renewal_failures = meter.create_counter(
            "agentd.leases.renewal_failures", unit="{failure}",
            description="Lease renewal rounds of this replica that failed (the run store did not answer).",
        )
        self._write_duration = meter.create_histogram(
            "agentd.run_store.write.duration", unit="s",
            description="Duration of one event-log write (a batch of events and checkpoint) to the run store.",
            explicit_bucket_boundaries_advisory=WRITE_DURATION_BUCKETS,
        )
        # Observes nothing (never exported): records the pending write durations before a collection
        # reads the histogram (the SDK calls observable callbacks first).
        meter.create_observable_gauge(
            "agentd.capacity.pending_writes", callbacks=[self._before_collect], description="(not exported)"
        )
        for counter in (self._taken_over, self._handed_off, self._renewal_failures):
            counter.add(0, self._attributes)
        runs.on_taken_over = lambda: self._taken_over.add(1, self._attributes)
        runs.on_handed_off = lambda: self._handed_off.add(1, self._attributes)
        runs.on_renew_failed = lambda: self._renewal_failures.add(1, self._attributes)
        runs.on_event_write = self._writes.append

    def _observe(self, value: int | None) -> Iterable["Observation"]:
        return [] if value is None else [self._observation(value, self._attributes)]

    def _active(self, options: "CallbackOptions") -> Iterable["Observation"]:
        return self._observe(self._runs.active_count)

    def _max_active(self, options: "CallbackOptions") -> Iterable["Observation"]:
        return self._observe(self._runs.max_active_runs)

    def _leases(self, options: "CallbackOptions") -> Iterable["Observation"]:
        return self._observe(self._runs.leases_held)

    def _queued(self, options: "CallbackOptions") -> Iterable["Observation"]:
        return self._observe(self._queue.read_blocking())

    def _before_collect(self, options: "CallbackOptions") -> Iterable["Observation"]:
        self.record_writes()
        return []

    def record_writes(self) -> None:
        """Record the write durations queued since the last collection (safe from any thread)."""
        writes = self._writes
        with self._lock:
            while True:
                try:
                    seconds = writes.popleft()
                except IndexError:
                    return
                self._write_duration.record(seconds, self._attributes)
