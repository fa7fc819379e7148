"""The RunStore / ControlBus contract, run against every engine (memory, Redis, Postgres).

Two replicas are two store objects on the same shared data, so the cross-replica
guarantees (a run claimed once, fencing after a takeover, cancel reaching the owner)
are tested the way a deployment exercises them.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
import uuid
from typing import Any, Awaitable, Callable, TypeVar

import pytest

from agentd.server.auth.principal import Principal
from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.memory import MemoryRunStore
from agentd.server.runs.postgres import store as postgres_run_store_module
from agentd.server.runs.postgres.listen import Signal
from agentd.server.runs.postgres.store import PostgresRunStore
from agentd.server.runs.redis.store import RedisRunStore
from agentd.server.runs.records import (
    TENANT_MAX_ACTIVE_RUNS,
    TENANT_MAX_QUEUED_RUNS,
    TENANT_START_RATE,
    Control,
    LeaseLostError,
    QueueFullError,
    RunNotWaitingError,
    RunStatus,
    SessionBusyError,
    SessionPolicy,
    TenantLimitError,
    TenantLimits,
)
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.events import (
    RunCancelled,
    RunCompleted,
    RunEvent,
    RunStarted,
    TextDelta,
    ToolOutput,
)
from agentd.server.runtime.items import MessageItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage
from tests.backends_runs import ENGINES, Replica, run_replicas

LEASE = 30.0
REJECT, ENQUEUE = SessionPolicy.REJECT, SessionPolicy.ENQUEUE

T = TypeVar("T")

# How long a test waits before it calls a wait a hang. Only ever a bound on a failure (the
# test fails, saying what hung), never a measured latency: what the test checks is done by then
# on any machine, however loaded.
GUARD_S = 60.0
# A store wait that only its engine's wake-up can end within the guard.
FOREVER_S = 3600.0


async def guarded(awaitable: Awaitable[T], what: str, guard_s: float = GUARD_S) -> T:
    """``awaitable``'s result; fails the test, naming ``what``, if it has not come within ``guard_s``."""
    try:
        async with asyncio.timeout(guard_s) as scope:
            return await awaitable
    except TimeoutError:
        if scope.expired():
            pytest.fail(f"{what}: still waiting after {guard_s:g}s (a hang)", pytrace=False)
        raise


async def eventually(check: Callable[[], Awaitable[bool]], what: str, guard_s: float = GUARD_S) -> None:
    """Return once ``check()`` is true (asked again after each answer); fail, naming ``what``, after
    ``guard_s``. For states nothing announces (another server's clock, a reconnect)."""

    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.01)

    await guarded(poll(), what, guard_s)


@pytest.fixture
def notify_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """The Postgres run store's fallback poll (a re-check after ``_FALLBACK_POLL_S`` in case a
    NOTIFY was lost) made longer than any guard: a waiter it wakes was woken by LISTEN/NOTIFY
    (or by a reconnect, which re-checks at once). The other engines have no poll: they block
    on their own primitive (an asyncio.Event, XREAD BLOCK)."""
    monkeypatch.setattr(postgres_run_store_module, "_FALLBACK_POLL_S", FOREVER_S)


class _WatchedSignal(Signal):
    """A Postgres wake-up signal that reports each waiter parking on it."""

    def __init__(self, parked: asyncio.Event, gen: int = 0) -> None:
        super().__init__()
        self.gen = gen
        self.parked = parked

    async def wait(self, seen: int, timeout_s: float) -> None:
        self.parked.set()
        await super().wait(seen, timeout_s)


class _WatchedEvent(asyncio.Event):
    """The memory store's wake-up event, reporting each waiter parking on it."""

    def __init__(self, parked: asyncio.Event) -> None:
        super().__init__()
        self.parked = parked

    async def wait(self) -> bool:  # type: ignore[override]
        self.parked.set()
        return await super().wait()


def parking(store: RunStore, run_id: str | None = None) -> asyncio.Event:
    """An event set once a ``claim`` (``run_id`` None) or a ``wait_events`` on ``run_id`` of
    ``store`` found nothing and parked on its engine's wake-up (memory: an asyncio.Event;
    Redis: a blocking XREADGROUP/XREAD; Postgres: the signal its LISTEN connection fires). From
    then on only that wake-up can end the wait early: what a test that must see the wake-up
    work waits for, instead of sleeping and hoping the waiter got there first."""
    parked = asyncio.Event()
    if isinstance(store, PostgresRunStore):
        if run_id is None:
            store._work = _WatchedSignal(parked, store._work.gen)
        else:
            assert run_id not in store._appended, "set up before the wait starts"
            store._appended[run_id] = _WatchedSignal(parked)
    elif isinstance(store, RedisRunStore):
        blocking = store._wait

        async def watched(call: Callable[[], Awaitable[Any]], timeout_s: float) -> Any:
            async def command() -> Any:
                parked.set()  # the blocking read is under way (on its own task)
                return await call()

            return await blocking(command, timeout_s)

        store._wait = watched  # type: ignore[method-assign]
    elif isinstance(store, MemoryRunStore):
        if run_id is None:
            store._work = _WatchedEvent(parked)
        else:
            store._appended[run_id] = _WatchedEvent(parked)
    else:
        raise TypeError(f"no wake-up to watch on {type(store).__name__}")
    return parked


async def live_subscription(publisher: ControlBus, received: asyncio.Queue[Control]) -> None:
    """Return once a message ``publisher`` sends reaches the subscriber feeding ``received``.
    Messages sent before a subscription is live are lost by design (pub/sub, NOTIFY), so a test
    first makes sure it is: probes until one arrives (every probe is ``PROBE``; later ones may
    still be on their way and are to be skipped)."""

    async def handshake() -> None:
        while True:
            await publisher.publish(PROBE)
            try:
                if await asyncio.wait_for(received.get(), 0.05) == PROBE:
                    return
            except TimeoutError:
                continue  # not subscribed yet: that probe was lost, send another

    await guarded(handshake(), "no probe ever reached the subscriber")


async def next_message(received: asyncio.Queue[Control], what: str) -> Control:
    """The next message in ``received`` that is not a probe (see ``live_subscription``)."""

    async def get() -> Control:
        while (message := await received.get()) == PROBE:
            pass
        return message

    return await guarded(get(), what)


