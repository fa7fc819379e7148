"""One execution of a run on this replica: the ``EventSink`` its loop writes to.

Events are stamped with the next sequence number and written to the run store in
batches by one flusher task per run: while a write is in flight, later events pile
up and go in the next write, so a burst of text deltas costs one round trip, not one
per event. Watchers on this replica get an event only after it is durable, so a
client never sees a sequence number that a replica taking the run over could
reuse. A checkpoint rides in the same write as the events before it.

On an inline store (``RunStore.inline``: the in-memory store, whose calls never wait) there
is no flusher: each event is written as it is emitted, on the spot (``record_progress_now``),
and watchers are woken there and then. Nothing is gained by batching writes that cost no
round trip, and a task per run and a wake-up per burst are saved. ``flusher`` is then a
future that ends with this execution's writes.

If the store says the lease is gone (another replica took the run over), the
execution stops quietly: no further event is written, and the new owner continues
the log.

Cancels are sticky. ``cancel`` sets ``cancel_requested`` at once (the loop checks it at
every step boundary and before any tool starts) and cancels the task, again and again
until it ends: a ``CancelledError`` can be swallowed (on Python 3.11 ``asyncio.wait_for``
drops one that lands as its inner call finishes, and redis-py wraps every socket write
in it), so one ``Task.cancel`` is no promise that the run stops. A cancel recorded in the
store reaches the run with every progress write too (``record_progress`` returns it).
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from typing import Any, AsyncIterator, Callable

from agentd.server.runs.base import RunStore
from agentd.server.runs.records import LeaseLostError, RunRecord
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.events import TERMINAL_PAYLOADS, Payload, RunEvent

log = logging.getLogger("agentd.runs")

# A store write that fails is retried (events keep their order) until this long before the lease ends.
WRITE_RETRY_DELAY_S = 0.2
# A run waiting for the caller re-reads its answers from the store this often (in case a
# control message was lost).
ACTION_POLL_S = 2.0
# A cancelled task that has not ended this long after its cancel is cancelled again (it may
# have swallowed the CancelledError); until it ends.
RECANCEL_S = 0.2
# A watcher gets at most this many events at a time (a slice of the shared buffer).
FOLLOW_BATCH = 500


class ActiveRun:
    #: Told how long each write to a shared store took (seconds, successful writes only; the
    #: capacity metrics' event-write histogram). Inline writes are not timed.
    on_write: Callable[[float], None] | None = None

    def __init__(self, record: RunRecord, store: RunStore, *, retention_s: float, lease_s: float) -> None:
        self.input = record.spec
        self.run_id = record.run_id
        self.attempt = record.attempt
        self.trace_id = record.trace_id
        self.cancel_reason = ""
        self._cancel_requested = False  # sticky: once set, the run ends at its next step boundary
        self._recancel: asyncio.TimerHandle | None = None
        self.task: asyncio.Task[None] | None = None
        self.last_payload: Payload | None = None
        self.first_sequence = record.last_sequence + 1
        self._store = store
        self._retention_s = retention_s
        self._lease_s = lease_s
        self._sequence = record.last_sequence
        self._pending: list[RunEvent] = []
        self._pending_checkpoint: Checkpoint | None = None
        self._checkpoint_waiters: list[asyncio.Future[None]] = []
        self._delivered: list[RunEvent] = []  # durable events of this execution, in order
        self._watchers: list[asyncio.Future[None]] = []
        self._progress: set[Callable[[int], None]] = set()  # told each durable last sequence
        self._dropped = False  # the execution is over and _delivered was let go (watchers use the store)
        self._wakeup = asyncio.Event()
        self._stopped = False  # lease lost or handed off: drop everything from now on
        self.ended = False  # the terminal event is durable
        self._actions: dict[str, dict[str, Any]] = dict(record.actions)  # the caller's answers so far
        self._action_waiters: dict[str, asyncio.Future[None]] = {}
        self._inline = store.inline
        # Done once this execution writes no more: the terminal event is durable, or it stopped.
        self.flusher: asyncio.Future[None]
        if self._inline:  # written as emitted (_write_now): nothing to run
            self.flusher = asyncio.get_running_loop().create_future()
        else:
            self.flusher = asyncio.create_task(self._flush_loop(), name=f"flush {self.run_id}")

    @property
    def event_count(self) -> int:
        return self._sequence

    @property
    def done(self) -> bool:
        return self.task is not None and self.task.done()

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def cancel_requested(self) -> bool:
        """True once the run was cancelled, or must stop (lease lost, handed off): never reset."""
        return self._cancel_requested or self._stopped

    # -- EventSink -----------------------------------------------------------------------

    def emit(self, payload: Payload) -> None:
        if self._stopped:
            return
        self._sequence += 1
        event = RunEvent(self.run_id, self._sequence, time.time_ns(), self.trace_id, payload)
        if isinstance(payload, TERMINAL_PAYLOADS):
            self.last_payload = payload
            if self._inline:
                self._write_now([event], None)
                return
        elif self._inline:  # most events: _write_now and _written, inlined (this runs for every event)
            try:
                cancel_reason = self._store.record_progress_now(
                    self.run_id, self.attempt, (event,), None, now=time.time()
                )
            except Exception as exc:
                self._write_failed(exc)
                return
            if cancel_reason:
                self.cancel(cancel_reason)
            if not self._dropped:
                self._delivered.append(event)
            if self._watchers:
                self._wake_watchers()
            if self._progress:
                for callback in list(self._progress):
                    callback(event.sequence)
            return
        self._pending.append(event)
        self._wakeup.set()

    async def checkpoint(self, checkpoint: Checkpoint) -> None:
        if self._stopped:
            raise asyncio.CancelledError()
        if checkpoint.sequence != self._sequence:  # (the loop fills it in from event_count)
            checkpoint = dataclasses.replace(checkpoint, sequence=self._sequence)
        if self._inline:
            self._write_now([], checkpoint)
            if self._stopped:  # the write failed: as a failed wait for durability
                raise asyncio.CancelledError()
            if checkpoint.pending:
                # Tools follow, and a shared store's write would suspend the run here: let the
                # streams send what the turn emitted (and other runs have a turn) before its tools
                # run, rather than a whole run of instant model turns and tools going out at its end.
                await asyncio.sleep(0)
            return
        self._pending_checkpoint = checkpoint
        self._wakeup.set()
        if not self._store.shared:
            return  # no other process could resume the run: nothing depends on durability now
        tools_follow = bool(checkpoint.pending)
        session_write_follows = self.input.session_id is not None and bool(checkpoint.step_items)
        if not (tools_follow or session_write_follows):
            # Nothing with an effect outside the run follows this checkpoint, so it rides with the
            # next write instead of holding the run up for a round trip. Before tools it is awaited:
            # a replica resuming the run must run the very calls that started (same call ids), not
            # ask the model again; before a session write, so the session never runs ahead of it.
            return
        waiter = asyncio.get_running_loop().create_future()
        self._checkpoint_waiters.append(waiter)
        await waiter

    async def wait_action(self, key: str) -> dict[str, Any]:
        while key not in self._actions:
            if self.cancel_requested:
                raise asyncio.CancelledError()
            waiter = self._action_waiters.get(key)
            if waiter is None:
                waiter = self._action_waiters[key] = asyncio.get_running_loop().create_future()
            # The answer normally arrives by the control bus; re-reading the run now and then
            # covers a lost message.
            done, _ = await asyncio.wait({waiter}, timeout=ACTION_POLL_S)
            if not done:
                await self.refresh_actions()
        return self._actions[key]

    def action_arrived(self, key: str, action: dict[str, Any]) -> None:
        self._actions.setdefault(key, action)  # the first answer wins, as in the store
        waiter = self._action_waiters.pop(key, None)
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def refresh_actions(self) -> None:
        """Pick up answers recorded in the run store (sent to another replica)."""
        try:
            record = await self._store.get_run(self.run_id)
        except StoreUnavailableError as exc:
            log.warning("run %s: cannot read the caller's answers: %s", self.run_id, exc)
            return
        if record is not None:
            for key, action in record.actions.items():
                self.action_arrived(key, action)

    # -- control -------------------------------------------------------------------------

    def cancel(self, reason: str) -> None:
        """End the run with ``run_cancelled`` (the first reason wins): at once when its task takes the
        cancellation, at its next step boundary at the latest (``cancel_requested``)."""
        if self.last_payload is not None or self._stopped:
            return
        if not self._cancel_requested:
            self._cancel_requested = True
            self.cancel_reason = self.cancel_reason or reason
        if self.task is not None and not self.task.done():
            # On the next loop iteration: a task cancelled before its first step never runs its
            # coroutine, so the run would end without its run_cancelled event.
            self.task.get_loop().call_soon(self._cancel_task)

    def _cancel_task(self) -> None:
        task = self.task
        if task is None or task.done() or self.last_payload is not None:
            return
        task.cancel()
        if self._recancel is None:  # again, until the task ends: it may swallow this one
            self._recancel = task.get_loop().call_later(RECANCEL_S, self._cancel_again)

    def _cancel_again(self) -> None:
        self._recancel = None
        self._cancel_task()

    def release_flusher(self) -> None:
        """The execution is over: let the flusher write what is pending and end."""
        if not self.flusher.done() and not self.ended:
            self._stopped = True
            self._wake_flusher()

    async def stop(self, why: str) -> None:
        """Stop executing without ending the run (to hand it off): what was emitted so far is
        still written, nothing after (not even the cancellation's own terminal event)."""
        self._stopped = True
        self._wake_flusher()
        if self.task is not None and not self.task.done():
            self.cancel_reason = why
            self.task.get_loop().call_soon(self._cancel_task)
        await self.wait()

    async def wait(self) -> None:
        if self.task is not None:
            await asyncio.wait({self.task})
        await asyncio.wait({self.flusher})

    # -- watching ------------------------------------------------------------------------

    async def follow(self, after_sequence: int) -> AsyncIterator[list[RunEvent]]:
        """Durable events of this execution after ``after_sequence``; ends after the terminal event,
        or when this execution stops without one, or its buffer was dropped (the caller then
        continues from the store). Each batch is a new list the caller may empty as it goes:
        nothing here holds it while suspended."""
        position = max(after_sequence - self.first_sequence + 1, 0)
        while True:
            if self._dropped:
                return
            if position < len(self._delivered):
                batch = self._delivered[position:position + FOLLOW_BATCH]
                position += len(batch)
                terminal = batch[-1].is_terminal
                yield batch
                del batch
                if terminal:
                    return
                continue
            if self.flusher.done():
                return
            waiter = asyncio.get_running_loop().create_future()
            self._watchers.append(waiter)
            await waiter

    @property
    def durable_sequence(self) -> int:
        """The last sequence written to the store by this execution (or before it)."""
        return self.first_sequence - 1 + len(self._delivered) if not self._dropped else self._sequence

    def on_progress(self, callback: Callable[[int], None]) -> Callable[[], None]:
        """Call ``callback(last durable sequence)`` after each write; returns the unsubscribe."""
        self._progress.add(callback)
        return lambda: self._progress.discard(callback)

    def drop_delivered(self) -> None:
        """The execution is over: let go of its events (the run store has them for as long as it
        keeps the run), so a watcher that never reads pins nothing; watchers go on from the store."""
        self._dropped = True
        self._delivered = []
        self._progress.clear()
        self._wake_watchers()

    # -- writing -------------------------------------------------------------------------

    def _wake_flusher(self) -> None:
        if self._inline:  # everything emitted is written already: the writes are over
            self._writes_over()
        else:
            self._wakeup.set()

    def _writes_over(self) -> None:
        """An inline execution writes no more (its terminal event is durable, or it stopped)."""
        if not self.flusher.done():
            self.flusher.set_result(None)
        self._wake_watchers()

    def _write_now(self, batch: list[RunEvent], checkpoint: Checkpoint | None) -> None:
        """Write on the spot to an inline store (see the module doc): ``_flush_once`` without the
        task, the batching (every write is one event or one checkpoint) and the retries (an
        inline store does no I/O to retry: a failure is a bug, and the run is given up)."""
        terminal = bool(batch) and batch[-1].is_terminal
        cancel_reason = ""
        try:
            if terminal:
                self._store.finish_now(self.run_id, self.attempt, batch, retention_s=self._retention_s, now=time.time())
            else:
                cancel_reason = self._store.record_progress_now(
                    self.run_id, self.attempt, batch, checkpoint, now=time.time()
                ) or ""
        except Exception as exc:
            self._write_failed(exc)
            return
        self._written(batch, cancel_reason)
        if terminal:
            self.ended = True
            self._writes_over()

    def _write_failed(self, exc: Exception) -> None:
        """An inline write failed: this execution writes no more (the flusher's outcomes)."""
        if isinstance(exc, LeaseLostError):
            log.warning("run %s: lease lost (attempt %d); another replica continues it", self.run_id, self.attempt)
            self._stop_and_cancel("this replica lost the run's lease")
        else:  # a bug: stop writing, as the flusher does
            log.error("run %s: writing its events failed; giving the run up", self.run_id, exc_info=exc)
            self._stop_and_cancel("internal error while writing the run's events")
        self._writes_over()

    def _written(self, batch: list[RunEvent], cancel_reason: str) -> None:
        """After a write: apply the cancel it reported, hand its events to watchers and progress."""
        if cancel_reason:
            # Recorded in the store (its control message may be lost): before the waiters go on,
            # so no tool starts after a write that saw the cancel.
            self.cancel(cancel_reason)
        if batch:
            if not self._dropped:
                self._delivered.extend(batch)
            if self._watchers:
                self._wake_watchers()
            if self._progress:
                last = batch[-1].sequence
                for callback in list(self._progress):
                    callback(last)

    async def _flush_loop(self) -> None:
        try:
            while True:
                await self._wakeup.wait()
                self._wakeup.clear()
                while self._pending or self._pending_checkpoint is not None:
                    if not await self._flush_once():
                        return
                if self._stopped or self.ended:
                    return
        except Exception:  # a bug: stop writing; the lease lapses and another replica resumes the run
            log.exception("run %s: writing its events failed; giving the run up", self.run_id)
            self._stop_and_cancel("internal error while writing the run's events")
        finally:
            for waiter in self._checkpoint_waiters:
                if not waiter.done():
                    waiter.set_exception(asyncio.CancelledError())
            self._checkpoint_waiters.clear()
            self._wake_watchers()

    async def _flush_once(self) -> bool:
        """Write the pending events (and checkpoint); False when this execution must stop writing."""
        batch, self._pending = self._pending, []
        checkpoint, self._pending_checkpoint = self._pending_checkpoint, None
        waiters, self._checkpoint_waiters = self._checkpoint_waiters, []
        terminal = bool(batch) and batch[-1].is_terminal
        deadline = time.monotonic() + self._lease_s
        retrying = False
        cancel_reason = ""
        while True:
            try:
                if retrying and batch and await self._already_written(batch[-1].sequence):
                    break  # the failed attempt had written it; only its reply was lost
                started = time.perf_counter()
                if terminal:
                    await self._store.finish(
                        self.run_id, self.attempt, batch, retention_s=self._retention_s, now=time.time()
                    )
                else:
                    cancel_reason = await self._store.record_progress(
                        self.run_id, self.attempt, batch, checkpoint, now=time.time()
                    ) or ""
                if self.on_write is not None:
                    self.on_write(time.perf_counter() - started)
                break
            except LeaseLostError:
                log.warning("run %s: lease lost (attempt %d); another replica continues it", self.run_id, self.attempt)
                self._fail_waiters(waiters)
                self._stop_and_cancel("this replica lost the run's lease")
                return False
            except StoreUnavailableError as exc:
                if time.monotonic() > deadline:
                    log.error("run %s: cannot write to the run store (%s); giving the run up", self.run_id, exc)
                    self._fail_waiters(waiters)
                    self._stop_and_cancel(f"the run store is unavailable: {exc}")
                    return False
                await asyncio.sleep(WRITE_RETRY_DELAY_S)
                retrying = True
        self._written(batch, cancel_reason)
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)
        if terminal:
            self.ended = True
            return False
        return True

    async def _already_written(self, sequence: int) -> bool:
        record = await self._store.get_run(self.run_id)
        return record is not None and record.last_sequence >= sequence and record.attempt == self.attempt

    def _stop_and_cancel(self, why: str) -> None:
        self._stopped = True
        self._pending = []
        if self.task is not None and not self.task.done():
            self.cancel_reason = why
            self.task.get_loop().call_soon(self._cancel_task)

    @staticmethod
    def _fail_waiters(waiters: list[asyncio.Future[None]]) -> None:
        for waiter in waiters:
            if not waiter.done():
                waiter.set_exception(asyncio.CancelledError())

    def _wake_watchers(self) -> None:
        watchers, self._watchers = self._watchers, []
        for waiter in watchers:
            if not waiter.done():
                waiter.set_result(None)
