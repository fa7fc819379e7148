"""Sweeping expired result cache entries while the server runs (as ``store_upkeep`` sweeps
expired sessions): one cheap loop that can never fail the server; errors are logged and the
next tick tries again."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Callable

from agentd.server.cache.base import ResultCache
from agentd.server.runtime.errors import StoreUnavailableError

log = logging.getLogger("agentd.cache")

__all__ = ["CacheSweeper"]


class CacheSweeper:
    def __init__(self, cache: ResultCache, *, interval_s: float, clock: Callable[[], float] = time.time) -> None:
        self._cache = cache
        self._interval_s = interval_s
        self._clock = clock
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.create_task(self._sweep(), name="agentd-result-cache-sweep")

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def sweep_now(self) -> int:
        """One sweep (what each tick does); how many expired entries it deleted."""
        return await self._cache.sweep(now=self._clock())

    async def _sweep(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                removed = await self.sweep_now()
            except StoreUnavailableError as exc:
                log.warning("result cache sweep skipped: %s", exc)
                continue
            except Exception:
                log.exception("result cache sweep failed unexpectedly")
                continue
            if removed:
                log.info("swept %d expired result cache entries", removed)
