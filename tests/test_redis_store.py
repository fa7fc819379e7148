"""What only the Redis store has: its key layout, hash tags, native expiry, replicas
sharing one prefix, client construction and connection failures.

The shared behaviour is the contract suite (``test_session_stores.py``). These run on
the real server from ``AGENTD_TEST_REDIS_URL``, each store on its own key prefix.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from typing import Any, AsyncIterator, Awaitable, Callable

import pytest
import redis.exceptions
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import RedisCluster
from redis.asyncio.connection import SSLConnection, UnixDomainSocketConnection
from redis.asyncio.sentinel import SentinelConnectionPool
from redis.crc import key_slot

from agentd.server.runtime.errors import SessionNotFoundError, StoreUnavailableError
from agentd.server.runtime.items import MessageItem
from agentd.server.redis_common import LuaScript, connect_redis
from agentd.server.sessions.redis import RedisSessionStore, lua
from tests.backends_redis import REDIS_URL, fail_unreachable, make_store, redis_store

KINDS = ("info", "items", "state", "meta", "requests")


def msg(text: str) -> MessageItem:
    return MessageItem(role="user", text=text)


@pytest.fixture
async def store() -> AsyncIterator[RedisSessionStore]:
    async with redis_store() as s:
        yield s


@pytest.fixture
async def raw() -> AsyncIterator[Redis]:
    """A plain connection to the same server, for looking under the store."""
    client = Redis.from_url(REDIS_URL)
    try:
        await client.ping()
    except (redis.exceptions.RedisError, OSError) as exc:
        await client.aclose()
        fail_unreachable(exc)
    try:
        yield client
    finally:
        await client.aclose()


def session_keys(store: RedisSessionStore, session_id: str) -> dict[str, bytes]:
    return dict(zip(KINDS, store._keys(session_id)))


async def all_keys(raw: Redis, prefix: str) -> set[bytes]:
    return {key async for key in raw.scan_iter(match=f"{prefix}:*", count=1000)}


async def pttls(raw: Redis, keys: dict[str, bytes]) -> dict[str, int]:
    return {kind: await raw.pttl(key) for kind, key in keys.items()}


async def redis_ms(raw: Redis) -> int:
    """The server's clock (TIME), in milliseconds: the clock its key expiry runs on."""
    seconds, micros = await raw.time()
    return seconds * 1000 + micros // 1000


async def assert_ttls_set_since(raw: Redis, keys: dict[str, bytes], ttl_s: float, since_ms: int) -> None:
    """Every key expires ``ttl_s`` (in whole milliseconds, rounded up) after a write made at or
    after ``since_ms`` (``redis_ms`` before the write): its PTTL, read now, is at most that, and
    at least that less the time the server's clock moved on since (measured, on the same clock)."""
    ttl_ms = math.ceil(ttl_s * 1000)
    left = await pttls(raw, keys)
    elapsed_ms = await redis_ms(raw) - since_ms
    assert all(ttl_ms - elapsed_ms - 1 <= ms <= ttl_ms for ms in left.values()), (left, ttl_ms, elapsed_ms)


async def age_keys(raw: Redis, keys: dict[str, bytes], left_ms: int) -> None:
    """As if time had passed, for Redis's expiry: every key has ``left_ms`` to live."""
    for key in keys.values():
        assert await raw.pexpire(key, left_ms)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, guard_s: float = 60.0) -> None:
    """Return once ``check()`` is true (asked again after each answer); fail, naming ``what``, if
    it is still false after ``guard_s`` (a bound on a failure, never a measured latency)."""
    try:
        async with asyncio.timeout(guard_s):
            while not await check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"{what}: still not so after {guard_s:g}s", pytrace=False)


# Long enough that no key expires on the server's clock while a test runs unless the test says so.
LONG_TTL = 3600.0


# --- layout ----------------------------------------------------------------------------


