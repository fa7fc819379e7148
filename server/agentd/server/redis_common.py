"""What the Redis engines (the session, agent and run stores, the run control bus) share:
clients, the error classes, the retry policy, Lua scripts called by SHA, and a store's
lifecycle (``RedisEngine``: open with its version check and script loading, ping, close).

Retries. Clients from ``connect_redis`` have redis-py's per-command retry switched off:
it would resend a write whose reply was lost (a timeout after sending is ambiguous).
``RetryPolicy.run`` retries, with backoff, an idempotent operation on connection errors
and once on a timeout, and any other operation only on errors that prove Redis refused
it unexecuted (CLUSTERDOWN, TRYAGAIN, LOADING).
"""

from __future__ import annotations

import asyncio
import hashlib
from importlib.resources import files
from typing import TYPE_CHECKING, Any, Awaitable, Callable, Protocol, Sequence, TypeVar, Union

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError as RedisConnectionError,
    NoScriptError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
    TryAgainError,
)
from redis.maint_notifications import MaintNotificationsConfig

from agentd.server.runtime.errors import StoreUnavailableError

if TYPE_CHECKING:
    from agentd.server.settings import Settings

RedisClient = Union[Redis, RedisCluster]
T = TypeVar("T")

# Anything that means "Redis could not serve this" (script-logic outcomes are return values).
FAILURES = (RedisError, RedisClusterException, OSError, asyncio.TimeoutError)
# Retried only for operations that are safe to repeat.
TRANSIENT = (RedisConnectionError, RedisTimeoutError, ClusterDownError, TryAgainError)
# Refused before executing: safe to retry for any operation.
REFUSED = (ClusterDownError, TryAgainError, BusyLoadingError)


# The oldest Redis agentd runs on: 6.2 brought every command the stores use beyond the
# basics — ZRANGE ... BYSCORE/REV (session listing, lease and expiry sweeps), XAUTOCLAIM
# (reclaiming a crashed replica's queue entries) and exclusive XRANGE ranges ("(0-<n>",
# replaying a run's events after a sequence). Valkey reports a compatible redis_version.
MIN_REDIS_VERSION = (6, 2, 0)


class RedisTooOldError(Exception):
    """The server answers but lacks commands agentd needs; retrying cannot help."""


def parse_version(text: str) -> tuple[int, ...]:
    """``"7.0.15"`` -> ``(7, 0, 15)``; a suffix like ``"-rc1"`` is ignored."""
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit()) if piece[:1].isdigit() else ""
        if not digits:
            break
        parts.append(int(digits))
    return tuple(parts)


async def check_server_version(client: "RedisClient", location: str) -> None:
    """Raise ``RedisTooOldError`` unless every server behind ``client`` is MIN_REDIS_VERSION or newer.

    A cluster client answers INFO per node; the oldest node decides. A server whose ACL
    forbids INFO (some managed services) is trusted: refusing to start would be worse.
    """
    try:
        info: Any = await client.info("server")
    except ResponseError:
        return
    found = [info] if "redis_version" in info else [v for v in info.values() if isinstance(v, dict)]
    versions = [str(node.get("redis_version", "")) for node in found]
    oldest = min(versions, key=parse_version, default="")
    if not versions or parse_version(oldest) < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise RedisTooOldError(
            f"redis at {location} is version {oldest or 'unknown'}; agentd needs Redis {need} or newer"
            " (ZRANGE BYSCORE/REV, XAUTOCLAIM, exclusive XRANGE): upgrade the server"
        )


def utf8(text: str) -> bytes:
    """Lone surrogates survive, like they do in the in-memory store."""
    return text.encode("utf-8", "surrogatepass")


def text(data: bytes) -> str:
    return data.decode("utf-8", "surrogatepass")



class LuaScript:
    """A Lua script called by SHA; loaded at open and again whenever Redis says NOSCRIPT."""

    __slots__ = ("source", "sha")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode("utf-8")).hexdigest()


class ScriptFolder:
    """An engine's ``scripts/*.lua`` (package data), read with importlib.resources.

    ``with_prelude(name)`` is ``scripts/_prelude.lua`` (the key names and helpers an engine's
    scripts share) then the script, each after a blank line, exactly as the scripts have
    always been joined, so their SHAs stay what servers already loaded.
    """

    def __init__(self, package: str) -> None:
        self._dir = files(package).joinpath("scripts")
        self._prelude = self.read("_prelude")

    def read(self, name: str) -> str:
        return self._dir.joinpath(f"{name}.lua").read_text(encoding="utf-8")

    def with_prelude(self, name: str) -> LuaScript:
        return LuaScript(f"\n{self._prelude}\n{self.read(name)}")

    def alone(self, name: str) -> LuaScript:
        return LuaScript(f"\n{self.read(name)}")


