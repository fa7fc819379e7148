"""Postgres stores for tests: each on a fresh schema of the real server, dropped afterwards.

The server is required, never optional: when it cannot be reached the test fails and
says how to provide one.
"""

from __future__ import annotations

import os
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from agentd.server.sessions.postgres import PostgresSessionStore

POSTGRES_URL = os.environ.get("AGENTD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")

_HOW_TO_PROVIDE = (
    "these tests need a Postgres server at {url}, which failed ({exc}): point AGENTD_TEST_POSTGRES_URL at a"
    " running server, or unset it to let the suite use 127.0.0.1:5432 or start its own (tests/servers.py)"
)


async def raw_connection() -> asyncpg.Connection:
    """A direct connection to the test database, outside any store (for setup and checks)."""
    try:
        return await asyncpg.connect(POSTGRES_URL, timeout=5)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        problem = f"{type(exc).__name__}: {exc}"
    parts = urlsplit(POSTGRES_URL)
    shown = parts._replace(netloc=parts.netloc.replace(f":{parts.password}@", ":***@")) if parts.password else parts
    pytest.fail(_HOW_TO_PROVIDE.format(url=urlunsplit(shown), exc=problem), pytrace=False)


def new_schema() -> str:
    return f"agentd_test_{uuid.uuid4().hex[:12]}"


def replica(schema: str, **kwargs: Any) -> PostgresSessionStore:
    """Another (unopened) store on ``schema``: a second agentd replica sharing the sessions."""
    return PostgresSessionStore(url=POSTGRES_URL, schema=schema, **kwargs)


@asynccontextmanager
async def dropped_afterwards(schema: str) -> AsyncIterator[None]:
    """Drop ``schema`` (and everything in it) when the block ends, however it ends."""
    raw = await raw_connection()
    try:
        yield
    finally:
        try:
            await raw.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
        finally:
            await raw.close()


@asynccontextmanager
async def postgres_store(**kwargs: Any) -> AsyncIterator[PostgresSessionStore]:
    """An opened store on a fresh schema; closed and its schema dropped afterwards.

    ``kwargs`` go to the constructor (``min_size``, ``default_ttl_s``...). The schema
    name is ``store.schema``; ``replica(store.schema)`` makes a second store on it.
    """
    schema = new_schema()
    async with dropped_afterwards(schema):
        store = replica(schema, **kwargs)
        await store.open()
        try:
            yield store
        finally:
            await store.close()