async def test_key_layout(store: RedisSessionStore, raw: Redis) -> None:
    p = store.prefix
    await store.create_session("s1", metadata={"title": "漢字"}, state={"n": [1, 2]})
    await store.append_items("s1", [msg("a"), msg("b")], request_id="req")

    assert await all_keys(raw, p) == {
        f"{p}:session:{{s1}}:{kind}".encode() for kind in KINDS
    } | {f"{p}:sessions".encode()}
    types = {kind: await raw.type(f"{p}:session:{{s1}}:{kind}") for kind in KINDS}
    assert types == {"info": b"hash", "items": b"list", "state": b"hash", "meta": b"hash", "requests": b"hash"}

    info = await raw.hgetall(f"{p}:session:{{s1}}:info")
    assert set(info) == {b"created_at", b"updated_at", b"last_seq"} and info[b"last_seq"] == b"2"
    first = await raw.lindex(f"{p}:session:{{s1}}:items", 0)
    seq, created_at, data = first.split(b"|", 2)
    assert (seq, float(created_at), data) == (b"1", float(info[b"updated_at"]), b'{"type":"message","role":"user","text":"a","agent":""}')
    assert await raw.hgetall(f"{p}:session:{{s1}}:state") == {b"n": b"[1,2]"}
    assert await raw.hgetall(f"{p}:session:{{s1}}:meta") == {b"title": "漢字".encode()}
    assert await raw.hgetall(f"{p}:session:{{s1}}:requests") == {b"req": b"1:2"}
    assert await raw.zrange(f"{p}:sessions", 0, -1, withscores=True) == [(b"s1", float(info[b"created_at"]))]

    await store.create_session("t1", ttl_s=30)
    assert await raw.type(f"{p}:expiries") == b"zset"
    assert await raw.zrange(f"{p}:expiries", 0, -1) == [b"t1"]


ODD_IDS = ["plain", "{", "}", "{}", "}{", "a{b}c", "a}b{c", "%7D", "%", "%25", "", "ü漢🙂", "{ü}", "x" * 300]


async def test_a_sessions_keys_share_one_slot_whatever_its_id(store: RedisSessionStore, raw: Redis) -> None:
    all_session_keys: set[bytes] = set()
    for sid in ODD_IDS:
        await store.create_session(sid, metadata={"m": "1"}, state={"s": 1})
        await store.append_items(sid, [msg(sid)], request_id="r")
        keys = session_keys(store, sid)
        assert await raw.exists(*keys.values()) == len(KINDS), sid
        assert len({key_slot(key) for key in keys.values()}) == 1, sid
        # The hash tag is the id itself, escaped: Redis hashes exactly that part.
        info = keys["info"]
        tag = info[info.index(b"{") + 1 : info.index(b"}", info.index(b"{") + 1)]
        assert tag and key_slot(info) == key_slot(tag)
        unescaped = tag.decode().replace("%7D", "}").replace("%25", "%")
        assert unescaped == (sid or "%"), sid
        all_session_keys |= set(keys.values())
    assert len(all_session_keys) == len(ODD_IDS) * len(KINDS)  # distinct ids never share keys

    for sid in ODD_IDS:
        assert await store.read_history(sid) == [msg(sid)]
        assert (await store.get_session(sid)).metadata == {"m": "1"}
    listed = [r.session_id for r in (await store.list_sessions(100)).sessions]
    assert sorted(listed) == sorted(ODD_IDS)


def test_prefix_may_not_contain_braces() -> None:
    client = connect_redis(url=REDIS_URL)
    for bad in ["", "a{b", "a}b"]:
        with pytest.raises(ValueError, match="prefix"):
            RedisSessionStore(client, prefix=bad)


# --- expiry ----------------------------------------------------------------------------


async def test_ttl_lives_on_every_key_and_writes_refresh_it(store: RedisSessionStore, raw: Redis) -> None:
    """Redis's own expiry: every key of a session with a TTL is PEXPIREd (milliseconds, so
    fractional TTLs work), every write starts it over, removing the TTL persists the keys, and
    Redis drops them by itself once it runs out; the sweeper then reclaims the index entries.
    Instead of sleeping through parts of a TTL, the test shortens what the keys have left
    (PEXPIRE) and reads the server's clock to know how long ago a write was."""
    p = store.prefix
    since = await redis_ms(raw)
    await store.create_session("s1", metadata={"a": "b"}, state={"c": 1}, ttl_s=LONG_TTL)
    await store.append_items("s1", [msg("x"), msg("y")], request_id="r")
    keys = session_keys(store, "s1")
    await assert_ttls_set_since(raw, keys, LONG_TTL, since)
    assert await raw.zscore(f"{p}:expiries", "s1") is not None

    await age_keys(raw, keys, 1_000_000)  # as if most of the TTL had passed...
    since = await redis_ms(raw)
    await store.pop_item("s1")  # ...until a write: every key's expiry starts over
    await assert_ttls_set_since(raw, keys, LONG_TTL, since)

    await store.update_session("s1", ttl_s=0)
    assert set((await pttls(raw, keys)).values()) == {-1}
    assert await raw.zscore(f"{p}:expiries", "s1") is None
    since = await redis_ms(raw)
    record = await store.update_session("s1", ttl_s=LONG_TTL + 0.25)  # fractional seconds: milliseconds in Redis
    assert record.ttl_s == LONG_TTL + 0.25
    await assert_ttls_set_since(raw, keys, LONG_TTL + 0.25, since)

    record = await store.update_session("s1", ttl_s=0.25)
    assert record.ttl_s == 0.25
    assert all(ms <= 250 for ms in (await pttls(raw, keys)).values())
    await eventually(lambda: _none_exist(raw, keys), "Redis never dropped the keys of an expired session")
    with pytest.raises(SessionNotFoundError):
        await store.get_session("s1")
    assert (await store.list_sessions(10)).sessions == []
    # The sweeper reclaims the index entries (listing may already have dropped one).
    await store.create_session("s2", ttl_s=0.1)
    s2 = session_keys(store, "s2")
    await eventually(lambda: _none_exist(raw, s2), "Redis never dropped the keys of an expired session")
    assert await raw.zscore(f"{p}:sessions", "s2") is not None  # Redis dropped the keys, not the index
    assert await store.sweep_expired() >= 1
    assert await raw.zcard(f"{p}:sessions") == 0
    assert await raw.zcard(f"{p}:expiries") == 0
    assert await all_keys(raw, p) == set()


