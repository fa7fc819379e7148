"""Build the session store the settings select (``AGENTD_STORE``).

Backend modules are imported only when chosen, so the embedded default never loads
asyncpg or redis.
"""

from __future__ import annotations

from agentd.server.sessions.base import SessionStore
from agentd.server.settings import Settings


def parse_nodes(field: str, value: str) -> list[tuple[str, int]]:
    """'host:port,host:port' -> [(host, port), ...]; ValueError naming the setting otherwise."""
    nodes = []
    for part in filter(None, (p.strip() for p in value.split(","))):
        host, sep, port = part.rpartition(":")
        if not sep or not host or not port.isdigit():
            raise ValueError(f"{field}: expected 'host:port' entries separated by commas, got {part!r}")
        nodes.append((host.strip("[]"), int(port)))
    return nodes


def build_store(settings: Settings) -> SessionStore:
    ttl = settings.session_ttl_s or None
    if settings.store == "memory":
        from agentd.server.sessions.memory import MemorySessionStore

        return MemorySessionStore(default_ttl_s=ttl)
    if settings.store == "postgres":
        from agentd.server.sessions.postgres import PostgresSessionStore

        return PostgresSessionStore(
            url=settings.postgres_url,
            schema=settings.postgres_schema,
            min_size=settings.postgres_min_pool,
            max_size=settings.postgres_max_pool,
            statement_cache_size=settings.postgres_statement_cache,
            connect_timeout_s=settings.postgres_connect_timeout_s,
            command_timeout_s=settings.postgres_command_timeout_s,
            default_ttl_s=ttl,
            auto_migrate=settings.auto_migrate,
        )
    if settings.store == "redis":
        return _build_redis(settings, ttl)
    from agentd.server.sessions.sqlite import SqliteSessionStore

    return SqliteSessionStore(settings.sqlite_path, default_ttl_s=ttl, auto_migrate=settings.auto_migrate)


def _build_redis(settings: Settings, ttl: float | None) -> SessionStore:
    from agentd.server.redis_common import connect_redis
    from agentd.server.sessions.redis import RedisSessionStore

    cluster = parse_nodes("AGENTD_REDIS_CLUSTER_NODES", settings.redis_cluster_nodes)
    sentinels = parse_nodes("AGENTD_REDIS_SENTINELS", settings.redis_sentinels)
    if sentinels and not settings.redis_sentinel_service:
        raise ValueError("AGENTD_REDIS_SENTINELS is set: also set AGENTD_REDIS_SENTINEL_SERVICE (the master's name)")
    if cluster:
        location = f"cluster {settings.redis_cluster_nodes}"
        client = connect_redis(cluster_nodes=cluster, **_redis_options(settings))
    elif sentinels:
        location = f"sentinel service {settings.redis_sentinel_service} via {settings.redis_sentinels}"
        client = connect_redis(
            sentinels=sentinels, sentinel_service=settings.redis_sentinel_service, **_redis_options(settings)
        )
    else:
        location = _redact(settings.redis_url)
        client = connect_redis(url=settings.redis_url, **_redis_options(settings))
    return RedisSessionStore(client, prefix=settings.redis_prefix, default_ttl_s=ttl, location=location)


def _redis_options(settings: Settings) -> dict[str, float | int]:
    return {
        "socket_timeout_s": settings.redis_timeout_s,
        "connect_timeout_s": settings.redis_timeout_s,
        "max_connections": settings.redis_max_connections,
    }


def _redact(url: str) -> str:
    """The URL without its password, for logs and error messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    return f"{scheme}{sep}{'***@' if at else ''}{host}" if sep else url
