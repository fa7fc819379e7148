"""What the Redis run store promises beyond the shared contract (tests/test_run_stores.py).

Against the real server at AGENTD_TEST_REDIS_URL, each test on its own key prefix, deleted
afterwards: one hash tag for every run key (Cluster), TTLs once a run ended, the sweep,
the queue's length, crashed claimers, closing during waits, and outages (via FaultProxy).
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator
from urllib.parse import urlsplit

import pytest
import redis.exceptions
from redis.asyncio import Redis
from redis.crc import key_slot

from agentd.server.runs.records import Control, QueueFullError, RunStatus, SessionPolicy
from agentd.server.runs.redis import GROUP, RedisControlBus, RedisRunStore
from agentd.server.runtime.errors import StoreUnavailableError
from tests.backends_redis import REDIS_URL, delete_prefix, fail_unreachable, new_prefix
from tests.backends_runs_redis import make_pair, redis_run_replicas
from tests.fault_proxy import FaultProxy
from tests.test_run_stores import (
    FOREVER_S,
    LEASE,
    checkpoint,
    completed,
    events,
    guarded,
    live_subscription,
    next_message,
    parking,
    spec,
)

REJECT, ENQUEUE = SessionPolicy.REJECT, SessionPolicy.ENQUEUE
TIMEOUTS = (TimeoutError, redis.exceptions.TimeoutError)  # what a call that waited out its timeout raises


@asynccontextmanager
async def raw_redis() -> AsyncIterator[Redis]:
    client = Redis.from_url(REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def prefix_keys(client: Redis, prefix: str) -> list[bytes]:
    return [key async for key in client.scan_iter(match=f"{prefix}:*", count=1000)]


async def redis_ms(raw: Redis) -> int:
    """The server's clock (TIME), in milliseconds: the clock its key expiry runs on."""
    seconds, micros = await raw.time()
    return seconds * 1000 + micros // 1000


async def assert_pttl_set_since(raw: Redis, key: bytes, ttl_ms: int, since_ms: int) -> None:
    """``key`` expires ``ttl_ms`` after a write made at or after ``since_ms`` (``redis_ms`` before the
    write): its PTTL, read now, is at most that, and at least that less the time the server's
    clock moved on since (measured on the same clock, so however slow the test, never a guess)."""
    left = await raw.pttl(key)
    elapsed_ms = await redis_ms(raw) - since_ms
    assert ttl_ms - elapsed_ms - 1 <= left <= ttl_ms, (key, left, ttl_ms, elapsed_ms)


async def test_every_run_key_shares_one_hash_tag() -> None:
    async with redis_run_replicas() as replica, raw_redis() as raw:
        store, _ = await replica()
        assert isinstance(store, RedisRunStore)
        now = time.time()
        # Ids with braces must not move the tag: it comes first in every key.
        a = spec(session="s}{1", request_id="req{x}")
        b = spec(session="s}{1")
        c = spec(request_id="}req")
        await store.create_run(a, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=now)
        await store.create_run(b, policy=ENQUEUE, owner=None, lease_s=LEASE, max_queued=10, now=now)
        await store.create_run(c, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=now)
        await store.record_progress(a.run_id, 1, events(a.run_id, 1, 2), checkpoint(1, 2), now=now)
        await store.finish(a.run_id, 1, events(a.run_id, 3, 0, completed()), retention_s=60, now=now)
        claimed = await store.claim("r1", 5, lease_s=LEASE, now=now, wait_s=0)
        assert [r.run_id for r in claimed] == [c.run_id, b.run_id]  # b became claimable when a ended

        keys = await prefix_keys(raw, store.prefix)
        tag = f"{store.prefix}:runs".encode()
        kinds = set()
        for key in keys:
            assert key.startswith(f"{store.prefix}:{{".encode()), key
            first_tag = key[key.index(b"{") + 1:key.index(b"}")]
            assert first_tag == tag, key
            kinds.add(key[len(store.key_base.encode()):].split(b":")[0])
        assert {key_slot(key) for key in keys} == {key_slot(tag)}
        # Every kind of key was made here: records, logs, queue, leases, session list and index,
        # request ids and the retention index.
        assert kinds == {b"run", b"events", b"queue", b"leases", b"active", b"session", b"request", b"expiries"}
        assert await raw.exists(store.key_base.encode() + b"events:" + a.run_id.encode())
        # The stream IDs are the event sequences.
        ids = [entry_id for entry_id, _ in await raw.xrange(store.key_base.encode() + b"events:" + a.run_id.encode())]
        assert ids == [b"0-1", b"0-2", b"0-3"]

    with pytest.raises(ValueError):
        RedisRunStore(Redis(), Redis(), prefix="bad{prefix}")


