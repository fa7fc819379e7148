"""Run stores for the contract suite: each engine yields a ``replica()`` factory.

``replica()`` opens another (RunStore, ControlBus) pair on the same shared data — a
second agentd process, as far as the engine can tell. The memory engine has no other
process, so its replicas are one pair. Everything is closed and cleaned afterwards
(Redis keys by prefix, Postgres schema dropped). Real servers only: an unreachable
Redis or Postgres fails the test.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import AsyncIterator, Awaitable, Callable

from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.memory import MemoryControlBus, MemoryRunStore

Replica = Callable[[], Awaitable[tuple[RunStore, ControlBus]]]
ENGINES = ("memory", "redis", "postgres")


@asynccontextmanager
async def run_replicas(engine: str) -> AsyncIterator[Replica]:
    if engine == "memory":
        store, bus = MemoryRunStore(), MemoryControlBus()

        async def same() -> tuple[RunStore, ControlBus]:
            return store, bus

        try:
            yield same
        finally:
            await bus.close()
            await store.close()
    elif engine == "redis":
        from tests.backends_runs_redis import redis_run_replicas

        async with redis_run_replicas() as replica:
            yield replica
    elif engine == "postgres":
        from tests.backends_runs_postgres import postgres_run_replicas

        async with postgres_run_replicas() as replica:
            yield replica
    else:
        raise ValueError(engine)
