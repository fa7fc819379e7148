"""What only the Postgres run store has to get right: migrations shared by replicas that
start together, the session gate and SKIP LOCKED claims under real concurrency across
replicas, retention sweeps, NOTIFY channels of long schema names, and outages (through
a fault proxy in front of the real server).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from urllib.parse import urlsplit

import asyncpg
import pytest

from agentd.server.runs.codec import encode_checkpoint, encode_event, encode_payload, encode_spec
from agentd.server.runs.postgres import (
    LATEST_VERSION,
    MIGRATIONS,
    PostgresRunStore,
    channel_name,
)
from agentd.server.runs.records import Control, LeaseLostError, RunStatus, SessionBusyError, SessionPolicy
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.events import RunCompleted, RunEvent, TextDelta
from agentd.server.runtime.items import MessageItem
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage
from agentd.server.sessions.postgres import PostgresSessionStore
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema, raw_connection
from tests.backends_runs_postgres import control_bus, postgres_run_replicas, run_store
from tests.fault_proxy import FaultProxy
from tests.test_run_stores import (
    FOREVER_S,
    guarded,
    live_subscription,
    next_message,
    notify_only,  # noqa: F401 (a fixture)
    parking,
)

LEASE = 30.0
REJECT, ENQUEUE = SessionPolicy.REJECT, SessionPolicy.ENQUEUE


def spec(session: str | None = None, request_id: str = "") -> RunInput:
    return RunInput(run_id=f"run_{uuid.uuid4().hex}", agent="assistant", input="hi", session_id=session,
                    request_id=request_id)


def deltas(run_id: str, first: int, count: int, text: str = "d") -> list[RunEvent]:
    return [RunEvent(run_id, first + i, time.time_ns(), "t" * 32, TextDelta("assistant", f"{text}{first + i}"))
            for i in range(count)]


def done(run_id: str, sequence: int) -> RunEvent:
    return RunEvent(run_id, sequence, time.time_ns(), "t" * 32, RunCompleted("ok", "assistant", Usage(1, 1, 1), 1, 0.1))


async def test_migrations_are_idempotent_and_replicas_may_start_together() -> None:
    schema = new_schema()
    async with dropped_afterwards(schema):
        # Four replicas and the session store all migrate the same empty schema at once.
        stores = [run_store(schema) for _ in range(4)]
        sessions = PostgresSessionStore(url=POSTGRES_URL, schema=schema, min_size=1, max_size=2)
        try:
            await asyncio.gather(*(s.open() for s in stores), sessions.open())
            raw = await raw_connection()
            try:
                versions = await raw.fetch(f'SELECT version FROM "{schema}".run_schema_version ORDER BY version')
                assert [r["version"] for r in versions] == list(range(1, LATEST_VERSION + 1))
                functions = await raw.fetchval(
                    "SELECT count(*) FROM pg_proc WHERE pronamespace = $1::regnamespace AND proname LIKE 'agentd_run%'",
                    schema,
                )
                # Migrating again (a restart, `agentd db migrate`) changes nothing.
                assert await stores[0].migrate() == LATEST_VERSION
                assert await run_store(schema).migrate() == LATEST_VERSION  # unopened: its own connection
                assert await raw.fetchval(f'SELECT count(*) FROM "{schema}".run_schema_version') == LATEST_VERSION
                assert await raw.fetchval(
                    "SELECT count(*) FROM pg_proc WHERE pronamespace = $1::regnamespace AND proname LIKE 'agentd_run%'",
                    schema,
                ) == functions
            finally:
                await raw.close()
            # Every replica works on the shared tables.
            s = spec(session="m")
            await stores[1].create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
            claimed = await stores[3].claim("r3", 5, lease_s=LEASE, now=time.time(), wait_s=1)
            assert [r.run_id for r in claimed] == [s.run_id]
            # Without auto-migration a migrated schema opens as is.
            manual = run_store(schema, auto_migrate=False)
            await manual.open()
            await manual.close()
        finally:
            await sessions.close()
            for store in stores:
                await store.close()

    # Without auto-migration an unmigrated schema is refused, with the command to run.
    empty = new_schema()
    async with dropped_afterwards(empty):
        refusing = run_store(empty, auto_migrate=False)
        with pytest.raises(StoreUnavailableError, match="agentd db migrate"):
            await refusing.open()
        raw = await raw_connection()
        try:
            assert await raw.fetchval("SELECT to_regnamespace($1)", empty) is None  # nothing created
        finally:
            await raw.close()


async def test_a_schema_at_version_1_upgrades_to_2_with_its_runs_intact() -> None:
    schema = new_schema()
    q = f'"{schema}"'
    async with dropped_afterwards(schema):
        raw = await raw_connection()
        try:
            # What an agentd of version 1 left: its tables and functions, a running run with
            # events and a checkpoint, and an ended one.
            async with raw.transaction():
                await raw.execute(f"CREATE SCHEMA {q}")
                await raw.execute(f"SET LOCAL search_path TO {q}, pg_temp")
                await raw.execute(
                    f"CREATE TABLE {q}.run_schema_version"
                    " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
                )
                await raw.execute(MIGRATIONS[0])
                await raw.execute(f"INSERT INTO {q}.run_schema_version (version) VALUES (1)")
            now = time.time()
            running, ended = spec(session="old"), spec(request_id="req-old")
            for s in (running, ended):
                await raw.fetchrow(f"SELECT * FROM {q}.agentd_run_create($1, $2, $3, $4, true, 'r1', $5, 10, $6)",
                                   s.run_id, s.session_id, s.request_id or None, encode_spec(s), now + LEASE, now)
            cp = Checkpoint(agent="a", turns=1, usage=Usage(1, 2, 1), history_items=0, run_items=(),
                            step_items=(), step_request_id="s", sequence=2, awaiting=("output:call_1",))
            await raw.execute(f"SELECT {q}.agentd_run_progress($1, 1, 1, $2, $3, $4, $5)", running.run_id,
                              [encode_event(e) for e in deltas(running.run_id, 1, 2)], "t" * 32,
                              encode_checkpoint(cp), now)
            final = done(ended.run_id, 1)
            await raw.execute(f"SELECT {q}.agentd_run_finish($1, 1, 1, $2, $3, 'completed', $4, $5, $6)",
                              ended.run_id, [encode_event(final)], "t" * 32, encode_payload(final.payload),
                              now + 60, now)

            # This agentd needs version 2: refused without auto-migration, upgraded with it.
            with pytest.raises(StoreUnavailableError, match="agentd db migrate"):
                await run_store(schema, auto_migrate=False).open()
            store = run_store(schema)
            await store.open()
            try:
                versions = await raw.fetch(f"SELECT version FROM {q}.run_schema_version ORDER BY version")
                assert [r["version"] for r in versions] == list(range(1, LATEST_VERSION + 1))
                got = await store.get_run(running.run_id)
                assert got is not None and got.spec == running
                assert (got.status, got.owner, got.attempt, got.last_sequence) == (RunStatus.RUNNING, "r1", 1, 2)
                assert got.checkpoint == cp and got.actions == {} and got.awaiting == ("output:call_1",)
                assert [e.sequence for e in await store.read_events(running.run_id, 0, 10)] == [1, 2]
                old = await store.get_run(ended.run_id)
                assert old is not None and old.status is RunStatus.COMPLETED and old.actions == {}

                # The upgraded run takes answers; they go with the run when it is swept.
                answer = {"output": "nul \x00 ü", "is_error": False}
                got = await store.submit_action(running.run_id, "output:call_1", answer, now=now + 1)
                assert got is not None and got.actions == {"output:call_1": answer} and got.awaiting == ()
                assert got.update_time == now + 1
                assert (await store.submit_action(ended.run_id, "output:x", answer, now=now + 1)).actions == {}
                page, _ = await store.list_runs("old", 10)
                assert [r.actions for r in page] == [{"output:call_1": answer}]
                await store.finish(running.run_id, 1, [done(running.run_id, 3)], retention_s=1, now=now + 2)
                assert await store.sweep(now=now + 100) == 2
                assert await raw.fetchval(f"SELECT count(*) FROM {q}.run_actions") == 0
                assert await raw.fetchval(f"SELECT count(*) FROM {q}.runs") == 0
            finally:
                await store.close()
        finally:
            await raw.close()


async def test_session_gate_holds_when_two_replicas_create_at_once() -> None:
    async with postgres_run_replicas(max_size=8) as replica:
        (one, _), (two, _), (three, _) = await replica(), await replica(), await replica()
        now = time.time()

        # REJECT: of two simultaneous first runs of a session, exactly one starts.
        sessions = [f"rej-{i}" for i in range(30)]
        pairs = [(spec(session=sid), spec(session=sid)) for sid in sessions]
        outcomes = await asyncio.gather(*(
            asyncio.gather(
                one.create_run(a, policy=REJECT, owner="ra", lease_s=LEASE, max_queued=100, now=now),
                two.create_run(b, policy=REJECT, owner="rb", lease_s=LEASE, max_queued=100, now=now),
                return_exceptions=True,
            )
            for a, b in pairs
        ))
        for (a, b), results in zip(pairs, outcomes):
            created = [r for r in results if not isinstance(r, BaseException)]
            refused = [r for r in results if isinstance(r, SessionBusyError)]
            assert len(created) == 1 and len(refused) == 1, results
            assert refused[0].run_id == created[0].record.run_id
            assert await three.active_run(a.session_id or "") == created[0].record.run_id

        # ENQUEUE: one runs, the other waits behind it, not claimable.
        sessions = [f"enq-{i}" for i in range(30)]
        pairs = [(spec(session=sid), spec(session=sid)) for sid in sessions]
        outcomes = await asyncio.gather(*(
            asyncio.gather(
                one.create_run(a, policy=ENQUEUE, owner="ra", lease_s=LEASE, max_queued=100, now=now),
                two.create_run(b, policy=ENQUEUE, owner="rb", lease_s=LEASE, max_queued=100, now=now),
            )
            for a, b in pairs
        ))
        running = {}
        for created_a, created_b in outcomes:
            statuses = sorted([created_a.record.status.value, created_b.record.status.value])
            assert statuses == ["queued", "running"]
            first = created_a if created_a.record.status is RunStatus.RUNNING else created_b
            running[first.record.session_id] = first.record
        assert await three.claim("r3", 100, lease_s=LEASE, now=time.time(), wait_s=0) == []

        # A finish racing a new ENQUEUE run of the same session never strands the new run:
        # it is claimable whichever commits first. Here every session has a run behind the
        # running one already; a third run is created while the first finishes.
        third = {sid: spec(session=sid) for sid in sessions}
        await asyncio.gather(*(
            asyncio.gather(
                (one if rec.owner == "ra" else two).finish(
                    rec.run_id, 1, [done(rec.run_id, 1)], retention_s=60, now=time.time()),
                three.create_run(third[sid], policy=ENQUEUE, owner=None, lease_s=LEASE, max_queued=100,
                                 now=time.time()),
            )
            for sid, rec in running.items()
        ))
        second = await three.claim("r3", 100, lease_s=LEASE, now=time.time(), wait_s=1)
        assert sorted(r.session_id or "" for r in second) == sorted(sessions)  # one per session: the second run
        assert not {r.run_id for r in second} & {s.run_id for s in third.values()}
        await asyncio.gather(*(
            three.finish(r.run_id, r.attempt, [done(r.run_id, 1)], retention_s=60, now=time.time()) for r in second
        ))
        last = await one.claim("ra", 100, lease_s=LEASE, now=time.time(), wait_s=1)
        assert {r.run_id for r in last} == {s.run_id for s in third.values()}


async def test_cancel_racing_finish_neither_deadlocks_nor_strands_the_session() -> None:
    async with postgres_run_replicas(max_size=8) as replica:
        (one, _), (two, _) = await replica(), await replica()
        t0 = time.time()
        heads, behind, requeued = [], [], []
        for i in range(20):
            a, b = spec(session=f"c-{i}"), spec(session=f"c-{i}")
            await one.create_run(a, policy=REJECT, owner="ra", lease_s=LEASE, max_queued=100, now=t0)
            await one.create_run(b, policy=ENQUEUE, owner=None, lease_s=LEASE, max_queued=100, now=t0)
            heads.append(a)
            behind.append(b)
        for i in range(10):  # runs whose lease expired and were requeued while the old owner finishes
            r = spec(session=f"x-{i}")
            await one.create_run(r, policy=REJECT, owner="ra", lease_s=0.1, max_queued=100, now=t0 - 10)
            requeued.append(r)
        assert set(await two.requeue_expired(now=t0)) == {r.run_id for r in requeued}

        results = await guarded(asyncio.gather(
            *(one.finish(a.run_id, 1, [done(a.run_id, 1)], retention_s=60, now=t0) for a in heads),
            *(two.cancel(a.run_id, "stop", event_time_ns=1, retention_s=60, now=t0) for a in heads),
            *(two.cancel(b.run_id, "stop", event_time_ns=1, retention_s=60, now=t0) for b in behind),
            *(one.finish(r.run_id, 1, [done(r.run_id, 1)], retention_s=60, now=t0) for r in requeued),
            *(two.cancel(r.run_id, "stop", event_time_ns=1, retention_s=60, now=t0) for r in requeued),
            return_exceptions=True,
        ), "finishes racing cancels")
        # Postgres breaks a deadlock (after deadlock_timeout) by failing one side with SQLSTATE
        # 40P01, which the store reports, never retries: a deadlock is a failed call here.
        deadlocked = [r for r in results if isinstance(r, BaseException)
                      and isinstance(r.__cause__, asyncpg.DeadlockDetectedError)]
        assert not deadlocked, f"finish and cancel deadlocked: {deadlocked}"
        stale_finishes = results[len(heads) * 3: len(heads) * 3 + len(requeued)]
        assert all(isinstance(r, LeaseLostError) for r in stale_finishes), stale_finishes
        assert not [r for r in results if isinstance(r, BaseException) and r not in stale_finishes]
        for a, b in zip(heads, behind):
            assert (await two.get_run(a.run_id)).status is RunStatus.COMPLETED  # type: ignore[union-attr]
            assert (await two.get_run(b.run_id)).status is RunStatus.CANCELLED  # type: ignore[union-attr]
            assert await two.active_run(a.session_id or "") is None
        for r in requeued:
            assert (await one.get_run(r.run_id)).status is RunStatus.CANCELLED  # type: ignore[union-attr]
        assert await two.claim("rb", 100, lease_s=LEASE, now=time.time(), wait_s=0) == []


async def test_three_claimers_take_each_of_50_runs_once_and_skip_locked_ones() -> None:
    async with postgres_run_replicas() as replica:
        stores = [(await replica())[0] for _ in range(3)]
        ids = []
        for _ in range(50):
            s = spec()
            ids.append(s.run_id)
            await stores[0].create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100, now=time.time())

        async def claimer(index: int) -> list[str]:
            got: list[str] = []
            while batch := await stores[index].claim(f"r{index}", 3, lease_s=LEASE, now=time.time(), wait_s=0.2):
                assert all(r.owner == f"r{index}" and r.attempt == 1 for r in batch)
                got += [r.run_id for r in batch]
            return got

        taken = await guarded(asyncio.gather(*(claimer(i) for i in range(3))), "three claimers taking 50 runs")
        everything = [run_id for got in taken for run_id in got]
        assert sorted(everything) == sorted(ids)  # each run exactly once
        raw = await raw_connection()
        try:
            owners = dict(await raw.fetch(f'SELECT run_id, owner FROM "{stores[0].schema}".runs WHERE status = \'running\''))
            assert owners == {run_id: f"r{i}" for i, got in enumerate(taken) for run_id in got}

            # A claimable run some transaction holds is skipped, never waited for: the lock is held
            # until the claim has returned, so a claim that waited for it could only end by failing
            # (its command timeout) or hang, never with the free run.
            held, free = spec(), spec()
            for s in (held, free):
                await stores[0].create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=100,
                                           now=time.time())
            async with raw.transaction():
                await raw.execute(f'SELECT 1 FROM "{stores[0].schema}".runs WHERE run_id = $1 FOR UPDATE', held.run_id)
                claimed = await guarded(stores[1].claim("r1", 5, lease_s=LEASE, now=time.time(), wait_s=0),
                                        "a claim next to a locked run")
                assert [r.run_id for r in claimed] == [free.run_id]
            claimed = await stores[2].claim("r2", 5, lease_s=LEASE, now=time.time(), wait_s=1)
            assert [r.run_id for r in claimed] == [held.run_id]
        finally:
            await raw.close()


async def test_sweep_deletes_expired_runs_and_their_events_in_batches() -> None:
    async with postgres_run_replicas() as replica:
        store, _ = await replica()
        q = f'"{store.schema}"'
        now = time.time()

        async def ended(retention_s: float, ended_at: float, request_id: str = "") -> str:
            s = spec(session="swept", request_id=request_id)
            await store.create_run(s, policy=ENQUEUE, owner="r1", lease_s=LEASE, max_queued=10, now=ended_at)
            await store.finish(s.run_id, 1, [*deltas(s.run_id, 1, 3), done(s.run_id, 4)], retention_s=retention_s,
                               now=ended_at)
            return s.run_id

        expired = await ended(1.0, now - 100)  # retention ended 99 s ago, not swept yet
        reused = await ended(1.0, now - 100, request_id="req-reuse")
        kept = await ended(3600.0, now)
        running = spec(session="swept")
        await store.create_run(running, policy=ENQUEUE, owner="r1", lease_s=LEASE, max_queued=10, now=now + 1)
        cancelled = spec()
        await store.create_run(cancelled, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=now)
        await store.cancel(cancelled.run_id, "no", event_time_ns=1, retention_s=0.001, now=now - 50)

        raw = await raw_connection()
        try:
            # More expired runs than one batch deletes, with their events.
            await raw.execute(
                f"INSERT INTO {q}.runs (run_id, status, spec, create_time, update_time, expire_time)"
                " SELECT 'run_bulk_' || g, 'completed', '{}', $1, $1, $1 FROM generate_series(1, 2100) g",
                now - 10,
            )
            await raw.execute(
                f"INSERT INTO {q}.run_events (run_id, seq, data)"
                " SELECT 'run_bulk_' || g, s, '{}' FROM generate_series(1, 2100) g, generate_series(1, 2) s"
            )
            # Past retention is gone for readers even before the sweep.
            assert await store.get_run(expired) is None
            assert await store.read_events(expired, 0, 10) == []
            assert await store.cancel(expired, "late", event_time_ns=1, retention_s=60, now=time.time()) is None
            page, _ = await store.list_runs("swept", 10)
            assert [r.run_id for r in page] == [running.run_id, kept]
            assert await raw.fetchval(f"SELECT count(*) FROM {q}.run_events WHERE run_id = $1", expired) == 4
            # ...and so is its request id: a new run may take it (the old one is removed now).
            again = await store.create_run(spec(request_id="req-reuse"), policy=REJECT, owner=None, lease_s=LEASE,
                                           max_queued=10, now=time.time())
            assert again.created
            assert await raw.fetchval(f"SELECT count(*) FROM {q}.runs WHERE run_id = $1", reused) == 0

            assert await store.sweep(now=now - 99.5) == 0  # nothing had ended before then
            assert await store.sweep(now=time.time()) == 2100 + 2  # the bulk, `expired` and `cancelled`
            assert await store.sweep(now=time.time()) == 0
            left = await raw.fetch(f"SELECT run_id FROM {q}.runs WHERE run_id NOT LIKE 'run_bulk_%'")
            assert {r["run_id"] for r in left} == {kept, running.run_id, again.record.run_id}
            assert await raw.fetchval(f"SELECT count(*) FROM {q}.runs WHERE run_id LIKE 'run_bulk_%'") == 0
            events = await raw.fetch(f"SELECT DISTINCT run_id FROM {q}.run_events")
            assert {r["run_id"] for r in events} == {kept}
            assert [e.sequence for e in await store.read_events(kept, 0, 10)] == [1, 2, 3, 4]
        finally:
            await raw.close()


async def test_nul_characters_in_events_and_checkpoints_round_trip() -> None:
    async with postgres_run_replicas() as replica:
        store, _ = await replica()
        s = spec()
        await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())
        cp = Checkpoint(agent="a", turns=1, usage=Usage(), history_items=0, run_items=(MessageItem("tool", "x\x00y"),),
                        step_items=(), step_request_id="s", sequence=1)
        await store.record_progress(s.run_id, 1, deltas(s.run_id, 1, 1, text="bin\x00ary"), cp, now=time.time())
        (event,) = await store.read_events(s.run_id, 0, 10)
        assert event.payload == TextDelta("assistant", "bin\x00ary1")
        got = await store.get_run(s.run_id)
        assert got is not None and got.checkpoint == cp


async def test_long_schema_names_still_notify(notify_only: None) -> None:
    """Channel names past Postgres' 63 bytes are shortened the same way by every replica: a
    parked claim is woken by the NOTIFY (the fallback poll is off, the claim's wait outlasts the
    guard) and control messages arrive."""
    schema = ("agentd_test_" + uuid.uuid4().hex + "x" * 63)[:63]
    assert channel_name(schema, "run_work") != f"{schema}_run_work" and len(channel_name(schema, "run_work")) <= 63
    async with postgres_run_replicas(schema=schema) as replica:
        (one, bus_one), (two, bus_two) = await replica(), await replica()
        received: asyncio.Queue[Control] = asyncio.Queue()

        async def listen() -> None:
            async for message in bus_one.subscribe():
                received.put_nowait(message)

        listener = asyncio.create_task(listen())
        parked = parking(one)
        waiting = asyncio.create_task(one.claim("ra", 1, lease_s=LEASE, now=time.time(), wait_s=FOREVER_S))
        try:
            await live_subscription(bus_two, received)
            await guarded(parked.wait(), "the claim never parked")
            s = spec()
            await two.create_run(s, policy=REJECT, owner=None, lease_s=LEASE, max_queued=10, now=time.time())
            await bus_two.publish(Control(s.run_id, "cancel", "why"))
            claimed = await guarded(waiting, "the parked claim was not woken by NOTIFY")
            assert [r.run_id for r in claimed] == [s.run_id]
            assert await next_message(received, "no control message") == Control(s.run_id, "cancel", "why")
        finally:
            waiting.cancel()
            listener.cancel()


def _via(port: int) -> str:
    """The test server's URL through the proxy, with a password the server ignores (trust
    auth) that must never show in an error."""
    parts = urlsplit(POSTGRES_URL)
    user = parts.username or "postgres"
    return parts._replace(netloc=f"{user}:s3cret-pw@127.0.0.1:{port}").geturl()


async def test_outage_gives_store_unavailable_and_recovers(notify_only: None) -> None:
    upstream = urlsplit(POSTGRES_URL)
    schema = new_schema()
    async with dropped_afterwards(schema), FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 5432) as proxy:
        url = _via(proxy.port)
        store = run_store(schema, url=url, connect_timeout_s=1.0, command_timeout_s=1.0)
        bus = control_bus(schema, url=url, connect_timeout_s=1.0, command_timeout_s=1.0)
        direct = control_bus(schema)
        await store.open()
        await bus.open()
        await direct.open()
        received: asyncio.Queue[Control] = asyncio.Queue()

        async def listen() -> None:
            async for message in bus.subscribe():
                received.put_nowait(message)

        listener = asyncio.create_task(listen())
        try:
            s = spec()
            await store.create_run(s, policy=REJECT, owner="r1", lease_s=LEASE, max_queued=10, now=time.time())

            def check(exc: StoreUnavailableError) -> None:
                assert f"127.0.0.1:{proxy.port}{upstream.path}" in str(exc) and "s3cret" not in str(exc)

            # A silent partition: calls end with their command timeout instead of hanging (a
            # hang is what the guard catches; the timeout is the store's own).
            proxy.stall()
            for call in (
                lambda: store.get_run(s.run_id),
                lambda: store.record_progress(s.run_id, 1, deltas(s.run_id, 1, 1), None, now=time.time()),
            ):
                with pytest.raises(StoreUnavailableError) as info:
                    await guarded(call(), "a call to a partitioned server")
                check(info.value)
                assert isinstance(info.value.__cause__, TimeoutError), repr(info.value.__cause__)

            # A crash or restart: connections reset and refused, calls fail at once: on the
            # refusal itself, not on a timeout.
            proxy.restore()
            proxy.cut()
            for call in (
                lambda: store.create_run(spec(), policy=REJECT, owner=None, lease_s=LEASE, max_queued=10,
                                         now=time.time()),
                lambda: store.claim("r1", 1, lease_s=LEASE, now=time.time(), wait_s=0),
                lambda: store.ping(),
            ):
                with pytest.raises(StoreUnavailableError) as info:
                    await guarded(call(), "a call to a server that refuses connections")
                check(info.value)
                assert not isinstance(info.value.__cause__, TimeoutError), repr(info.value.__cause__)
            with pytest.raises(StoreUnavailableError, match="cannot connect") as info:
                await PostgresRunStore(url=url, schema=schema, connect_timeout_s=1.0).open()
            check(info.value)
            with pytest.raises(StoreUnavailableError):
                await bus.publish(Control("run_x", "cancel"))

            # Back: the pool reconnects, and so do the LISTEN connections.
            proxy.restore()
            await store.ping()
            got = await store.get_run(s.run_id)
            assert got is not None and got.last_sequence in (0, 1)  # the stalled write may or may not have landed
            # Messages published before the bus listens again are lost, by design: probe until one
            # arrives (the bus reconnected), then a message sent after that arrives.
            await live_subscription(direct, received)
            await direct.publish(Control("run_y", "cancel", "after the outage"))
            message = await next_message(received, "no control message after the bus reconnected")
            assert message == Control("run_y", "cancel", "after the outage")
            # The store's LISTEN connection is back too: a parked wait_events is woken by the
            # NOTIFY of another store's append (or, had the append come before the LISTEN was
            # back, by the re-check every reconnect makes), not by a poll.
            parked = parking(store, s.run_id)
            waiter = asyncio.create_task(
                store.wait_events(s.run_id, got.last_sequence, limit=10, timeout_s=FOREVER_S))
            try:
                await guarded(parked.wait(), "wait_events never parked")
                other = run_store(schema)
                await other.open()
                try:
                    await other.record_progress(s.run_id, 1, deltas(s.run_id, got.last_sequence + 1, 1), None,
                                                now=time.time())
                finally:
                    await other.close()
                woken = await guarded(waiter, "the parked wait_events was not woken after the outage")
                assert [e.sequence for e in woken] == [got.last_sequence + 1]
            finally:
                waiter.cancel()
        finally:
            listener.cancel()
            await direct.close()
            await bus.close()
            await store.close()
