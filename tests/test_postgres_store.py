"""What only the Postgres store has: migrations, several replicas on one schema, a pool.

The shared behaviour is the contract suite (tests/test_session_stores.py); these run
against the real server too (tests/backends_postgres.py), each on a fresh schema.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable, TypeVar
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.runtime.items import MessageItem, ToolResultItem
from agentd.server.sessions.postgres import store as postgres_store_module
from agentd.server.sessions.postgres import LATEST_VERSION, PostgresSessionStore
from tests.backends_postgres import (
    POSTGRES_URL,
    dropped_afterwards,
    new_schema,
    postgres_store,
    raw_connection,
    replica,
)

T = TypeVar("T")


def msg(text: str) -> MessageItem:
    return MessageItem(role="user", text=text)


GUARD_S = 60.0  # how long a test waits before it calls a wait a hang: a bound on a failure, never a latency


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
    """Return once ``check()`` is true (asked again after each answer); fail, naming ``what``, after ``guard_s``."""

    async def poll() -> None:
        while not await check():
            await asyncio.sleep(0.005)

    await guarded(poll(), what, guard_s)


@asynccontextmanager
async def raw() -> AsyncIterator[asyncpg.Connection]:
    conn = await raw_connection()
    try:
        yield conn
    finally:
        await conn.close()


@asynccontextmanager
async def opened(store: PostgresSessionStore) -> AsyncIterator[PostgresSessionStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


class CountingProxy:
    """A TCP relay in front of the test server that counts round trips: a client write
    that follows server data (or starts a connection) opens a new one."""

    def __init__(self, *, answer: bool = True) -> None:
        self.answer = answer  # False: accept connections and never reply (a black hole)
        self.round_trips = 0
        self.upstream_ports: list[int] = []
        self._server: asyncio.AbstractServer | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    def url(self, url: str = POSTGRES_URL) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        parts = urlsplit(url)
        userinfo = parts.netloc.rpartition("@")[0]
        netloc = f"{userinfo}@127.0.0.1:{port}" if userinfo else f"127.0.0.1:{port}"
        return urlunsplit(parts._replace(netloc=netloc))

    async def __aenter__(self) -> CountingProxy:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        if not self.answer:
            await asyncio.sleep(3600)
        target = urlsplit(POSTGRES_URL)
        up_reader, up_writer = await asyncio.open_connection(target.hostname, target.port or 5432)
        self.upstream_ports.append(up_writer.get_extra_info("sockname")[1])
        last = ["server"]

        async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, side: str) -> None:
            try:
                while data := await reader.read(65536):
                    if side == "client" and last[0] == "server":
                        self.round_trips += 1
                    last[0] = side
                    writer.write(data)
                    await writer.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                writer.close()

        tasks = [
            asyncio.create_task(pump(client_reader, up_writer, "client")),
            asyncio.create_task(pump(up_reader, client_writer, "server")),
        ]
        self._tasks.update(tasks)
        await asyncio.gather(*tasks, return_exceptions=True)


# --- migrations ------------------------------------------------------------------------


async def test_migrations_record_each_version_and_are_idempotent() -> None:
    async with postgres_store() as store, raw() as conn:
        versions = await conn.fetch(f'SELECT version, applied_at FROM "{store.schema}".schema_version ORDER BY 1')
        assert [row["version"] for row in versions] == list(range(1, LATEST_VERSION + 1))
        assert all(row["applied_at"] is not None for row in versions)

        status = await store.schema_status()
        assert (status.backend, status.current, status.latest, status.pending) == (
            "postgres",
            LATEST_VERSION,
            LATEST_VERSION,
            0,
        )
        target = urlsplit(POSTGRES_URL)
        assert status.location == f"{target.hostname}:{target.port or 5432}{target.path} schema {store.schema}"
        assert await store.migrate() == status
        assert await store.migrate() == status
        # An unopened replica can report and migrate too (`agentd db status|migrate`).
        assert await replica(store.schema).migrate() == status
        assert await replica(store.schema).schema_status() == status
        count = await conn.fetchval(f'SELECT count(*) FROM "{store.schema}".schema_version')
        assert count == LATEST_VERSION


async def test_replicas_migrating_a_fresh_schema_at_once_both_succeed() -> None:
    schema = new_schema()
    async with dropped_afterwards(schema):
        first, second, third = replica(schema), replica(schema), replica(schema)
        try:
            statuses = await asyncio.gather(first.open(), second.open(), third.migrate(), replica(schema).migrate())
            assert [s.current for s in statuses[2:]] == [LATEST_VERSION, LATEST_VERSION]
            await first.create_session("s1")
            assert (await second.get_session("s1")).session_id == "s1"
        finally:
            await first.close()
            await second.close()
        async with raw() as conn:
            rows = await conn.fetch(f'SELECT version FROM "{schema}".schema_version ORDER BY version')
        assert [r["version"] for r in rows] == list(range(1, LATEST_VERSION + 1))


async def test_without_auto_migrate_an_empty_schema_refuses_to_open() -> None:
    schema = new_schema()
    async with dropped_afterwards(schema):
        pinned = replica(schema, auto_migrate=False)
        status = await pinned.schema_status()
        assert (status.current, status.pending) == (0, LATEST_VERSION)
        with pytest.raises(StoreUnavailableError, match="run `agentd db migrate`") as info:
            await pinned.open()
        assert schema in str(info.value) and f"needs {LATEST_VERSION}" in str(info.value)
        with pytest.raises(StoreUnavailableError, match="not open"):
            await pinned.get_session("s1")
        async with raw() as conn:
            assert await conn.fetchval("SELECT to_regnamespace($1)", schema) is None  # nothing created

        assert (await pinned.migrate()).pending == 0
        async with opened(pinned):
            await pinned.create_session("s1")


async def test_a_schema_newer_than_the_code_is_used_with_a_warning(caplog: pytest.LogCaptureFixture) -> None:
    async with postgres_store() as store, raw() as conn:
        await store.create_session("s1")
        await conn.execute(f'INSERT INTO "{store.schema}".schema_version (version) VALUES ($1)', LATEST_VERSION + 1)
        for auto_migrate in (False, True):
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="agentd.store"):
                async with opened(replica(store.schema, auto_migrate=auto_migrate)) as older:
                    assert (await older.get_session("s1")).session_id == "s1"
            assert f"version {LATEST_VERSION + 1}, newer" in caplog.text
        assert (await store.schema_status()).current == LATEST_VERSION + 1


async def test_schema_names_are_plain_identifiers() -> None:
    for bad in ["Agentd", "1st", "a-b", 'x"; DROP SCHEMA public; --', ""]:
        with pytest.raises(ValueError, match="schema"):
            PostgresSessionStore(url=POSTGRES_URL, schema=bad)


async def test_tables_indexes_and_functions() -> None:
    async with postgres_store() as store, raw() as conn:
        indexes = {
            row["indexname"]: row["indexdef"]
            for row in await conn.fetch(
                "SELECT indexname, indexdef FROM pg_indexes WHERE schemaname = $1", store.schema
            )
        }
        assert set(indexes) == {
            "sessions_pkey",
            "sessions_by_tenant",
            "sessions_by_expiry",
            "items_pkey",
            "append_requests_pkey",
            "schema_version_pkey",
        }
        assert indexes["items_pkey"].endswith("USING btree (session_id, seq)")
        assert indexes["append_requests_pkey"].endswith("USING btree (session_id, request_id)")
        assert indexes["sessions_by_tenant"].endswith("USING btree (tenant, created_at DESC, id DESC)")
        assert indexes["sessions_by_expiry"].endswith("USING btree (expires_at) WHERE (expires_at IS NOT NULL)")

        columns = {
            (row["table_name"], row["column_name"]): (row["data_type"], row["collation_name"])
            for row in await conn.fetch(
                "SELECT table_name, column_name, data_type, collation_name FROM information_schema.columns"
                " WHERE table_schema = $1",
                store.schema,
            )
        }
        for table in ("sessions", "items", "append_requests"):
            key = "id" if table == "sessions" else "session_id"
            assert columns[(table, key)] == ("text", "C")
        assert columns[("items", "data")][0] == "json"
        assert columns[("sessions", "metadata")][0] == columns[("sessions", "state")][0] == "jsonb"
        assert columns[("sessions", "expires_at")][0] == "timestamp with time zone"

        # The functions carry their schema, so callers' search_path does not matter.
        functions = await conn.fetch(
            "SELECT proname, proconfig FROM pg_proc WHERE pronamespace = to_regnamespace($1)", store.schema
        )
        assert {row["proname"] for row in functions} == {
            "agentd_create",
            "agentd_read_history_create",
            "agentd_append",
            "agentd_pop",
            "agentd_clear",
            "agentd_drop_through",
        }
        assert all(row["proconfig"] == [f"search_path={store.schema}, pg_temp"] for row in functions)


# --- several replicas on one schema ----------------------------------------------------


async def test_concurrent_creates_on_two_replicas() -> None:
    async with postgres_store() as a, opened(replica(a.schema)) as b:
        outcomes = await asyncio.gather(
            *((a if n % 2 else b).create_session("s1", metadata={"n": str(n)}) for n in range(6)),
            return_exceptions=True,
        )
        created = [o for o in outcomes if not isinstance(o, BaseException)]
        assert len(created) == 1
        assert all(isinstance(o, SessionExistsError) for o in outcomes if isinstance(o, BaseException))
        assert await b.get_session("s1") == created[0]


# --- expiry ----------------------------------------------------------------------------


async def test_sweep_deletes_the_rows_of_expired_sessions(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": time.time()}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    monkeypatch.setattr(postgres_store_module, "_SWEEP_BATCH", 2)  # several batches below
    async with postgres_store() as store, raw() as conn:
        q = f'"{store.schema}"'
        for n in range(5):
            await store.create_session(f"gone{n}", ttl_s=1)
            await store.append_items(f"gone{n}", [msg("a"), msg("b")], request_id="r")
        await store.create_session("kept", ttl_s=60)
        await store.append_items("kept", [msg("k")], request_id="r")
        await store.create_session("forever")

        clock["now"] += 1.5
        with pytest.raises(SessionNotFoundError):
            await store.get_session("gone0")
        # Invisible already, still stored until swept.
        assert await conn.fetchval(f"SELECT count(*) FROM {q}.sessions") == 7
        assert await store.sweep_expired() == 5
        assert await store.sweep_expired() == 0
        assert [r["id"] for r in await conn.fetch(f"SELECT id FROM {q}.sessions ORDER BY id")] == ["forever", "kept"]
        assert await conn.fetch(f"SELECT session_id, seq FROM {q}.items") == [("kept", 1)]
        assert await conn.fetch(f"SELECT session_id FROM {q}.append_requests") == [("kept",)]


async def test_expiry_uses_the_callers_clock_and_writes_restart_it(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = {"now": 1_800_000_000.25}
    monkeypatch.setattr(time, "time", lambda: clock["now"])
    async with postgres_store(default_ttl_s=10) as store:
        assert await store.read_history("s1", create=True) == []
        record = await store.get_session("s1")
        assert (record.created_at, record.ttl_s, record.expires_at) == (1_800_000_000.25, 10, 1_800_000_010.25)
        clock["now"] += 9.5
        appended = await store.append_items("s1", [msg("a")])
        assert appended[0].created_at == clock["now"]
        clock["now"] += 9.5  # 19s after creation, 9.5s after the append: alive
        assert (await store.get_session("s1")).expires_at == 1_800_000_019.75
        clock["now"] += 0.5  # exactly at expiry: gone
        assert await store.read_history("s1") == []
        with pytest.raises(SessionNotFoundError):
            await store.pop_item("s1")
        with pytest.raises(SessionNotFoundError):
            await store.delete_session("s1")  # reported missing, and its rows are gone
        assert (await store.create_session("s1", ttl_s=0)).expires_at is None


# --- wire efficiency -------------------------------------------------------------------


async def test_every_call_is_one_round_trip() -> None:
    async with CountingProxy() as proxy:
        schema = new_schema()
        async with dropped_afterwards(schema):
            store = PostgresSessionStore(url=proxy.url(), schema=schema, min_size=1, max_size=1)
            async with opened(store):
                for sid in ("other", "d0", "d1"):
                    await store.create_session(sid)
                calls = {
                    "create_session": lambda: store.create_session(f"s{next(ids)}", metadata={"a": "b"}, ttl_s=60),
                    "get_session": lambda: store.get_session("s0"),
                    "list_sessions": lambda: store.list_sessions(1),
                    "list_sessions_after": lambda: store.list_sessions(1, page.next_cursor),
                    "update_session": lambda: store.update_session("s0", state={"n": 1}, ttl_s=0),
                    "append_items": lambda: store.append_items("s0", [msg("a"), msg("b"), msg("c")]),
                    "append_items_replay": lambda: store.append_items("s0", [msg("a")], request_id="r"),
                    "append_items_empty": lambda: store.append_items("s0", []),
                    "list_items": lambda: store.list_items("s0", 10),
                    "list_items_newest": lambda: store.list_items("s0", 10, newest_first=True),
                    "read_history": lambda: store.read_history("s0"),
                    "read_history_create": lambda: store.read_history(f"new{next(ids)}", create=True),
                    "pop_item": lambda: store.pop_item("s0"),
                    "clear_items": lambda: store.clear_items("other"),
                    "drop_items_through": lambda: store.drop_items_through("s0", next(ids)),
                    "sweep_expired": lambda: store.sweep_expired(),
                    "ping": lambda: store.ping(),
                    "delete_session": lambda: store.delete_session(f"d{next(deletable)}"),
                }
                ids, deletable = itertools.count(), itertools.count()
                page = await store.list_sessions(1)
                # The first use of a statement on a connection also prepares it: warm up.
                for call in calls.values():
                    await call()
                counts = {}
                for name, call in calls.items():
                    before = proxy.round_trips
                    await call()
                    counts[name] = proxy.round_trips - before
                assert counts == dict.fromkeys(calls, 1)


# --- failures --------------------------------------------------------------------------


async def test_an_unreachable_server_fails_fast_without_leaking_the_password() -> None:
    """A refused connection fails ``open`` on the refusal: the connect timeout is an hour, so
    only the refusal can end it before the guard."""
    url = "postgresql://agentd:s3cret-pw@127.0.0.1:1/sessions"
    store = PostgresSessionStore(url=url, schema="agentd", connect_timeout_s=3600)
    with pytest.raises(StoreUnavailableError) as info:
        await guarded(store.open(), "opening a store on a refused port")
    message = str(info.value)
    assert "127.0.0.1:1/sessions" in message and "cannot connect" in message
    assert "s3cret" not in message and "agentd:" not in message
    for call in (store.ping(), store.get_session("s1"), store.sweep_expired()):
        with pytest.raises(StoreUnavailableError, match="not open"):
            await call
    with pytest.raises(StoreUnavailableError, match="127.0.0.1:1/sessions"):
        await store.schema_status()
    await store.close()  # closing a store that never opened is fine


async def test_a_server_that_never_answers_times_out() -> None:
    """A server that accepts and never answers costs the connect timeout, not a hang."""
    async with CountingProxy(answer=False) as black_hole:
        store = PostgresSessionStore(url=black_hole.url(), connect_timeout_s=0.3)
        with pytest.raises(StoreUnavailableError, match="cannot connect") as info:
            await guarded(store.open(), "opening a store on a server that never answers")
        assert isinstance(info.value.__cause__, TimeoutError), repr(info.value.__cause__)


async def terminate(conn: asyncpg.Connection, client_ports: list[int], *, wait: bool = False) -> int:
    """Kill the store's backends (only those behind our proxy: other tests may be running
    agentd stores on this database too); with ``wait``, return once they are gone."""
    killed: list[int] = await conn.fetchval(
        "SELECT coalesce(array_agg(pid) FILTER (WHERE pg_terminate_backend(pid)), '{}') FROM pg_stat_activity"
        " WHERE application_name = 'agentd' AND datname = current_database()"
        " AND pid <> pg_backend_pid() AND client_port = ANY($1::int[])",
        client_ports,
    )
    while wait and await conn.fetchval("SELECT count(*) FROM pg_stat_activity WHERE pid = ANY($1)", killed):
        await asyncio.sleep(0.005)
    return len(killed)


async def test_killed_connections_are_replaced_and_nothing_is_half_written() -> None:
    batch = 20
    async with CountingProxy() as proxy:
        schema = new_schema()
        async with dropped_afterwards(schema), raw() as conn:
            store = PostgresSessionStore(url=proxy.url(), schema=schema, min_size=2, max_size=4)
            async with opened(store):
                await store.create_session("s1")
                acknowledged: list[int] = []

                async def writer(w: int) -> None:
                    for i in range(25):
                        try:
                            stored = await store.append_items("s1", [msg(f"{w}-{i}-{k}") for k in range(batch)])
                            acknowledged.append(stored[0].sequence)
                        except StoreUnavailableError:
                            pass  # its connection was killed: written whole or not at all
                        await asyncio.sleep(0.002)

                async def killer() -> None:
                    for _ in range(3):
                        await asyncio.sleep(0.03)
                        await terminate(conn, proxy.upstream_ports)

                await asyncio.gather(*(writer(w) for w in range(4)), killer())

                # After a kill the next call may fail; the one after that works again.
                assert await terminate(conn, proxy.upstream_ports, wait=True) >= 1
                try:
                    await store.get_session("s1")
                except StoreUnavailableError:
                    pass
                record = await store.get_session("s1")
                await store.ping()

                items = await store.list_items("s1", 10_000)
                sequences = [s.sequence for s in items]
                assert sequences == list(range(1, len(items) + 1))  # failed appends consumed nothing
                assert record.item_count == len(items) and len(items) % batch == 0
                starts = set(range(1, len(items) + 1, batch))
                assert set(acknowledged) <= starts  # every acknowledged append is there...
                for start in starts:  # ...and every stored one is whole, from one writer call
                    texts = [items[start - 1 + k].item.text for k in range(batch)]  # type: ignore[union-attr]
                    prefix = texts[0].rsplit("-", 1)[0]
                    assert texts == [f"{prefix}-{k}" for k in range(batch)]


async def test_a_cancelled_or_timed_out_append_writes_nothing() -> None:
    async with postgres_store(command_timeout_s=0.3) as store, raw() as conn, raw() as watcher:
        await store.create_session("s1")
        holder = conn.get_server_pid()

        async def blocked_on_holder() -> bool:
            waiting = await watcher.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", holder)
            return waiting > 0

        # Another transaction holds the session row: appends wait for it.
        async with conn.transaction():
            await conn.execute(f'SELECT 1 FROM "{store.schema}".sessions WHERE id = $1 FOR UPDATE', "s1")
            task = asyncio.create_task(store.append_items("s1", [msg("cancelled")]))
            # Cancelled while it waits in the server for the row (not before it got there).
            await eventually(blocked_on_holder, "the append never waited for the locked row")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            # Its command timeout (0.3 s) ends the next one; the guard only catches a hang.
            with pytest.raises(StoreUnavailableError, match="postgres store at") as info:
                await guarded(store.append_items("s1", [msg("timed out")]), "an append behind a locked row")
            assert isinstance(info.value.__cause__, (asyncio.TimeoutError, asyncpg.QueryCanceledError))
        assert [s.sequence for s in await store.append_items("s1", [msg("ok")])] == [1]
        assert await store.read_history("s1") == [msg("ok")]


async def test_values_postgres_cannot_hold() -> None:
    async with postgres_store() as store:
        # Items are json, not jsonb: NUL characters survive.
        await store.create_session("s1")
        item = ToolResultItem(call_id="c", tool_name="cat", output="bin\x00ary")
        await store.append_items("s1", [item])
        assert await store.read_history("s1") == [item]
        # jsonb cannot hold \u0000 and JSON has no NaN: bad input, not an outage.
        with pytest.raises(ValueError):
            await store.create_session("s2", metadata={"k": "nul\x00"})
        with pytest.raises(ValueError):
            await store.update_session("s1", state={"x": float("nan")})
        assert (await store.get_session("s1")).state == {}
        with pytest.raises(SessionNotFoundError):
            await store.get_session("s2")