PROBE = Control("run_probe", "probe", "")


@pytest.fixture(params=ENGINES)
async def replicas(request: pytest.FixtureRequest):
    async with run_replicas(request.param) as replica:
        yield replica


@pytest.fixture
async def store(replicas: Replica) -> RunStore:
    return (await replicas())[0]


def spec(session: str | None = None, request_id: str = "", text: str = "hello", tenant: str | None = None) -> RunInput:
    """A run spec; ``tenant`` given: started by a principal of that tenant (else the default tenant's)."""
    return RunInput(
        run_id=f"run_{uuid.uuid4().hex}", agent="assistant", input=text, session_id=session, request_id=request_id,
        context={"user": "ü", "n": [1, 2]}, max_turns=5, trace_metadata={"k": "v"},
        principal=Principal("user-1", tenant, method="api_key") if tenant is not None else None,
    )


def events(run_id: str, first: int, count: int, terminal: object = None) -> list[RunEvent]:
    out = [RunEvent(run_id, first + i, time.time_ns(), "t" * 32, TextDelta("assistant", f"d{first + i} ✓"))
           for i in range(count)]
    if terminal is not None:
        out.append(RunEvent(run_id, first + count, time.time_ns(), "t" * 32, terminal))  # type: ignore[arg-type]
    return out


def completed(turns: int = 1) -> RunCompleted:
    return RunCompleted({"answer": 42}, "assistant", Usage(3, 4, 1), turns, 0.5)


def checkpoint(turns: int, sequence: int) -> Checkpoint:
    call = ToolCallItem("call_1", "lookup", '{"q": "x"}', "assistant")
    result = ToolResultItem("call_1", "lookup", "found ü", False, "assistant")
    return Checkpoint(
        agent="billing", turns=turns, usage=Usage(10, 20, turns), history_items=2,
        run_items=(MessageItem("user", "hi"), call, result), step_items=(call, result),
        step_request_id=f"run/{turns}", sequence=sequence, trace_id="a" * 32, span_id="b" * 16,
    )


async def test_create_running_and_round_trip(store: RunStore) -> None:
    s = spec(session="s1", request_id="req-1")
    now = time.time()
    created = await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=now)
    assert created.created
    got = await store.get_run(s.run_id)
    assert got is not None
    assert (got.status, got.owner, got.attempt, got.last_sequence) == (RunStatus.RUNNING, "r1", 1, 0)
    assert got.spec == s
    assert got.lease_expires == pytest.approx(now + LEASE, abs=0.01)
    assert await store.get_run("run_missing") is None
    assert await store.active_run("s1") == s.run_id


