"""What the Redis session store and the Redis run store share: clients, the error
classes, the retry policy and Lua scripts called by SHA.

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
from typing import Any, Awaitable, Callable, TypeVar, Union

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.cluster import ClusterNode, RedisCluster
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff, NoBackoff
from redis.exceptions import (
    BusyLoadingError,
    ClusterDownError,
    ConnectionError as RedisConnectionError,
    RedisClusterException,
    RedisError,
    ResponseError,
    TimeoutError as RedisTimeoutError,
    TryAgainError,
)
from redis.maint_notifications import MaintNotificationsConfig

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
