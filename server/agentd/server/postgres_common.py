"""What the Postgres engines (the session, agent and run stores, the run control bus, the
trace archive) share: how a schema name is checked, how a database is named in messages
(never with its password), how versioned migrations are applied (each component keeps its
own version table, and every migration of one schema queues on the same advisory lock),
and, in ``PostgresConnector`` and ``PostgresEngine``, connection settings, the mapping of
driver failures to ``StoreUnavailableError`` and a pool's lifecycle.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import re
from contextlib import suppress
from typing import Any, Awaitable, Callable, Sequence, TypeVar
from urllib.parse import parse_qs, unquote, urlsplit

import asyncpg

from agentd.server.runtime.errors import StoreUnavailableError

log = logging.getLogger("agentd.store")

T = TypeVar("T")

# Anything the driver raises when Postgres cannot serve a call (OSError includes TimeoutError).
DRIVER_ERRORS = (
    asyncpg.PostgresError, asyncpg.InterfaceError, asyncpg.InternalClientError, OSError, asyncio.TimeoutError
)
# The connection died under the operation (OSError includes TimeoutError: checked apart).
CONNECTION_LOST = (
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    # The server shut the session down or is restarting (not a cancelled statement).
    asyncpg.exceptions.AdminShutdownError,
    asyncpg.exceptions.CrashShutdownError,
    asyncpg.exceptions.CannotConnectNowError,
    OSError,
)
# Closing a pool: what a stuck or broken one raises before it is cut off instead.
_CLOSE_ERRORS = (asyncio.TimeoutError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError)
PING_TIMEOUT_S = 2.0

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


async def keep_session(conn: asyncpg.Connection) -> None:
    """Pool reset hook: nothing to reset. The engines leave no session state on pooled
    connections (no SET, LISTEN, cursors or session-level advisory locks; an open
    transaction is still rolled back by the pool), so the default reset query would only
    add a round trip per call."""


async def _release(pool: asyncpg.Pool, conn: asyncpg.Connection) -> None:
    # Whatever happens here (a pool closed or terminated meanwhile, a connection that
    # broke) the pool has dealt with the connection: it is cut off, never handed out broken.
    with suppress(Exception):
        await pool.release(conn)


def _usable(conn: asyncpg.Connection) -> bool:
    """Open, and idle outside a transaction (False too when the pool took it back)."""
    try:
        return not (conn.is_closed() or conn.is_in_transaction())
    except asyncpg.InterfaceError:  # detached from its holder: closed, or the pool is closing
        return False


class Pool:
    """An asyncpg pool whose connections stay at hand between calls.

    asyncpg's acquire and release cost about as much Python as the statement itself (a
    proxy, a timer and a future per acquire; a shielded task, a reset and a timer per
    release: some 70 µs a call here). ``run`` keeps the connections it used in a list of
    its own instead (last used first): taking one back is a ``pop``, giving it back an
    ``append``. Only a healthy connection goes on the list: one the server answered
    (a result, or an error of the statement's own), open and outside a transaction. Any
    other (cancelled, timed out, broken) goes back to the pool before the failure is
    raised, as with ``async with pool.acquire()``: the pool waits for a cancellation in
    flight (so a timed-out or cancelled write is over, not about to commit, when its
    caller hears of it) or cuts the connection off. A healthy connection goes back to the
    pool too, in the background, while a caller waits for the pool (it serves that
    caller) and once the pool is closing. Connections on the list count as in use for the
    pool, so it never opens more than ``max_size``.
    """

    def __init__(self, pool: asyncpg.Pool, acquire_timeout_s: float) -> None:
        self.pool = pool
        self._acquire_timeout_s = acquire_timeout_s
        self._idle: list[asyncpg.Connection] = []
        self._waiting = 0  # callers waiting for the pool
        self._closing = False
        self._returning: set[asyncio.Task[None]] = set()  # the loop keeps only weak references

    async def run(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``op`` (one statement) on a connection; one that died under it (not a timeout: the
        server may still be working) is cut off, never handed out again."""
        conn = await self._take()
        try:
            result = await op(conn)
        except CONNECTION_LOST as exc:
            if not isinstance(exc, TimeoutError):
                # Possibly half-dead (a killed backend whose close is still in flight).
                with suppress(asyncpg.InterfaceError):  # already closed and detached
                    conn.terminate()
            # After a timeout the pool waits for the server to cancel the statement: the
            # caller hears of the failure only once the statement is over, as before.
            await _release(self.pool, conn)
            raise
        except asyncpg.PostgresError:
            self._keep(conn)  # the server answered: the connection is idle and sound
            raise
        except BaseException:
            await _release(self.pool, conn)  # cancelled (the same wait), or a bug
            raise
        self._keep(conn)
        return result

    async def _take(self) -> asyncpg.Connection:
        idle = self._idle
        while idle:
            conn = idle.pop()
            if _usable(conn):
                return conn
            self._return(conn)  # closed while kept (a killed backend): the pool replaces it
        self._waiting += 1
        try:
            return await self.pool.acquire(timeout=self._acquire_timeout_s)
        finally:
            self._waiting -= 1

    def _keep(self, conn: asyncpg.Connection) -> None:
        if self._waiting or self._closing or not _usable(conn):
            self._return(conn)
        else:
            self._idle.append(conn)

    def _return(self, conn: asyncpg.Connection) -> None:
        task = asyncio.ensure_future(_release(self.pool, conn))
        self._returning.add(task)
        task.add_done_callback(self._returning.discard)

    def acquire(self, *, timeout: float | None = None) -> Any:
        """A connection straight from the pool (``async with``), for work that is not one statement."""
        return self.pool.acquire(timeout=timeout)

    async def close(self) -> None:
        """Give every kept connection back, then close the pool (see ``asyncpg.Pool.close``)."""
        self._closing = True
        idle, self._idle = self._idle, []
        for conn in idle:
            self._return(conn)
        await self.pool.close()

    def terminate(self) -> None:
        self._closing = True
        self._idle.clear()
        self.pool.terminate()


class PostgresConnector:
    """Connection settings and error mapping, the same for every Postgres engine.

    ``_what`` names the engine in messages (``"postgres <what> at <host:port/db> schema
    <schema>"``), ``_application`` its connections in ``pg_stat_activity`` (so an operator
    can find or terminate them). Defined once so that every engine reports an outage, a
    wrong URL or a password the same way, and never with the password in it.
    """

    _what = "store"
    _application = "agentd"

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        connect_timeout_s: float,
        command_timeout_s: float,
        statement_cache_size: int = 256,
    ) -> None:
        self._quoted = check_schema(schema)
        self._url = url
        self._schema = schema
        self._connect_timeout_s = connect_timeout_s
        self._command_timeout_s = command_timeout_s
        self._statement_cache_size = statement_cache_size
        self._error_text = ErrorText(url)
        self._where = f"postgres {self._what} at {location(url)} schema {schema}"

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

    def _connect_kwargs(self, application: str | None = None) -> dict[str, Any]:
        return {
            "statement_cache_size": self._statement_cache_size,
            "timeout": self._connect_timeout_s,
            "command_timeout": self._command_timeout_s,
            "server_settings": {"application_name": application or self._application},
        }

    async def _connect(self, application: str | None = None) -> asyncpg.Connection:
        """A connection of its own, outside any pool (listeners, ``agentd db`` commands)."""
        return await asyncpg.connect(self._url, **self._connect_kwargs(application))


