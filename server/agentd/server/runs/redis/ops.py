"""The plumbing the Redis run store and control bus share: retries and error mapping,
closing a client."""

from __future__ import annotations

from typing import Awaitable, Callable, TypeVar

from agentd.server.redis_common import RedisClient, RetryPolicy
from agentd.server.runtime.errors import StoreUnavailableError

__all__ = ["Closed", "RedisOps", "close_client"]

T = TypeVar("T")


class Closed(Exception):
    """A blocking wait ended because the store closed."""


class RedisOps:
    _location: str

    def __init__(self) -> None:
        self._retries = RetryPolicy()
        self._open = False

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = str(exc) or type(exc).__name__
        return StoreUnavailableError(f"redis run store at {self._location}: {detail}")

    async def _run(self, op: Callable[[], Awaitable[T]], *, idempotent: bool) -> T:
        """One operation with the retry policy its idempotency allows (as the session store)."""
        if not self._open:
            raise StoreUnavailableError(f"redis run store at {self._location}: not open")
        return await self._retries.run(op, idempotent=idempotent, unavailable=self._unavailable)


async def close_client(client: RedisClient) -> None:
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if manager is not None:  # a Sentinel-backed client's pool holds the Sentinel connections separately
        await manager.aclose()
