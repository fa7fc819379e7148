"""One contract suite for every AgentStore engine.

Each test runs against every entry of ``STORE_FACTORIES``: an async context manager that
yields an opened store on a fresh, private namespace (a temp file, a Postgres schema, a
Redis key prefix) and removes it afterwards. Postgres and Redis are the real servers on
this machine; an unreachable one fails the run, it is never skipped. Two stores on one
namespace are two replicas. At the bottom: outages (a fault proxy between the store and
the real Postgres or Redis), writes failing half-way, and where each engine keeps its
data (beside the sessions, as the factory builds it).
"""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncContextManager, AsyncIterator, Awaitable, Callable
from urllib.parse import urlsplit

import pytest
from redis.exceptions import TimeoutError as RedisTimeoutError

from agentd.server.agents.store.base import (
    CHANGE_FEED_LIMIT,
    AgentExistsError,
    AgentNotFoundError,
    AgentRecord,
    AgentStore,
    AgentVersionNotFoundError,
    AgentVersionRecord,
    AliasNotFoundError,
    AliasRecord,
    VersionConflictError,
)
from agentd.server.agents.store.factory import build_agent_store
from agentd.server.agents.store.memory import MemoryAgentStore
from agentd.server.agents.store.postgres import PostgresAgentStore
from agentd.server.agents.store.redis import RedisAgentStore
from agentd.server.agents.store.sqlite import SqliteAgentStore
from agentd.server.redis_common import connect_redis
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.sessions.postgres import PostgresSessionStore
from agentd.server.sessions.sqlite import SqliteSessionStore
from agentd.server.settings import Settings
from agentd.server.tenancy import DEFAULT_TENANT
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema, raw_connection
from tests.backends_redis import REDIS_URL, delete_prefix, fail_unreachable, new_prefix
from tests.fault_proxy import FaultProxy

T = "acme"  # the tenant most tests use
DEF: dict[str, Any] = {"instructions": "Help the user.", "model": "gpt-4o-mini", "tools": ["lookup_order"]}


def d(n: int) -> dict[str, Any]:
    """A distinct definition per version."""
    return {"instructions": f"version {n}", "n": n}


