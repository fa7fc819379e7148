"""What the Postgres run store and control bus share: connection settings and error mapping."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg

from agentd.server.postgres_common import ErrorText, check_schema, location
from agentd.server.runtime.errors import StoreUnavailableError

__all__ = ["Common", "DRIVER_ERRORS", "PING_TIMEOUT_S"]

DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError)
PING_TIMEOUT_S = 2.0


class Common:
    """Connection settings, error mapping and migrations shared by the store and the bus."""

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        connect_timeout_s: float,
        command_timeout_s: float,
        statement_cache_size: int = 256,
        what: str,
    ) -> None:
        self._quoted = check_schema(schema)
        self._url = url
        self._schema = schema
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._statement_cache_size = statement_cache_size
        self._error_text = ErrorText(url)
        self._where = f"postgres {what} at {location(url)} schema {schema}"

    @property
    def schema(self) -> str:
        return self._schema

    @property
    def location(self) -> str:
        return self._where

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        if isinstance(exc, asyncio.TimeoutError) and not str(exc):
            return StoreUnavailableError(f"{self._where}: no answer within the timeout (TimeoutError)")
        return StoreUnavailableError(f"{self._where}: {self._error_text(exc)}")

    def _cannot_connect(self, exc: BaseException) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self._where}: cannot connect ({self._error_text(exc)}); check that the server is running"
            " and reachable from here, and that the URL's user, password and database are right"
        )

    def _connect_kwargs(self, application: str) -> dict[str, Any]:
        return {
            "statement_cache_size": self._statement_cache_size,
            "timeout": self._connect_timeout_s,
            "command_timeout": self._command_timeout_s,
            "server_settings": {"application_name": application},
        }

    async def _connect(self, application: str) -> asyncpg.Connection:
        return await asyncpg.connect(self._url, **self._connect_kwargs(application))