def one_timeout() -> Callable[[Exception], bool]:
    """A retry filter for one operation: connection errors as the policy allows, timeouts once."""
    timeouts = 0

    def retryable(error: Exception) -> bool:
        nonlocal timeouts
        if isinstance(error, RedisTimeoutError):
            timeouts += 1
            return timeouts <= 1
        return True

    return retryable


async def no_cleanup(error: Exception) -> None:
    """redis-py has already dropped the failed connection; the retry takes a fresh one."""



class RetryPolicy:
    """How one store operation is retried (see the module docstring)."""

    def __init__(self) -> None:
        backoff = ExponentialBackoff(cap=0.5, base=0.05)
        self._backoff = backoff
        self._connect = Retry(backoff, retries=2, supported_errors=TRANSIENT)
        # After a failed first attempt (made outside redis-py's Retry): the remaining tries.
        self._rest = Retry(backoff, retries=1, supported_errors=TRANSIENT)
        self._refused_rest = Retry(backoff, retries=1, supported_errors=REFUSED)

    async def run(
        self,
        op: Callable[[], Awaitable[T]],
        *,
        idempotent: bool,
        unavailable: Callable[[BaseException], Exception],
    ) -> T:
        """``op`` with the retries its idempotency allows; a final failure is ``unavailable(error)``."""
        try:
            return await op()  # the hot path: no retry machinery until something fails
        except FAILURES as exc:
            first_error = exc
        retryable = one_timeout()
        if not isinstance(first_error, TRANSIENT if idempotent else REFUSED) or not retryable(first_error):
            raise unavailable(first_error) from first_error
        await asyncio.sleep(self._backoff.compute(1))
        retry = self._rest if idempotent else self._refused_rest
        try:
            return await retry.call_with_retry(op, no_cleanup, is_retryable=retryable)
        except FAILURES as exc:
            raise unavailable(exc) from exc

    async def connect(self, op: Callable[[], Awaitable[T]]) -> T:
        """A first contact (open): connection errors retried twice, a timeout once; errors propagate."""
        return await self._connect.call_with_retry(op, no_cleanup, is_retryable=one_timeout())


# --- clients -----------------------------------------------------------------------


def describe_client(client: RedisClient) -> str:
    """Where a client points, for messages: never includes credentials."""
    if isinstance(client, RedisCluster):
        return "cluster " + ",".join(client.nodes_manager.startup_nodes)
    pool = client.connection_pool
    manager = getattr(pool, "sentinel_manager", None)
    if manager is not None:
        sentinels = ",".join(
            f"{s.connection_pool.connection_kwargs.get('host')}:{s.connection_pool.connection_kwargs.get('port')}"
            for s in manager.sentinels
        )
        return f"sentinel service {pool.service_name} via {sentinels}"
    kwargs = pool.connection_kwargs
    if kwargs.get("path"):
        return f"unix:{kwargs['path']} db {kwargs.get('db', 0)}"
    return f"{kwargs.get('host', 'localhost')}:{kwargs.get('port', 6379)}/{kwargs.get('db', 0)}"