@asynccontextmanager
async def opened(store: AgentStore) -> AsyncIterator[AgentStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


def postgres_agents(schema: str, **kwargs: Any) -> PostgresAgentStore:
    return PostgresAgentStore(url=kwargs.pop("url", POSTGRES_URL), schema=schema, **kwargs)


def redis_agents(prefix: str, url: str = REDIS_URL, **kwargs: Any) -> RedisAgentStore:
    client = connect_redis(url=url, connect_timeout_s=kwargs.pop("connect_timeout_s", 2.0),
                           socket_timeout_s=kwargs.pop("socket_timeout_s", 5.0), client_name="agentd-test")
    return RedisAgentStore(client, prefix=prefix, **kwargs)


@asynccontextmanager
async def postgres_store(**kwargs: Any) -> AsyncIterator[AgentStore]:
    schema = new_schema()
    async with dropped_afterwards(schema):
        async with opened(postgres_agents(schema, **kwargs)) as store:
            yield store


@asynccontextmanager
async def redis_store(**kwargs: Any) -> AsyncIterator[AgentStore]:
    prefix = new_prefix()
    store = redis_agents(prefix, **kwargs)
    try:
        try:
            await store.open()
        except StoreUnavailableError as exc:
            await store.close()
            fail_unreachable(exc)
        try:
            yield store
        finally:
            await store.close()
    finally:
        await delete_prefix(prefix)


STORE_FACTORIES: dict[str, Callable[[Path], AsyncContextManager[AgentStore]]] = {
    "memory": lambda tmp_path: opened(MemoryAgentStore()),
    "sqlite": lambda tmp_path: opened(SqliteAgentStore(tmp_path / "agentd.db")),
    "postgres": lambda tmp_path: postgres_store(),
    "redis": lambda tmp_path: redis_store(),
}


@pytest.fixture(params=list(STORE_FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[AgentStore]:
    async with STORE_FACTORIES[request.param](tmp_path) as backend:
        yield backend


# A second store on the same data (file, schema, key prefix): another server replica.
# The memory store has no shared data, so it has no replicas.
REPLICA_FACTORIES: dict[str, Callable[[Any], AgentStore]] = {
    "sqlite": lambda s: SqliteAgentStore(s.path),
    "postgres": lambda s: postgres_agents(s.schema),
    "redis": lambda s: redis_agents(s.prefix),
}


@pytest.fixture(params=list(REPLICA_FACTORIES))
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[AgentStore, AgentStore]]:
    async with STORE_FACTORIES[request.param](tmp_path) as first:
        async with opened(REPLICA_FACTORIES[request.param](first)) as second:
            yield first, second


async def unchanged(store: AgentStore, action: Callable[[], Awaitable[Any]], error: type[Exception]) -> Exception:
    """``action`` raises ``error`` and writes nothing: the revision stays where it was."""
    before = await store.revision()
    with pytest.raises(error) as info:
        await action()
    assert await store.revision() == before
    return info.value


# --- agents and versions -------------------------------------------------------------


async def test_create_and_get(store: AgentStore) -> None:
    before = time.time()
    created = await store.create_agent(T, "triage", DEF, created_by="alice")
    after = time.time()
    assert created == AgentVersionRecord(T, "triage", 1, DEF, created.create_time, "alice")
    assert before <= created.create_time <= after
    agent, latest = await store.get_agent(T, "triage")
    assert agent == AgentRecord(T, "triage", 1, created.create_time, created.create_time)
    assert latest == created  # exactly what the write returned, times included
    assert await store.get_version(T, "triage", 1) == created
    await store.ping()


async def test_definitions_round_trip_whatever_json_holds(store: AgentStore) -> None:
    definition = {
        "text": "Grüße 👋 \u0000 \\ \" ' \n",
        "nested": {"list": [1, 2.5, -3, None, True, False, "x"], "empty": {}, "deep": [[{"a": []}]]},
        "big": 2**62,
        "float": 0.1 + 0.2,
        "lone": "\ud800",
    }
    created = await store.create_agent(T, "a", definition, created_by="bob 🧑\u200d💻")
    assert created.definition == definition
    assert (await store.get_agent(T, "a"))[1] == created
    assert await store.get_version(T, "a", 1) == created


async def test_given_and_returned_dicts_do_not_alias_the_store(store: AgentStore) -> None:
    definition: dict[str, Any] = {"tools": ["a"], "inner": {"x": 1}}
    created = await store.create_agent(T, "a", definition)
    definition["tools"].append("b")
    definition["inner"]["x"] = 2
    created.definition["tools"].append("c")
    _, latest = await store.get_agent(T, "a")
    assert latest.definition == {"tools": ["a"], "inner": {"x": 1}}
    latest.definition["inner"]["x"] = 3
    assert (await store.get_version(T, "a", 1)).definition == {"tools": ["a"], "inner": {"x": 1}}


async def test_what_json_cannot_hold_is_refused_before_writing(store: AgentStore) -> None:
    await unchanged(store, lambda: store.create_agent(T, "a", {"t": math.nan}), ValueError)
    await unchanged(store, lambda: store.create_agent(T, "a", {"t": {1, 2}}), TypeError)
    await unchanged(store, lambda: store.create_agent(T, "a", ["not", "a", "dict"]), TypeError)  # type: ignore[arg-type]
    with pytest.raises(AgentNotFoundError):
        await store.get_agent(T, "a")
    await store.create_agent(T, "a", d(1))
    await unchanged(store, lambda: store.update_agent(T, "a", {"t": math.inf}), ValueError)
    assert (await store.get_agent(T, "a"))[0].latest_version == 1


async def test_bad_tenant_or_name_is_a_caller_bug(store: AgentStore) -> None:
    for tenant in ("", "a/b", "a:b", "x" * 65, "{t}"):
        with pytest.raises(ValueError):
            await store.create_agent(tenant, "a", DEF)
        with pytest.raises(ValueError):
            await store.get_agent(tenant, "a")
    with pytest.raises(ValueError):
        await store.create_agent(T, "", DEF)
    with pytest.raises(ValueError):
        await store.list_agents(T, 0)
    with pytest.raises(ValueError):
        await store.list_versions(T, "a", 0)
    with pytest.raises(ValueError):
        await store.list_agents(T, 10, "not a cursor!")
    assert await store.revision() == 0


async def test_create_existing_raises_and_keeps_the_agent(store: AgentStore) -> None:
    first = await store.create_agent(T, "triage", d(1))
    error = await unchanged(store, lambda: store.create_agent(T, "triage", d(2)), AgentExistsError)
    assert isinstance(error, AgentExistsError)
    assert (error.tenant, error.name) == (T, "triage")
    assert str(error) == "agent 'triage' already exists"
    assert await store.get_agent(T, "triage") == (AgentRecord(T, "triage", 1, first.create_time, first.create_time),
                                                  first)


async def test_missing_agent_raises_not_found(store: AgentStore) -> None:
    with pytest.raises(AgentNotFoundError) as info:
        await store.get_agent(T, "nope")
    assert (info.value.tenant, info.value.name) == (T, "nope")
    assert str(info.value) == "agent 'nope' does not exist"
    assert isinstance(info.value, LookupError)
    await unchanged(store, lambda: store.update_agent(T, "nope", d(1)), AgentNotFoundError)
    await unchanged(store, lambda: store.delete_agent(T, "nope"), AgentNotFoundError)
    with pytest.raises(AgentNotFoundError):
        await store.list_versions(T, "nope", 10)
    with pytest.raises(AgentVersionNotFoundError):
        await store.get_version(T, "nope", 1)


async def test_update_adds_the_next_version(store: AgentStore) -> None:
    created = await store.create_agent(T, "a", d(1), created_by="alice")
    v2 = await store.update_agent(T, "a", d(2), created_by="bob")
    v3 = await store.update_agent(T, "a", d(3))
    assert [(v.version, v.definition, v.created_by) for v in (v2, v3)] == [(2, d(2), "bob"), (3, d(3), "")]
    assert created.create_time <= v2.create_time <= v3.create_time
    agent, latest = await store.get_agent(T, "a")
    assert agent == AgentRecord(T, "a", 3, created.create_time, v3.create_time)
    assert latest == v3
    # Every version stays exactly as written.
    assert [await store.get_version(T, "a", n) for n in (1, 2, 3)] == [created, v2, v3]


async def test_get_version_that_does_not_exist(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    for version in (0, -1, 2, 10**6, 2**63 - 1, 2**70):
        with pytest.raises(AgentVersionNotFoundError) as info:
            await store.get_version(T, "a", version)
        assert (info.value.tenant, info.value.name, info.value.version) == (T, "a", version)
    assert str(info.value) == f"agent 'a' has no version {2**70}"


async def test_expected_version_is_optimistic_concurrency(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    v2 = await store.update_agent(T, "a", d(2), expected_version=1)
    assert v2.version == 2
    error = await unchanged(store, lambda: store.update_agent(T, "a", d(3), expected_version=1), VersionConflictError)
    assert isinstance(error, VersionConflictError)
    assert (error.tenant, error.name, error.expected, error.latest) == (T, "a", 1, 2)
    assert "version 2" in str(error) and "not 1" in str(error)
    await unchanged(store, lambda: store.update_agent(T, "a", d(3), expected_version=7), VersionConflictError)
    await unchanged(store, lambda: store.update_agent(T, "a", d(3), expected_version=2**70), VersionConflictError)
    with pytest.raises(ValueError):
        await store.update_agent(T, "a", d(3), expected_version=0)
    assert (await store.get_agent(T, "a"))[1] == v2
    assert (await store.update_agent(T, "a", d(3), expected_version=2)).version == 3
    # A missing agent is missing, whatever was expected.
    await unchanged(store, lambda: store.update_agent(T, "b", d(1), expected_version=1), AgentNotFoundError)


async def test_concurrent_updates_never_share_a_version(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    results = await asyncio.gather(*(store.update_agent(T, "a", d(10 + i)) for i in range(10)))
    assert sorted(r.version for r in results) == list(range(2, 12))
    for r in results:
        assert await store.get_version(T, "a", r.version) == r
    assert (await store.get_agent(T, "a"))[0].latest_version == 11
    assert await store.revision() == 11


async def test_concurrent_updates_expecting_one_version_let_one_win(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    results = await asyncio.gather(
        *(store.update_agent(T, "a", d(10 + i), expected_version=1) for i in range(10)), return_exceptions=True
    )
    won = [r for r in results if isinstance(r, AgentVersionRecord)]
    lost = [r for r in results if isinstance(r, VersionConflictError)]
    assert len(won) == 1 and len(lost) == 9 and won[0].version == 2
    assert all(e.latest == 2 for e in lost)
    assert await store.revision() == 2


async def test_concurrent_creates_make_one_agent(store: AgentStore) -> None:
    results = await asyncio.gather(*(store.create_agent(T, "a", d(i)) for i in range(5)), return_exceptions=True)
    assert sum(isinstance(r, AgentVersionRecord) for r in results) == 1
    assert sum(isinstance(r, AgentExistsError) for r in results) == 4
    assert (await store.get_agent(T, "a"))[0].latest_version == 1


async def test_list_agents_pages_by_name(store: AgentStore) -> None:
    names = ["zeta", "alpha", "Beta", "ümlaut", "alpha-2", "a", "b/c", "日本"]
    for name in names:
        await store.create_agent(T, name, d(1))
    await store.update_agent(T, "zeta", d(2))
    await store.create_agent(T, "deleted", d(1))
    await store.delete_agent(T, "deleted")
    await store.create_agent("other", "also", d(1))
    seen: list[AgentRecord] = []
    cursor = ""
    pages = 0
    while True:
        page, cursor = await store.list_agents(T, 3, cursor)
        seen += page
        pages += 1
        assert len(page) <= 3
        if not cursor:
            break
    assert [r.name for r in seen] == sorted(names)  # code point order
    assert pages == 3
    assert all(r.tenant == T for r in seen)
    zeta = next(r for r in seen if r.name == "zeta")
    assert zeta.latest_version == 2 and zeta == (await store.get_agent(T, "zeta"))[0]
    # A page that ends exactly at the end says so.
    everything, cursor = await store.list_agents(T, len(names))
    assert len(everything) == len(names) and cursor == ""
    assert await store.list_agents("empty", 10) == ([], "")


async def test_list_versions_newest_first(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    for n in range(2, 8):
        await store.update_agent(T, "a", d(n))
    versions = await store.list_versions(T, "a", 100)
    assert [v.version for v in versions] == [7, 6, 5, 4, 3, 2, 1]
    assert [v.definition for v in versions] == [d(n) for n in range(7, 0, -1)]
    assert versions[2] == await store.get_version(T, "a", 5)
    assert [v.version for v in await store.list_versions(T, "a", 3)] == [7, 6, 5]
    assert [v.version for v in await store.list_versions(T, "a", 3, before_version=5)] == [4, 3, 2]
    assert [v.version for v in await store.list_versions(T, "a", 3, before_version=2)] == [1]
    assert await store.list_versions(T, "a", 3, before_version=1) == []
    assert [v.version for v in await store.list_versions(T, "a", 2, before_version=100)] == [7, 6]
    assert [v.version for v in await store.list_versions(T, "a", 10**9, before_version=2**70)] == list(range(7, 0, -1))
    with pytest.raises(ValueError):
        await store.list_versions(T, "a", 3, before_version=-1)


async def test_many_versions_list_in_one_call(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    await asyncio.gather(*(store.update_agent(T, "a", d(n)) for n in range(2, 1203)))
    versions = await store.list_versions(T, "a", 2000)
    assert [v.version for v in versions] == list(range(1202, 0, -1))
    assert [v.version for v in await store.list_versions(T, "a", 1100, before_version=1150)][::1099] == [1149, 50]


async def test_soft_delete_keeps_versions(store: AgentStore) -> None:
    v1 = await store.create_agent(T, "a", d(1))
    v2 = await store.update_agent(T, "a", d(2))
    await store.set_alias(T, "a", "prod", [(1, 100)])
    await store.create_agent(T, "b", d(1))
    await store.delete_agent(T, "a")
    with pytest.raises(AgentNotFoundError):
        await store.get_agent(T, "a")
    assert [r.name for r in (await store.list_agents(T, 10))[0]] == ["b"]
    # A run pinned to a version of a deleted agent can still read it.
    assert [await store.get_version(T, "a", 1), await store.get_version(T, "a", 2)] == [v1, v2]
    with pytest.raises(AgentVersionNotFoundError):
        await store.get_version(T, "a", 3)
    for action in (
        lambda: store.update_agent(T, "a", d(3)),
        lambda: store.delete_agent(T, "a"),
        lambda: store.set_alias(T, "a", "prod", [(2, 100)]),
        lambda: store.delete_alias(T, "a", "prod"),
    ):
        await unchanged(store, action, AgentNotFoundError)
    for read in (
        lambda: store.list_versions(T, "a", 10),
        lambda: store.get_alias(T, "a", "prod"),
        lambda: store.list_aliases(T, "a"),
    ):
        with pytest.raises(AgentNotFoundError):
            await read()


async def test_recreating_a_deleted_name_continues_its_numbering(store: AgentStore) -> None:
    old1 = await store.create_agent(T, "a", d(1))
    await store.update_agent(T, "a", d(2))
    await store.set_alias(T, "a", "prod", [(2, 100)])
    await store.delete_agent(T, "a")
    again = await store.create_agent(T, "a", {"fresh": True})
    assert again.version == 3  # never 1 again: a run pinned to v1 keeps meaning the old v1
    agent, latest = await store.get_agent(T, "a")
    assert agent == AgentRecord(T, "a", 3, again.create_time, again.create_time)
    assert agent.create_time > old1.create_time
    assert latest == again
    assert await store.get_version(T, "a", 1) == old1
    assert [v.version for v in await store.list_versions(T, "a", 10)] == [3, 2, 1]
    assert await store.list_aliases(T, "a") == []  # aliases went with the delete
    with pytest.raises(AliasNotFoundError):
        await store.get_alias(T, "a", "prod")
    assert (await store.update_agent(T, "a", d(4), expected_version=3)).version == 4
    # And again.
    await store.delete_agent(T, "a")
    assert (await store.create_agent(T, "a", d(5))).version == 5


async def test_tenants_are_isolated(store: AgentStore) -> None:
    mine = await store.create_agent("t1", "shared-name", d(1))
    await store.update_agent("t1", "shared-name", d(2))
    await store.set_alias("t1", "shared-name", "prod", [(2, 100)])
    # Another tenant finds nothing, and changes nothing.
    with pytest.raises(AgentNotFoundError):
        await store.get_agent("t2", "shared-name")
    with pytest.raises(AgentVersionNotFoundError):
        await store.get_version("t2", "shared-name", 1)
    with pytest.raises(AgentNotFoundError):
        await store.get_alias("t2", "shared-name", "prod")
    for action in (
        lambda: store.update_agent("t2", "shared-name", d(9)),
        lambda: store.delete_agent("t2", "shared-name"),
        lambda: store.set_alias("t2", "shared-name", "prod", [(1, 100)]),
        lambda: store.delete_alias("t2", "shared-name", "prod"),
    ):
        await unchanged(store, action, AgentNotFoundError)
    assert await store.list_agents("t2", 10) == ([], "")
    # Both may own the name, numbered independently; the default tenant too.
    theirs = await store.create_agent("t2", "shared-name", d(7))
    default = await store.create_agent(DEFAULT_TENANT, "shared-name", d(8))
    assert (theirs.version, theirs.tenant, default.version, default.tenant) == (1, "t2", 1, DEFAULT_TENANT)
    assert (await store.get_agent("t1", "shared-name"))[1].version == 2
    assert await store.get_version("t1", "shared-name", 1) == mine
    assert (await store.get_version("t2", "shared-name", 1)).definition == d(7)
    assert await store.list_aliases("t2", "shared-name") == []
    assert [r.tenant for r in (await store.list_agents("t2", 10))[0]] == ["t2"]
    assert await store.tenants() == sorted(["t1", "t2", DEFAULT_TENANT])
    await store.delete_agent("t2", "shared-name")
    assert await store.tenants() == sorted(["t1", DEFAULT_TENANT])
    assert (await store.get_agent("t1", "shared-name"))[1].version == 2


async def test_tenants_lists_those_with_live_agents(store: AgentStore) -> None:
    assert await store.tenants() == []
    await store.create_agent("b", "x", d(1))
    await store.create_agent("b", "y", d(1))
    await store.create_agent("a", "x", d(1))
    assert await store.tenants() == ["a", "b"]
    await store.delete_agent("b", "x")
    assert await store.tenants() == ["a", "b"]
    await store.delete_agent("b", "y")
    assert await store.tenants() == ["a"]
    await store.create_agent("b", "x", d(2))
    assert await store.tenants() == ["a", "b"]


# --- aliases -------------------------------------------------------------------------


async def test_aliases_point_at_versions_and_split_traffic(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    await store.update_agent(T, "a", d(2))
    await store.update_agent(T, "a", d(3))
    before = time.time()
    prod = await store.set_alias(T, "a", "prod", [(2, 100)])
    assert prod == AliasRecord(T, "a", "prod", ((2, 100),), prod.update_time)
    assert before <= prod.update_time <= time.time()
    assert await store.get_alias(T, "a", "prod") == prod
    canary = await store.set_alias(T, "a", "canary", ((3, 10), (2, 90)))
    assert canary.routes == ((3, 10), (2, 90))  # as given, in order
    assert await store.get_alias(T, "a", "canary") == canary
    # Replacing keeps one alias under the name.
    moved = await store.set_alias(T, "a", "prod", [[3, 50], [1, 50]])
    assert moved.routes == ((3, 50), (1, 50)) and moved.update_time >= prod.update_time
    assert await store.list_aliases(T, "a") == [canary, moved]  # by alias name
    # Aliases do not change the agent's own record.
    agent, _ = await store.get_agent(T, "a")
    assert agent.latest_version == 3
    await store.delete_alias(T, "a", "canary")
    assert await store.list_aliases(T, "a") == [moved]
    with pytest.raises(AliasNotFoundError) as info:
        await store.get_alias(T, "a", "canary")
    assert (info.value.tenant, info.value.agent, info.value.alias) == (T, "a", "canary")
    assert str(info.value) == "agent 'a' has no alias 'canary'"
    assert isinstance(info.value, LookupError)
    await unchanged(store, lambda: store.delete_alias(T, "a", "canary"), AliasNotFoundError)


async def test_alias_routes_must_name_existing_versions(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    await store.update_agent(T, "a", d(2))
    prod = await store.set_alias(T, "a", "prod", [(1, 100)])
    error = await unchanged(store, lambda: store.set_alias(T, "a", "prod", [(2, 50), (5, 25), (9, 25)]),
                            AgentVersionNotFoundError)
    assert isinstance(error, AgentVersionNotFoundError)
    assert (error.tenant, error.name, error.version) == (T, "a", 5)
    await unchanged(store, lambda: store.set_alias(T, "a", "prod", [(2**70, 100)]), AgentVersionNotFoundError)
    assert await store.get_alias(T, "a", "prod") == prod
    await unchanged(store, lambda: store.set_alias(T, "missing", "prod", [(1, 100)]), AgentNotFoundError)
    with pytest.raises(AgentNotFoundError):
        await store.list_aliases(T, "missing")


@pytest.mark.parametrize(
    "routes",
    [
        [],
        [(1, 90)],
        [(1, 60), (2, 60)],
        [(1, 0), (2, 100)],
        [(1, -10), (2, 110)],
        [(1, 50), (1, 50)],
        [(0, 100)],
        [(-1, 100)],
        [(1, 50.0), (2, 50)],
        [(True, 100)],
        [(1, 100, 3)],
        [(1,)],
        [("1", 100)],
    ],
    ids=repr,
)
async def test_alias_routes_are_validated(store: AgentStore, routes: Any) -> None:
    await store.create_agent(T, "a", d(1))
    await store.update_agent(T, "a", d(2))
    await unchanged(store, lambda: store.set_alias(T, "a", "prod", routes), ValueError)
    assert await store.list_aliases(T, "a") == []


async def test_alias_name_must_not_be_empty(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    await unchanged(store, lambda: store.set_alias(T, "a", "", [(1, 100)]), ValueError)


# --- change feed ---------------------------------------------------------------------


async def test_every_write_bumps_the_revision_and_is_in_the_feed(store: AgentStore) -> None:
    assert await store.revision() == 0
    assert await store.changed_since(0) == (0, [])
    writes: list[tuple[Callable[[], Awaitable[Any]], tuple[str, str]]] = [
        (lambda: store.create_agent(T, "a", d(1)), (T, "a")),
        (lambda: store.update_agent(T, "a", d(2)), (T, "a")),
        (lambda: store.create_agent("t2", "b", d(1)), ("t2", "b")),
        (lambda: store.set_alias(T, "a", "prod", [(1, 100)]), (T, "a")),
        (lambda: store.delete_alias(T, "a", "prod"), (T, "a")),
        (lambda: store.update_agent(T, "a", d(3), expected_version=2), (T, "a")),
        (lambda: store.delete_agent("t2", "b"), ("t2", "b")),
        (lambda: store.create_agent("t2", "b", d(1)), ("t2", "b")),
        (lambda: store.create_agent(DEFAULT_TENANT, "c:with:colons", d(1)), (DEFAULT_TENANT, "c:with:colons")),
    ]
    for n, (write, pair) in enumerate(writes, start=1):
        await write()
        assert await store.revision() == n
        assert await store.changed_since(n - 1) == (n, [pair])
        # Reads change nothing.
        await store.list_agents(T, 10)
        await store.tenants()
        assert await store.revision() == n
    total = len(writes)
    assert await store.changed_since(0) == (total, [(T, "a"), ("t2", "b"), (DEFAULT_TENANT, "c:with:colons")])
    assert await store.changed_since(3) == (total, [(T, "a"), ("t2", "b"), (DEFAULT_TENANT, "c:with:colons")])
    assert await store.changed_since(6) == (total, [("t2", "b"), (DEFAULT_TENANT, "c:with:colons")])
    assert await store.changed_since(total) == (total, [])
    # Ahead of the store (its data was replaced): reload everything.
    assert await store.changed_since(total + 1) == (total, None)
    assert await store.changed_since(2**70) == (total, None)
    with pytest.raises(ValueError):
        await store.changed_since(-1)


async def test_failed_writes_do_not_bump_the_revision(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    for action, error in (
        (lambda: store.create_agent(T, "a", d(1)), AgentExistsError),
        (lambda: store.update_agent(T, "a", d(2), expected_version=5), VersionConflictError),
        (lambda: store.update_agent(T, "nope", d(2)), AgentNotFoundError),
        (lambda: store.set_alias(T, "a", "prod", [(2, 100)]), AgentVersionNotFoundError),
        (lambda: store.delete_alias(T, "a", "prod"), AliasNotFoundError),
        (lambda: store.delete_agent(T, "nope"), AgentNotFoundError),
    ):
        await unchanged(store, action, error)
    assert await store.changed_since(0) == (1, [(T, "a")])


async def test_the_feed_is_bounded(store: AgentStore) -> None:
    await store.create_agent(T, "a", d(1))
    for start in range(0, CHANGE_FEED_LIMIT, 100):
        await asyncio.gather(*(store.update_agent(T, "a", d(n)) for n in range(start, start + 100)))
    await store.create_agent(T, "b", d(1))
    current = CHANGE_FEED_LIMIT + 2
    assert await store.revision() == current
    # More than the limit behind (or behind what the log keeps): reload everything.
    assert await store.changed_since(0) == (current, None)
    assert await store.changed_since(1) == (current, None)
    # Exactly the limit behind: still a list.
    assert await store.changed_since(2) == (current, [(T, "a"), (T, "b")])
    assert await store.changed_since(current - 1) == (current, [(T, "b")])


# --- replicas ------------------------------------------------------------------------


async def test_replicas_see_each_others_writes_at_once(replicas: tuple[AgentStore, AgentStore]) -> None:
    one, two = replicas
    assert (await one.revision(), await two.revision()) == (0, 0)
    created = await one.create_agent(T, "a", d(1))
    assert await two.revision() == 1
    assert await two.changed_since(0) == (1, [(T, "a")])
    assert (await two.get_agent(T, "a"))[1] == created
    v2 = await two.update_agent(T, "a", d(2), expected_version=1)
    assert (await one.get_agent(T, "a"))[1] == v2
    # One replica's expectation loses to the other's write.
    with pytest.raises(VersionConflictError):
        await one.update_agent(T, "a", d(3), expected_version=1)
    alias = await two.set_alias(T, "a", "prod", [(1, 20), (2, 80)])
    assert await one.get_alias(T, "a", "prod") == alias
    assert await one.changed_since(2) == (3, [(T, "a")])
    await one.delete_agent(T, "a")
    with pytest.raises(AgentNotFoundError):
        await two.get_agent(T, "a")
    assert await two.get_version(T, "a", 2) == v2
    assert (await two.create_agent(T, "a", d(3))).version == 3


async def test_concurrent_updates_on_two_replicas_never_share_a_version(
    replicas: tuple[AgentStore, AgentStore],
) -> None:
    one, two = replicas
    await one.create_agent(T, "a", d(1))
    results = await asyncio.gather(*((one if i % 2 else two).update_agent(T, "a", d(i)) for i in range(20)))
    assert sorted(r.version for r in results) == list(range(2, 22))
    assert await one.revision() == await two.revision() == 21
    current, changed = await two.changed_since(1)
    assert (current, changed) == (21, [(T, "a")])
    creates = await asyncio.gather(*((one if i % 2 else two).create_agent(T, "b", d(i)) for i in range(6)),
                                   return_exceptions=True)
    assert sum(isinstance(r, AgentVersionRecord) for r in creates) == 1


# --- outages and failures half-way ---------------------------------------------------


def _via(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = parts.netloc.rpartition("@")[0]
    return parts._replace(netloc=f"{userinfo + '@' if userinfo else ''}127.0.0.1:{port}").geturl()


@asynccontextmanager
async def behind_proxy(backend: str) -> AsyncIterator[tuple[AgentStore, AgentStore, FaultProxy]]:
    """A store reaching the real server through a fault proxy, and a direct one on the same data."""
    url = POSTGRES_URL if backend == "postgres" else REDIS_URL
    upstream = urlsplit(url)
    async with FaultProxy(upstream.hostname or "127.0.0.1", upstream.port or 0) as proxy:
        if backend == "postgres":
            schema = new_schema()
            async with dropped_afterwards(schema):
                proxied = postgres_agents(schema, url=_via(url, proxy.port), connect_timeout_s=1.0,
                                          command_timeout_s=1.0)
                async with opened(proxied), opened(postgres_agents(schema)) as direct:
                    try:
                        yield proxied, direct, proxy
                    finally:
                        proxy.restore()
        else:
            prefix = new_prefix()
            try:
                proxied = redis_agents(prefix, url=_via(url, proxy.port), connect_timeout_s=1.0,
                                       socket_timeout_s=1.0, timeout_s=1.0)
                async with opened(proxied), opened(redis_agents(prefix)) as direct:
                    try:
                        yield proxied, direct, proxy
                    finally:
                        proxy.restore()
            finally:
                await delete_prefix(prefix)


@pytest.mark.parametrize("backend", ["postgres", "redis"])
@pytest.mark.parametrize("fault", ["cut", "stall"])
async def test_an_unreachable_store_raises_store_unavailable_and_writes_nothing(backend: str, fault: str) -> None:
    async with behind_proxy(backend) as (store, direct, proxy):
        v1 = await store.create_agent(T, "a", d(1))
        prod = await store.set_alias(T, "a", "prod", [(1, 100)])
        snapshot = (await direct.revision(), await direct.get_agent(T, "a"), await direct.list_aliases(T, "a"))
        calls: list[Callable[[], Awaitable[Any]]] = [
            lambda: store.create_agent(T, "b", d(1)),
            lambda: store.update_agent(T, "a", d(2)),
            lambda: store.get_agent(T, "a"),
            lambda: store.changed_since(0),
            lambda: store.update_agent(T, "a", d(2), expected_version=1),
            lambda: store.delete_agent(T, "a"),
            lambda: store.set_alias(T, "a", "canary", [(1, 100)]),
            lambda: store.delete_alias(T, "a", "prod"),
            lambda: store.get_version(T, "a", 1),
            lambda: store.list_agents(T, 10),
            lambda: store.list_versions(T, "a", 10),
            lambda: store.get_alias(T, "a", "prod"),
            lambda: store.list_aliases(T, "a"),
            lambda: store.tenants(),
            lambda: store.revision(),
            lambda: store.ping(),
        ]
        if fault == "stall":  # each call costs its timeouts: a few are enough
            calls = calls[:4]
        getattr(proxy, fault)()  # a restart or crash (cut), or a silent partition (stall)
        for call in calls:
            with pytest.raises(StoreUnavailableError) as info:
                try:
                    async with asyncio.timeout(60):  # a bound on a hang, not a measured time
                        await call()
                except TimeoutError:
                    pytest.fail("an outage must cost a timeout, not a hang", pytrace=False)
            assert f"{backend} agent store at 127.0.0.1:{proxy.port}" in str(info.value)
            # A partition costs the store's own timeout; a reset or refused connection fails on
            # that, at once, never by waiting for a timeout.
            timed_out = isinstance(info.value.__cause__, (TimeoutError, RedisTimeoutError))
            assert timed_out == (fault == "stall"), repr(info.value.__cause__)
        # None of those writes reached the data.
        assert (await direct.revision(), await direct.get_agent(T, "a"), await direct.list_aliases(T, "a")) == snapshot
        with pytest.raises(AgentNotFoundError):
            await direct.get_agent(T, "b")
        # Back up: the same store object serves again, without reopening.
        proxy.restore()
        try:
            async with asyncio.timeout(60):  # a bound on a hang, not a measured time
                while True:
                    try:
                        await store.get_alias(T, "a", "prod")
                        break
                    except StoreUnavailableError:
                        await asyncio.sleep(0.1)  # retried until it reconnects
        except TimeoutError:
            pytest.fail("the store did not reconnect", pytrace=False)
        if fault == "stall":
            # A write that timed out is in doubt (it may still reach the server once traffic
            # flows again), which is why the stores never resend one: nothing more to check.
            return
        assert await store.get_alias(T, "a", "prod") == prod
        assert (await store.get_agent(T, "a"))[1] == v1
        assert (await store.update_agent(T, "a", d(2), expected_version=1)).version == 2
        assert await direct.changed_since(snapshot[0]) == (snapshot[0] + 1, [(T, "a")])


async def test_opening_an_unreachable_store_raises_store_unavailable() -> None:
    async with FaultProxy("127.0.0.1", 1) as proxy:  # nothing listens upstream
        for store in (
            postgres_agents("agentd_nowhere", url=_via(POSTGRES_URL, proxy.port), connect_timeout_s=1.0),
            redis_agents("agentd-nowhere", url=_via(REDIS_URL, proxy.port), connect_timeout_s=1.0),
        ):
            with pytest.raises(StoreUnavailableError):
                await store.open()
            await store.close()


async def test_a_closed_store_raises_store_unavailable(tmp_path: Path) -> None:
    for name, factory in STORE_FACTORIES.items():
        if name == "memory":
            continue
        async with factory(tmp_path / name) as store:
            pass
        with pytest.raises(StoreUnavailableError):
            await store.create_agent(T, "a", d(1))
        with pytest.raises(StoreUnavailableError):
            await store.revision()


async def test_sqlite_write_failing_half_way_leaves_nothing(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    async with opened(SqliteAgentStore(path)) as store:
        await store.create_agent(T, "a", d(1))
        await store.set_alias(T, "a", "prod", [(1, 100)])
        # The change log refuses rows: every write fails at its last step.
        conn = sqlite3.connect(path)
        conn.execute("CREATE TRIGGER refuse BEFORE INSERT ON agent_changes BEGIN SELECT RAISE(ABORT, 'disk full'); END")
        conn.commit()
        try:
            await _every_write_fails_whole(store)
        finally:
            conn.execute("DROP TRIGGER refuse")
            conn.commit()
            conn.close()
        assert (await store.update_agent(T, "a", d(2))).version == 2


async def test_postgres_write_failing_half_way_leaves_nothing() -> None:
    async with postgres_store() as store:
        await store.create_agent(T, "a", d(1))
        await store.set_alias(T, "a", "prod", [(1, 100)])
        schema = store.schema  # type: ignore[attr-defined]
        raw = await raw_connection()
        try:
            await raw.execute(
                f'CREATE FUNCTION "{schema}".refuse() RETURNS trigger LANGUAGE plpgsql AS $$'
                " BEGIN RAISE EXCEPTION 'disk full'; END $$;"
                f' CREATE TRIGGER refuse AFTER INSERT ON "{schema}".agent_versions'
                f' FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()'
            )
            for write in (lambda: store.create_agent(T, "b", d(1)), lambda: store.update_agent(T, "a", d(2))):
                await unchanged(store, write, StoreUnavailableError)
            with pytest.raises(AgentNotFoundError):
                await store.get_agent(T, "b")
            await raw.execute(f'DROP TRIGGER refuse ON "{schema}".agent_versions')
            await raw.execute(
                f'CREATE TRIGGER refuse AFTER INSERT ON "{schema}".agent_changes'
                f' FOR EACH ROW EXECUTE FUNCTION "{schema}".refuse()'
            )
            await _every_write_fails_whole(store)
        finally:
            await raw.execute(f'DROP TRIGGER IF EXISTS refuse ON "{schema}".agent_changes')
            await raw.close()
        assert (await store.update_agent(T, "a", d(2))).version == 2


async def _every_write_fails_whole(store: AgentStore) -> None:
    before = (await store.revision(), await store.get_agent(T, "a"), await store.list_aliases(T, "a"))
    for write in (
        lambda: store.create_agent(T, "b", d(1)),
        lambda: store.update_agent(T, "a", d(2)),
        lambda: store.set_alias(T, "a", "canary", [(1, 100)]),
        lambda: store.delete_alias(T, "a", "prod"),
        lambda: store.delete_agent(T, "a"),
    ):
        await unchanged(store, write, StoreUnavailableError)
    assert (await store.revision(), await store.get_agent(T, "a"), await store.list_aliases(T, "a")) == before
    with pytest.raises(AgentNotFoundError):
        await store.get_agent(T, "b")
    with pytest.raises(AgentVersionNotFoundError):
        await store.get_version(T, "a", 2)
    assert await store.changed_since(0) == (before[0], [(T, "a")])


# --- where the data lives: beside the sessions ---------------------------------------


async def test_sqlite_agents_share_the_session_file(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    sessions = SqliteSessionStore(path)
    agents, replica = SqliteAgentStore(path), SqliteAgentStore(path)
    # The file first: sqlite_worker.connect's "PRAGMA journal_mode = WAL" on a brand-new file
    # fails at once (no busy wait) while another connection writes it. Then two agent
    # stores migrate the same file at once: each migration is applied once.
    await sessions.open()
    await asyncio.gather(agents.open(), replica.open())
    await replica.close()
    try:
        await sessions.create_session("s1")
        await agents.create_agent(T, "a", d(1))
        assert (await sessions.get_session("s1")).session_id == "s1"
        session_status, agent_status = await sessions.schema_status(), await agents.schema_status()
        assert (session_status.pending, agent_status.pending) == (0, 0)
        assert agent_status.current == agent_status.latest >= 1
    finally:
        await sessions.close()
        await agents.close()
    conn = sqlite3.connect(path)
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
        versions = conn.execute("SELECT version FROM agent_schema_version").fetchall()
    finally:
        conn.close()
    assert {"sessions", "schema_version", "agents", "agent_versions", "agent_schema_version"} <= tables
    assert versions == [(1,)]
    # Reopening applies nothing twice.
    async with opened(SqliteAgentStore(path)) as again:
        assert (await again.get_agent(T, "a"))[0].latest_version == 1


async def test_sqlite_refuses_to_start_on_an_old_schema_without_auto_migrate(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    store = SqliteAgentStore(path, auto_migrate=False)
    assert (await store.schema_status()).current == 0
    assert not path.exists()  # looking created nothing
    sessions = SqliteSessionStore(path)
    await sessions.open()
    await sessions.close()
    with pytest.raises(StoreUnavailableError, match="agentd db migrate"):
        await store.open()
    status = await store.migrate()
    assert status.pending == 0 and status.current == status.latest
    async with opened(store):
        await store.create_agent(T, "a", d(1))


async def test_postgres_agents_share_the_session_schema_and_migrate_once() -> None:
    schema = new_schema()
    async with dropped_afterwards(schema):
        stores = [postgres_agents(schema) for _ in range(4)]
        sessions = PostgresSessionStore(url=POSTGRES_URL, schema=schema, min_size=1, max_size=2)
        await asyncio.gather(*(s.open() for s in stores), sessions.open())
        try:
            await sessions.create_session("s1")
            await stores[0].create_agent(T, "a", d(1))
            assert (await stores[3].get_agent(T, "a"))[0].latest_version == 1
            raw = await raw_connection()
            try:
                versions = await raw.fetch(f'SELECT version FROM "{schema}".agent_schema_version ORDER BY version')
                tables = {r[0] for r in await raw.fetch(
                    "SELECT table_name FROM information_schema.tables WHERE table_schema = $1", schema)}
            finally:
                await raw.close()
            assert [r[0] for r in versions] == list(range(1, (await stores[0].schema_status()).latest + 1))
            assert {"sessions", "schema_version", "agents", "agent_versions", "agent_aliases"} <= tables
        finally:
            await asyncio.gather(*(s.close() for s in stores), sessions.close())


async def test_postgres_refuses_to_start_on_an_old_schema_without_auto_migrate() -> None:
    schema = new_schema()
    async with dropped_afterwards(schema):
        store = postgres_agents(schema, auto_migrate=False)
        assert (await store.schema_status()).current == 0
        with pytest.raises(StoreUnavailableError, match="agentd db migrate"):
            await store.open()
        assert (await store.migrate()).pending == 0
        async with opened(store):
            assert await store.revision() == 0


async def test_redis_agent_keys_share_one_hash_tag_under_the_session_prefix() -> None:
    async with redis_store() as store:
        await store.create_agent(T, "a", d(1))
        await store.create_agent(DEFAULT_TENANT, "b{x}", d(1))
        await store.set_alias(T, "a", "prod", [(1, 100)])
        await store.create_agent(T, "gone", d(1))
        await store.delete_agent(T, "gone")
        prefix = store.prefix  # type: ignore[attr-defined]
        client = connect_redis(url=REDIS_URL)
        try:
            keys = sorted([key async for key in client.scan_iter(match=f"{prefix}:*")])
        finally:
            await client.aclose()
        assert keys and all(key.startswith(f"{prefix}:{{{prefix}:agents}}:".encode()) for key in keys)


async def test_the_factory_puts_agents_beside_the_sessions(tmp_path: Path) -> None:
    sqlite_store = build_agent_store(Settings(store="sqlite", sqlite_path=tmp_path / "x.db"))
    assert isinstance(sqlite_store, SqliteAgentStore) and sqlite_store.path == str(tmp_path / "x.db")
    assert isinstance(build_agent_store(Settings(store="memory")), MemoryAgentStore)
    pg = build_agent_store(Settings(store="postgres", postgres_url=POSTGRES_URL, postgres_schema="agentd_x"))
    assert isinstance(pg, PostgresAgentStore) and pg.schema == "agentd_x"
    redis = build_agent_store(Settings(store="redis", redis_url=REDIS_URL, redis_prefix="pfx"))
    assert isinstance(redis, RedisAgentStore) and redis.prefix == "pfx"
    assert "pfx:{pfx:agents}:" == redis.key_base
    await redis.close()
    prefix = new_prefix()
    try:
        built = build_agent_store(Settings(store="redis", redis_url=REDIS_URL, redis_prefix=prefix))
        async with opened(built):
            await built.create_agent(T, "a", d(1))
            async with opened(redis_agents(prefix)) as other:
                assert (await other.get_agent(T, "a"))[0].latest_version == 1
    finally:
        await delete_prefix(prefix)
