"""Build the agent store the settings select: the session store's engine and place.

``AGENTD_STORE`` picks the engine, and the agents live where that engine keeps the
sessions: the same SQLite file (``AGENTD_SQLITE_PATH``), Postgres database and schema
(``AGENTD_POSTGRES_*``) or Redis deployment and key prefix (``AGENTD_REDIS_*``), each with
its own tables or keys (and, in SQL, its own migration version table). So every replica
that shares the sessions shares the agents. Engine modules are imported only when
chosen, so the embedded default never loads asyncpg or redis.
"""

from __future__ import annotations

from agentd.server.agents.store.base import AgentStore
from agentd.server.settings import Settings

__all__ = ["build_agent_store"]

# Agent traffic is light (a catalog poll, API calls, a version read on a cache miss): a
# small pool of its own beside the session store's.
_POSTGRES_MAX_POOL = 4


def build_agent_store(settings: Settings) -> AgentStore:
    """The (unopened) agent store beside the session store ``settings`` describe."""
    if settings.store == "memory":
        from agentd.server.agents.store.memory import MemoryAgentStore

        return MemoryAgentStore()
    if settings.store == "postgres":
        from agentd.server.agents.store.postgres import PostgresAgentStore

        return PostgresAgentStore(
            url=settings.postgres_url,
            schema=settings.postgres_schema,
            min_size=min(1, settings.postgres_min_pool),
            max_size=min(_POSTGRES_MAX_POOL, settings.postgres_max_pool),
            statement_cache_size=settings.postgres_statement_cache,
            connect_timeout_s=settings.postgres_connect_timeout_s,
            command_timeout_s=settings.postgres_command_timeout_s,
            auto_migrate=settings.auto_migrate,
        )
    if settings.store == "redis":
        return _build_redis(settings)
    from agentd.server.agents.store.sqlite import SqliteAgentStore

    return SqliteAgentStore(settings.sqlite_path, auto_migrate=settings.auto_migrate)


def _build_redis(settings: Settings) -> AgentStore:
    from agentd.server.agents.store.redis import RedisAgentStore
    from agentd.server.redis_common import connect_redis, redis_deployment

    location, deployment, options = redis_deployment(settings)
    options["max_connections"] = min(8, settings.redis_max_connections)
    client = connect_redis(**deployment, **options, client_name="agentd-agents")
    return RedisAgentStore(client, prefix=settings.redis_prefix, location=location, timeout_s=settings.redis_timeout_s)
