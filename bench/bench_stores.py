"""Session store benchmark: agentd's Postgres and Redis stores against the raw driver.

For each backend, in the same run and against the same server, it measures:

* items appended per second, one item per call and a 10-item batch (a run's step),
  with 1 writer and with 8 concurrent writers (one session each);
* p50/p99 latency of reading a session's latest 50 items.

The raw baseline is the least a hand-written client of the same driver must do for the
same result: serialise each item to JSON, append atomically with gap-free sequence
numbers, read the newest 50 and parse them back, on minimal tables or keys (Postgres:
one CTE statement over a pool without the per-release reset query; Redis: one Lua
script). agentd does more (session existence and expiry checks, counters, request ids,
typed items); the ratio shows what that costs. Numbers, not pass/fail.

    python bench/bench_stores.py [--seconds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
import uuid
from pathlib import Path
from typing import Any, Awaitable, Callable

import asyncpg
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.server.runtime.items import MessageItem  # noqa: E402
from agentd.server.sessions.base import SessionStore  # noqa: E402

POSTGRES_URL = os.environ.get("AGENTD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGENTD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
WRITERS = 8
POOL = 10
ITEM = MessageItem("assistant", "The order A-1001 ships tomorrow; a refund of 49 EUR is on its way. " * 2, "billing")
_encode = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def encoded_items(count: int) -> list[str]:
    return [_encode(ITEM.to_dict()) for _ in range(count)]


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class Backend:
    """One side of a comparison: append a batch to a session, read the latest 50."""

    name: str

    async def setup(self) -> None: ...
    async def teardown(self) -> None: ...
    async def new_session(self) -> str: ...
    async def append(self, session_id: str, count: int) -> None: ...
    async def latest_50(self, session_id: str) -> Any: ...


class AgentdBackend(Backend):
    def __init__(self, name: str, make: Callable[[], SessionStore], cleanup: Callable[[], Awaitable[None]]) -> None:
        self.name = name
        self._make = make
        self._cleanup = cleanup

    async def setup(self) -> None:
        self.store = self._make()
        await self.store.open()

    async def teardown(self) -> None:
        await self.store.close()
        await self._cleanup()

    async def new_session(self) -> str:
        session_id = uuid.uuid4().hex
        await self.store.create_session(session_id)
        return session_id

    async def append(self, session_id: str, count: int) -> None:
        await self.store.append_items(session_id, [ITEM] * count)

    async def latest_50(self, session_id: str) -> Any:
        return await self.store.list_items(session_id, 50, newest_first=True)


class RawPostgres(Backend):
    name = "raw asyncpg"
    SCHEMA = f"bench_raw_{uuid.uuid4().hex[:8]}"

    async def setup(self) -> None:
        async def no_reset(conn: asyncpg.Connection) -> None:
            """Like agentd's pool: skip the per-release reset query, so the baseline is the best case."""

        self.pool = await asyncpg.create_pool(POSTGRES_URL, min_size=POOL, max_size=POOL, reset=no_reset)
        await self.pool.execute(f"""
            CREATE SCHEMA {self.SCHEMA};
            CREATE TABLE {self.SCHEMA}.sessions (id text PRIMARY KEY, last_seq bigint NOT NULL DEFAULT 0);
            CREATE TABLE {self.SCHEMA}.items (
                session_id text NOT NULL REFERENCES {self.SCHEMA}.sessions ON DELETE CASCADE,
                seq bigint NOT NULL, type text NOT NULL, data jsonb NOT NULL,
                created_at timestamptz NOT NULL DEFAULT now(), PRIMARY KEY (session_id, seq));
        """)
        self.append_sql = f"""
            WITH s AS (UPDATE {self.SCHEMA}.sessions SET last_seq = last_seq + $2 WHERE id = $1 RETURNING last_seq)
            INSERT INTO {self.SCHEMA}.items (session_id, seq, type, data)
            SELECT $1, s.last_seq - $2 + i.ord, 'message', i.data
            FROM s, unnest($3::jsonb[]) WITH ORDINALITY AS i(data, ord)"""
        self.read_sql = f"SELECT seq, data FROM {self.SCHEMA}.items WHERE session_id = $1 ORDER BY seq DESC LIMIT 50"

    async def teardown(self) -> None:
        await self.pool.execute(f"DROP SCHEMA {self.SCHEMA} CASCADE")
        await self.pool.close()

    async def new_session(self) -> str:
        session_id = uuid.uuid4().hex
        await self.pool.execute(f"INSERT INTO {self.SCHEMA}.sessions (id) VALUES ($1)", session_id)
        return session_id

    async def append(self, session_id: str, count: int) -> None:
        await self.pool.execute(self.append_sql, session_id, count, encoded_items(count))

    async def latest_50(self, session_id: str) -> Any:
        return [json.loads(row["data"]) for row in await self.pool.fetch(self.read_sql, session_id)]


