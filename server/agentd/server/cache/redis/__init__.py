"""Result cache on Redis (standalone, Sentinel or Cluster), under the session store's key prefix.

One key per entry, ``<prefix>:result-cache:<tenant>:<request key>`` (tenants cannot contain
``:``, so keys are unambiguous), a STRING ``<expires_at>|<entry JSON>``. A store is one
``SET ... PX`` (Redis drops the key at its expiry by its own clock), a lookup one ``GET``
whose expiry is also checked against the caller's clock (``now``), so every engine answers
by the same clock. Both are single-key commands, atomic as they are: no script is needed.
Each key is its own Cluster slot; nothing reads two entries together.

Both are safe to repeat, so both are retried as ``redis_common.RetryPolicy`` allows reads.
Memory is bounded by the TTLs and, beyond them, by the server's ``maxmemory`` policy: with
``volatile-lru``/``allkeys-lru`` the cache's keys (which all have an expiry) are the first to go
before sessions' keys without one.

The package: ``store.py`` (``RedisResultCache``).
"""

from agentd.server.cache.redis.store import RedisResultCache

__all__ = ["RedisResultCache"]