async def test_ended_runs_carry_a_ttl_and_sweep_removes_them() -> None:
    async with redis_run_replicas() as replica, raw_redis() as raw:
        store, _ = await replica()
        assert isinstance(store, RedisRunStore)
        base = store.key_base.encode()
        now = time.time()
        done = spec(session="ret", request_id="req-done")
        queued = spec(session="ret2", request_id="req-queued")
        await store.create_run(done, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=now)
        await store.create_run(queued, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=now)
        await store.record_progress(done.run_id, 1, events(done.run_id, 1, 2), None, now=now)

        def keys_of(run_id: str, request_id: str) -> list[bytes]:
            return [base + b"run:" + run_id.encode(), base + b"events:" + run_id.encode(),
                    base + b"request:" + request_id.encode()]

        # Active runs never expire.
        for key in keys_of(done.run_id, "req-done"):
            assert await raw.pttl(key) == -1, key

        since = await redis_ms(raw)
        await store.finish(done.run_id, 1, events(done.run_id, 3, 0, completed()), retention_s=30, now=now)
        for key in keys_of(done.run_id, "req-done"):
            await assert_pttl_set_since(raw, key, 30_000, since)
        since = await redis_ms(raw)
        cancelled = await store.cancel(queued.run_id, "no", event_time_ns=1, retention_s=20, now=now)
        assert cancelled is not None and cancelled.status is RunStatus.CANCELLED
        for key in keys_of(queued.run_id, "req-queued"):
            await assert_pttl_set_since(raw, key, 20_000, since)

        # Nothing is due yet: sweep leaves the runs listed.
        assert await store.sweep(now=now + 1) == 0
        assert [r.run_id for r in (await store.list_runs("ret", 10))[0]] == [done.run_id]

        # The caller's clock passed both retentions: sweep deletes them although Redis' TTLs run on.
        assert await store.sweep(now=now + 31) == 2
        for run_id, request_id in ((done.run_id, "req-done"), (queued.run_id, "req-queued")):
            assert await store.get_run(run_id) is None
            assert await store.read_events(run_id, 0, 10) == []
            assert not await raw.exists(*keys_of(run_id, request_id))
        assert await store.list_runs("ret", 10) == ([], None)
        assert not await raw.exists(base + b"session:ret", base + b"session:ret2", base + b"expiries")
        again = await store.create_run(spec(request_id="req-done"), policy=REJECT, owner=None, lease_s=LEASE,
                                       max_queued=10, now=time.time())
        assert again.created


async def test_caller_actions_live_in_the_record_and_share_its_ttl() -> None:
    async with redis_run_replicas() as replica, raw_redis() as raw:
        store, _ = await replica()
        assert isinstance(store, RedisRunStore)
        now = time.time()
        s = spec()
        await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=now)
        before = set(await prefix_keys(raw, store.prefix))
        answer = {"output": "nul \x00 ü", "is_error": False}
        got = await store.submit_action(s.run_id, "output:call_{1}", answer, now=now + 1)
        assert got is not None and got.actions == {"output:call_{1}": answer} and got.update_time == now + 1
        # A field of the run's hash: no other key, and no TTL while the run is active.
        assert set(await prefix_keys(raw, store.prefix)) == before
        run_key = store.key_base.encode() + b"run:" + s.run_id.encode()
        assert await raw.hexists(run_key, b"action:output:call_{1}")
        assert await raw.pttl(run_key) == -1

        since = await redis_ms(raw)
        await store.finish(s.run_id, 1, events(s.run_id, 1, 0, completed()), retention_s=30, now=now + 2)
        await assert_pttl_set_since(raw, run_key, 30_000, since)
        late = await store.submit_action(s.run_id, "output:call_2", answer, now=now + 3)
        assert late is not None and late.actions == {"output:call_{1}": answer} and late.update_time == now + 2
        assert await store.sweep(now=now + 40) == 1
        assert not await raw.exists(run_key)
        assert await store.submit_action(s.run_id, "output:call_2", answer, now=now + 41) is None