def connect_redis(
    *,
    url: str | None = None,
    sentinels: list[tuple[str, int]] | None = None,
    sentinel_service: str | None = None,
    cluster_nodes: list[tuple[str, int]] | None = None,
    username: str | None = None,
    password: str | None = None,
    sentinel_password: str | None = None,
    ssl: bool = False,
    socket_timeout_s: float = 5.0,
    connect_timeout_s: float = 5.0,
    max_connections: int = 50,
    health_check_interval_s: float = 30.0,
    client_name: str | None = "agentd",
) -> RedisClient:
    """A client for exactly one of: a URL, a Sentinel-managed master, or a Cluster.

    ``url``: ``redis://``, ``rediss://`` (TLS) or ``unix://``; credentials in it win over
    ``username``/``password``. ``ssl`` applies to Sentinel and Cluster (use ``rediss://``
    for a URL). Nothing connects until first use (``RedisSessionStore.open``).

    Per-command retries are off (``retries=0``): the store retries what is safe to retry.
    A pooled connection the server has closed is noticed and replaced on checkout (URL
    and Sentinel; redis-py's Cluster client only notices on use, so there the first
    non-retryable call after e.g. a node restart fails once). TCP keepalive notices dead
    peers, and a connection idle longer than ``health_check_interval_s`` is PINGed before
    reuse (a failed PING fails that call, before its command was sent).
    """
    given = [name for name, value in (("url", url), ("sentinels", sentinels), ("cluster_nodes", cluster_nodes)) if value]
    if len(given) != 1:
        raise ValueError(
            "configure exactly one Redis deployment: a url, sentinels (with sentinel_service) or cluster_nodes;"
            f" got {', '.join(given) if given else 'none'}"
        )
    if bool(sentinels) != bool(sentinel_service):
        raise ValueError("sentinels and sentinel_service go together: name the master's service in Sentinel")
    if url and ssl:
        raise ValueError("for TLS with a URL use the rediss:// scheme")

    common: dict[str, Any] = {
        "socket_timeout": socket_timeout_s,
        "socket_connect_timeout": connect_timeout_s,
        "health_check_interval": health_check_interval_s,
        "client_name": client_name,
        "decode_responses": False,
        # RESP3-only push notifications we do not use. Left at redis-py's "auto", the pool
        # also skips its check for connections the server has closed (CLIENT KILL, idle
        # timeout, restart), so the next command, even a pop, would be sent into a dead
        # socket and fail, although nothing reached Redis.
        "maint_notifications_config": MaintNotificationsConfig(enabled=False),
    }
    credentials = {k: v for k, v in (("username", username), ("password", password)) if v is not None}

    if url:
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=connect_timeout_s,  # how long a call may wait for a free connection
            retry=Retry(NoBackoff(), 0),
            **common,
            **credentials,
        )
        return Redis.from_pool(pool)

    if sentinels:
        sentinel_kwargs: dict[str, Any] = {
            "socket_timeout": socket_timeout_s,
            "socket_connect_timeout": connect_timeout_s,
            "ssl": ssl,
        }
        if sentinel_password is not None:
            sentinel_kwargs["password"] = sentinel_password
        manager = Sentinel(
            [(host, int(port)) for host, port in sentinels],
            sentinel_kwargs=sentinel_kwargs,
            ssl=ssl,
            max_connections=max_connections,
            retry=Retry(NoBackoff(), 0),
            **common,
            **credentials,
        )
        assert sentinel_service is not None
        client: Redis = manager.master_for(sentinel_service)
        return client

    assert cluster_nodes is not None
    return RedisCluster(
        startup_nodes=[ClusterNode(host, int(port)) for host, port in cluster_nodes],
        ssl=ssl,
        max_connections=max_connections,
        retry=Retry(NoBackoff(), 0),
        **common,
        **credentials,
    )


# --- engines -----------------------------------------------------------------------


def check_prefix(prefix: str) -> None:
    """``ValueError`` unless ``prefix`` can start every key: braces would break the hash tags."""
    if not prefix or "{" in prefix or "}" in prefix:
        raise ValueError(f"redis key prefix must be non-empty and free of braces, got {prefix!r}")


async def close_client(client: RedisClient) -> None:
    """Close ``client`` and, for a Sentinel-backed one, the Sentinel connections its pool holds apart."""
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if manager is not None:
        await manager.aclose()


async def load_scripts(client: RedisClient, scripts: Sequence[LuaScript]) -> None:
    """SCRIPT LOAD every script (at open, and again after NOSCRIPT), checking Redis agrees on its SHA."""
    for script in scripts:
        sha = await client.script_load(script.source)
        if isinstance(sha, bytes):
            sha = sha.decode("ascii")
        if sha != script.sha:  # pragma: no cover - would mean Redis hashes differently
            raise RedisError(f"SCRIPT LOAD returned {sha}, expected {script.sha}")


