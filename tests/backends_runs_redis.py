"""Redis run stores for the contract suite: replicas on one throwaway prefix of a real server.

Each ``replica()`` is a new (RedisRunStore, RedisControlBus) pair with its own clients, as a
separate agentd process would have. An unreachable server fails the test (never skips).
Afterwards every pair is closed and every key under the prefix deleted.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Awaitable, Callable

from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.redis import RedisControlBus, RedisRunStore
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.redis_common import connect_redis
from tests.backends_redis import REDIS_URL, delete_prefix, fail_unreachable, new_prefix


def make_pair(
    prefix: str, url: str = REDIS_URL, *, timeout_s: float = 2.0, **store_kwargs: Any
) -> tuple[RedisRunStore, RedisControlBus]:
    """An unopened store and bus on ``prefix`` at ``url``, each with its own clients."""
    common: dict[str, Any] = {"url": url, "connect_timeout_s": timeout_s}
    client = connect_redis(**common, socket_timeout_s=timeout_s, client_name="agentd-test-runs")
    # Blocking reads: no socket timeout (the store bounds each wait), room for every waiter.
    blocking = connect_redis(**common, socket_timeout_s=None, max_connections=1000, client_name="agentd-test-runs-wait")
    bus_client = connect_redis(**common, socket_timeout_s=timeout_s, client_name="agentd-test-control")
    store = RedisRunStore(client, blocking, prefix=prefix, timeout_s=timeout_s, **store_kwargs)
    bus = RedisControlBus(bus_client, prefix=prefix, timeout_s=timeout_s)
    return store, bus


Replica = Callable[[], Awaitable[tuple[RunStore, ControlBus]]]


@asynccontextmanager
async def redis_run_replicas(**store_kwargs: Any) -> AsyncIterator[Replica]:
    """Yields ``replica()``; ``store_kwargs`` go to every RedisRunStore (e.g. ``reclaim_idle_s``)."""
    prefix = new_prefix()
    pairs: list[tuple[RedisRunStore, RedisControlBus]] = []
    reached = False

    async def replica() -> tuple[RunStore, ControlBus]:
        nonlocal reached
        store, bus = make_pair(prefix, **store_kwargs)
        pairs.append((store, bus))
        try:
            await store.open()
            reached = True
            await bus.open()
        except StoreUnavailableError as exc:
            fail_unreachable(exc)
        return store, bus

    try:
        yield replica
    finally:
        try:
            for store, bus in pairs:
                await bus.close()
                await store.close()
        finally:
            if reached:  # nothing was written where no store could connect
                await delete_prefix(prefix)
