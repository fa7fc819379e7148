"""What the Postgres session store, run store and trace archive share: how a schema
name is checked, how a database is named in messages (never with its password), and
how versioned migrations are applied (each component keeps its own version table, and
every migration of one schema queues on the same advisory lock).
"""

from __future__ import annotations

import hashlib
import logging
import re
from typing import Sequence
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

log = logging.getLogger("agentd.store")

_SCHEMA_NAME = re.compile(r"[a-z_][a-z0-9_]*")


def check_schema(schema: str) -> str:
    """The schema name quoted for SQL; ``ValueError`` unless it is a plain identifier."""
    if not _SCHEMA_NAME.fullmatch(schema):
        raise ValueError(f"postgres schema must match [a-z_][a-z0-9_]*, got {schema!r}")
    return f'"{schema}"'  # quoted anyway: a plain name may still be a keyword


def location(url: str) -> str:
    """``host:port/database`` from a connection URL, for messages: never the user or password."""
    parts = urlsplit(url)
    query = parse_qs(parts.query)
    hosts = parts.netloc.rpartition("@")[2] or query.get("host", ["localhost"])[0]
    if hosts.startswith("/"):  # a Unix socket directory
        hosts = f"{hosts}:{query.get('port', ['5432'])[0]}"
    elif "," not in hosts and not re.search(r":\d+$", hosts):
        hosts = f"{hosts}:{query.get('port', ['5432'])[0]}"
    database = unquote(parts.path.lstrip("/")) or query.get("dbname", ["(default database)"])[0]
    return f"{hosts}/{database}"


class ErrorText:
    """Driver errors as message text, with the URL's password masked should a driver quote it."""

    def __init__(self, url: str) -> None:
        self._password = urlsplit(url).password or ""

    def __call__(self, exc: BaseException) -> str:
        text = f"{type(exc).__name__}: {exc}".rstrip(": ")
        return text.replace(self._password, "***") if self._password else text


def migration_lock_key(schema: str) -> int:
    """The advisory lock all migrations of ``schema`` serialise on (a signed bigint)."""
    digest = hashlib.sha256(f"agentd.migrate.{schema}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


async def schema_version(conn: asyncpg.Connection, quoted_schema: str, version_table: str) -> int:
    """The version recorded in ``version_table`` (0 when the table does not exist yet)."""
    table = f"{quoted_schema}.{version_table}"
    if not await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table):
        return 0
    return int(await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {table}"))


async def apply_migrations(
    conn: asyncpg.Connection, schema: str, version_table: str, migrations: Sequence[str], what: str
) -> int:
    """Apply the pending ``migrations`` (version N is ``migrations[N - 1]``) in one transaction,
    recording each in ``version_table``, and return the version reached.

    Replicas starting together queue on the schema's migration lock (taken before CREATE
    SCHEMA: concurrent IF NOT EXISTS creations can still collide); the later ones find
    nothing to do. Migrations run with the schema first on the search path and pg_temp
    last, so nothing temporary shadows the tables, and functions keep that path.
    """
    q = check_schema(schema)
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", migration_lock_key(schema))
        await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {q}")
        await conn.execute(f"SET LOCAL search_path TO {q}, pg_temp")
        await conn.execute(
            f"CREATE TABLE IF NOT EXISTS {q}.{version_table}"
            " (version integer PRIMARY KEY, applied_at timestamptz NOT NULL DEFAULT now())"
        )
        current: int = await conn.fetchval(f"SELECT coalesce(max(version), 0) FROM {q}.{version_table}")
        for version in range(current + 1, len(migrations) + 1):
            await conn.execute(migrations[version - 1])
            await conn.execute(f"INSERT INTO {q}.{version_table} (version) VALUES ($1)", version)
            log.info("postgres schema %s: %s migrated to version %d", schema, what, version)
    return max(current, len(migrations))
