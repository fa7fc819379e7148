"""One contract suite for every ResultCache engine (agentd.server.cache), and the request key.

Each test runs against every entry of ``CACHE_FACTORIES``: an async context manager that
yields an opened cache on a fresh, private namespace (a temp file, a Postgres schema, a Redis
key prefix) and removes it afterwards. Postgres and Redis are the real servers on this
machine; an unreachable one fails the run, it is never skipped. Two caches on one namespace
are two replicas. Expiry is tested with the caller's clock (``now``), which every engine
honours, so nothing sleeps; Redis's own expiry of the key is waited for with a polling guard.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from decimal import Decimal
from pathlib import Path
from typing import Any, AsyncContextManager, AsyncIterator, Callable

import pytest
from redis.asyncio import Redis

from agentd.server.cache.base import CachedResult, ResultCache, decode_entry, encode_entry
from agentd.server.cache.factory import build_result_cache
from agentd.server.cache.key import agent_fingerprint, agents_fingerprint, canonical_json, request_key
from agentd.server.cache.memory import MemoryResultCache
from agentd.server.cache.postgres import PostgresResultCache
from agentd.server.cache.redis import RedisResultCache
from agentd.server.cache.sqlite import SqliteResultCache
from agentd.server.redis_common import connect_redis
from agentd.server.runtime.agent import Agent, ResultCaching, compile_agent
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.usage import Usage
from agentd.server.settings import Settings
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema, raw_connection
from tests.backends_redis import REDIS_URL, delete_prefix, fail_unreachable, new_prefix

T = "acme"
T0 = 1_700_000_000.0  # the clock the tests pass as ``now``


def key(n: int) -> str:
    return f"{n:064x}"


def result(output: Any = "the answer", **kwargs: Any) -> CachedResult:
    usage = Usage(120, 30, 2, reasoning_tokens=5, cached_input_tokens=40, cost_usd=Decimal("0.000123456789"),
                  unpriced_calls=1)
    values: dict[str, Any] = dict(last_agent="billing", usage=usage, turns=2, run_id="run_1", trace_id="a" * 32,
                                  created_at=T0)
    values.update(kwargs)
    return CachedResult(output, **values)


@asynccontextmanager
async def opened(cache: ResultCache) -> AsyncIterator[ResultCache]:
    await cache.open()
    try:
        yield cache
    finally:
        await cache.close()


def postgres_cache(schema: str, **kwargs: Any) -> PostgresResultCache:
    return PostgresResultCache(url=POSTGRES_URL, schema=schema, **kwargs)


def redis_cache(prefix: str, **kwargs: Any) -> RedisResultCache:
    client = connect_redis(url=REDIS_URL, connect_timeout_s=2.0, client_name="agentd-test")
    return RedisResultCache(client, prefix=prefix, **kwargs)


@asynccontextmanager
async def postgres_store(**kwargs: Any) -> AsyncIterator[ResultCache]:
    schema = new_schema()
    async with dropped_afterwards(schema):
        async with opened(postgres_cache(schema, **kwargs)) as cache:
            yield cache


@asynccontextmanager
async def redis_store(**kwargs: Any) -> AsyncIterator[ResultCache]:
    prefix = new_prefix()
    cache = redis_cache(prefix, **kwargs)
    try:
        try:
            await cache.open()
        except StoreUnavailableError as exc:
            await cache.close()
            fail_unreachable(exc)
        try:
            yield cache
        finally:
            await cache.close()
    finally:
        await delete_prefix(prefix)


CACHE_FACTORIES: dict[str, Callable[..., AsyncContextManager[ResultCache]]] = {
    "memory": lambda tmp_path, **kw: opened(MemoryResultCache(**kw)),
    "sqlite": lambda tmp_path, **kw: opened(SqliteResultCache(tmp_path / "agentd.db", **kw)),
    "postgres": lambda tmp_path, **kw: postgres_store(**kw),
    "redis": lambda tmp_path, **kw: redis_store(**kw),
}

# A second cache on the same data (file, schema, key prefix): another replica.
REPLICA_FACTORIES: dict[str, Callable[[Any], ResultCache]] = {
    "sqlite": lambda c: SqliteResultCache(c.path),
    "postgres": lambda c: postgres_cache(c.schema),
    "redis": lambda c: redis_cache(c.prefix),
}


@pytest.fixture(params=list(CACHE_FACTORIES))
def engine(request: pytest.FixtureRequest) -> str:
    return str(request.param)


@pytest.fixture
async def cache(engine: str, tmp_path: Path) -> AsyncIterator[ResultCache]:
    async with CACHE_FACTORIES[engine](tmp_path) as opened_cache:
        yield opened_cache


# --- get and put ------------------------------------------------------------------------------


async def test_a_stored_result_comes_back_whole(cache: ResultCache) -> None:
    stored = result({"sku": "A-1", "price_eur": 49.5, "tags": ["x", None, True], "note": "naïve ✓ \x00 \ud800"})
    assert await cache.put(T, key(1), stored, ttl_s=60, now=T0) is True
    got = await cache.get(T, key(1), now=T0 + 1)
    assert got == stored
    assert got is not None and got.usage.cost_usd == Decimal("0.000123456789")
    assert (got.usage.reasoning_tokens, got.usage.cached_input_tokens, got.usage.unpriced_calls) == (5, 40, 1)
    text_output = result("plain text")
    await cache.put(T, key(2), text_output, ttl_s=60, now=T0)
    assert await cache.get(T, key(2), now=T0) == text_output
    assert (cache.counts.stores, cache.counts.hits, cache.counts.misses) == (2, 2, 0)


async def test_an_unknown_key_is_a_miss(cache: ResultCache) -> None:
    assert await cache.get(T, key(7), now=T0) is None
    assert (cache.counts.hits, cache.counts.misses) == (0, 1)


async def test_a_put_replaces_the_entry_under_its_key(cache: ResultCache) -> None:
    await cache.put(T, key(1), result("first"), ttl_s=5, now=T0)
    await cache.put(T, key(1), result("second"), ttl_s=60, now=T0 + 1)
    got = await cache.get(T, key(1), now=T0 + 30)  # past the first entry's expiry: the second's TTL counts
    assert got is not None and got.final_output == "second"


async def test_an_entry_expires_at_its_ttl_by_the_callers_clock(cache: ResultCache) -> None:
    await cache.put(T, key(1), result(), ttl_s=10, now=T0)
    assert await cache.get(T, key(1), now=T0 + 9.5) is not None
    assert await cache.get(T, key(1), now=T0 + 10) is None  # expired exactly at now + ttl
    assert await cache.get(T, key(1), now=T0 + 3600) is None


async def test_sweep_deletes_expired_entries_only(cache: ResultCache, engine: str) -> None:
    await cache.put(T, key(1), result("short"), ttl_s=5, now=T0)
    await cache.put(T, key(2), result("long"), ttl_s=100, now=T0)
    removed = await cache.sweep(now=T0 + 10)
    assert removed == (0 if engine == "redis" else 1)  # Redis drops keys itself
    assert await cache.get(T, key(1), now=T0 + 10) is None
    live = await cache.get(T, key(2), now=T0 + 10)
    assert live is not None and live.final_output == "long"
    assert await cache.sweep(now=T0 + 10) == 0


async def test_tenants_never_meet(cache: ResultCache) -> None:
    await cache.put("acme", key(1), result("acme's"), ttl_s=60, now=T0)
    assert await cache.get("globex", key(1), now=T0) is None
    await cache.put("globex", key(1), result("globex's"), ttl_s=60, now=T0)
    acme, globex = await cache.get("acme", key(1), now=T0), await cache.get("globex", key(1), now=T0)
    assert acme is not None and acme.final_output == "acme's"
    assert globex is not None and globex.final_output == "globex's"


async def test_bad_arguments_are_refused(cache: ResultCache) -> None:
    for bad_key in ("", "A" * 64, "0" * 63, "0" * 64 + "0", "g" * 64):
        with pytest.raises(ValueError):
            await cache.get(T, bad_key, now=T0)
    for bad_tenant in ("", "a:b", "a/b", "x" * 65):
        with pytest.raises(ValueError):
            await cache.put(bad_tenant, key(1), result(), ttl_s=60, now=T0)
    for ttl in (0, -1, float("nan"), float("inf")):
        with pytest.raises(ValueError):
            await cache.put(T, key(1), result(), ttl_s=ttl, now=T0)
    with pytest.raises(ValueError):  # not JSON: never stored
        await cache.put(T, key(1), result({"x": float("nan")}), ttl_s=60, now=T0)
    assert cache.counts.stores == 0


# --- bounds -----------------------------------------------------------------------------------


async def test_an_entry_over_the_size_limit_is_not_stored(engine: str, tmp_path: Path) -> None:
    limit = 2048
    async with CACHE_FACTORIES[engine](tmp_path, max_entry_bytes=limit) as cache:
        base = len(encode_entry(result("")))
        exact = result("x" * (limit - base))
        assert len(encode_entry(exact)) == limit
        assert await cache.put(T, key(1), exact, ttl_s=60, now=T0) is True  # at the limit: stored
        assert await cache.get(T, key(1), now=T0) == exact
        too_large = result("é" * (limit - base))  # escaped as \\u00e9: six bytes each
        assert await cache.put(T, key(2), too_large, ttl_s=60, now=T0) is False
        assert await cache.get(T, key(2), now=T0) is None
        # A too-large result for a key with an entry leaves that entry as it was.
        assert await cache.put(T, key(1), too_large, ttl_s=60, now=T0) is False
        assert await cache.get(T, key(1), now=T0) == exact
        assert (cache.counts.too_large, cache.counts.stores) == (2, 1)


async def test_memory_keeps_at_most_max_entries_evicting_the_least_recently_used() -> None:
    cache = MemoryResultCache(max_entries=3)
    for n in (1, 2, 3):
        await cache.put(T, key(n), result(f"r{n}"), ttl_s=60, now=T0)
    assert await cache.get(T, key(1), now=T0) is not None  # key 1 used: key 2 is now the oldest
    await cache.put(T, key(4), result("r4"), ttl_s=60, now=T0)
    assert len(cache) == 3 and cache.counts.evicted == 1
    assert await cache.get(T, key(2), now=T0) is None
    assert all([await cache.get(T, key(n), now=T0) for n in (1, 3, 4)])


async def test_memory_keeps_at_most_max_bytes() -> None:
    size = len(encode_entry(result("x" * 100)))
    cache = MemoryResultCache(max_bytes=size * 2 + size // 2)
    for n in (1, 2, 3):
        await cache.put(T, key(n), result("x" * 100), ttl_s=60, now=T0)
    assert len(cache) == 2 and cache.size_bytes == size * 2 and cache.counts.evicted == 1
    assert await cache.get(T, key(1), now=T0) is None
    # Replacing an entry does not count it twice.
    await cache.put(T, key(3), result("y" * 100), ttl_s=60, now=T0)
    assert len(cache) == 2 and cache.size_bytes == size * 2
    # An expired entry read or swept gives its bytes back.
    await cache.get(T, key(2), now=T0 + 60)
    assert len(cache) == 1 and cache.size_bytes == size
    assert await cache.sweep(now=T0 + 60) == 1 and cache.size_bytes == 0


# --- shared engines ---------------------------------------------------------------------------


@pytest.mark.parametrize("shared", list(REPLICA_FACTORIES))
async def test_replicas_share_entries(shared: str, tmp_path: Path) -> None:
    async with CACHE_FACTORIES[shared](tmp_path) as first:
        async with opened(REPLICA_FACTORIES[shared](first)) as second:
            await first.put(T, key(1), result("from one"), ttl_s=60, now=T0)
            got = await second.get(T, key(1), now=T0)
            assert got is not None and got.final_output == "from one"
            await second.put(T, key(1), result("from two"), ttl_s=60, now=T0)
            again = await first.get(T, key(1), now=T0)
            assert again is not None and again.final_output == "from two"


async def test_redis_drops_the_key_by_its_own_clock(tmp_path: Path) -> None:
    async with redis_store() as cache:
        assert isinstance(cache, RedisResultCache)
        await cache.put(T, key(1), result(), ttl_s=0.2, now=time.time())
        raw = Redis.from_url(REDIS_URL)
        name = f"{cache.key_base}{T}:{key(1)}"
        try:
            assert 0 < await raw.pttl(name) <= 200
            deadline = time.monotonic() + 10  # a guard, not a timing assertion
            while await raw.exists(name):
                assert time.monotonic() < deadline, "redis never expired the entry"
                await asyncio.sleep(0.05)
            # Something else written under an entry's key is a miss, never an error.
            await raw.set(name, b"not an entry")
            assert await cache.get(T, key(1), now=time.time()) is None
            await raw.set(name, b"9999999999.0|{\"v\": 2}")
            assert await cache.get(T, key(1), now=time.time()) is None
        finally:
            await raw.aclose()


async def test_postgres_keeps_entries_in_an_unlogged_table_with_its_own_version() -> None:
    async with postgres_store() as cache:
        assert isinstance(cache, PostgresResultCache)
        raw = await raw_connection()
        try:
            persistence = await raw.fetchval(
                "SELECT c.relpersistence::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace"
                " WHERE n.nspname = $1 AND c.relname = 'result_cache'", cache.schema)
            assert persistence == "u"
        finally:
            await raw.close()
        status = await cache.schema_status()
        assert (status.current, status.latest, status.pending) == (1, 1, 0)
        assert (await cache.migrate()).current == 1  # idempotent


async def test_sqlite_shares_the_session_file_with_its_own_version(tmp_path: Path) -> None:
    path = tmp_path / "agentd.db"
    closed = SqliteResultCache(path)
    assert (await closed.schema_status()).current == 0 and not path.exists()  # looking creates nothing
    async with opened(SqliteResultCache(path)) as cache:
        status = await cache.schema_status()
        assert (status.current, status.latest) == (1, 1)
    refusing = SqliteResultCache(tmp_path / "other.db", auto_migrate=False)
    with pytest.raises(StoreUnavailableError, match="agentd db migrate"):
        await refusing.open()


@pytest.mark.parametrize("shared", list(REPLICA_FACTORIES))
async def test_a_closed_cache_is_unavailable(shared: str, tmp_path: Path) -> None:
    async with CACHE_FACTORIES[shared](tmp_path) as first:
        other = REPLICA_FACTORIES[shared](first)
        with pytest.raises(StoreUnavailableError):
            await other.get(T, key(1), now=T0)
        await other.close()


async def test_the_factory_puts_the_cache_beside_the_sessions(tmp_path: Path) -> None:
    memory = build_result_cache(Settings(store="memory", result_cache_memory_max_entries=5,
                                         result_cache_max_entry_bytes=999))
    assert isinstance(memory, MemoryResultCache) and memory.max_entries == 5 and memory.max_entry_bytes == 999
    sqlite = build_result_cache(Settings(store="sqlite", sqlite_path=tmp_path / "s.db"))
    assert isinstance(sqlite, SqliteResultCache) and sqlite.path == str(tmp_path / "s.db")
    postgres = build_result_cache(Settings(store="postgres", postgres_url=POSTGRES_URL, postgres_schema="agentd_x"))
    assert isinstance(postgres, PostgresResultCache) and postgres.schema == "agentd_x"
    redis = build_result_cache(Settings(store="redis", redis_url="redis://:hunter2@cache.example:6380/2",
                                        redis_prefix="pfx"))
    try:
        assert isinstance(redis, RedisResultCache) and redis.key_base == "pfx:result-cache:"
        assert "hunter2" not in redis.location
    finally:
        await redis.close()


# --- entries and keys -------------------------------------------------------------------------


def test_an_entry_that_is_not_ours_does_not_decode() -> None:
    for text in ("", "[]", "{}", '{"v": 2}', '{"v": 1}', '{"v": 1, "output": 1, "agent": "a", "usage": {}}', "nope"):
        with pytest.raises(ValueError):
            decode_entry(text)
    # An entry from code without cost fields decodes with defaults.
    old = '{"v":1,"output":"x","agent":"a","usage":{"input":1,"output":2,"requests":1},"turns":1}'
    decoded = decode_entry(old)
    assert decoded.usage.cost_usd is None and decoded.usage.unpriced_calls == 0 and decoded.run_id == ""


def test_canonical_json_ignores_key_order_only() -> None:
    assert canonical_json({"b": 1, "a": [1, {"y": 2, "x": 1}]}) == canonical_json({"a": [1, {"x": 1, "y": 2}], "b": 1})
    assert canonical_json({"a": "é"}) == b'{"a":"\\u00e9"}'
    with pytest.raises(ValueError):
        canonical_json({"a": float("nan")})


def test_request_keys_are_equal_exactly_for_equal_requests() -> None:
    base: dict[str, Any] = dict(tenant="acme", agent="pricing", version=3, fingerprint="f" * 64, input="price of A-1?",
                                input_items=[{"type": "message", "role": "user", "text": "hi"}],
                                context={"customer": "c1", "tier": {"level": 2.0, "flags": ["a"]}}, max_turns=None)
    k = request_key(**base)
    assert len(k) == 64 and int(k, 16) >= 0 and k == k.lower()
    reordered = {**base, "context": {"tier": {"flags": ["a"], "level": 2.0}, "customer": "c1"}}
    assert request_key(**reordered) == k
    changes = [("tenant", "globex"), ("agent", "quotes"), ("version", 4), ("fingerprint", "e" * 64),
               ("input", "price of A-2?"), ("input_items", []), ("context", {"customer": "c2"}),
               ("context", {}), ("max_turns", 3)]
    keys = {request_key(**{**base, field: value}) for field, value in changes}
    assert k not in keys and len(keys) == len(changes)


def test_the_fingerprint_follows_the_definition() -> None:
    def compiled(**kwargs: Any):  # noqa: ANN202
        agent = Agent(**{"name": "a", "instructions": "Be brief.", "cache": ResultCaching(60), **kwargs})
        return compile_agent(agent, {"a": agent, "b": Agent(name="b")}, "gpt-4o-mini")

    one = compiled()
    assert agent_fingerprint(one) == agent_fingerprint(compiled())  # the same definition, another object
    assert agent_fingerprint(one) == agent_fingerprint(compiled(cache=ResultCaching(5)))  # the TTL changes no answer
    for change in (dict(instructions="Be long."), dict(model="gpt-5"), dict(max_turns=3), dict(handoffs=["b"]),
                   dict(output_schema={"type": "object"})):
        assert agent_fingerprint(compiled(**change)) != agent_fingerprint(one), change
    b = compile_agent(Agent(name="b"), {"b": Agent(name="b")}, "gpt-4o-mini")
    assert agents_fingerprint([one, b]) == agents_fingerprint([b, one])
    assert agents_fingerprint([one, b]) != agents_fingerprint([one])