async def _none_exist(raw: Redis, keys: dict[str, bytes]) -> bool:
    return not await raw.exists(*keys.values())


async def test_a_drop_refreshes_every_keys_ttl_and_keeps_the_layout(store: RedisSessionStore, raw: Redis) -> None:
    p = store.prefix
    await store.create_session("s1", metadata={"a": "b"}, state={"c": 1}, ttl_s=LONG_TTL)
    await store.append_items("s1", [msg("x"), msg("y"), msg("z")], request_id="r")
    keys = session_keys(store, "s1")
    await age_keys(raw, keys, 1_000_000)  # as if most of the TTL had passed
    assert await store.drop_items_through("s1", 0) == 0  # removes nothing: not a write
    assert all(0 < ms <= 1_000_000 for ms in (await pttls(raw, keys)).values())
    since = await redis_ms(raw)
    assert await store.drop_items_through("s1", 2) == 2  # a write: every key's expiry starts over
    await assert_ttls_set_since(raw, keys, LONG_TTL, since)
    assert [r.split(b"|", 1)[0] for r in await raw.lrange(keys["items"], 0, -1)] == [b"3"]
    info = await raw.hgetall(keys["info"])
    assert info[b"last_seq"] == b"3"  # sequences never rewind
    assert await raw.hgetall(keys["requests"]) == {b"r": b"1:3"}  # request ids outlive their items

    assert await store.drop_items_through("s1", 10) == 1
    assert not await raw.exists(keys["items"])  # an emptied list is no key at all
    assert (await store.get_session("s1")).item_count == 0
    await age_keys(raw, {k: v for k, v in keys.items() if k != "items"}, 1_000_000)
    since = await redis_ms(raw)
    assert [s.sequence for s in await store.append_items("s1", [msg("w")])] == [4]
    await assert_ttls_set_since(raw, keys, LONG_TTL, since)
    assert await raw.zscore(f"{p}:expiries", "s1") is not None


