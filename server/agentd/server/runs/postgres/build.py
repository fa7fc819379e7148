"""The Postgres run store and control bus, from the settings."""

from __future__ import annotations

from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.postgres.bus import PostgresControlBus
from agentd.server.runs.postgres.store import PostgresRunStore
from agentd.server.settings import Settings

__all__ = ["build_postgres_runs"]


def build_postgres_runs(settings: Settings) -> tuple[RunStore, ControlBus]:
    """The run store and control bus of ``AGENTD_RUN_STORE=postgres`` (unopened), on the
    session store's database and schema (``AGENTD_POSTGRES_*``)."""
    store = PostgresRunStore(
        url=settings.postgres_url,
        schema=settings.postgres_schema,
        min_size=settings.postgres_min_pool,
        max_size=settings.postgres_max_pool,
        statement_cache_size=settings.postgres_statement_cache,
        connect_timeout_s=settings.postgres_connect_timeout_s,
        command_timeout_s=settings.postgres_command_timeout_s,
        auto_migrate=settings.auto_migrate,
    )
    bus = PostgresControlBus(
        url=settings.postgres_url,
        schema=settings.postgres_schema,
        statement_cache_size=settings.postgres_statement_cache,
        connect_timeout_s=settings.postgres_connect_timeout_s,
        command_timeout_s=settings.postgres_command_timeout_s,
    )
    return store, bus