async def test_cancelled_queued_run_frees_its_queue_slot() -> None:
    async with redis_run_replicas() as replica, raw_redis() as raw:
        store, _ = await replica()
        assert isinstance(store, RedisRunStore)
        first = spec()
        await store.create_run(first, policy=REJECT, owner=None, lease_s=LEASE, max_queued=1, now=time.time())
        with pytest.raises(QueueFullError):
            await store.create_run(spec(), policy=REJECT, owner=None, lease_s=LEASE, max_queued=1, now=time.time())
        await store.cancel(first.run_id, "no", event_time_ns=1, retention_s=60, now=time.time())
        assert await raw.xlen(store.key_base.encode() + b"queue") == 0
        second = spec()
        await store.create_run(second, policy=REJECT, owner=None, lease_s=LEASE, max_queued=1, now=time.time())
        claimed = await store.claim("r1", 5, lease_s=LEASE, now=time.time(), wait_s=0)
        assert [r.run_id for r in claimed] == [second.run_id]


async def test_a_run_read_by_a_crashed_claimer_is_claimed_by_another() -> None:
    """An entry read but never claimed is taken over once it has been idle ``reclaim_idle_s``,
    not before. Idle time is Redis's own clock, so instead of waiting it out the test sets it:
    XCLAIM ... IDLE ages the entry (still pending on the crashed claimer) by exactly that much."""
    reclaim_idle_s = 3600.0  # no entry gets this idle while the test runs
    async with redis_run_replicas(reclaim_idle_s=reclaim_idle_s) as replica, raw_redis() as raw:
        (one, _), (two, _) = await replica(), await replica()
        assert isinstance(one, RedisRunStore)
        queue = one.key_base.encode() + b"queue"
        s = spec()
        await one.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
        # A claimer's XREADGROUP got the entry, then its process died before claiming the run.
        read = await raw.xreadgroup(GROUP, "crashed-replica", {queue: ">"}, count=10)
        ((entry_id, fields),) = read[0][1]
        assert fields[b"r"] == s.run_id.encode()
        assert (await raw.xpending(queue, GROUP))["pending"] == 1

        # Not yet idle long enough: it may still be working on it.
        assert await two.claim("rb", 5, lease_s=LEASE, now=time.time(), wait_s=0) == []
        assert (await raw.xpending(queue, GROUP))["pending"] == 1
        # Idle for longer than reclaim_idle_s (and still the crashed claimer's).
        await raw.xclaim(queue, GROUP, "crashed-replica", 0, [entry_id], idle=int(reclaim_idle_s * 1000) + 1000)
        pending = await raw.xpending_range(queue, GROUP, min="-", max="+", count=10)
        assert [(p["consumer"], p["time_since_delivered"] > reclaim_idle_s * 1000) for p in pending] == [
            (b"crashed-replica", True)]
        claimed = await two.claim("rb", 5, lease_s=LEASE, now=time.time(), wait_s=0)
        assert [(r.run_id, r.owner, r.attempt, r.status) for r in claimed] == [(s.run_id, "rb", 1, RunStatus.RUNNING)]
        assert (await raw.xpending(queue, GROUP))["pending"] == 0
        assert await raw.xlen(queue) == 0
        assert await one.claim("ra", 5, lease_s=LEASE, now=time.time(), wait_s=0) == []


async def test_close_ends_pending_waits() -> None:
    """Closing the store ends the blocking reads parked in it: they return [] at once, where
    otherwise they would block for longer than the guard (their own timeout)."""
    async with redis_run_replicas() as replica:
        store, _ = await replica()
        s = spec()
        await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())
        parked = parking(store, s.run_id)
        waiting = asyncio.create_task(store.wait_events(s.run_id, 0, limit=10, timeout_s=FOREVER_S))
        await guarded(parked.wait(), "wait_events never parked")
        parked = parking(store)
        claiming = asyncio.create_task(store.claim("r2", 5, lease_s=LEASE, now=time.time(), wait_s=FOREVER_S))
        await guarded(parked.wait(), "the claim never parked")
        await store.close()
        assert await guarded(waiting, "wait_events after close") == []
        assert await guarded(claiming, "a claim after close") == []


def _via(proxy: FaultProxy) -> str:
    parts = urlsplit(REDIS_URL)
    netloc = parts.netloc.rsplit("@", 1)
    userinfo = netloc[0] + "@" if len(netloc) == 2 else ""
    return parts._replace(netloc=f"{userinfo}127.0.0.1:{proxy.port}").geturl()


