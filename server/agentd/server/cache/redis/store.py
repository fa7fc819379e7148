"""``RedisResultCache``: result cache entries in Redis (see the package docstring)."""

from __future__ import annotations

import math
from types import SimpleNamespace

from agentd.server.cache.base import DEFAULT_MAX_ENTRY_BYTES, ResultCache
from agentd.server.redis_common import RedisClient, RedisEngine, utf8

__all__ = ["RedisResultCache"]

# RedisEngine loads an engine's scripts at open: this one sends plain commands only.
_NO_SCRIPTS = SimpleNamespace(SCRIPTS=())


class RedisResultCache(RedisEngine, ResultCache):
    """Entries in Redis; any number of replicas share one prefix (the session store's).

    ``client`` is owned by the cache from now on (``close`` closes it). Build it with
    ``connect_redis``. Lifecycle (open with the version check, ping, close): ``RedisEngine``'s.
    """

    backend = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "agentd",
        location: str = "",
        timeout_s: float = 5.0,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
    ) -> None:
        RedisEngine.__init__(
            self, client, what="redis result cache", lua=_NO_SCRIPTS, prefix=prefix, location=location,
            timeout_s=timeout_s,
        )
        ResultCache.__init__(self, max_entry_bytes=max_entry_bytes)
        self._base = utf8(f"{prefix}:result-cache:")

    @property
    def key_base(self) -> str:
        """Every entry's key starts with this."""
        return self._base.decode()

    def _key(self, tenant: str, key: str) -> bytes:
        return self._base + utf8(f"{tenant}:{key}")

    async def _load(self, tenant: str, key: str, now: float) -> bytes | None:
        name = self._key(tenant, key)
        value = await self._run(lambda: self._client.get(name), idempotent=True)
        if value is None:
            return None
        expires, separator, text = bytes(value).partition(b"|")
        try:
            if not separator or float(expires) <= now:
                return None
        except ValueError:
            return None
        return text

    async def _store(self, tenant: str, key: str, text: str, now: float, expires_at: float) -> None:
        name = self._key(tenant, key)
        value = f"{expires_at!r}|".encode("ascii") + text.encode("ascii")
        milliseconds = max(1, math.ceil((expires_at - now) * 1000))
        # Idempotent: a repeat sets the same value again.
        await self._run(lambda: self._client.set(name, value, px=milliseconds), idempotent=True)

    async def sweep(self, *, now: float) -> int:
        """Nothing to do: Redis drops expired keys itself."""
        return 0