async def test_request_id_returns_the_first_run(store: RunStore) -> None:
    first = spec(request_id="req-dup")
    await store.create_run(first, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
    again = await store.create_run(spec(request_id="req-dup"), policy=REJECT, owner="r1", lease_s=LEASE,
                                   max_queued=10, now=time.time())
    assert not again.created
    assert again.record.run_id == first.run_id and again.record.status is RunStatus.QUEUED


async def test_session_reject_and_enqueue(store: RunStore) -> None:
    a = spec(session="busy")
    await store.create_run(a, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())
    with pytest.raises(SessionBusyError) as caught:
        await store.create_run(spec(session="busy"), policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10,
                               now=time.time())
    assert caught.value.run_id == a.run_id
    b, c = spec(session="busy"), spec(session="busy")
    for s in (b, c):
        created = await store.create_run(s, policy=ENQUEUE, owner="r1", lease_s=LEASE, max_queued=10,
                                         now=time.time())
        assert created.record.status is RunStatus.QUEUED  # behind a: not started even though an owner offered
    assert await store.claim("r2", 10, lease_s=LEASE, now=time.time(), wait_s=0) == []
    await store.finish(a.run_id, 1, events(a.run_id, 1, 0, completed()), retention_s=60, now=time.time())
    claimed = await store.claim("r2", 10, lease_s=LEASE, now=time.time(), wait_s=1)
    assert [r.run_id for r in claimed] == [b.run_id]  # c still waits for b
    assert await store.active_run("busy") == b.run_id
    await store.finish(b.run_id, 1, events(b.run_id, 1, 0, completed()), retention_s=60, now=time.time())
    claimed = await store.claim("r2", 10, lease_s=LEASE, now=time.time(), wait_s=1)
    assert [r.run_id for r in claimed] == [c.run_id]


async def test_cancelled_queued_run_lets_the_session_go_on(store: RunStore) -> None:
    a, b, c = spec(session="q"), spec(session="q"), spec(session="q")
    await store.create_run(a, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())
    for s in (b, c):
        await store.create_run(s, policy=ENQUEUE, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
    cancelled = await store.cancel(b.run_id, "not needed", event_time_ns=time.time_ns(), retention_s=60,
                                   now=time.time())
    assert cancelled is not None and cancelled.status is RunStatus.CANCELLED
    assert await store.claim("r2", 10, lease_s=LEASE, now=time.time(), wait_s=0) == []  # a still runs
    await store.finish(a.run_id, 1, events(a.run_id, 1, 0, completed()), retention_s=60, now=time.time())
    claimed = await store.claim("r2", 10, lease_s=LEASE, now=time.time(), wait_s=1)
    assert [r.run_id for r in claimed] == [c.run_id]


async def test_each_queued_run_is_claimed_exactly_once(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    ids = set()
    for _ in range(30):
        s = spec()
        ids.add(s.run_id)
        await one.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100, now=time.time())

    async def claimer(store: RunStore, owner: str) -> list[str]:
        got: list[str] = []
        while True:
            batch = await store.claim(owner, 4, lease_s=LEASE, now=time.time(), wait_s=0.2)
            if not batch:
                return got
            assert all(r.owner == owner and r.attempt == 1 and r.status is RunStatus.RUNNING for r in batch)
            got += [r.run_id for r in batch]

    a, b = await asyncio.gather(claimer(one, "ra"), claimer(two, "rb"))
    assert len(a) + len(b) == 30 and set(a) | set(b) == ids


async def test_claim_wakes_up_when_another_replica_queues(replicas: Replica, notify_only: None) -> None:
    """A claim parked with nothing to claim is woken by the engine's own signal (an event,
    XREADGROUP BLOCK, NOTIFY) when another replica queues a run: its wait is longer than the
    guard and the Postgres fallback poll is off, so nothing else can return it in time."""
    (one, _), (two, _) = await replicas(), await replicas()
    parked = parking(one)
    waiting = asyncio.create_task(one.claim("ra", 5, lease_s=LEASE, now=time.time(), wait_s=FOREVER_S))
    try:
        await guarded(parked.wait(), "the claim never parked")
        s = spec()
        await two.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
        claimed = await guarded(waiting, "the parked claim was not woken by the queued run")
        assert [r.run_id for r in claimed] == [s.run_id]
    finally:
        waiting.cancel()


async def test_queue_limit(store: RunStore) -> None:
    for _ in range(2):
        await store.create_run(spec(), policy=REJECT, owner=None, lease_s=LEASE, max_queued=2, now=time.time())
    with pytest.raises(QueueFullError):
        await store.create_run(spec(), policy=REJECT, owner=None, lease_s=LEASE, max_queued=2, now=time.time())
    # A run the creating replica executes itself is not queued, so the limit does not apply.
    await store.create_run(spec(), policy=REJECT, owner="r1", lease_s=LEASE, max_queued=2, now=time.time())


async def test_runs_queued_behind_their_session_count_against_the_queue_limit(store: RunStore) -> None:
    kw = {"lease_s": LEASE, "max_queued": 3}
    head = spec(session="crowded")
    await store.create_run(head, policy=ENQUEUE, owner="r1", now=time.time(), **kw)  # running: not queued
    behind = [spec(session="crowded") for _ in range(2)]
    for s in behind:
        await store.create_run(s, policy=ENQUEUE, owner="r1", now=time.time(), **kw)
    await store.create_run(spec(), policy=REJECT, owner=None, now=time.time(), **kw)  # claimable: 3 queued
    with pytest.raises(QueueFullError):  # behind its session is queued too
        await store.create_run(spec(session="crowded"), policy=ENQUEUE, owner="r1", now=time.time(), **kw)
    with pytest.raises(QueueFullError):
        await store.create_run(spec(session="elsewhere"), policy=ENQUEUE, owner=None, now=time.time(), **kw)
    with pytest.raises(QueueFullError):
        await store.create_run(spec(), policy=REJECT, owner=None, now=time.time(), **kw)
    # A run that executes at once is not queued; a queued run that ends makes room.
    await store.create_run(spec(session="free"), policy=ENQUEUE, owner="r1", now=time.time(), **kw)
    await store.cancel(behind[1].run_id, "not needed", event_time_ns=time.time_ns(), retention_s=60, now=time.time())
    await store.create_run(spec(session="crowded"), policy=ENQUEUE, owner="r1", now=time.time(), **kw)
    with pytest.raises(QueueFullError):
        await store.create_run(spec(session="crowded"), policy=ENQUEUE, owner="r1", now=time.time(), **kw)
    # The head ends: the next run of the session becomes claimable, still one of the 3 queued.
    await store.finish(head.run_id, 1, events(head.run_id, 1, 0, completed()), retention_s=60, now=time.time())
    with pytest.raises(QueueFullError):
        await store.create_run(spec(), policy=REJECT, owner=None, now=time.time(), **kw)


async def test_events_and_checkpoint_are_recorded_in_order(store: RunStore) -> None:
    s = spec()
    await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())
    first = [RunEvent(s.run_id, 1, time.time_ns(), "t" * 32, RunStarted("assistant", "", 0, "req")),
             *events(s.run_id, 2, 3)]
    await store.record_progress(s.run_id, 1, first, None, now=time.time())
    cp = checkpoint(turns=1, sequence=4)
    output = ToolOutput("assistant", ToolResultItem("c", "t", "out", True, "assistant"), 0.25)
    await store.record_progress(s.run_id, 1, [RunEvent(s.run_id, 5, time.time_ns(), "t" * 32, output)], cp,
                                now=time.time())
    await store.record_progress(s.run_id, 1, [], checkpoint(turns=2, sequence=5), now=time.time())
    with pytest.raises(ValueError):  # a gap is a bug in the caller, never stored
        await store.record_progress(s.run_id, 1, events(s.run_id, 7, 1), None, now=time.time())
    read = await store.read_events(s.run_id, 0, 100)
    assert [e.sequence for e in read] == [1, 2, 3, 4, 5]
    assert read[0].payload == first[0].payload and read[4].payload == output
    assert read[1] == first[1]
    assert [e.sequence for e in await store.read_events(s.run_id, 3, 1)] == [4]
    got = await store.get_run(s.run_id)
    assert got is not None and got.last_sequence == 5 and got.checkpoint == checkpoint(turns=2, sequence=5)
    assert got.trace_id == "t" * 32


async def test_takeover_fences_the_old_owner(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    s = spec(session="take")
    t0 = time.time()
    await one.create_run(s, policy=REJECT, owner="ra", lease_s=0.5, max_queued=10, now=t0)
    await one.record_progress(s.run_id, 1, events(s.run_id, 1, 2), checkpoint(1, 2), now=t0)
    assert await two.requeue_expired(now=t0 + 0.1) == []  # lease still valid
    assert await two.requeue_expired(now=t0 + 1.0) == [s.run_id]
    assert await one.requeue_expired(now=t0 + 1.0) == []  # requeued once
    claimed = await two.claim("rb", 5, lease_s=LEASE, now=t0 + 1.0, wait_s=1)
    assert [(r.run_id, r.attempt, r.last_sequence) for r in claimed] == [(s.run_id, 2, 2)]
    assert claimed[0].checkpoint == checkpoint(1, 2)
    with pytest.raises(LeaseLostError):
        await one.record_progress(s.run_id, 1, events(s.run_id, 3, 1), None, now=t0 + 1.1)
    with pytest.raises(LeaseLostError):
        await one.finish(s.run_id, 1, events(s.run_id, 3, 0, completed()), retention_s=60, now=t0 + 1.1)
    renewed = await one.renew("ra", {s.run_id: 1}, lease_s=LEASE, now=t0 + 1.1)
    assert renewed.lost == {s.run_id}
    await two.finish(s.run_id, 2, events(s.run_id, 3, 1, completed(2)), retention_s=60, now=t0 + 1.2)
    assert [e.sequence for e in await one.read_events(s.run_id, 0, 100)] == [1, 2, 3, 4]
    assert await one.active_run("take") is None


async def test_renew_extends_and_reports_cancels(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    s, other = spec(), spec()
    t0 = time.time()
    for run in (s, other):
        await one.create_run(run, policy=REJECT, owner="ra", lease_s=1.0, max_queued=10, now=t0)
    outcome = await one.renew("ra", {s.run_id: 1, other.run_id: 1}, lease_s=5.0, now=t0 + 0.5)
    assert outcome.lost == set() and outcome.cancel == {}
    assert await two.requeue_expired(now=t0 + 2.0) == []  # renewed until t0 + 5.5
    cancelled = await two.cancel(s.run_id, "user asked", event_time_ns=time.time_ns(), retention_s=60, now=t0 + 2)
    assert cancelled is not None and cancelled.status is RunStatus.RUNNING and cancelled.cancel_reason == "user asked"
    await two.cancel(s.run_id, "second reason", event_time_ns=time.time_ns(), retention_s=60, now=t0 + 2)
    outcome = await one.renew("ra", {s.run_id: 1, other.run_id: 1}, lease_s=5.0, now=t0 + 2.1)
    assert outcome.cancel == {s.run_id: "user asked"}
    assert (await one.renew("rX", {s.run_id: 1}, lease_s=5, now=t0 + 2.2)).lost == {s.run_id}
    assert (await one.renew("ra", {"run_gone": 1}, lease_s=5, now=t0 + 2.2)).lost == {"run_gone"}


async def test_cancel_queued_ends_it_with_an_event(store: RunStore) -> None:
    s = spec(session="cq")
    await store.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
    ended = await store.cancel(s.run_id, "changed my mind", event_time_ns=123, retention_s=60, now=time.time())
    assert ended is not None and ended.status is RunStatus.CANCELLED
    assert ended.result == RunCancelled("changed my mind", Usage(), 0)
    log = await store.read_events(s.run_id, 0, 10)
    assert [(e.sequence, e.payload, e.time_ns) for e in log] == [(1, RunCancelled("changed my mind", Usage(), 0), 123)]
    assert await store.claim("r1", 5, lease_s=LEASE, now=time.time(), wait_s=0) == []
    assert await store.active_run("cq") is None
    again = await store.cancel(s.run_id, "again", event_time_ns=1, retention_s=60, now=time.time())
    assert again is not None and again.result == ended.result and again.last_sequence == 1
    assert await store.cancel("run_missing", "x", event_time_ns=1, retention_s=60, now=time.time()) is None


async def test_release_hands_the_run_back_at_once(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    s = spec()
    await one.create_run(s, policy=REJECT, owner="ra", lease_s=LEASE, max_queued=10, now=time.time())
    await one.record_progress(s.run_id, 1, events(s.run_id, 1, 1), checkpoint(1, 1), now=time.time())
    assert not await one.release(s.run_id, 7, now=time.time())
    assert await one.release(s.run_id, 1, now=time.time())
    claimed = await two.claim("rb", 5, lease_s=LEASE, now=time.time(), wait_s=1)
    assert [(r.run_id, r.attempt, r.owner) for r in claimed] == [(s.run_id, 2, "rb")]
    assert claimed[0].checkpoint == checkpoint(1, 1)


async def test_finish_records_result_and_retention(store: RunStore) -> None:
    retention_s = 600.0
    s = spec(session="fin", request_id="req-fin")
    await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())
    finished_at = time.time()
    await store.finish(s.run_id, 1, events(s.run_id, 1, 2, completed(3)), retention_s=retention_s, now=finished_at)
    done = await store.get_run(s.run_id)
    assert done is not None
    assert (done.status, done.result, done.owner, done.last_sequence) == (RunStatus.COMPLETED, completed(3), "", 3)
    assert await store.active_run("fin") is None
    runs, _ = await store.list_runs("fin", 10)
    assert [r.run_id for r in runs] == [s.run_id]
    # A sweep at a time within the retention keeps the run; one past it deletes it. The sweep
    # takes the time as ``now``, so no test time passes (Redis also drops the keys on its own
    # clock when the retention ends: a retention nobody waits out keeps that from racing the
    # checks above).
    assert await store.sweep(now=finished_at + retention_s - 1) == 0
    assert await store.get_run(s.run_id) is not None
    await store.sweep(now=finished_at + retention_s + 1)
    assert await store.get_run(s.run_id) is None
    assert await store.read_events(s.run_id, 0, 10) == []
    assert (await store.list_runs("fin", 10))[0] == []
    # The request id is forgotten with the run.
    fresh = await store.create_run(spec(request_id="req-fin"), policy=REJECT, owner=None, lease_s=LEASE,
                                   max_queued=10, now=time.time())
    assert fresh.created


async def test_list_runs_pages_newest_first(store: RunStore) -> None:
    made = []
    t0 = time.time()
    for i in range(5):
        s = spec(session="listed")
        made.append(s.run_id)
        await store.create_run(s, policy=ENQUEUE, owner=None, lease_s=LEASE, max_queued=10, now=t0 + i)
    await store.create_run(spec(session="other"), policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=t0)
    seen, cursor = [], None
    while True:
        page, cursor = await store.list_runs("listed", 2, cursor)
        seen += [r.run_id for r in page]
        if cursor is None:
            break
    assert seen == made[::-1]
    assert (await store.list_runs("nobody", 10)) == ([], None)


async def test_wait_events_follows_appends_from_another_replica(replicas: Replica, notify_only: None) -> None:
    """A ``wait_events`` parked on an empty log is woken by the engine's own signal when another
    replica appends (not by a poll: the Postgres fallback poll is off, the wait outlasts the guard)."""
    (one, _), (two, _) = await replicas(), await replicas()
    s = spec()
    await one.create_run(s, policy=REJECT, owner="ra", lease_s=LEASE, max_queued=10, now=time.time())
    assert await two.wait_events(s.run_id, 0, limit=10, timeout_s=0.2) == []
    parked = parking(two, s.run_id)
    waiter = asyncio.create_task(two.wait_events(s.run_id, 0, limit=10, timeout_s=FOREVER_S))
    try:
        await guarded(parked.wait(), "wait_events never parked")
        await one.record_progress(s.run_id, 1, events(s.run_id, 1, 2), None, now=time.time())
        got = await guarded(waiter, "the parked wait_events was not woken by the append")
        assert [e.sequence for e in got] == [1, 2]
    finally:
        waiter.cancel()


async def test_control_reaches_other_replicas(replicas: Replica) -> None:
    """A message published on one replica's bus reaches a live subscriber on another's, intact.
    The bus has no poll and no store behind it: the message arrives pushed, or never."""
    (_, bus_a), (_, bus_b) = await replicas(), await replicas()
    received: asyncio.Queue[Control] = asyncio.Queue()

    async def listen(bus: ControlBus) -> None:
        async for message in bus.subscribe():
            received.put_nowait(message)

    listener = asyncio.create_task(listen(bus_a))
    try:
        await live_subscription(bus_b, received)
        await bus_b.publish(Control("run_x", "cancel", "stop ü"))
        message = await next_message(received, "the control message never reached the other replica")
        assert message == Control("run_x", "cancel", "stop ü")
    finally:
        listener.cancel()


async def test_caller_actions_are_recorded_once_and_travel_with_the_run(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    s = spec()
    t0 = time.time()
    await one.create_run(s, policy=REJECT, owner="ra", lease_s=0.5, max_queued=10, now=t0)
    answer = {"output": "42 ü \u0000", "is_error": False}
    got = await two.submit_action(s.run_id, "output:call_1", answer, now=t0)
    assert got is not None and got.actions == {"output:call_1": answer}
    again = await two.submit_action(s.run_id, "output:call_1", {"output": "other", "is_error": True}, now=t0)
    assert again is not None and again.actions == {"output:call_1": answer}  # the first answer wins
    approval = {"approved": False, "reason": "too expensive"}
    await one.submit_action(s.run_id, "approval:call_2", approval, now=t0)
    # A replica taking the run over sees the answers.
    await two.requeue_expired(now=t0 + 1)
    claimed = await two.claim("rb", 5, lease_s=LEASE, now=t0 + 1, wait_s=1)
    assert claimed[0].actions == {"output:call_1": answer, "approval:call_2": approval}
    await two.finish(s.run_id, 2, events(s.run_id, 1, 0, completed()), retention_s=60, now=t0 + 2)
    late = await one.submit_action(s.run_id, "output:call_3", answer, now=t0 + 2)
    assert late is not None and "output:call_3" not in late.actions  # an ended run takes no answers
    assert (await one.get_run(s.run_id)).actions == {"output:call_1": answer, "approval:call_2": approval}
    assert await one.submit_action("run_missing", "output:x", answer, now=t0) is None


# -- the caller's answers (submit_answers) ----------------------------------------------------

OUT1, OUT3, APPROVE2 = "output:call_1", "output:call_3", "approval:call_2"


async def waiting_run(replicas: Replica, *awaiting: str) -> tuple[RunStore, RunStore, RunInput]:
    """Two replicas' stores and a run executed by replica one ("ra", attempt 1) whose checkpoint
    waits for ``awaiting`` (action keys)."""
    (one, _), (two, _) = await replicas(), await replicas()
    s = spec()
    now = time.time()
    await one.create_run(s, policy=REJECT, owner="ra", lease_s=LEASE, max_queued=10, now=now)
    await one.record_progress(s.run_id, 1, events(s.run_id, 1, 1), waiting(awaiting, sequence=1), now=now)
    return one, two, s


def waiting(awaiting: tuple[str, ...], sequence: int) -> Checkpoint:
    calls = tuple(ToolCallItem(key.partition(":")[2], "lookup", "{}", "assistant") for key in awaiting)
    return dataclasses.replace(checkpoint(1, sequence), pending=calls, awaiting=awaiting)


async def refusal(call: Awaitable[object]) -> RunNotWaitingError:
    with pytest.raises(RunNotWaitingError) as caught:
        await call
    return caught.value


async def test_a_repeated_answer_is_taken_and_recorded_once(replicas: Replica) -> None:
    one, two, s = await waiting_run(replicas, OUT1, APPROVE2)
    output, approval = {"output": '42 ü \u0000 "q" \\n', "is_error": False}, {"approved": True, "reason": "fine"}
    first = await one.submit_answers(s.run_id, [(OUT1, output)], now=time.time())
    assert first is not None and first.recorded == (OUT1,) and first.record.actions == {OUT1: output}
    again = await two.submit_answers(s.run_id, [(OUT1, dict(output))], now=time.time())
    assert again is not None and again.recorded == () and again.record.actions == {OUT1: output}
    assert again.record.awaiting == (APPROVE2,)
    error = await refusal(two.submit_answers(s.run_id, [(OUT1, {**output, "output": '42 ü \u0000 "q" \\N'})],
                                             now=time.time()))
    assert error.reason == "ANSWER_CONFLICT"
    assert (await two.submit_answers(s.run_id, [(APPROVE2, approval)], now=time.time())).recorded == (APPROVE2,)
    # The same decision is the same answer, whatever its reason says; the first reason stands.
    repeat = await one.submit_answers(s.run_id, [(APPROVE2, {"approved": True, "reason": "retry"})], now=time.time())
    assert repeat is not None and repeat.recorded == () and repeat.record.actions == {OUT1: output, APPROVE2: approval}
    # Both at once, one of them a repeat: taken, only the new one recorded.
    _, _, s2 = await waiting_run(replicas, OUT1, OUT3)
    await one.submit_answers(s2.run_id, [(OUT1, output)], now=time.time())
    both = await two.submit_answers(s2.run_id, [(OUT1, output), (OUT3, output)], now=time.time())
    assert both is not None and both.recorded == (OUT3,) and both.record.awaiting == ()
    assert await one.submit_answers("run_missing", [(OUT1, output)], now=time.time()) is None
    with pytest.raises(ValueError):
        await one.submit_answers(s.run_id, [(OUT1, output), (OUT1, output)], now=time.time())


@pytest.mark.parametrize("first", ["one", "two"])
@pytest.mark.parametrize("key", [OUT1, APPROVE2])
async def test_identical_answers_sent_at_once_are_both_taken_and_recorded_once(
    replicas: Replica, first: str, key: str
) -> None:
    one, two, s = await waiting_run(replicas, OUT1, APPROVE2)
    answer = {"output": "same", "is_error": True} if key == OUT1 else {"approved": False, "reason": "no"}
    stores = (one, two) if first == "one" else (two, one)
    results = await asyncio.gather(*(store.submit_answers(s.run_id, [(key, dict(answer))], now=time.time())
                                     for store in stores))
    assert all(r is not None and r.record.actions == {key: answer} for r in results)
    assert sorted(len(r.recorded) for r in results) == [0, 1]  # applied once
    got = await one.get_run(s.run_id)
    assert got is not None and got.actions == {key: answer}


async def test_a_different_answer_for_an_answered_call_is_refused(replicas: Replica) -> None:
    one, two, s = await waiting_run(replicas, OUT1, APPROVE2, OUT3)
    long_output = "x" * 500 + " the end"
    await one.submit_answers(s.run_id, [(OUT1, {"output": long_output, "is_error": False})], now=time.time())
    before = await one.get_run(s.run_id)
    for changed in ({"output": "other", "is_error": False}, {"output": long_output, "is_error": True}):
        error = await refusal(two.submit_answers(s.run_id, [(OUT1, changed)], now=time.time()))
        assert (error.reason, error.run_id, error.call_id) == ("ANSWER_CONFLICT", s.run_id, "call_1")
        assert error.waiting_for == ["call_2", "call_3"]
        text = str(error)
        assert "has a tool output for call 'call_1'" in text and "'xxxx" in text and "the end" not in text
        assert len(text) < 400 and "output:" not in text and "approval:" not in text
    await one.submit_answers(s.run_id, [(APPROVE2, {"approved": True, "reason": ""})], now=time.time())
    error = await refusal(two.submit_answers(s.run_id, [(APPROVE2, {"approved": False, "reason": "no"})],
                                             now=time.time()))
    assert (error.reason, error.call_id, error.waiting_for) == ("ANSWER_CONFLICT", "call_2", ["call_3"])
    assert "call 'call_2'" in str(error) and "approved" in str(error) and "approval:" not in str(error)
    # One refused answer refuses the call: the new answer beside it is not recorded either.
    error = await refusal(one.submit_answers(
        s.run_id, [(OUT3, {"output": "new", "is_error": False}), (OUT1, {"output": "other", "is_error": False})],
        now=time.time()))
    assert error.reason == "ANSWER_CONFLICT" and error.call_id == "call_1"
    after = await two.get_run(s.run_id)
    assert after is not None and OUT3 not in after.actions and after.awaiting == (OUT3,)
    assert after.actions == {**before.actions, APPROVE2: {"approved": True, "reason": ""}}


async def test_an_answer_for_a_call_the_run_does_not_wait_for_is_refused(replicas: Replica) -> None:
    one, two, s = await waiting_run(replicas, OUT1, APPROVE2)
    output = {"output": "x", "is_error": False}
    error = await refusal(two.submit_answers(s.run_id, [("output:nope", output)], now=time.time()))
    assert (error.reason, error.run_id, error.call_id) == ("RUN_NOT_WAITING", s.run_id, "nope")
    assert error.waiting_for == ["call_1", "call_2"]
    assert str(error) == (f"run {s.run_id} is not waiting for call 'nope'; it waits for a tool output for call "
                          "'call_1' and an approval for call 'call_2'")
    # The wrong kind of answer for a call it waits for.
    error = await refusal(one.submit_answers(s.run_id, [("output:call_2", output)], now=time.time()))
    assert (error.reason, error.call_id, error.waiting_for) == ("RUN_NOT_WAITING", "call_2", ["call_1", "call_2"])
    assert str(error).startswith(f"run {s.run_id} is not waiting for a tool output for call 'call_2'; it waits for")
    assert "output:" not in str(error) and "approval:" not in str(error)
    got = await one.get_run(s.run_id)
    assert got is not None and got.actions == {} and got.awaiting == (OUT1, APPROVE2)


async def test_answers_after_the_run_moved_on_and_after_it_ended(replicas: Replica) -> None:
    one, two, s = await waiting_run(replicas, OUT1)
    output = {"output": "42", "is_error": False}
    await two.submit_answers(s.run_id, [(OUT1, output)], now=time.time())
    # The run used the answer and waits for the next call's approval.
    await one.record_progress(s.run_id, 1, events(s.run_id, 2, 1), waiting((APPROVE2,), sequence=2), now=time.time())
    again = await two.submit_answers(s.run_id, [(OUT1, output)], now=time.time())
    assert again is not None and again.recorded == () and again.record.awaiting == (APPROVE2,)
    error = await refusal(two.submit_answers(s.run_id, [(OUT1, {"output": "43", "is_error": False})],
                                             now=time.time()))
    assert error.reason == "ANSWER_CONFLICT" and error.waiting_for == ["call_2"]
    await two.submit_answers(s.run_id, [(APPROVE2, {"approved": False, "reason": "no"})], now=time.time())
    await one.finish(s.run_id, 1, events(s.run_id, 3, 0, completed()), retention_s=60, now=time.time())
    # Ended: a repeat is still taken (the answer is in the record until its retention ends)...
    ended = await two.submit_answers(s.run_id, [(OUT1, output), (APPROVE2, {"approved": False, "reason": ""})],
                                     now=time.time())
    assert ended is not None and ended.recorded == () and ended.record.status is RunStatus.COMPLETED
    # ...a different one is a conflict, and nothing new is taken.
    error = await refusal(one.submit_answers(s.run_id, [(APPROVE2, {"approved": True, "reason": ""})],
                                             now=time.time()))
    assert (error.reason, error.waiting_for) == ("ANSWER_CONFLICT", []) and "denied" in str(error)
    assert "ended" in str(error)
    error = await refusal(one.submit_answers(s.run_id, [(OUT3, output)], now=time.time()))
    assert (error.reason, error.call_id, error.waiting_for) == ("RUN_NOT_WAITING", "call_3", [])
    assert "has ended (completed)" in str(error) and "output:" not in str(error)


async def test_an_answer_written_by_submit_action_counts_as_recorded(replicas: Replica) -> None:
    one, two, s = await waiting_run(replicas, OUT1)
    output = {"output": "nul \x00 ü", "is_error": False}
    await one.submit_action(s.run_id, OUT1, output, now=time.time())
    taken = await two.submit_answers(s.run_id, [(OUT1, dict(output))], now=time.time())
    assert taken is not None and taken.recorded == () and taken.record.actions == {OUT1: output}
    error = await refusal(two.submit_answers(s.run_id, [(OUT1, {**output, "output": "other"})], now=time.time()))
    assert error.reason == "ANSWER_CONFLICT" and error.call_id == "call_1"


async def test_a_queued_run_takes_answers_for_its_checkpoint(replicas: Replica) -> None:
    """Between executions (lease expired, not claimed again) the run still waits for its answers."""
    one, two, s = await waiting_run(replicas, OUT1)
    assert await two.requeue_expired(now=time.time() + LEASE + 1) == [s.run_id]
    taken = await two.submit_answers(s.run_id, [(OUT1, {"output": "1", "is_error": False})], now=time.time())
    assert taken is not None and taken.recorded == (OUT1,) and taken.record.status is RunStatus.QUEUED
    claimed = await one.claim("rb", 5, lease_s=LEASE, now=time.time(), wait_s=1)
    assert claimed[0].actions == {OUT1: {"output": "1", "is_error": False}} and claimed[0].awaiting == ()


# -- per-tenant limits --------------------------------------------------------------------


async def refused(store: RunStore, s: RunInput, limit_name: str, **kwargs: object) -> TenantLimitError:
    """Create ``s`` expecting a TenantLimitError naming ``limit_name``; check nothing was created."""
    options: dict[str, object] = {"policy": REJECT, "owner": None, "lease_s": LEASE, "max_queued": 100, "now": time.time()}
    with pytest.raises(TenantLimitError) as caught:
        await store.create_run(s, **{**options, **kwargs})  # type: ignore[arg-type]
    assert caught.value.limit_name == limit_name and caught.value.tenant == s.tenant
    assert limit_name in str(caught.value) and repr(s.tenant) in str(caught.value)
    assert await store.get_run(s.run_id) is None  # a refused start creates nothing
    if s.session_id is not None:
        assert s.run_id not in [r.run_id for r in (await store.list_runs(s.session_id, 100))[0]]
    return caught.value


async def test_tenant_active_limit_counts_unfinished_runs_per_tenant(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    limits = TenantLimits(max_active=2)
    t0 = time.time()
    kw = {"lease_s": LEASE, "max_queued": 100, "now": t0, "limits": limits}
    running = spec(tenant="acme", request_id="req-acme")
    queued = spec(tenant="acme", session="acme-s")
    await one.create_run(running, policy=REJECT, owner="ra", **kw)  # type: ignore[arg-type]
    await two.create_run(queued, policy=REJECT, owner=None, **kw)  # type: ignore[arg-type]

    # The third unfinished run is refused on every replica, however it would start.
    error = await refused(two, spec(tenant="acme"), TENANT_MAX_ACTIVE_RUNS, limits=limits)
    assert error.limit == 2 and error.retry_after_s is None and "unfinished" in str(error)
    await refused(one, spec(tenant="acme"), TENANT_MAX_ACTIVE_RUNS, owner="ra", limits=limits)
    await refused(one, spec(tenant="acme", session="acme-s"), TENANT_MAX_ACTIVE_RUNS, policy=ENQUEUE, limits=limits)
    # A request id retry returns its run, never refused.
    again = await two.create_run(spec(tenant="acme", request_id="req-acme"), policy=REJECT, owner="rb",
                                 **kw)  # type: ignore[arg-type]
    assert not again.created and again.record.run_id == running.run_id
    # Other tenants count their own runs.
    for tenant in ("globex", None):
        for _ in range(2):
            created = await one.create_run(spec(tenant=tenant), policy=REJECT, owner=None, **kw)  # type: ignore[arg-type]
            assert created.created
    await refused(two, spec(tenant="globex"), TENANT_MAX_ACTIVE_RUNS, limits=limits)
    # Without limits (a replica configured without them) nothing is refused.
    assert (await two.create_run(spec(tenant="globex"), policy=REJECT, owner=None, lease_s=LEASE, max_queued=100,
                                 now=t0)).created

    # A run that ends frees its slot: finished ...
    await one.finish(running.run_id, 1, events(running.run_id, 1, 0, completed()), retention_s=60, now=t0)
    third = spec(tenant="acme")
    await two.create_run(third, policy=REJECT, owner="rb", **kw)  # type: ignore[arg-type]
    await refused(one, spec(tenant="acme"), TENANT_MAX_ACTIVE_RUNS, limits=limits)
    # ... or a queued run cancelled.
    await one.cancel(queued.run_id, "not needed", event_time_ns=time.time_ns(), retention_s=60, now=t0)
    fourth = spec(tenant="acme")
    assert (await one.create_run(fourth, policy=REJECT, owner=None, **kw)).created  # type: ignore[arg-type]
    # A run waiting for the caller is unfinished; cancelling a running run only asks it to stop.
    waiting = Checkpoint(agent="a", turns=1, usage=Usage(), history_items=0, run_items=(), step_items=(),
                         step_request_id="s", sequence=0, awaiting=("approval:call_1",))
    await two.record_progress(third.run_id, 1, [], waiting, now=t0)
    assert (await one.get_run(third.run_id)).visible_status is RunStatus.REQUIRES_ACTION  # type: ignore[union-attr]
    await refused(one, spec(tenant="acme"), TENANT_MAX_ACTIVE_RUNS, limits=limits)
    asked = await one.cancel(third.run_id, "stop", event_time_ns=time.time_ns(), retention_s=60, now=t0)
    assert asked is not None and asked.status is RunStatus.RUNNING
    await refused(one, spec(tenant="acme"), TENANT_MAX_ACTIVE_RUNS, limits=limits)
    await two.finish(third.run_id, 1, events(third.run_id, 1, 0, RunCancelled("stop", Usage(), 1)), retention_s=0.5,
                     now=t0)
    # Sweeping ended runs changes nothing in the count.
    assert await one.sweep(now=t0 + 10) >= 1
    fifth = spec(tenant="acme")
    assert (await two.create_run(fifth, policy=REJECT, owner=None, **kw)).created  # type: ignore[arg-type]
    await refused(one, spec(tenant="acme"), TENANT_MAX_ACTIVE_RUNS, limits=limits)


async def test_tenant_queued_limit_counts_runs_waiting_in_the_queue(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    limits = TenantLimits(max_queued=2)
    t0 = time.time()
    kw = {"lease_s": LEASE, "max_queued": 100, "now": t0, "limits": limits}
    a, b = spec(tenant="acme"), spec(tenant="acme")
    for s in (a, b):
        await one.create_run(s, policy=REJECT, owner=None, **kw)  # type: ignore[arg-type]
    error = await refused(two, spec(tenant="acme"), TENANT_MAX_QUEUED_RUNS, limits=limits)
    assert error.limit == 2 and error.retry_after_s is None
    # Runs that do not join the queue are not refused: executed by their creator, or behind their session.
    session_head = spec(tenant="acme", session="qs")
    assert (await two.create_run(session_head, policy=REJECT, owner="rb", **kw)).created  # type: ignore[arg-type]
    behind = spec(tenant="acme", session="qs")
    assert (await two.create_run(behind, policy=ENQUEUE, owner=None, **kw)).record.status is RunStatus.QUEUED  # type: ignore[arg-type]
    await refused(one, spec(tenant="acme"), TENANT_MAX_QUEUED_RUNS, limits=limits)
    # Another tenant has its own share of the queue.
    globex = spec(tenant="globex")
    await one.create_run(globex, policy=REJECT, owner=None, **kw)  # type: ignore[arg-type]

    # A claimed run left the queue: room for one more.
    claimed = await two.claim("rb", 1, lease_s=LEASE, now=t0, wait_s=1)
    assert [r.run_id for r in claimed] == [a.run_id]
    c = spec(tenant="acme")
    await one.create_run(c, policy=REJECT, owner=None, **kw)  # type: ignore[arg-type]
    await refused(two, spec(tenant="acme"), TENANT_MAX_QUEUED_RUNS, limits=limits)
    # A cancelled queued run too.
    await two.cancel(b.run_id, "no", event_time_ns=time.time_ns(), retention_s=60, now=t0)
    d = spec(tenant="acme")
    await two.create_run(d, policy=REJECT, owner=None, **kw)  # type: ignore[arg-type]
    # A run handed back joins the queue again (never refused) and counts: c, d and a are queued now.
    assert await two.release(a.run_id, 1, now=t0)
    await refused(one, spec(tenant="acme"), TENANT_MAX_QUEUED_RUNS, limits=limits)
    claimed = await one.claim("ra", 10, lease_s=LEASE, now=t0, wait_s=1)
    assert {r.run_id for r in claimed} == {globex.run_id, a.run_id, c.run_id, d.run_id}
    # So does a run its session lets go when the earlier run ends: behind, then e, are queued now.
    await two.finish(session_head.run_id, 1, events(session_head.run_id, 1, 0, completed()), retention_s=60, now=t0)
    e = spec(tenant="acme")
    assert (await one.create_run(e, policy=REJECT, owner=None, **kw)).created  # type: ignore[arg-type]
    await refused(one, spec(tenant="acme"), TENANT_MAX_QUEUED_RUNS, limits=limits)
    claimed = await two.claim("rb", 10, lease_s=LEASE, now=t0, wait_s=1)
    assert {r.run_id for r in claimed} == {behind.run_id, e.run_id}
    assert (await one.create_run(spec(tenant="acme"), policy=REJECT, owner=None, **kw)).created  # type: ignore[arg-type]


async def test_tenant_start_rate_is_a_token_bucket_per_tenant(replicas: Replica) -> None:
    (one, _), (two, _) = await replicas(), await replicas()
    limits = TenantLimits(start_rate=0.5, start_burst=2)
    t0 = time.time()

    async def start(store: RunStore, at: float, **fields: object) -> bool:
        s = spec(**{"tenant": "acme", **fields})  # type: ignore[arg-type]
        created = await store.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100, now=at,
                                         limits=limits)
        return created.created

    # A burst of two, on any replica; the third waits for the refill (0.5 per second).
    assert await start(one, t0, request_id="req-rate", session="rs")
    assert await start(two, t0)
    error = await refused(one, spec(tenant="acme"), TENANT_START_RATE, limits=limits, now=t0)
    assert error.retry_after_s == pytest.approx(2.0) and error.limit == 0.5
    assert "AGENTD_TENANT_START_BURST" in str(error) and "retry in 2.00s" in str(error)
    error = await refused(two, spec(tenant="acme"), TENANT_START_RATE, limits=limits, now=t0 + 1.5)
    assert error.retry_after_s == pytest.approx(0.5)
    # Each tenant has its own bucket.
    assert await start(one, t0, tenant="globex")
    # A request id retry is never refused, and takes no token.
    again = await two.create_run(spec(tenant="acme", request_id="req-rate"), policy=REJECT, owner=None,
                                 lease_s=LEASE, max_queued=100, now=t0 + 2, limits=limits)
    assert not again.created
    # A start refused by another check takes no token either.
    with pytest.raises(SessionBusyError):
        await start(one, t0 + 2, session="rs")
    assert await start(two, t0 + 2)  # the one token refilled by then
    await refused(one, spec(tenant="acme"), TENANT_START_RATE, limits=limits, now=t0 + 2)
    # A replica whose clock is behind refills nothing from it.
    await refused(two, spec(tenant="acme"), TENANT_START_RATE, limits=limits, now=t0 + 1)
    # The bucket holds at most the burst, however long it waited (and its state may be swept meanwhile).
    await one.sweep(now=t0 + 1000)
    assert await start(one, t0 + 1000) and await start(two, t0 + 1000)
    error = await refused(one, spec(tenant="acme"), TENANT_START_RATE, limits=limits, now=t0 + 1000)
    assert error.retry_after_s == pytest.approx(2.0)
    # The rate is checked after the other limits: a start they refuse takes no token.
    both = TenantLimits(max_active=1, start_rate=0.5, start_burst=1)
    first = spec(tenant="initech")
    assert (await one.create_run(first, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100,
                                 now=t0, limits=both)).created
    await refused(two, spec(tenant="initech"), TENANT_MAX_ACTIVE_RUNS, limits=both, now=t0 + 2)
    await two.cancel(first.run_id, "make room", event_time_ns=time.time_ns(), retention_s=60, now=t0 + 2)
    assert (await two.create_run(spec(tenant="initech"), policy=REJECT, owner=None, lease_s=LEASE, max_queued=100,
                                 now=t0 + 2, limits=both)).created  # the token refilled at t0 + 2 was still there
