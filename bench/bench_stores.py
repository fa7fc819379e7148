"""Session store benchmark: agentd's Postgres and Redis stores against the raw driver.

For each backend, in the same run and against the same server, it measures:

* items appended per second, one item per call and a 10-item batch (a run's step),
  with 1 writer and with 8 concurrent writers (one session each);
* p50/p99 latency of reading a session's latest 50 items.

agentd and raw alternate in short rounds (every writer appends ``--round-appends`` times,
a few milliseconds; which side goes first alternates too) for ``--seconds`` per figure, so
that noise from a shared machine (a neighbour's fsyncs, CPU bursts) hits both alike; a
figure's ratio is the median of the rounds' ratios, reported with its quartiles and
extremes. Reads alternate one by one.

The raw baseline is the least a hand-written client of the same driver must do for the
same result: serialise each item to JSON, append atomically with gap-free sequence
numbers, read the newest 50 and parse them back, on minimal tables or keys (Postgres:
one CTE statement over a pool without the per-release reset query; Redis: one Lua
script). agentd does more (session existence and expiry checks, counters, request ids,
typed items); the ratio shows what that costs. Numbers, not pass/fail.

    python bench/bench_stores.py [--seconds 5] [--round-appends 10] [--backends postgres,redis]
                                 [--only append_1_item_1_writer,read_latest_50] [--json]

``--json``: the last line of stdout is one flat JSON object, metric name -> number
(``postgres_append_1_item_1_writer_ratio``, ``..._agentd_per_s``, ``..._q1_ratio``, ...).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
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


async def append_round(backend: Backend, sessions: list[str], batch: int, appends: int) -> float:
    """Seconds for each of ``len(sessions)`` concurrent writers (one session each) to
    append ``appends`` batches of ``batch`` items."""

    async def writer(session_id: str) -> None:
        for _ in range(appends):
            await backend.append(session_id, batch)

    started = time.perf_counter()
    if len(sessions) == 1:
        await writer(sessions[0])
    else:
        await asyncio.gather(*(writer(s) for s in sessions))
    return time.perf_counter() - started


async def read_samples(backend: Backend, session_id: str, reads: int) -> list[float]:
    """Latencies (ms) of ``reads`` reads of the newest 50 items."""
    samples = []
    for _ in range(reads):
        started = time.perf_counter()
        rows = await backend.latest_50(session_id)
        samples.append((time.perf_counter() - started) * 1e3)
        assert len(rows) == 50
    return samples


async def read_session(backend: Backend) -> str:
    session_id = await backend.new_session()
    for _ in range(20):
        await backend.append(session_id, 10)  # 200 items; read the newest 50
    await read_samples(backend, session_id, 50)  # warm caches and prepared statements
    return session_id


# (metric, items per append, concurrent writers)
APPENDS = (
    ("append_1_item_1_writer", 1, 1),
    ("append_1_item_8_writers", 1, WRITERS),
    ("append_10_items_1_writer", 10, 1),
    ("append_10_items_8_writers", 10, WRITERS),
)


def alternate(index: int, agentd: Backend, raw: Backend) -> list[tuple[str, Backend]]:
    """Both sides, the one going first alternating round by round."""
    pair = [("agentd", agentd), ("raw", raw)]
    return pair if index % 2 == 0 else pair[::-1]


async def compare(
    agentd: Backend, raw: Backend, seconds: float, round_appends: int, reads: int, only: set[str] | None,
    rounds: dict[str, int],
) -> dict[str, float]:
    """agentd against raw. Each figure alternates the two in short rounds (every writer
    appends ``round_appends`` times, a few milliseconds) for ``seconds``, so that noise from
    a shared machine (a neighbour's fsyncs, CPU bursts) hits both alike; its ratio is the
    median of the rounds' ratios (with their quartiles and extremes as the spread), its
    rates each side's items over its time in all rounds (``rounds``: how many, per figure).
    Reads alternate one by one."""
    await agentd.setup()
    try:
        await raw.setup()
        try:
            metrics: dict[str, float] = {}
            for key, batch, writers in APPENDS:
                if only is not None and key not in only:
                    continue
                sessions = {"agentd": [await agentd.new_session() for _ in range(writers)],
                            "raw": [await raw.new_session() for _ in range(writers)]}
                for side, backend in alternate(0, agentd, raw):  # warm-up: pools, prepared statements
                    await append_round(backend, sessions[side], batch, 20)
                elapsed = {"agentd": 0.0, "raw": 0.0}
                ratios = []
                deadline = time.perf_counter() + seconds
                while len(ratios) < 2 or time.perf_counter() < deadline:
                    took = {}
                    for side, backend in alternate(len(ratios), agentd, raw):
                        took[side] = await append_round(backend, sessions[side], batch, round_appends)
                        elapsed[side] += took[side]
                    ratios.append(took["raw"] / took["agentd"])  # rates' ratio: same items on both sides
                items = len(ratios) * writers * round_appends * batch
                metrics[f"{key}_agentd_per_s"] = items / elapsed["agentd"]
                metrics[f"{key}_raw_per_s"] = items / elapsed["raw"]
                rounds[key] = len(ratios)
                metrics.update(spread(key, ratios))
            if only is None or "read_latest_50" in only:
                sessions_read = {"agentd": await read_session(agentd), "raw": await read_session(raw)}
                samples: dict[str, list[float]] = {"agentd": [], "raw": []}
                for index in range(reads):
                    for side, backend in alternate(index, agentd, raw):
                        samples[side] += await read_samples(backend, sessions_read[side], 1)
                for side, values in samples.items():
                    metrics[f"read_latest_50_{side}_p50_ms"] = pct(values, 0.5)
                    metrics[f"read_latest_50_{side}_p99_ms"] = pct(values, 0.99)
            return metrics
        finally:
            await raw.teardown()
    finally:
        await agentd.teardown()


def spread(key: str, ratios: list[float]) -> dict[str, float]:
    q1, median, q3 = statistics.quantiles(ratios, n=4)
    return {
        f"{key}_ratio": median,
        f"{key}_q1_ratio": q1,
        f"{key}_q3_ratio": q3,
        f"{key}_min_ratio": min(ratios),
        f"{key}_max_ratio": max(ratios),
    }


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
    parser.add_argument("--seconds", type=float, default=5.0, help="duration of each append figure, both sides")
    parser.add_argument("--round-appends", type=int, default=10,
                        help="appends per writer and side in one round (agentd, then raw, or the reverse)")
    parser.add_argument("--reads", type=int, default=1000, help="reads of the newest 50 items per side")
    parser.add_argument("--backends", default="postgres,redis", help="comma-separated: postgres, redis")
    parser.add_argument("--only", help="comma-separated figures, e.g. append_1_item_1_writer,read_latest_50")
    parser.add_argument("--json", action="store_true", help="end with one flat JSON object of the metrics")
    args = parser.parse_args()
    only = set(args.only.split(",")) if args.only else None

    results: dict[str, dict[str, float]] = {}
    rounds: dict[str, dict[str, int]] = {}
    for name in args.backends.split(","):
        agentd, raw = PAIRS[name]()
        rounds[name] = {}
        results[name] = await compare(agentd, raw, args.seconds, args.round_appends, args.reads, only, rounds[name])

    print(f"session stores · {os.cpu_count()} cpu · {args.seconds:g} s per append figure, agentd and raw alternating"
          f" in rounds of {args.round_appends} appends per writer · ratio = agentd / raw, the median of the rounds'"
          " [quartiles] (extremes) · reads alternate one by one")
    for name, got in results.items():
        print(f"{name}:\n  {'':32} {'agentd':>10} {'raw':>10} {'ratio':>7}")
        for key, _, _ in APPENDS:
            if f"{key}_ratio" in got:
                print(f"  {key + '_per_s':32} {got[f'{key}_agentd_per_s']:10.0f} {got[f'{key}_raw_per_s']:10.0f}"
                      f" {got[f'{key}_ratio']:7.0%}  [{got[f'{key}_q1_ratio']:.0%}–{got[f'{key}_q3_ratio']:.0%}]"
                      f" ({got[f'{key}_min_ratio']:.0%}–{got[f'{key}_max_ratio']:.0%}), {rounds[name][key]} rounds")
        for q in ("p50", "p99"):
            if f"read_latest_50_agentd_{q}_ms" in got:
                a, r = got[f"read_latest_50_agentd_{q}_ms"], got[f"read_latest_50_raw_{q}_ms"]
                print(f"  {'read_latest_50_' + q + '_ms':32} {a:10.3f} {r:10.3f}  {a - r:+.3f} ms")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "stores.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps({f"{name}_{key}": value for name, got in results.items() for key, value in got.items()}))


if __name__ == "__main__":
    asyncio.run(main())
