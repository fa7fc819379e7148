"""Wake-ups for the Postgres run store and control bus: the LISTEN connection that
receives the notifications, and the signals that wake local waiters."""

from __future__ import annotations

import asyncio
import logging
from contextlib import suppress
from typing import Any, Awaitable, Callable

import asyncpg

__all__ = ["Listener", "Signal"]

log = logging.getLogger("agentd.runs")

_KEEPALIVE_S = 5.0  # how often a quiet LISTEN connection is checked (a silent partition)
_RECONNECT_MAX_S = 2.0


class Signal:
    """Wakes every waiter at once; a waiter passing the generation it saw before its
    check cannot miss a wake-up that came in between."""

    __slots__ = ("gen", "users", "_waiters")

    def __init__(self) -> None:
        self.gen = 0
        self.users = 0
        self._waiters: set[asyncio.Future[None]] = set()

    def fire(self) -> None:
        self.gen += 1
        waiters, self._waiters = self._waiters, set()
        for waiter in waiters:
            if not waiter.done():
                waiter.set_result(None)

    async def wait(self, seen: int, timeout_s: float) -> None:
        if self.gen != seen or timeout_s <= 0:
            return
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.add(waiter)
        try:
            await asyncio.wait((waiter,), timeout=timeout_s)
        finally:
            self._waiters.discard(waiter)
            waiter.cancel()


class Listener:
    """One dedicated LISTEN connection, kept alive: reconnected (with backoff) after it
    drops or stops answering a periodic ping. ``on_gap`` runs after every reconnect, as
    notifications sent meanwhile are lost. Also usable for the odd statement (NOTIFY)."""

    def __init__(
        self,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
        channels: dict[str, Callable[[str], None]],
        on_gap: Callable[[], None],
        what: str,
        ping_timeout_s: float,
    ) -> None:
        self._connect = connect
        self._channels = channels
        self._on_gap = on_gap
        self._what = what
        self._ping_timeout_s = ping_timeout_s
        self._conn: asyncpg.Connection | None = None
        self._lost = asyncio.Event()
        self._lock = asyncio.Lock()
        self._task: asyncio.Task[None] | None = None
        self._closed = False

    @property
    def connected(self) -> bool:
        return self._conn is not None and not self._conn.is_closed()

    async def start(self) -> None:
        """Connect and listen (driver errors propagate), then keep it so in the background."""
        self._conn = await self._open_connection()
        self._task = asyncio.create_task(self._supervise(), name=f"agentd {self._what} listener")

    async def _open_connection(self) -> asyncpg.Connection:
        conn = await self._connect()
        try:
            for channel, handler in self._channels.items():
                await conn.add_listener(channel, self._dispatcher(handler))
        except BaseException:
            conn.terminate()
            raise
        self._lost.clear()
        conn.add_termination_listener(self._terminated)
        return conn

    @staticmethod
    def _dispatcher(handler: Callable[[str], None]) -> Callable[[Any, int, str, str], None]:
        def dispatch(_conn: Any, _pid: int, _channel: str, payload: str) -> None:
            try:
                handler(payload)
            except Exception:  # one bad message must not silence the channel
                log.exception("postgres notification handler failed")

        return dispatch

    def _terminated(self, conn: asyncpg.Connection) -> None:
        if conn is self._conn:
            self._lost.set()

    async def _supervise(self) -> None:
        while not self._closed:
            try:
                await asyncio.wait_for(self._lost.wait(), _KEEPALIVE_S)
            except asyncio.TimeoutError:
                try:
                    await self.execute("SELECT 1", timeout_s=self._ping_timeout_s)
                    continue
                except Exception as exc:  # noqa: BLE001 - any failure means reconnect
                    log.warning("%s: LISTEN connection stopped answering (%s); reconnecting", self._what, exc)
            if self._closed:
                return
            old, self._conn = self._conn, None
            if old is not None:
                with suppress(Exception):
                    old.terminate()
            delay = 0.05
            while not self._closed:
                try:
                    self._conn = await self._open_connection()
                    break
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - retried until it works or we close
                    log.debug("%s: LISTEN reconnect failed (%s); retrying in %.2fs", self._what, exc, delay)
                    await asyncio.sleep(delay)
                    delay = min(delay * 2, _RECONNECT_MAX_S)
            if self._conn is not None:
                log.info("%s: LISTEN connection re-established", self._what)
                self._on_gap()

    async def execute(self, sql: str, *args: Any, timeout_s: float) -> None:
        async with self._lock:
            conn = self._conn
            if conn is None or conn.is_closed():
                raise asyncpg.InterfaceError("the LISTEN connection is reconnecting")
            await conn.execute(sql, *args, timeout=timeout_s)

    async def close(self, timeout_s: float) -> None:
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with suppress(asyncio.CancelledError, Exception):
                await task
        conn, self._conn = self._conn, None
        if conn is not None:
            try:
                await asyncio.wait_for(conn.close(), timeout_s)
            except Exception:  # noqa: BLE001 - a stuck connection is cut off
                conn.terminate()
