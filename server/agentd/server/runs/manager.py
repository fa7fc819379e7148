"""This replica's share of the runs: creating, executing, watching, cancelling, handing off.

Runs live in a ``RunStore`` every replica shares; this manager executes some of them.
A new run executes on the replica that created it when that replica has capacity
(no queue hop, so a streamed run starts as fast as a local one); otherwise it is
queued and any replica with capacity claims it. Background tasks keep the leases of
this replica's runs alive, take over runs whose replica stopped renewing, and apply
cancels sent from other replicas.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import time
from typing import Any, AsyncIterator, Callable

from agentd.server.runs.active import ActiveRun
from agentd.server.runs.base import ControlBus, RunStore, start_now
from agentd.server.runs.records import (
    ANSWER_CONFLICT,
    LEASE_EXPIRED,
    Control,
    CreatedRun,
    LeaseLostError,
    RunNotFoundError,
    RunRecord,
    RunNotWaitingError,
    RunStatus,
    ServerDrainingError,
    SessionPolicy,
    TenantLimits,
    same_answer,
    split_action_key,
)
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.events import Handoff, RunCancelled, RunEvent, ToolOutput
from agentd.server.runtime.items import ToolCallItem, ToolResultItem
from agentd.server.runtime.run_loop import AgentRunner, Resume, RunInput
from agentd.server.runtime.usage import Usage

log = logging.getLogger("agentd.runs")

WATCH_BATCH = 500
WATCH_WAIT_S = 5.0
CLAIM_WAIT_S = 1.0
STORE_RETRY_S = 1.0
SWEEP_INTERVAL_S = 60.0


def default_replica_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


class RunManager:
    def __init__(
        self,
        runner: AgentRunner,
        store: RunStore,
        bus: ControlBus,
        *,
        replica_id: str = "",
        max_active_runs: int = 1000,
        max_queued_runs: int = 10_000,
        lease_s: float = 10.0,
        retention_s: float = 86_400.0,
        tenant_max_active_runs: int = 0,
        tenant_max_queued_runs: int = 0,
        tenant_start_rate: float = 0.0,
        tenant_start_burst: int | None = None,
        max_stream_lag: int = 10_000,
    ) -> None:
        self._runner = runner
        # A stream this many events behind its run is ended (RESOURCE_EXHAUSTED); see AgentService._stream.
        self.max_stream_lag = max_stream_lag
        self.store = store
        self._bus = bus
        self.replica_id = replica_id or default_replica_id()
        self._capacity = max_active_runs
        self._max_queued = max_queued_runs
        self._lease_s = lease_s
        self._retention_s = retention_s
        # Checked by the store inside create_run, atomically across every replica sharing it.
        limits = TenantLimits(tenant_max_active_runs, tenant_max_queued_runs, tenant_start_rate,
                              tenant_start_burst or 0)
        self._tenant_limits = limits if limits.enabled else None
        self._local: dict[str, ActiveRun] = {}
        self._slot_freed = asyncio.Event()
        self._draining = False
        self._tasks: list[asyncio.Task[None]] = []
        self._ending: set[asyncio.Task[None]] = set()  # ending runs whose creating call failed
        # Hooks of the capacity metrics (tracing/capacity.py); None: not measured.
        self.on_taken_over: Callable[[], None] | None = None  # a run claimed after its lease expired
        self.on_handed_off: Callable[[], None] | None = None  # a run a drain released to the queue
        self.on_renew_failed: Callable[[], None] | None = None  # a lease renewal round that failed
        self.on_event_write: Callable[[float], None] | None = None  # seconds of each event-log write

    # -- lifecycle -----------------------------------------------------------------------

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._claim_loop(), name="runs: claim"),
            asyncio.create_task(self._renew_loop(), name="runs: renew"),
            asyncio.create_task(self._control_loop(), name="runs: control"),
        ]
        if self.store.shared:
            self._tasks.append(asyncio.create_task(self._takeover_loop(), name="runs: takeover"))
        self._tasks.append(asyncio.create_task(self._sweep_loop(), name="runs: sweep"))

    async def drain(self, grace_s: float) -> None:
        """Take no new runs; give running ones ``grace_s``; hand the rest to other replicas (a shared
        store) or cancel them (in memory, where no other replica could continue them)."""
        self._draining = True
        for task in self._tasks:
            if task.get_name() == "runs: claim":
                task.cancel()
        runs = list(self._local.values())
        if runs:
            log.info("draining %d active run(s), grace %.1fs", len(runs), grace_s)
            tasks = {r.task for r in runs if r.task is not None}
            await asyncio.wait(tasks, timeout=grace_s) if tasks else None
        left = [r for r in self._local.values() if not r.done]
        if left and self.store.shared:
            log.warning("handing %d unfinished run(s) to other replicas", len(left))
            await asyncio.gather(*(self._hand_off(r) for r in left))
        elif left:
            log.warning("cancelling %d run(s) still active after the grace period", len(left))
            for run in left:
                run.cancel("server shutting down")
            await asyncio.wait({r.task for r in left if r.task is not None}, timeout=5)
        for run in list(self._local.values()):
            await asyncio.wait({run.flusher}, timeout=5)
        if self._ending:
            await asyncio.wait(set(self._ending), timeout=5)

    async def close(self) -> None:
        """Stop the background tasks (after ``drain``)."""
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def close_stores(self) -> None:
        """Close the control bus and the run store (last, after every RPC ended)."""
        await self._bus.close()
        await self.store.close()

    async def _hand_off(self, run: ActiveRun) -> None:
        await run.stop("handed off: this replica is shutting down")
        try:
            released = await self.store.release(run.run_id, run.attempt, now=time.time())
            log.info("run %s %s", run.run_id, "handed off" if released else "was already taken over")
            if released and self.on_handed_off is not None:
                self.on_handed_off()
        except StoreUnavailableError as exc:
            log.warning("run %s: could not hand off (%s); it is taken over when its lease expires", run.run_id, exc)

    # -- creating and executing ---------------------------------------------------------

    @property
    def active_count(self) -> int:
        return len(self._local)

    # Read-only views for the capacity metrics and GetLiveStats (safe from another thread).

    @property
    def leases_held(self) -> int:
        """The run leases this replica holds and renews (its executions not stopped)."""
        return sum(1 for run in list(self._local.values()) if not run.stopped)

    @property
    def max_active_runs(self) -> int:
        return self._capacity

    @property
    def max_queued_runs(self) -> int:
        return self._max_queued

    @property
    def draining(self) -> bool:
        return self._draining

    async def create(self, spec: RunInput, policy: SessionPolicy) -> CreatedRun:
        """Record the run, and execute it here when this replica has capacity.

        The store write and the launch go together: when the calling RPC is cancelled (its
        caller went away, its deadline passed) or the write fails while it is in flight, the
        write may still have created the run, which nobody would execute and a lease expiry would
        later revive. Such a run is ended as cancelled instead (``_end_unstarted``): a run whose
        creating call failed never executes."""
        if self._draining:
            raise ServerDrainingError("this replica is shutting down and takes no new runs; retry on another replica")
        owner = self.replica_id if len(self._local) < self._capacity else None
        call = self.store.create_run(
            spec, policy=policy, owner=owner, lease_s=self._lease_s, max_queued=self._max_queued, now=time.time(),
            limits=self._tenant_limits,
        )
        # The write goes on in a task of its own, shielded from this call's cancellation; an inline
        # store answers on the spot instead (no task, no trip through the loop). Only an inline
        # store's: another engine's call, begun in this task and carried on in another, would leave
        # what it bound to the task (asyncio.timeout) behind.
        write = start_now(call) if self.store.inline else asyncio.ensure_future(call)
        try:
            created = write.result() if write.done() else await asyncio.shield(write)
        except asyncio.CancelledError:
            self._end_unstarted(spec.run_id, write, "the call that started the run was cancelled before it started "
                                                    "(the caller went away or its deadline passed)")
            raise
        except StoreUnavailableError:
            # The write may have happened with its reply lost: the caller is told it failed.
            self._end_unstarted(spec.run_id, write, "the call that started the run failed before it started")
            raise
        return self._created(created)

    def _created(self, created: CreatedRun) -> CreatedRun:
        record = created.record
        if created.created and record.status is RunStatus.RUNNING and record.owner == self.replica_id:
            self._launch(record)
        return created

    def _end_unstarted(self, run_id: str, write: asyncio.Future[CreatedRun], reason: str) -> None:
        task = asyncio.create_task(self._end_unstarted_run(run_id, write, reason), name=f"end unstarted {run_id}")
        self._ending.add(task)
        task.add_done_callback(self._ending.discard)

    async def _end_unstarted_run(self, run_id: str, write: asyncio.Future[CreatedRun], reason: str) -> None:
        """End, as cancelled, the run ``write`` may have created, without executing it."""
        created: CreatedRun | None
        try:
            created = await write
        except Exception:
            created = None  # refused, or unknown: look it up
        if created is not None and not created.created:
            return  # the request id named an earlier run, which is not this call's to end
        record = created.record if created is not None else None
        deadline = time.monotonic() + self._lease_s
        while True:
            try:
                if record is None:
                    record = await self.store.get_run(run_id)
                    if record is None:
                        return  # never created
                if record.status.is_terminal:
                    return
                if (record.status is RunStatus.RUNNING and record.owner == self.replica_id
                        and run_id not in self._local):
                    # Created to execute here, never launched: end it as this execution would have.
                    event = RunEvent(run_id, record.last_sequence + 1, time.time_ns(), record.trace_id,
                                     RunCancelled(reason, Usage(), 0))
                    await self.store.finish(run_id, record.attempt, [event], retention_s=self._retention_s,
                                            now=time.time())
                else:  # queued (ended at once), or executing elsewhere (cancelled there)
                    await self.cancel(run_id, reason)
                log.info("run %s ended before it started: %s", run_id, reason)
                return
            except (LeaseLostError, RunNotFoundError):
                record = None  # changed under us (requeued, ended): look again
            except StoreUnavailableError as exc:
                record = None
                if time.monotonic() > deadline:
                    log.warning("run %s: could not end it after its creating call failed (%s)", run_id, exc)
                    return
                await asyncio.sleep(STORE_RETRY_S)
            if time.monotonic() > deadline:
                log.warning("run %s: could not end it after its creating call failed", run_id)
                return

    def _launch(self, record: RunRecord) -> ActiveRun:
        run = ActiveRun(record, self.store, retention_s=self._retention_s, lease_s=self._lease_s)
        run.on_write = self.on_event_write
        self._local[run.run_id] = run
        started = time.perf_counter()
        run.task = asyncio.create_task(self._execute(run, record), name=run.run_id)
        # A done callback, not a finally: it also runs for a task cancelled before it started.
        run.task.add_done_callback(lambda _: self._executed(run, started))
        if record.cancel_reason:
            run.cancel(record.cancel_reason)
        return run

    async def _execute(self, run: ActiveRun, record: RunRecord) -> None:
        resume = None
        if record.last_sequence > 0 or record.checkpoint is not None:  # an earlier execution got somewhere
            try:
                resume = await self._resume(record)
            except StoreUnavailableError as exc:
                # Without the log, tools that already finished would run again: leave the run to a
                # later attempt (the lease is no longer renewed, so it is taken over).
                log.warning("run %s: cannot read its log to resume it (%s); giving it up", run.run_id, exc)
                run.release_flusher()
                return
        await self._runner.run(run.input, run, resume)
        if not run.flusher.done():  # (on an inline store the terminal event is written already)
            await asyncio.wait({run.flusher})

    async def _resume(self, record: RunRecord) -> Resume:
        """How to continue a run an earlier execution began: from its checkpoint, with the results
        of the checkpoint's pending calls that the log already holds (those tools finished)."""
        cp = record.checkpoint
        outputs: dict[str, ToolResultItem] = {}
        handoffs: set[str] = set()
        pending = {item.call_id for item in cp.pending if isinstance(item, ToolCallItem)} if cp is not None else set()
        if cp is not None and pending:
            after = cp.sequence
            while after < record.last_sequence:
                batch = await self.store.read_events(record.run_id, after, WATCH_BATCH)
                if not batch:
                    break
                for event in batch:
                    payload = event.payload
                    if isinstance(payload, ToolOutput) and payload.item.call_id in pending:
                        outputs.setdefault(payload.item.call_id, payload.item)
                    elif isinstance(payload, Handoff) and payload.call_id in pending:
                        handoffs.add(payload.call_id)
                after = batch[-1].sequence
        return Resume(record.attempt, record.requeue_reason or LEASE_EXPIRED, cp, record.trace_id, outputs,
                      frozenset(handoffs))

    def _executed(self, run: ActiveRun, started: float) -> None:
        run.release_flusher()
        if log.isEnabledFor(logging.INFO):
            outcome = type(run.last_payload).__name__ if run.ended and run.last_payload is not None else "stopped"
            log.info(
                "run %s %s", run.run_id, outcome,
                extra={
                    "run_id": run.run_id,
                    "agent": run.input.agent,
                    "session_id": run.input.session_id,
                    "outcome": outcome,
                    "attempt": run.attempt,
                    "events": run.event_count,
                    "duration_ms": round((time.perf_counter() - started) * 1000, 2),
                },
            )
        if self._local.get(run.run_id) is run:
            del self._local[run.run_id]
        self._slot_freed.set()
        # Once its writes are done, the execution's event buffer goes: watchers that never read
        # must not pin a run's events past the store's own retention.
        if self.store.inline and run.flusher.done():  # no write is in flight: at once, no task
            run.drop_delivered()
            return
        dropping = asyncio.create_task(self._drop_buffer(run))
        self._ending.add(dropping)
        dropping.add_done_callback(self._ending.discard)

    @staticmethod
    async def _drop_buffer(run: ActiveRun) -> None:
        await asyncio.wait({run.flusher})
        run.drop_delivered()

    def on_progress(self, run_id: str, callback: Callable[[int], None]) -> tuple[Callable[[], None], int] | None:
        """Tell ``callback`` the run's last durable sequence after each write, while it executes here
        (None: it does not); returns the unsubscribe and the last durable sequence now."""
        local = self._local.get(run_id)
        if local is None or local.ended or local.stopped:
            return None
        return local.on_progress(callback), local.durable_sequence

    async def _claim_loop(self) -> None:
        while not self._draining:
            free = self._capacity - len(self._local)
            if free <= 0:
                self._slot_freed.clear()
                await self._slot_freed.wait()
                continue
            try:
                records = await self.store.claim(
                    self.replica_id, free, lease_s=self._lease_s, now=time.time(), wait_s=CLAIM_WAIT_S
                )
            except StoreUnavailableError as exc:
                log.warning("cannot claim queued runs: %s", exc)
                await asyncio.sleep(STORE_RETRY_S)
                continue
            except Exception:
                log.exception("claiming queued runs failed")
                await asyncio.sleep(STORE_RETRY_S)
                continue
            # Runs created here while the claim waited may have used the room it was asking for.
            room = max(self._capacity - len(self._local), 0)
            for record in records[:room]:
                if record.attempt > 1:
                    log.info("run %s taken over (attempt %d)", record.run_id, record.attempt)
                    expired = (record.requeue_reason or LEASE_EXPIRED) == LEASE_EXPIRED
                    if expired and self.on_taken_over is not None:
                        self.on_taken_over()
                self._launch(record)
            for record in records[room:]:
                try:
                    await self.store.release(record.run_id, record.attempt, now=time.time())
                except StoreUnavailableError as exc:
                    log.warning("run %s: could not give back a claim (%s); taken over at lease expiry",
                                record.run_id, exc)

    async def _renew_loop(self) -> None:
        interval = self._lease_s / 3
        while True:
            await asyncio.sleep(interval)
            leases = {r.run_id: r.attempt for r in self._local.values() if not r.stopped}
            if not leases:
                continue
            try:
                outcome = await self.store.renew(self.replica_id, leases, lease_s=self._lease_s, now=time.time())
            except StoreUnavailableError as exc:
                log.warning("cannot renew %d run lease(s): %s", len(leases), exc)
                if self.on_renew_failed is not None:
                    self.on_renew_failed()
                continue
            except Exception:
                log.exception("renewing run leases failed")
                if self.on_renew_failed is not None:
                    self.on_renew_failed()
                continue
            for run_id in outcome.lost:
                run = self._local.get(run_id)
                if run is not None and not run.ended:
                    log.warning("run %s: lease lost; another replica continues it", run_id)
                    asyncio.create_task(run.stop("this replica lost the run's lease"))
            for run_id, reason in outcome.cancel.items():
                run = self._local.get(run_id)
                if run is not None:
                    run.cancel(reason)

    async def _takeover_loop(self) -> None:
        interval = max(self._lease_s / 2, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                taken = await self.store.requeue_expired(now=time.time())
            except StoreUnavailableError as exc:
                log.warning("cannot check run leases: %s", exc)
                continue
            except Exception:
                log.exception("checking run leases failed")
                continue
            if taken:
                log.warning("%d run(s) lost their replica and were queued again: %s", len(taken), ", ".join(taken))

    async def _sweep_loop(self) -> None:
        """Delete runs past their retention (engines that expire keys by themselves do little here)."""
        while True:
            await asyncio.sleep(SWEEP_INTERVAL_S)
            try:
                deleted = await self.store.sweep(now=time.time())
            except StoreUnavailableError as exc:
                log.warning("cannot delete expired runs: %s", exc)
                continue
            except Exception:
                log.exception("deleting expired runs failed")
                continue
            if deleted:
                log.info("deleted %d run(s) past their retention", deleted)

    async def _control_loop(self) -> None:
        while True:
            try:
                async for message in self._bus.subscribe():
                    run = self._local.get(message.run_id)
                    if run is None:
                        continue
                    if message.kind == "cancel":
                        run.cancel(message.reason or "cancelled")
                    elif message.kind == "action":
                        asyncio.create_task(run.refresh_actions())
                return
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("the control subscription failed; resubscribing")
                await asyncio.sleep(STORE_RETRY_S)

    # -- queries and control -----------------------------------------------------------

    async def get(self, run_id: str) -> RunRecord:
        record = await self.store.get_run(run_id)
        if record is None:
            raise RunNotFoundError(run_id)
        return record

    async def list_runs(self, session_id: str, limit: int, cursor: str | None) -> tuple[list[RunRecord], str | None]:
        return await self.store.list_runs(session_id, limit, cursor)

    async def active_run_for_session(self, session_id: str) -> str | None:
        return await self.store.active_run(session_id)

    async def cancel(self, run_id: str, reason: str) -> RunRecord:
        """Cancel wherever the run executes: here directly, elsewhere through the store and the bus."""
        local = self._local.get(run_id)
        record = await self.store.cancel(
            run_id, reason, event_time_ns=time.time_ns(), retention_s=self._retention_s, now=time.time()
        )
        if record is None:
            raise RunNotFoundError(run_id)
        if local is not None:
            local.cancel(reason)
        elif record.status is RunStatus.RUNNING:
            await self._bus.publish(Control(run_id, "cancel", reason))
        return record

    async def answer(self, run_id: str, answers: list[tuple[str, dict[str, Any]]]) -> RunRecord:
        """Record the caller's answers (``(action key, action)``) and get them to the executing replica.

        The store decides, from the run as it holds it and atomically with the write
        (``RunStore.submit_answers``), so every replica agrees whatever the run's timing: a repeat of
        an answer the run has is taken (OK, the run returned) even after the run moved on or ended,
        so a retried call is harmless; a different answer for an answered call, or an answer for a
        call the run does not wait for, raises ``RunNotWaitingError`` and records none of them.
        """
        distinct: dict[str, dict[str, Any]] = {}
        for key, action in answers:
            first = distinct.setdefault(key, action)
            if not same_answer(key, first, action):
                kind, call_id = split_action_key(key)
                raise RunNotWaitingError(
                    f"the request sends two different {'decisions' if kind == 'approval' else 'outputs'} for call "
                    f"{call_id!r} of run {run_id}; send one",
                    run_id=run_id, call_id=call_id, reason=ANSWER_CONFLICT,
                )
        taken = await self.store.submit_answers(run_id, list(distinct.items()), now=time.time())
        if taken is None:
            raise RunNotFoundError(run_id)
        record = taken.record
        if record.status.is_terminal or record.checkpoint is None:
            return record
        # Wake the execution for every answer its checkpoint waits for, repeats included: the
        # first call may have recorded its answer and lost its notice (the run re-reads its answers
        # now and then anyway).
        awaited = set(record.checkpoint.awaiting)
        local = self._local.get(run_id)
        for key in distinct:
            if key not in awaited:
                continue
            if local is not None:
                local.action_arrived(key, record.actions[key])
            else:
                await self._bus.publish(Control(run_id, "action", key))
        return record

    async def cancel_attached(self, run_id: str, reason: str) -> None:
        """Cancel the run of a stream whose caller went away; wait for it to end when it runs here, so
        the caller's next call sees the session with the run's whole steps only."""
        local = self._local.get(run_id)
        if local is not None:
            local.cancel(reason)
            await local.wait()
            return
        try:
            await self.cancel(run_id, reason)
        except (StoreUnavailableError, RunNotFoundError) as exc:
            log.warning("run %s: could not cancel after its caller went away: %s", run_id, exc)

    async def watch(self, run_id: str, after_sequence: int) -> AsyncIterator[list[RunEvent]]:
        """The run's events after ``after_sequence`` until its terminal event, from wherever they are:
        the local execution's durable buffer when it runs here, else the shared log."""
        after = after_sequence
        local = self._local.get(run_id)
        if local is not None and after + 1 >= local.first_sequence:
            ended = False
            # To its end (it ends after the terminal batch): one left suspended would be closed
            # by the event loop's finalizer hook, a wake-up through the loop's self-pipe per run.
            async for batch in local.follow(after):
                last = batch[-1]
                yield batch  # the caller may empty it
                del batch
                after = last.sequence
                ended = last.is_terminal
            if ended:
                return
        caught_up = False
        while True:
            if caught_up:
                batch = await self.store.wait_events(run_id, after, limit=WATCH_BATCH, timeout_s=WATCH_WAIT_S)
            else:
                batch = await self.store.read_events(run_id, after, WATCH_BATCH)
            if batch:
                caught_up = False
                last = batch[-1]
                yield batch  # the caller may empty it
                del batch
                after = last.sequence
                if last.is_terminal:
                    return
                continue
            # Nothing new: make sure the run exists and has not already ended before waiting.
            record = await self.store.get_run(run_id)
            if record is None:
                raise RunNotFoundError(run_id)
            if record.status.is_terminal and record.last_sequence <= after:
                return
            caught_up = record.last_sequence <= after
