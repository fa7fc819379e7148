"""Postgres run stores for the contract suite: replicas on one fresh schema, dropped afterwards.

Every ``replica()`` is a new (PostgresRunStore, PostgresControlBus) pair with its own
pool and LISTEN connections: a second agentd process, as far as Postgres can tell. The
real server is required: when it cannot be reached the test fails (never skips).
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any, AsyncIterator

import pytest

from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.postgres import PostgresControlBus, PostgresRunStore
from agentd.server.runtime.errors import StoreUnavailableError
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_runs import Replica


def run_store(schema: str, url: str = POSTGRES_URL, **kwargs: Any) -> PostgresRunStore:
    """An unopened run store on ``schema`` with test-sized pools."""
    options: dict[str, Any] = dict(min_size=1, max_size=4, connect_timeout_s=5.0, command_timeout_s=10.0)
    return PostgresRunStore(url=url, schema=schema, **{**options, **kwargs})


def control_bus(schema: str, url: str = POSTGRES_URL, **kwargs: Any) -> PostgresControlBus:
    options: dict[str, Any] = dict(connect_timeout_s=5.0, command_timeout_s=10.0)
    return PostgresControlBus(url=url, schema=schema, **{**options, **kwargs})


@asynccontextmanager
async def postgres_run_replicas(schema: str | None = None, **store_kwargs: Any) -> AsyncIterator[Replica]:
    """A ``replica()`` factory on one throwaway schema; every pair is closed and the
    schema dropped when the block ends."""
    schema = schema or new_schema()
    pairs: list[tuple[PostgresRunStore, PostgresControlBus]] = []
    async with dropped_afterwards(schema):  # fails the test when the server is unreachable

        async def replica() -> tuple[RunStore, ControlBus]:
            store, bus = run_store(schema, **store_kwargs), control_bus(schema)
            try:
                await store.open()
                await bus.open()
            except StoreUnavailableError as exc:
                await bus.close()
                await store.close()
                pytest.fail(f"the Postgres run store could not open at {POSTGRES_URL}: {exc}", pytrace=False)
            pairs.append((store, bus))
            return store, bus

        try:
            yield replica
        finally:
            for store, bus in reversed(pairs):
                await bus.close()
                await store.close()
