"""Background upkeep of the stores while the server runs.

Two loops, both cheap: one pings the session store and the run store and mirrors
their reachability into gRPC health checking, so a load balancer stops sending calls to a replica whose database
is down and resumes when it is back; the other deletes expired sessions. Neither can
fail the server: errors are logged and retried on the next tick.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable, Iterable

from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.sessions.base import SessionStore

log = logging.getLogger("agentd.store")

# (service name, serving?) -> awaitable; the gRPC health servicer's ``set`` wrapped by serve.py.
HealthSetter = Callable[[str, bool], Awaitable[None]]


class StoreUpkeep:
    def __init__(
        self,
        store: SessionStore,
        set_health: HealthSetter,
        services: Iterable[str],
        *,
        ping_interval_s: float,
        sweep_interval_s: float,
        also_ping: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        self._store = store
        self._also_ping = also_ping  # the run store's ping: a replica that cannot reach it cannot run
        self._set_health = set_health
        self._services = tuple(services)
        self._ping_interval_s = ping_interval_s
        self._sweep_interval_s = sweep_interval_s
        self._tasks: list[asyncio.Task[None]] = []
        self.healthy = True

    def start(self) -> None:
        self._tasks = [
            asyncio.create_task(self._watch_health(), name="agentd-store-health"),
            asyncio.create_task(self._sweep(), name="agentd-store-sweep"),
        ]

    async def stop(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        self._tasks = []

    async def check_now(self) -> bool:
        """Ping once and publish the result; returns whether the store is reachable."""
        try:
            # A hung connection must not hang health checking: bound the ping by the interval.
            await asyncio.wait_for(self._ping(), timeout=max(self._ping_interval_s, 1.0))
            reachable, problem = True, ""
        except (StoreUnavailableError, asyncio.TimeoutError) as exc:
            reachable, problem = False, str(exc) or "ping timed out"
        if reachable != self.healthy:
            self.healthy = reachable
            if reachable:
                log.info("stores are reachable again; serving")
            else:
                log.error("a store is unreachable; health is NOT_SERVING until it is back: %s", problem)
            for service in self._services:
                await self._set_health(service, reachable)
        return reachable

    async def _ping(self) -> None:
        await self._store.ping()
        if self._also_ping is not None:
            await self._also_ping()

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self._ping_interval_s)
            try:
                await self.check_now()
            except Exception:  # never let the watcher die
                log.exception("store health check failed unexpectedly")

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._sweep_interval_s)
            try:
                removed = await self._store.sweep_expired()
            except StoreUnavailableError as exc:
                log.warning("expired-session sweep skipped: %s", exc)
                continue
            except Exception:
                log.exception("expired-session sweep failed unexpectedly")
                continue
            if removed:
                log.info("swept %d expired sessions", removed)
