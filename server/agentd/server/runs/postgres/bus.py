"""``PostgresControlBus``: run control messages over NOTIFY."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import AsyncIterator

from agentd.server.postgres_common import DRIVER_ERRORS, PING_TIMEOUT_S, PostgresConnector
from agentd.server.runs.base import ControlBus
from agentd.server.runs.postgres.listen import Listener
from agentd.server.runs.postgres.schema import channel_name
from agentd.server.runs.records import Control
from agentd.server.runtime.errors import StoreUnavailableError

__all__ = ["PostgresControlBus"]

log = logging.getLogger("agentd.runs")

_NOTIFY_MAX_BYTES = 7900  # the server's limit is 8000


class PostgresControlBus(PostgresConnector, ControlBus):
    """``Control`` messages over NOTIFY on ``<schema>_run_control``, to every replica's
    subscribers. One LISTEN connection per bus (reconnected after failures); publishing
    goes over it too, so a bus costs a single connection."""

    _what = "control bus"
    _application = "agentd-runs-control"

    def __init__(
        self,
        *,
        url: str,
        schema: str = "agentd",
        statement_cache_size: int = 256,
        connect_timeout_s: float = 5.0,
        command_timeout_s: float = 10.0,
    ) -> None:
        super().__init__(
            url=url, schema=schema, connect_timeout_s=connect_timeout_s, command_timeout_s=command_timeout_s,
            statement_cache_size=statement_cache_size,
        )
        self._channel = channel_name(schema, "run_control")
        self._listener: Listener | None = None
        self._subscribers: set[asyncio.Queue[Control | None]] = set()
        self._opening: asyncio.Lock | None = None

    async def open(self) -> None:
        if self._listener is not None:
            return
        if self._opening is None:
            self._opening = asyncio.Lock()
        async with self._opening:
            if self._listener is not None:
                return
            listener = Listener(
                lambda: self._connect("agentd-runs-control"),
                {self._channel: self._on_message},
                lambda: None,  # messages sent during a gap are lost, as the interface says
                self._where,
                min(PING_TIMEOUT_S, self._command_timeout_s),
            )
            try:
                await listener.start()
            except DRIVER_ERRORS as exc:
                raise self._cannot_connect(exc) from exc
            self._listener = listener

    async def close(self) -> None:
        listener, self._listener = self._listener, None
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        if listener is not None:
            await listener.close(self._command_timeout_s)

    def _on_message(self, payload: str) -> None:
        try:
            data = json.loads(payload)
            message = Control(str(data["run_id"]), str(data["kind"]), str(data.get("reason", "")))
        except (ValueError, KeyError, TypeError):
            log.warning("%s: ignoring a malformed control message %r", self._where, payload[:200])
            return
        for queue in self._subscribers:
            queue.put_nowait(message)

    async def publish(self, message: Control) -> None:
        listener = self._listener
        if listener is None:
            raise StoreUnavailableError(f"{self._where}: not open")
        payload = _control_payload(message)
        try:
            await listener.execute("SELECT pg_notify($1, $2)", self._channel, payload, timeout_s=self._command_timeout_s)
        except DRIVER_ERRORS as exc:
            raise self._unavailable(exc) from exc

    async def subscribe(self) -> AsyncIterator[Control]:  # type: ignore[override]
        if self._listener is None:
            await self.open()
        queue: asyncio.Queue[Control | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._subscribers.discard(queue)


def _control_payload(message: Control) -> str:
    """The message as JSON under NOTIFY's size limit (a very long reason is shortened)."""
    data = {"run_id": message.run_id, "kind": message.kind, "reason": message.reason}
    text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    while len(text.encode()) > _NOTIFY_MAX_BYTES and data["reason"]:
        data["reason"] = data["reason"][: len(data["reason"]) // 2]
        text = json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return text
