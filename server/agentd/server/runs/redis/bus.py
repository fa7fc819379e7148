"""``RedisControlBus``: run control messages over Redis pub/sub."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from agentd.server.redis_common import FAILURES, RedisClient, RedisOps, check_prefix, close_client, text, utf8
from agentd.server.runs.base import ControlBus
from agentd.server.runs.records import Control

__all__ = ["RedisControlBus"]

log = logging.getLogger("agentd.runs")

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


class RedisControlBus(RedisOps, ControlBus):
    """``Control`` messages over Redis pub/sub on ``<prefix>:runs:control``.

    One subscribed connection per bus, read by a background task that hands every
    message to each local ``subscribe()`` iterator; it reconnects (with backoff) after
    a connection error, and PINGs an idle connection so a silent partition is noticed
    too. Messages published while it is disconnected are lost, as the interface allows.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "agentd",
        location: str = "",
        timeout_s: float = 5.0,
        idle_ping_s: float = 5.0,
    ) -> None:
        check_prefix(prefix)
        super().__init__(client, what="redis run store", location=location)
        self._channel = utf8(f"{prefix}:runs:control")
        self._timeout_s = timeout_s
        self._idle_ping_s = idle_ping_s
        self._subscribers: set[asyncio.Queue[Control | None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._closed = False
        self._last_error: BaseException | None = None

    @property
    def channel(self) -> str:
        return text(self._channel)

    async def open(self) -> None:
        if self._reader is not None:
            return
        self._closed = False
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="agentd-run-control")
        try:
            await asyncio.wait_for(self._ready.wait(), self._timeout_s)
        except asyncio.TimeoutError:
            error = self._last_error or TimeoutError("no subscription confirmation")
            await self._stop_reader()
            raise self._unavailable(error) from None
        self._open = True

    async def close(self) -> None:
        self._closed = True
        self._open = False
        await self._stop_reader()
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        await close_client(self._client)

    async def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass

    async def publish(self, message: Control) -> None:
        data = utf8(_encode_json({"run_id": message.run_id, "kind": message.kind, "reason": message.reason}))
        await self._run(lambda: self._client.publish(self._channel, data), idempotent=False)

    async def subscribe(self) -> AsyncIterator[Control]:  # type: ignore[override]
        if self._closed:
            return
        queue: asyncio.Queue[Control | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._subscribers.discard(queue)

    def _dispatch(self, data: bytes) -> None:
        try:
            d = _decode_json(text(data))
            message = Control(str(d["run_id"]), str(d["kind"]), str(d.get("reason", "")))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed run control message: %s", exc)
            return
        for queue in self._subscribers:
            queue.put_nowait(message)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                last_seen, ping_at = loop.time(), None
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    t = loop.time()
                    if message is None:
                        if ping_at is not None:
                            if t - ping_at > self._timeout_s:
                                raise asyncio.TimeoutError(f"no reply to PING on {self.channel} in {self._timeout_s}s")
                        elif t - last_seen > self._idle_ping_s:
                            await pubsub.ping()
                            ping_at = t
                        continue
                    last_seen, ping_at = t, None
                    kind = message["type"]
                    if kind in ("message", b"message"):
                        self._dispatch(message["data"])
                    elif kind in ("subscribe", b"subscribe"):
                        failures = 0
                        if self._ready is not None:
                            self._ready.set()
            except asyncio.CancelledError:
                raise
            except FAILURES as exc:
                self._last_error = exc
                if not self._closed:
                    log.warning(
                        "run control channel at %s: %s; reconnecting", self._location, exc or type(exc).__name__
                    )
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # pragma: no cover - the connection is already gone
                    pass
            failures += 1
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))
