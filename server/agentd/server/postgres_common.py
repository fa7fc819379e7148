"""What the Postgres session store and the Postgres trace archive share: how a schema
name is checked, how a database is named in messages (never with its password), and
the advisory lock every migration of one schema queues on.
"""

from __future__ import annotations

import hashlib
import re
from urllib.parse import parse_qs, unquote, urlsplit

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