class PostgresEngine(PostgresConnector):
    """A Postgres store on a connection pool: opening it (pool, then migrate or check the
    tables), closing it, health checks, and one statement per call with one retry.

    Every store on a pool does these the same way, so they live here once. A store says
    which ``_tables`` it keeps (for messages), in which ``_version_table`` with which
    ``_migrations``, which SQLSTATE class its own functions raise (``_own_sqlstate``,
    passed through ``_call`` for the store to translate) and its logger (``_log``).
    """

    _tables = "tables"
    _version_table = "schema_version"
    _migrations: Sequence[str] = ()
    _own_sqlstate = ""
    _log = log
    # What ``open`` says of tables older than this code, and logs of newer ones.
    _too_old = "{where}: {tables} are at version {current}, this agentd needs {latest}: run `agentd db migrate`"
    _newer = "postgres schema {schema}: {tables} at version {current}, newer than this agentd's {latest}; continuing"

    def __init__(
        self,
        *,
        url: str,
        schema: str,
        min_size: int,
        max_size: int,
        statement_cache_size: int = 256,
        connect_timeout_s: float,
        command_timeout_s: float,
        auto_migrate: bool,
    ) -> None:
        super().__init__(
            url=url, schema=schema, connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s,
            statement_cache_size=statement_cache_size,
        )
        self._min_size = min_size
        self._max_size = max_size
        # Waiting for a pooled connection covers a busy pool and a reconnect, not forever.
        self._acquire_timeout_s = connect_timeout_s + command_timeout_s
        self._auto_migrate = auto_migrate
        self._pool: Pool | None = None

    @property
    def _latest(self) -> int:
        return len(self._migrations)

    # --- calls ----------------------------------------------------------------------

    async def _call(self, op: Callable[[asyncpg.Connection], Awaitable[T]], *, idempotent: bool = False) -> T:
        """Run ``op`` (one statement) on a pooled connection, mapping driver failures.

        Retried once on a fresh connection when the first one turned out dead: always if
        nothing was sent on it (asyncpg refused it up front), and for ``idempotent``
        operations whatever happened. A write whose connection died may have committed,
        so it is reported, not repeated. Timeouts are never retried: the server may still
        be working on the statement. Errors the store's functions raise on purpose (SQLSTATE
        class ``_own_sqlstate``) come out as ``asyncpg.PostgresError``.
        """
        pool = self._pool
        if pool is None:
            raise StoreUnavailableError(f"{self._where}: not open")
        for attempt in (1, 2):
            try:
                return await pool.run(op)
            except asyncio.TimeoutError as exc:
                raise self._unavailable(exc) from exc
            except CONNECTION_LOST as exc:
                if attempt == 2 or not (idempotent or isinstance(exc, asyncpg.InternalClientError)):
                    raise self._unavailable(exc) from exc
                self._log.debug("%s: retrying on a fresh connection after %s", self._where, self._error_text(exc))
            except asyncpg.PostgresError as exc:
                if self._own_sqlstate and exc.sqlstate and exc.sqlstate.startswith(self._own_sqlstate):
                    raise
                if isinstance(exc, asyncpg.DataError):  # a value Postgres cannot hold (NUL in text, NaN)
                    raise ValueError(f"postgres cannot store this value: {exc}") from exc
                raise self._unavailable(exc) from exc
        raise AssertionError("unreachable")

    async def _admin(self, op: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
        """``op`` on a pooled connection, or a one-off one when not open (``agentd db``)."""
        try:
            if self._pool is not None:
                async with self._pool.acquire(timeout=self._acquire_timeout_s) as conn:
                    return await op(conn)
            try:
                conn = await self._connect()
            except DRIVER_ERRORS as exc:
                raise self._cannot_connect(exc) from exc
            try:
                return await op(conn)
            finally:
                with suppress(*DRIVER_ERRORS):
                    await conn.close(timeout=self._connect_timeout_s)
        except DRIVER_ERRORS as exc:
            raise self._unavailable(exc) from exc

    # --- schema ---------------------------------------------------------------------

    async def _table_version(self) -> int:
        """The version of the store's tables in the schema (0: none yet)."""
        return await self._admin(lambda conn: schema_version(conn, self._quoted, self._version_table))

    async def _migrate(self) -> int:
        """Bring the store's tables to the latest version (see ``apply_migrations``); the version reached."""
        return await self._admin(
            lambda conn: apply_migrations(conn, self._schema, self._version_table, self._migrations, self._tables)
        )

    def _check_version(self, current: int, latest: int) -> None:
        """Refuse tables older than this code; use newer ones, with a warning: migrations
        are additive, so older code keeps working during a rolling deploy."""
        fields = {"where": self._where, "tables": self._tables, "schema": self._schema, "current": current,
                  "latest": latest, "location": location(self._url)}
        if current < latest:
            raise StoreUnavailableError(self._too_old.format(**fields))
        if current > latest:
            self._log.warning("%s", self._newer.format(**fields))

    # --- lifecycle ------------------------------------------------------------------

    async def _create_pool(self) -> Pool:
        try:
            pool = await asyncpg.create_pool(
                self._url, min_size=self._min_size, max_size=self._max_size, reset=keep_session,
                **self._connect_kwargs(),
            )
        except DRIVER_ERRORS as exc:
            raise self._cannot_connect(exc) from exc
        return Pool(pool, self._acquire_timeout_s)

    async def _prepare(self) -> None:
        """Make the tables ready at open (migrate, or check them when ``auto_migrate`` is off)."""
        self._check_version(await (self._migrate() if self._auto_migrate else self._table_version()), self._latest)

    async def open(self) -> None:
        if self._pool is not None:
            return
        pool = await self._create_pool()
        self._pool = pool
        try:
            await self._prepare()
        except BaseException:
            self._pool = None
            pool.terminate()
            raise

    async def _close_pool(self, pool: Pool | None) -> None:
        """Let in-flight calls finish; a stuck connection is cut off after the command timeout."""
        if pool is None:
            return
        try:
            await asyncio.wait_for(pool.close(), timeout=self._command_timeout_s)
        except _CLOSE_ERRORS:
            pool.terminate()

    async def close(self) -> None:
        pool, self._pool = self._pool, None
        await self._close_pool(pool)

    async def ping(self) -> None:
        timeout = min(PING_TIMEOUT_S, self._command_timeout_s)
        await self._call(lambda conn: conn.fetchval("SELECT 1", timeout=timeout), idempotent=True)