async def test_expiry_follows_the_callers_clock(
    store: RedisSessionStore, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Like the other stores, a session is expired once time.time() passes updated_at + ttl,
    even while Redis (on its own clock) still holds the keys."""
    await store.create_session("s1", ttl_s=60)
    await store.append_items("s1", [msg("old")], request_id="r")
    later = time.time() + 61
    monkeypatch.setattr(time, "time", lambda: later)

    assert await raw.exists(session_keys(store, "s1")["info"])
    with pytest.raises(SessionNotFoundError):
        await store.get_session("s1")
    with pytest.raises(SessionNotFoundError):
        await store.pop_item("s1")
    assert await store.read_history("s1") == []
    assert (await store.list_sessions(10)).sessions == []
    assert await store.sweep_expired() == 1
    assert await all_keys(raw, store.prefix) == set()
    record = await store.create_session("s1")
    assert (record.item_count, record.created_at) == (0, later)
    assert [s.sequence for s in await store.append_items("s1", [msg("new")], request_id="r")] == [1]


async def test_sweep_rescores_sessions_kept_alive_by_writes(
    store: RedisSessionStore, raw: Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Expiry is judged by the caller's clock, so the test moves that on instead of waiting (the
    TTL is long on the server's clock, which only reclaims space)."""
    now = [time.time()]
    monkeypatch.setattr(time, "time", lambda: now[0])
    await store.create_session("busy", ttl_s=LONG_TTL)
    for _ in range(3):
        now[0] += LONG_TTL * 0.4
        await store.append_items("busy", [msg("still here")])
    # Its hint (the create-time expiry) has passed, but the session has not expired.
    assert await store.sweep_expired() == 0
    record = await store.get_session("busy")
    assert await raw.zscore(f"{store.prefix}:expiries", "busy") == pytest.approx(record.expires_at)


# --- replicas and concurrency ----------------------------------------------------------


async def test_listing_skips_stale_index_entries_and_still_fills_pages(store: RedisSessionStore, raw: Redis) -> None:
    ids = [f"s{i:02d}" for i in range(40)]
    for sid in ids:
        await store.create_session(sid)
    live = ids[::4]  # 10 live sessions, 30 whose keys vanished under the index
    for sid in ids:
        if sid not in live:
            await raw.delete(*session_keys(store, sid).values())

    pages: list[list[str]] = []
    cursor = None
    while True:
        page = await store.list_sessions(3, cursor)
        pages.append([r.session_id for r in page.sessions])
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert [len(p) for p in pages] == [3, 3, 3, 1]
    assert [sid for p in pages for sid in p] == live[::-1]
    assert await raw.zcard(f"{store.prefix}:sessions") == len(live)  # stale entries were dropped


async def test_listing_repairs_an_entry_with_a_wrong_score(store: RedisSessionStore, raw: Redis) -> None:
    record = await store.create_session("s1")
    await raw.zadd(f"{store.prefix}:sessions", {"s1": record.created_at - 5})  # as a partial failure might leave it
    assert (await store.list_sessions(10)).sessions == [record]
    assert await raw.zscore(f"{store.prefix}:sessions", "s1") == record.created_at


# --- retries ---------------------------------------------------------------------------


def lose_first_reply(monkeypatch: pytest.MonkeyPatch, store: RedisSessionStore, attribute: str) -> list[int]:
    """The first call through ``store._<attribute>`` runs on the server but its reply is lost."""
    real = getattr(store, attribute)
    calls: list[int] = []

    async def lossy(*args: Any, **kwargs: Any) -> Any:
        result = await real(*args, **kwargs)
        calls.append(1)
        if len(calls) == 1:
            raise redis.exceptions.ConnectionError("connection reset after the command ran")
        return result

    monkeypatch.setattr(store, attribute, lossy)
    return calls


async def test_safe_operations_are_retried_after_a_lost_reply(
    store: RedisSessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_session("s1")
    calls = lose_first_reply(monkeypatch, store, "_eval")
    stored = await store.append_items("s1", [msg("a"), msg("b")], request_id="req")
    assert len(calls) == 2 and [s.sequence for s in stored] == [1, 2]  # replayed, not duplicated
    assert await store.read_history("s1") == [msg("a"), msg("b")]

    monkeypatch.undo()
    calls = lose_first_reply(monkeypatch, store, "_pipeline")
    record = await store.create_session("s2", metadata={"k": "v"})  # not "already exists": it was ours
    assert len(calls) == 2 and record.metadata == {"k": "v"}
    assert await store.get_session("s2") == record


async def test_unsafe_operations_are_not_retried_after_a_lost_reply(
    store: RedisSessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    await store.create_session("s1")
    await store.append_items("s1", [msg("a"), msg("b")])
    calls = lose_first_reply(monkeypatch, store, "_eval")
    with pytest.raises(StoreUnavailableError, match="connection reset") as info:
        await store.pop_item("s1")
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    assert len(calls) == 1
    monkeypatch.undo()
    assert await store.read_history("s1") == [msg("a")]  # popped once, not twice

    calls = lose_first_reply(monkeypatch, store, "_eval")
    with pytest.raises(StoreUnavailableError):
        await store.append_items("s1", [msg("c")])  # no request id: a resend could duplicate it
    assert len(calls) == 1
    monkeypatch.undo()
    assert await store.read_history("s1") == [msg("a"), msg("c")]

    calls = lose_first_reply(monkeypatch, store, "_eval")
    with pytest.raises(StoreUnavailableError):
        await store.drop_items_through("s1", 1)  # ran, but a resend would report 0 removed
    assert len(calls) == 1
    monkeypatch.undo()
    assert await store.read_history("s1") == [msg("c")]
    assert await store.drop_items_through("s1", 1) == 0  # the caller may repeat it: harmless


async def test_scripts_reload_when_the_server_forgot_them(
    store: RedisSessionStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    """NOSCRIPT (a restarted or failed-over server) reloads and retries, alone or in a pipeline."""
    await store.create_session("s1")
    fresh = LuaScript(lua.GET.source + f"\n-- {uuid.uuid4().hex}")  # a SHA the server never saw
    monkeypatch.setattr(lua, "GET", fresh)
    monkeypatch.setattr(lua, "SCRIPTS", (*lua.SCRIPTS, fresh))
    assert (await store.get_session("s1")).session_id == "s1"
    fresh2 = LuaScript(lua.GET.source + f"\n-- {uuid.uuid4().hex}")
    monkeypatch.setattr(lua, "GET", fresh2)
    monkeypatch.setattr(lua, "SCRIPTS", (*lua.SCRIPTS, fresh2))
    assert [r.session_id for r in (await store.list_sessions(5)).sessions] == ["s1"]


# --- connections -----------------------------------------------------------------------


async def test_unreachable_server_fails_open_fast_and_names_it() -> None:
    """A refused connection fails ``open`` on the refusal: the connect timeout is an hour, so
    only the refusal can end it before the guard."""
    store = RedisSessionStore(connect_redis(url="redis://:secret@127.0.0.1:1/0", connect_timeout_s=3600))
    with pytest.raises(StoreUnavailableError, match="127.0.0.1:1") as info:
        async with asyncio.timeout(60):  # a hang, not a measured time
            await store.open()
    assert "secret" not in str(info.value)
    assert isinstance(info.value.__cause__, redis.exceptions.ConnectionError)
    await store.close()


async def test_unopened_and_closed_stores_are_unavailable() -> None:
    store = make_store("agentd-test-unused")
    with pytest.raises(StoreUnavailableError, match="not open"):
        await store.get_session("s1")
    with pytest.raises(StoreUnavailableError, match="not open"):
        await store.ping()
    # Argument errors are found before any I/O.
    with pytest.raises(ValueError):
        await store.update_session("s1", ttl_s=-1)
    with pytest.raises(ValueError):
        await store.create_session("s1", ttl_s=-0.5)
    with pytest.raises(ValueError):
        await store.list_sessions(0)
    with pytest.raises(TypeError, match="metadata"):
        await store.create_session("s1", metadata={"n": 1})  # type: ignore[dict-item]
    await store.close()

    async with redis_store() as opened:
        await opened.ping()
        await opened.close()
        with pytest.raises(StoreUnavailableError):
            await opened.append_items("s1", [msg("x")])
        with pytest.raises(StoreUnavailableError):
            await opened.ping()


async def test_server_errors_become_store_unavailable(store: RedisSessionStore, raw: Redis) -> None:
    await store.create_session("s1")
    items_key = session_keys(store, "s1")["items"]
    await raw.set(items_key, "not a list")  # someone else's write in our namespace
    with pytest.raises(StoreUnavailableError, match=f"redis store at {store.location}.*WRONGTYPE") as info:
        await store.append_items("s1", [msg("x")])
    assert isinstance(info.value.__cause__, redis.exceptions.ResponseError)
    assert await store.read_history("s2") == []  # other sessions are unaffected
    with pytest.raises(StoreUnavailableError):
        await store.get_session("s1")  # LLEN on a string: the script fails as a whole


async def test_killed_connections_are_replaced(raw: Redis) -> None:
    name = f"agentd-kill-{uuid.uuid4().hex[:8]}"
    async with redis_store(client_name=name) as store:
        await store.create_session("s1")
        await asyncio.gather(*(store.append_items("s1", [msg(str(i))]) for i in range(5)))  # several connections
        ids = [c["id"] for c in await raw.client_list() if c.get("name") == name]
        assert ids
        for client_id in ids:  # only this store's connections: the server may be shared
            await raw.client_kill_filter(_id=client_id)

        # Non-idempotent writes too: a dead pooled connection is noticed before sending.
        assert (await store.pop_item("s1")) is not None
        assert len(await store.append_items("s1", [msg("after")])) == 1
        assert (await store.get_session("s1")).item_count == 5
        await store.ping()


# --- client construction ---------------------------------------------------------------


async def test_connect_redis_from_urls() -> None:
    client = connect_redis(url="redis://user:pw@cache.internal:6380/2", max_connections=7, socket_timeout_s=1.5)
    try:
        assert isinstance(client, Redis) and isinstance(client.connection_pool, BlockingConnectionPool)
        kwargs = client.connection_pool.connection_kwargs
        assert (kwargs["host"], kwargs["port"], kwargs["db"], kwargs["socket_timeout"]) == ("cache.internal", 6380, 2, 1.5)
        assert client.connection_pool.max_connections == 7
        assert kwargs["retry"].get_retries() == 0  # the store decides what is safe to retry
        store = RedisSessionStore(client)
        assert store.location == "cache.internal:6380/2"  # never the password
    finally:
        await client.aclose()

    tls = connect_redis(url="rediss://cache.internal:6380/0")
    assert tls.connection_pool.connection_class is SSLConnection
    await tls.aclose()
    unix = connect_redis(url="unix:///run/redis.sock?db=3")
    assert unix.connection_pool.connection_class is UnixDomainSocketConnection
    assert RedisSessionStore(unix).location == "unix:/run/redis.sock db 3"
    await unix.aclose()


async def test_connect_redis_for_sentinel_and_cluster() -> None:
    sentinel = connect_redis(sentinels=[("s1.internal", 26379), ("s2.internal", 26380)], sentinel_service="main")
    try:
        assert isinstance(sentinel, Redis)
        pool = sentinel.connection_pool
        assert isinstance(pool, SentinelConnectionPool) and pool.service_name == "main"
        hosts = [
            (s.connection_pool.connection_kwargs["host"], s.connection_pool.connection_kwargs["port"])
            for s in pool.sentinel_manager.sentinels
        ]
        assert hosts == [("s1.internal", 26379), ("s2.internal", 26380)]
        assert RedisSessionStore(sentinel).location == "sentinel service main via s1.internal:26379,s2.internal:26380"
    finally:
        await sentinel.aclose()

    cluster = connect_redis(cluster_nodes=[("10.0.0.1", 7000), ("10.0.0.2", 7001)], password="pw")
    try:
        assert isinstance(cluster, RedisCluster)
        assert sorted(cluster.nodes_manager.startup_nodes) == ["10.0.0.1:7000", "10.0.0.2:7001"]
        assert cluster.retry.get_retries() == 0
        assert RedisSessionStore(cluster).location == "cluster 10.0.0.1:7000,10.0.0.2:7001"
    finally:
        await cluster.aclose()


@pytest.mark.parametrize(
    "kwargs",
    [
        {},
        {"url": "redis://a", "cluster_nodes": [("b", 1)]},
        {"url": "redis://a", "sentinels": [("b", 1)], "sentinel_service": "m"},
        {"sentinels": [("b", 1)]},
        {"url": "redis://a", "sentinel_service": "m"},
        {"url": "redis://a", "ssl": True},
    ],
)
def test_connect_redis_wants_exactly_one_deployment(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="exactly one|sentinel|rediss"):
        connect_redis(**kwargs)


def test_connect_redis_rejects_unknown_schemes() -> None:
    with pytest.raises(ValueError):
        connect_redis(url="http://127.0.0.1:6379")


async def test_no_schema_to_migrate(store: RedisSessionStore) -> None:
    assert store.backend == "redis"
    assert await store.schema_status() is None and await store.migrate() is None


def test_settings_choose_url_sentinel_or_cluster() -> None:
    from agentd.server.sessions.factory import build_store
    from agentd.server.settings import Settings

    cluster = build_store(Settings(store="redis", redis_cluster_nodes="10.0.0.1:7000, 10.0.0.2:7001"))
    assert isinstance(cluster, RedisSessionStore) and isinstance(cluster._client, RedisCluster)
    assert "10.0.0.1:7000" in cluster.location

    sentinel = build_store(Settings(
        store="redis", redis_sentinels="s1:26379,s2:26379", redis_sentinel_service="mymaster", redis_prefix="app1"
    ))
    assert isinstance(sentinel._client.connection_pool, SentinelConnectionPool)
    assert sentinel._client.connection_pool.service_name == "mymaster" and sentinel.prefix == "app1"

    plain = build_store(Settings(store="redis", redis_url="rediss://:hunter2@cache.example:6380/2"))
    assert "hunter2" not in plain.location and "cache.example:6380" in plain.location

    with pytest.raises(ValueError, match="AGENTD_REDIS_CLUSTER_NODES"):
        build_store(Settings(store="redis", redis_cluster_nodes="no-port"))
    with pytest.raises(ValueError, match="AGENTD_REDIS_SENTINEL_SERVICE"):
        build_store(Settings(store="redis", redis_sentinels="s1:26379"))
