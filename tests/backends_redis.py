"""Redis stores for tests: a real server, one throwaway key prefix per store.

Tests never skip for want of Redis: an unreachable server fails them, saying how to
provide one. Clean-up deletes only the store's own prefixed keys (SCAN, never KEYS,
never FLUSHDB), so a shared server is safe to use.
"""

from __future__ import annotations

import os
import re
import uuid
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, AsyncIterator, NoReturn

import pytest
from redis.asyncio import Redis

from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.redis_common import connect_redis
from agentd.server.sessions.redis import RedisSessionStore

REDIS_URL = os.environ.get("AGENTD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


def fail_unreachable(exc: BaseException) -> NoReturn:
    pytest.fail(
        f"the Redis tests need a Redis server at {REDIS_URL}, which failed: {exc}\n"
        "Point AGENTD_TEST_REDIS_URL at a running server, or unset it to let the suite use"
        " 127.0.0.1:6379 or start its own (tests/servers.py).",
        pytrace=False,
    )


def new_prefix() -> str:
    return f"agentd-test-{uuid.uuid4().hex[:12]}"


def make_store(prefix: str, **kwargs: Any) -> RedisSessionStore:
    """An unopened store on ``prefix``; ``client_name`` goes to the client, the rest to the store."""
    client = connect_redis(url=REDIS_URL, connect_timeout_s=2.0, client_name=kwargs.pop("client_name", "agentd-test"))
    return RedisSessionStore(client, prefix=prefix, **kwargs)


async def delete_prefix(prefix: str) -> None:
    """Delete every key under ``prefix`` (SCAN MATCH with the prefix's glob characters escaped)."""
    client = Redis.from_url(REDIS_URL)
    try:
        pattern = re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"
        batch: list[bytes] = []
        async for key in client.scan_iter(match=pattern, count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                await client.unlink(*batch)
                batch.clear()
        if batch:
            await client.unlink(*batch)
    finally:
        await client.aclose()


class DisposableRedisSessionStore(RedisSessionStore):
    """A store on a fresh prefix whose ``close`` also deletes its keys; for store factories."""

    async def open(self) -> None:
        try:
            await super().open()
        except StoreUnavailableError as exc:
            fail_unreachable(exc)

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            await delete_prefix(self.prefix)


def redis_factory(tmp_path: Path | None = None, **kwargs: Any) -> RedisSessionStore:
    """For ``STORE_FACTORIES`` in the contract suite: ``"redis": redis_factory``."""
    client = connect_redis(url=REDIS_URL, connect_timeout_s=2.0, client_name="agentd-test")
    return DisposableRedisSessionStore(client, prefix=new_prefix(), **kwargs)


@asynccontextmanager
async def redis_store(**kwargs: Any) -> AsyncIterator[RedisSessionStore]:
    """An opened store on a fresh prefix; its keys are deleted afterwards."""
    prefix = new_prefix()
    store = make_store(prefix, **kwargs)
    try:
        await store.open()
    except StoreUnavailableError as exc:
        await store.close()
        fail_unreachable(exc)
    try:
        yield store
    finally:
        try:
            await store.close()
        finally:
            await delete_prefix(prefix)


@asynccontextmanager
async def replica_of(store: RedisSessionStore, **kwargs: Any) -> AsyncIterator[RedisSessionStore]:
    """A second, independently connected store on the same prefix: another server replica.

    Closing it leaves the keys alone (they belong to ``store``).
    """
    other = make_store(store.prefix, **kwargs)
    await other.open()
    try:
        yield other
    finally:
        await other.close()