class RawRedis(Backend):
    name = "raw redis-py"
    PREFIX = f"bench-raw-{uuid.uuid4().hex[:8]}"
    APPEND = """
        local last = redis.call('HINCRBY', KEYS[1], 'last_seq', #ARGV)
        local first = last - #ARGV
        local records = {}
        for i, item in ipairs(ARGV) do records[i] = (first + i) .. '|' .. item end
        redis.call('RPUSH', KEYS[2], unpack(records))
        return last"""

    async def setup(self) -> None:
        self.client = aioredis.from_url(REDIS_URL, max_connections=50)
        self.script = self.client.register_script(self.APPEND)

    async def teardown(self) -> None:
        keys = [k async for k in self.client.scan_iter(match=f"{self.PREFIX}:*", count=1000)]
        if keys:
            await self.client.delete(*keys)
        await self.client.aclose()

    async def new_session(self) -> str:
        session_id = uuid.uuid4().hex
        await self.client.hset(f"{self.PREFIX}:{{{session_id}}}:info", "last_seq", 0)
        return session_id

    async def append(self, session_id: str, count: int) -> None:
        keys = [f"{self.PREFIX}:{{{session_id}}}:info", f"{self.PREFIX}:{{{session_id}}}:items"]
        await self.script(keys=keys, args=encoded_items(count))

    async def latest_50(self, session_id: str) -> Any:
        records = await self.client.lrange(f"{self.PREFIX}:{{{session_id}}}:items", -50, -1)
        return [json.loads(record.split(b"|", 1)[1]) for record in records]


async def append_rate(backend: Backend, batch: int, writers: int, seconds: float) -> float:
    sessions = [await backend.new_session() for _ in range(writers)]
    appended = [0] * writers
    deadline = time.perf_counter() + seconds

    async def writer(index: int) -> None:
        while time.perf_counter() < deadline:
            await backend.append(sessions[index], batch)
            appended[index] += batch

    started = time.perf_counter()
    await asyncio.gather(*(writer(i) for i in range(writers)))
    return sum(appended) / (time.perf_counter() - started)


async def read_latency(backend: Backend, reads: int) -> tuple[float, float]:
    session_id = await backend.new_session()
    for _ in range(20):
        await backend.append(session_id, 10)  # 200 items; read the newest 50
    for _ in range(50):
        await backend.latest_50(session_id)  # warm caches and prepared statements
    samples = []
    for _ in range(reads):
        started = time.perf_counter()
        rows = await backend.latest_50(session_id)
        samples.append((time.perf_counter() - started) * 1e3)
        assert len(rows) == 50
    return pct(samples, 0.5), pct(samples, 0.99)


async def measure(backend: Backend, seconds: float) -> dict[str, float]:
    await backend.setup()
    try:
        await append_rate(backend, 1, 1, 0.5)  # warm-up
        result = {
            "append_1_item_1_writer_per_s": await append_rate(backend, 1, 1, seconds),
            "append_1_item_8_writers_per_s": await append_rate(backend, 1, WRITERS, seconds),
            "append_10_items_1_writer_per_s": await append_rate(backend, 10, 1, seconds),
            "append_10_items_8_writers_per_s": await append_rate(backend, 10, WRITERS, seconds),
        }
        p50, p99 = await read_latency(backend, 1000)
        result.update(read_latest_50_p50_ms=p50, read_latest_50_p99_ms=p99)
        return result
    finally:
        await backend.teardown()


async def drop_pg_schema(schema: str) -> None:
    conn = await asyncpg.connect(POSTGRES_URL)
    try:
        await conn.execute(f"DROP SCHEMA IF EXISTS {schema} CASCADE")
    finally:
        await conn.close()


async def delete_redis_prefix(prefix: str) -> None:
    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def postgres_pair() -> tuple[Backend, Backend]:
    from agentd.server.sessions.postgres import PostgresSessionStore

    schema = f"bench_agentd_{uuid.uuid4().hex[:8]}"
    agentd = AgentdBackend(
        "agentd postgres",
        lambda: PostgresSessionStore(url=POSTGRES_URL, schema=schema, min_size=POOL, max_size=POOL),
        lambda: drop_pg_schema(schema),
    )
    return agentd, RawPostgres()


def redis_pair() -> tuple[Backend, Backend]:
    from agentd.server.redis_common import connect_redis
    from agentd.server.sessions.redis import RedisSessionStore

    prefix = f"bench-agentd-{uuid.uuid4().hex[:8]}"
    agentd = AgentdBackend(
        "agentd redis",
        lambda: RedisSessionStore(connect_redis(url=REDIS_URL), prefix=prefix, location=REDIS_URL),
        lambda: delete_redis_prefix(prefix),
    )
    return agentd, RawRedis()


PAIRS: dict[str, Callable[[], tuple[Backend, Backend]]] = {"postgres": postgres_pair, "redis": redis_pair}


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each throughput measurement")
    parser.add_argument("--backends", default="postgres,redis", help="comma-separated: postgres, redis")
    args = parser.parse_args()

    results: dict[str, Any] = {}
    for name in args.backends.split(","):
        agentd, raw = PAIRS[name]()
        results[name] = {"agentd": await measure(agentd, args.seconds), "raw": await measure(raw, args.seconds)}

    print(f"session stores ({args.seconds:.0f} s per throughput figure; items/s and ms; ratio = agentd / raw)")
    header = f"  {'':34} {'agentd':>10} {'raw':>10} {'ratio':>7}"
    for name, both in results.items():
        print(f"{name}:\n{header}")
        a, r = both["agentd"], both["raw"]
        for key in a:
            if key.endswith("_per_s"):
                print(f"  {key:34} {a[key]:10.0f} {r[key]:10.0f} {a[key] / r[key]:7.0%}")
        for key in ("read_latest_50_p50_ms", "read_latest_50_p99_ms"):
            print(f"  {key:34} {a[key]:10.3f} {r[key]:10.3f}  +{a[key] - r[key]:.3f} ms")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "stores.json").write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    asyncio.run(main())