async def _open(store: RedisRunStore, bus: RedisControlBus) -> None:
    try:
        await store.open()
        await bus.open()
    except StoreUnavailableError as exc:
        fail_unreachable(exc)


async def test_a_stopped_or_stalled_redis_raises_store_unavailable() -> None:
    upstream = urlsplit(REDIS_URL)
    prefix = new_prefix()
    async with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 6379) as proxy:
        store, bus = make_pair(prefix, _via(proxy), timeout_s=0.5)
        direct_store, direct_bus = make_pair(prefix)
        try:
            await _open(store, bus)
            await _open(direct_store, direct_bus)
            s = spec()
            now = time.time()
            await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=now)
            received: asyncio.Queue[Control] = asyncio.Queue()

            async def listen() -> None:
                async for message in bus.subscribe():
                    received.put_nowait(message)

            listener = asyncio.create_task(listen())
            where = f"redis run store at 127.0.0.1:{proxy.port}/"

            # Redis stopped: connections reset, new ones refused.
            proxy.cut()
            calls = [
                lambda: store.get_run(s.run_id),
                lambda: store.record_progress(s.run_id, 1, events(s.run_id, 1, 1), None, now=now),
                lambda: store.renew("r1", {s.run_id: 1}, lease_s=LEASE, now=now),
                lambda: store.claim("r1", 5, lease_s=LEASE, now=now, wait_s=1),
                lambda: store.wait_events(s.run_id, 0, limit=10, timeout_s=1),
                lambda: store.ping(),
                lambda: bus.publish(Control(s.run_id, "cancel", "x")),
            ]
            for call in calls:  # each fails on the reset or refusal itself, not on a timeout
                with pytest.raises(StoreUnavailableError) as info:
                    await guarded(call(), "a call to a stopped server")
                assert where in str(info.value)
                assert not isinstance(info.value.__cause__, TIMEOUTS), repr(info.value.__cause__)

            # Back: the store and the control channel reconnect by themselves. Messages sent
            # before the channel is subscribed again are lost, by design: probe until one arrives.
            proxy.restore()
            await store.ping()
            await store.record_progress(s.run_id, 1, events(s.run_id, 1, 1), None, now=now)
            await live_subscription(direct_bus, received)
            await direct_bus.publish(Control(s.run_id, "cancel", "after the outage"))
            assert (await next_message(received, "the control channel did not resubscribe")).reason == "after the outage"

            # Partitioned: every call ends with the store's timeout, never a hang.
            proxy.stall()
            for call in (
                lambda: store.get_run(s.run_id),
                lambda: store.record_progress(s.run_id, 1, events(s.run_id, 2, 1), None, now=now),
                lambda: store.wait_events(s.run_id, 1, limit=10, timeout_s=0.2),
            ):
                with pytest.raises(StoreUnavailableError) as info:
                    await guarded(call(), "a call to a partitioned server")
                assert where in str(info.value)
                assert isinstance(info.value.__cause__, TIMEOUTS), repr(info.value.__cause__)
            proxy.restore()
            got = await store.get_run(s.run_id)
            assert got is not None and got.status is RunStatus.RUNNING
            listener.cancel()
        finally:
            proxy.restore()
            for closing in (bus, store, direct_bus, direct_store):
                await closing.close()
            await delete_prefix(prefix)


async def test_build_from_settings_uses_the_session_store_settings() -> None:
    from agentd.server.runs.redis import build_redis_runs
    from agentd.server.settings import Settings

    prefix = new_prefix()
    parts = urlsplit(REDIS_URL)
    with_password = parts._replace(netloc=f"user:secret@{parts.hostname}:{parts.port or 6379}").geturl()
    store, bus = build_redis_runs(Settings(store="redis", redis_url=with_password, redis_prefix=prefix))
    assert isinstance(store, RedisRunStore) and isinstance(bus, RedisControlBus)
    assert "secret" not in store.location and store.key_base == f"{prefix}:{{{prefix}:runs}}:"
    await store.close()
    await bus.close()

    settings = Settings(store="redis", redis_url=REDIS_URL, redis_prefix=prefix, redis_timeout_s=1.0)
    store, bus = build_redis_runs(settings)
    try:
        await _open(store, bus)  # type: ignore[arg-type]
        s = spec(session="built")
        await store.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
        claimed = await store.claim("r1", 1, lease_s=LEASE, now=time.time(), wait_s=1)
        assert [r.run_id for r in claimed] == [s.run_id]
    finally:
        await bus.close()
        await store.close()
        await delete_prefix(prefix)
