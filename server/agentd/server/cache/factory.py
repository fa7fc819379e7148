"""Build the result cache the settings select: the session store's engine and place.

``AGENTD_STORE`` picks the engine, and the entries live where that engine keeps the
sessions (as the agent store's do): the same SQLite file (``AGENTD_SQLITE_PATH``), Postgres
database and schema (``AGENTD_POSTGRES_*``, a small pool of its own) or Redis deployment and
key prefix (``AGENTD_REDIS_*``, a client of its own); ``memory`` keeps them in the process.
So every replica that shares the sessions shares the cache. Engine modules are imported only
when chosen.
"""

from __future__ import annotations

from agentd.server.cache.base import ResultCache
from agentd.server.settings import Settings

__all__ = ["build_result_cache"]

# Cache traffic is one short statement per lookup or store of an opted-in run.
_POSTGRES_MAX_POOL = 4
_REDIS_MAX_CONNECTIONS = 16


def build_result_cache(settings: Settings) -> ResultCache:
    """The (unopened) result cache beside the session store ``settings`` describe."""
    max_entry_bytes = settings.result_cache_max_entry_bytes
    if settings.store == "memory":
        from agentd.server.cache.memory import MemoryResultCache

        return MemoryResultCache(
            max_entry_bytes=max_entry_bytes, max_entries=settings.result_cache_memory_max_entries,
            max_bytes=settings.result_cache_memory_max_bytes,
        )
    if settings.store == "postgres":
        from agentd.server.cache.postgres import PostgresResultCache

        return PostgresResultCache(
            url=settings.postgres_url,
            schema=settings.postgres_schema,
            min_size=min(1, settings.postgres_min_pool),
            max_size=min(_POSTGRES_MAX_POOL, settings.postgres_max_pool),
            statement_cache_size=settings.postgres_statement_cache,
            connect_timeout_s=settings.postgres_connect_timeout_s,
            command_timeout_s=settings.postgres_command_timeout_s,
            auto_migrate=settings.auto_migrate,
            max_entry_bytes=max_entry_bytes,
        )
    if settings.store == "redis":
        from agentd.server.cache.redis import RedisResultCache
        from agentd.server.redis_common import connect_redis, redis_deployment

        location, deployment, options = redis_deployment(settings)
        options["max_connections"] = min(_REDIS_MAX_CONNECTIONS, settings.redis_max_connections)
        client = connect_redis(**deployment, **options, client_name="agentd-cache")
        return RedisResultCache(
            client, prefix=settings.redis_prefix, location=location, timeout_s=settings.redis_timeout_s,
            max_entry_bytes=max_entry_bytes,
        )
    from agentd.server.cache.sqlite import SqliteResultCache

    return SqliteResultCache(settings.sqlite_path, auto_migrate=settings.auto_migrate, max_entry_bytes=max_entry_bytes)