class RedisOps:
    """How an engine runs one operation: its retry policy and its error messages.

    Every Redis engine maps failures the same way, to ``StoreUnavailableError`` naming
    ``what`` it is (``"redis store"``, ``"redis agent store"``, ...) and where, so that one
    class serves them all; ``_open`` is what the engine's own ``open`` sets.
    """

    def __init__(self, client: RedisClient, *, what: str, location: str = "") -> None:
        self._client = client
        self._what = what
        self._location = location or describe_client(client)
        self._open = False
        self._retries = RetryPolicy()

    @property
    def location(self) -> str:
        return self._location

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = str(exc) or type(exc).__name__
        return StoreUnavailableError(f"{self._what} at {self._location}: {detail}")

    def _not_open(self) -> StoreUnavailableError:
        return StoreUnavailableError(f"{self._what} at {self._location}: not open")

    async def _run(self, op: Callable[[], Awaitable[T]], *, idempotent: bool) -> T:
        """One store operation with the retry policy its idempotency allows."""
        if not self._open:
            raise self._not_open()
        return await self._retries.run(op, idempotent=idempotent, unavailable=self._unavailable)


class ScriptModule(Protocol):
    """An engine's ``lua`` module: ``SCRIPTS`` is every script it calls."""

    SCRIPTS: Sequence[LuaScript]


class RedisEngine(RedisOps):
    """A Redis store's lifecycle and script calls, the same for every store that keeps its
    logic in Lua (sessions, agents, runs): ``open`` PINGs, checks the server version and
    loads ``lua.SCRIPTS`` (first contact retried as ``RetryPolicy.connect`` allows), ``ping``
    answers health checks within ``timeout_s``, ``close`` closes the client (the store owns
    it). ``_eval`` calls a script by SHA, loading them again after a server lost them.
    ``lua.SCRIPTS`` is read at every load, so a load sends what the module holds then.
    A store with more to set up at open overrides ``_on_connect``. Every key of the
    store starts with ``prefix`` (checked here).
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        what: str,
        lua: ScriptModule,
        prefix: str,
        location: str = "",
        timeout_s: float = 5.0,
    ) -> None:
        check_prefix(prefix)
        super().__init__(client, what=what, location=location)
        self._prefix = prefix
        self._lua = lua
        self._timeout_s = timeout_s

    @property
    def prefix(self) -> str:
        return self._prefix

    async def _load_scripts(self) -> None:
        await load_scripts(self._client, self._lua.SCRIPTS)

    async def _eval(self, script: LuaScript, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or failed-over server; the script did not run
            await self._load_scripts()
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def _on_connect(self) -> None:
        """More first-contact work, after the scripts are loaded (retried with them)."""

    async def open(self) -> None:
        if self._open:
            return

        async def connect() -> None:
            await asyncio.wait_for(self._client.ping(), self._timeout_s)
            await check_server_version(self._client, self._location)
            await self._load_scripts()
            await self._on_connect()

        try:
            await self._retries.connect(connect)
        except RedisTooOldError as exc:
            raise StoreUnavailableError(str(exc)) from None
        except FAILURES as exc:
            raise self._unavailable(exc) from exc
        self._open = True

    async def close(self) -> None:
        self._open = False
        await close_client(self._client)

    async def ping(self) -> None:
        if not self._open:
            raise self._not_open()
        try:
            await asyncio.wait_for(self._client.ping(), self._timeout_s)
        except FAILURES as exc:
            raise self._unavailable(exc) from exc


def redis_deployment(settings: "Settings") -> tuple[str, dict[str, Any], dict[str, Any]]:
    """Where the AGENTD_REDIS_* settings point, for the engines that build their own clients:
    ``(location for messages, the deployment's connect_redis arguments, the common options)``.

    One reading of the settings, so that the agent store and the run store reach the very
    deployment the session store does (and fail on the same misconfiguration).
    """
    # Imported here: these helpers belong to the session store's factory, which is built on this module.
    from agentd.server.sessions.factory import _redact, _redis_options, parse_nodes

    cluster = parse_nodes("AGENTD_REDIS_CLUSTER_NODES", settings.redis_cluster_nodes)
    sentinels = parse_nodes("AGENTD_REDIS_SENTINELS", settings.redis_sentinels)
    if sentinels and not settings.redis_sentinel_service:
        raise ValueError("AGENTD_REDIS_SENTINELS is set: also set AGENTD_REDIS_SENTINEL_SERVICE (the master's name)")
    deployment: dict[str, Any]
    if cluster:
        location = f"cluster {settings.redis_cluster_nodes}"
        deployment = {"cluster_nodes": cluster}
    elif sentinels:
        location = f"sentinel service {settings.redis_sentinel_service} via {settings.redis_sentinels}"
        deployment = {"sentinels": sentinels, "sentinel_service": settings.redis_sentinel_service}
    else:
        location = _redact(settings.redis_url)
        deployment = {"url": settings.redis_url}
    return location, deployment, dict(_redis_options(settings))
