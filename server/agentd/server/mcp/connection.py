"""One connection to an MCP server, owned by one task.

The ``mcp`` client is built on anyio task groups and cancel scopes: a transport
(``stdio_client``, ``streamable_http_client``) and its ``ClientSession`` must be entered
and exited by the same task, in order, or anyio fails with "exited non-innermost cancel
scope" / "attempted to exit cancel scope in a different task". So a connection is owned by
one long-lived task (``MCPConnection._own``): it opens the transport and the session, serves
the requests callers queue (tool calls and tool listings) each as a task of its own task
group, and closes everything itself. Callers never touch the session: they queue a request
and await its future.

- **Cancellation.** A caller that is cancelled (its run was cancelled, or its tool timed out)
  marks its request abandoned and wakes the owner, which cancels that request's task; the
  ``mcp`` session then sends the server ``notifications/cancelled`` for it.
- **Reconnecting.** A connection that dies (the server process exits, the HTTP endpoint goes
  away, the server forgets the session) is opened again at once; attempts that fail are
  retried with exponential backoff (``backoff_initial_s`` doubling up to ``backoff_max_s``), at
  most ``max_reconnect_attempts`` in a row. Then the server is *down*: requests fail at once
  for ``down_cooldown_s``, and the next request after that starts a new round. Requests
  arriving while the owner waits to retry fail at once too (the model gets an error output
  and the run goes on); requests queued while a connection is being opened wait for it.
- **Tool lists** are cached. ``notifications/tools/list_changed`` marks the cache stale the
  moment it is read from the wire (in order with the responses around it) and refreshes it;
  ``fresh_tools`` waits for a stale list to be refreshed, ``refresh_tools`` forces one.
- **Bounds.** ``max_concurrent_calls`` calls in flight per connection (others wait their
  turn); at most ``MAX_LISTED_TOOLS`` tools are read from a server; connecting (the
  transport, ``initialize`` and the first listing) takes at most ``connect_timeout_s``.
- **Closing.** ``request_close`` asks the owner to close the session (the same task that
  opened it closes it); ``aclose`` waits for that, cancelling the owner after a timeout. A
  closed connection opens again on the next request (a server reused by another app, or a
  test's next event loop).

The ``mcp`` package is imported on first use, on a worker thread (it takes about a second),
so apps without MCP servers never load it and the event loop is not stalled by the import.
"""

from __future__ import annotations

import asyncio
import collections
import contextvars
import importlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncContextManager, Callable, Mapping

from agentd.server.redaction import redact

log = logging.getLogger("agentd.mcp")

# At most this many tools are read from one server (pages of tools/list included); the tools
# an agent exposes from it are bounded further by its ``max_tools``.
MAX_LISTED_TOOLS = 1024
MAX_LIST_PAGES = 64



@dataclass
class CallContext:
    """One request as the HTTP client's hooks see it: they run in a copy of the context of the
    task sending it (the ``mcp`` transport carries it along), so the request's task sets
    ``CURRENT_CALL`` and the hooks read and mark the very same object."""

    headers: Mapping[str, str] | None = None  # added to the request's HTTP request (context_headers)
    session_gone: bool = False  # the server answered 404 to the session id: it does not know the session


CURRENT_CALL: contextvars.ContextVar[CallContext | None] = contextvars.ContextVar("agentd_mcp_call", default=None)

TransportFactory = Callable[[], AsyncContextManager[tuple[Any, Any]]]


class MCPUnavailableError(Exception):
    """The server cannot be reached now: connecting failed, it is down, or the connection was lost."""


class MCPCallError(Exception):
    """The server answered a request with an error (a JSON-RPC error, not a tool's own error result)."""

    def __init__(self, message: str, code: int | None = None) -> None:
        super().__init__(message)
        self.code = code


_MCP_MODULES = ("mcp", "mcp.client.session", "mcp.client.stdio", "mcp.client.streamable_http",
                "mcp.shared.exceptions", "mcp_types")
_mcp_ready = False


async def load_mcp() -> None:
    """Import the ``mcp`` client (about a second, the first time) on a worker thread."""
    global _mcp_ready
    if _mcp_ready:
        return

    def load() -> None:
        for name in _MCP_MODULES:
            importlib.import_module(name)

    try:
        await asyncio.to_thread(load)
    except ImportError as exc:
        raise MCPUnavailableError(f"the mcp package is not installed ({exc}); pip install 'agentd[server]'") from exc
    _mcp_ready = True


def describe(exc: BaseException) -> str:
    """A one-line account of a failure, the first leaf of an exception group."""
    while isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        exc = exc.exceptions[0]
    text = redact(str(exc).strip().splitlines()[0]) if str(exc).strip() else ""
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) and not text:
        return "timed out"
    return f"{name}: {text}" if text else name


@dataclass(eq=False)
class _Request:
    kind: str  # "call" | "list"
    future: asyncio.Future[Any]
    name: str = ""
    arguments: dict[str, Any] | None = None
    meta: dict[str, Any] | None = None
    headers: Mapping[str, str] | None = None
    scope: Any = None  # the anyio CancelScope of its task, once started
    abandoned: bool = False
    force: bool = False  # a listing asked for as such (refresh_tools): never answered from the cache
    resent: bool = False  # sent again on a new session once already


class _WatchedStream:
    """The transport's read stream, seen by the owner first: it notes a tool-list change the
    moment the notification is read (in wire order, before the responses after it are
    delivered) and the end of the stream (the connection is gone)."""

    def __init__(self, inner: Any, on_item: Callable[[Any], None], on_end: Callable[[], None]) -> None:
        self._inner = inner
        self._on_item = on_item
        self._on_end = on_end

    @property
    def last_context(self) -> Any:  # the HTTP transport's per-message context (mcp's ContextReceiveStream)
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> Any:
        import anyio

        try:
            item = await self._inner.receive()
        except (anyio.EndOfStream, anyio.ClosedResourceError, anyio.BrokenResourceError):
            self._on_end()
            raise
        self._on_item(item)
        return item

    def __aiter__(self) -> "_WatchedStream":
        return self

    async def __anext__(self) -> Any:
        import anyio

        try:
            return await self.receive()
        except anyio.EndOfStream:
            raise StopAsyncIteration from None

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> "_WatchedStream":
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.aclose()


def _retrieve(future: asyncio.Future[Any]) -> None:
    if not future.cancelled():
        future.exception()  # marks it retrieved: an unawaited listing's failure is not "never retrieved"


@dataclass(eq=False)
class MCPConnection:
    """A connection to one MCP server (see the module docstring). ``open_transport`` opens the
    transport and yields its (read, write) streams; ``name`` is for logs and messages."""

    name: str
    open_transport: TransportFactory
    connect_timeout_s: float = 10.0
    max_concurrent_calls: int = 8
    max_reconnect_attempts: int = 5
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    down_cooldown_s: float = 30.0
    # Close the session after this long without requests (None: keep it open). It opens
    # again on the next request.
    idle_timeout_s: float | None = None
    client_name: str = "agentd"
    client_version: str = "0"

    # -- observable state -------------------------------------------------------------------
    state: str = field(default="idle", init=False)  # idle | connecting | connected | backoff | down
    generation: int = field(default=0, init=False)  # sessions opened so far
    tools: tuple[Any, ...] | None = field(default=None, init=False)  # mcp.types.Tool, the last listing
    tools_version: int = field(default=0, init=False)
    last_error: str = field(default="", init=False)

    def __post_init__(self) -> None:
        if self.max_concurrent_calls < 1:
            raise ValueError(f"MCP server {self.name!r}: max_concurrent_calls must be >= 1")
        if self.max_reconnect_attempts < 1:
            raise ValueError(f"MCP server {self.name!r}: max_reconnect_attempts must be >= 1")
        self._loop: asyncio.AbstractEventLoop | None = None
        self._changes = 0  # tool-list change notifications seen
        self._listed_changes = 0  # ... as of the current listing
        self._reset()

    def _reset(self) -> None:
        self._pending: collections.deque[_Request] = collections.deque()
        self._inflight: set[_Request] = set()
        self._owner: asyncio.Task[None] | None = None
        self._wakeup: asyncio.Event | None = None
        self._changed: asyncio.Event | None = None
        self._closed_evt: asyncio.Event | None = None
        self._limiter: asyncio.Semaphore | None = None
        self._listing: asyncio.Future[Any] | None = None
        self._closing = False
        self._ended = False
        self._lost = ""
        self._retry_at = 0.0
        if self.state not in ("idle",):
            self.state = "idle"

    def _bind(self) -> asyncio.AbstractEventLoop:
        """Bind to the running loop; a new loop (the old one is gone) starts from scratch."""
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            self._loop = loop
            self._reset()
            self._wakeup = asyncio.Event()
            self._changed = asyncio.Event()
            self._closed_evt = asyncio.Event()
            self._limiter = asyncio.Semaphore(self.max_concurrent_calls)
        return loop

    @property
    def tools_stale(self) -> bool:
        """A change notification came after the current listing (or there is none yet)."""
        return self.tools is None or self._changes != self._listed_changes

    # -- what callers use ---------------------------------------------------------------------

    async def call_tool(
        self,
        name: str,
        arguments: dict[str, Any],
        *,
        meta: dict[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> Any:
        """Call a tool; the server's ``CallToolResult``. ``MCPUnavailableError`` when the server cannot
        be reached, ``MCPCallError`` when it answers with an error. Cancelling the caller cancels
        the request on the server."""
        loop = self._bind()
        assert self._limiter is not None
        async with self._limiter:
            request = _Request("call", loop.create_future(), name, arguments, meta, headers)
            request.future.add_done_callback(_retrieve)
            self._submit(request)
            try:
                return await request.future
            except asyncio.CancelledError:
                request.abandoned = True  # the owner cancels its task, and the server is told
                self._wake()
                raise

    async def fresh_tools(self, timeout_s: float | None = None) -> tuple[Any, ...]:
        """The server's tools, listed again first when the list is stale or was never read
        (connecting if need be). Raises ``MCPUnavailableError`` (the cached list, if any, stays)."""
        if not self.tools_stale:
            assert self.tools is not None
            return self.tools
        return await self._listed(False, timeout_s)

    async def refresh_tools(self, timeout_s: float | None = None) -> tuple[Any, ...]:
        """List the server's tools now (joining a listing in progress)."""
        return await self._listed(True, timeout_s)

    async def _listed(self, force: bool, timeout_s: float | None) -> tuple[Any, ...]:
        self._bind()
        listing = self._request_listing(force=force)
        timeout = self.connect_timeout_s if timeout_s is None else timeout_s
        try:
            async with asyncio.timeout(timeout):
                await asyncio.shield(listing)
        except TimeoutError:
            raise MCPUnavailableError(f"listing its tools took longer than {timeout:g}s") from None
        assert self.tools is not None
        return self.tools

    def warm_up(self) -> None:
        """Start connecting (and listing the tools) in the background; failures are logged."""
        try:
            self._bind()
            self._request_listing()
        except MCPUnavailableError:
            pass

    async def wait_connected(self, after_generation: int = 0) -> int:
        """Wait until a session newer than ``after_generation`` is open; its generation."""
        await self.wait_until(lambda c: c.state == "connected" and c.generation > after_generation)
        return self.generation

    async def wait_until(self, predicate: Callable[["MCPConnection"], bool]) -> None:
        """Wait until ``predicate(self)`` holds, checked at every state change (for tests and tools)."""
        self._bind()
        while not predicate(self):
            assert self._changed is not None
            changed = self._changed
            await changed.wait()

    def request_close(self) -> None:
        """Ask the owner to close the session (it closes it itself); requests still queued fail."""
        if self._owner is None or self._owner.done() or self._closed_evt is None:
            return
        self._closing = True
        self._closed_evt.set()
        self._wake()

    async def aclose(self, timeout_s: float = 5.0) -> None:
        """Close the session and wait for it to be closed; after ``timeout_s`` the owner task is
        cancelled (the ``mcp`` transports' own shutdown still runs: the stdio transport closes
        the server's stdin, then terminates and kills it, each wait bounded)."""
        owner = self._owner
        if owner is None or owner.done():
            return
        if self._loop is not asyncio.get_running_loop():
            return  # its loop is gone, and the task with it
        self.request_close()
        done, _ = await asyncio.wait({owner}, timeout=max(timeout_s, 0.0))
        if not done:
            log.warning("MCP server %r did not close within %.1fs; cancelling its connection", self.name, timeout_s)
            owner.cancel()
            await asyncio.wait({owner})

    @property
    def owner(self) -> asyncio.Task[None] | None:
        return self._owner

    # -- queueing -------------------------------------------------------------------------------

    def _wake(self) -> None:
        if self._wakeup is not None:
            self._wakeup.set()

    def _set_state(self, state: str) -> None:
        self.state = state
        if self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    def _submit(self, request: _Request) -> None:
        if self.state in ("backoff", "down") and time.monotonic() < self._retry_at:
            wait = self._retry_at - time.monotonic()
            what = "is down" if self.state == "down" else "is reconnecting"
            raise MCPUnavailableError(f"the server {what} (last error: {self.last_error}); next attempt in {wait:.0f}s")
        self._pending.append(request)
        self._wake()
        if self._owner is None or self._owner.done():
            self._closing = False
            assert self._closed_evt is not None
            self._closed_evt.clear()
            self._owner = asyncio.get_running_loop().create_task(self._own(), name=f"agentd mcp {self.name}")
            self._owner.add_done_callback(self._owner_done)

    def _owner_done(self, task: asyncio.Task[None]) -> None:
        if not task.cancelled() and task.exception() is not None:
            log.error("MCP server %r: its connection task failed", self.name, exc_info=task.exception())

    def _request_listing(self, force: bool = False) -> asyncio.Future[Any]:
        if self._listing is not None and not self._listing.done():
            return self._listing
        loop = asyncio.get_running_loop()
        request = _Request("list", loop.create_future(), force=force)
        request.future.add_done_callback(_retrieve)
        self._submit(request)
        self._listing = request.future
        return request.future

    def _fail_pending(self, error: Exception) -> None:
        while self._pending:
            request = self._pending.popleft()
            if not request.future.done():
                request.future.set_exception(error)

    # -- the owner task -----------------------------------------------------------------------

    async def _own(self) -> None:
        import anyio

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._close_watch, group.cancel_scope)
                await self._own_loop()
                group.cancel_scope.cancel()
        finally:
            self._set_state("idle")
            self._fail_pending(MCPUnavailableError("the connection was closed"))

    async def _close_watch(self, scope: Any) -> None:
        """A close that comes while the owner is not serving (connecting, waiting to retry or for
        work) cancels what it does; a serving owner closes its session itself, in order."""
        assert self._closed_evt is not None
        await self._closed_evt.wait()
        if self.state != "connected":
            scope.cancel()

    async def _own_loop(self) -> None:
        failures = 0
        reconnect = True  # a request started the owner
        while not self._closing:
            if not reconnect and not self._pending:
                if not await self._wait_for_work():
                    return
            reconnect = False
            self._set_state("connecting")
            outcome, error = await self._session()
            if self._closing or outcome == "closed":
                return
            if outcome == "idle":
                self._set_state("idle")
                log.info("MCP server %r: idle, session closed (it opens again on the next request)", self.name)
                return
            if outcome == "lost":
                failures = 0
                log.warning("MCP server %r: connection lost (%s); reconnecting", self.name, error)
                self.last_error = error
                reconnect = True
                continue
            failures += 1
            self.last_error = error
            self._fail_pending(MCPUnavailableError(f"could not connect: {error}"))
            if failures >= self.max_reconnect_attempts:
                log.error(
                    "MCP server %r: %d connection attempts failed (last: %s); its tools fail for %.0fs",
                    self.name, failures, error, self.down_cooldown_s,
                )
                self._retry_at = time.monotonic() + self.down_cooldown_s
                self._set_state("down")
                await asyncio.sleep(self.down_cooldown_s)
                self._set_state("idle")
                failures = 0
                continue  # the next request starts a new round
            delay = min(self.backoff_max_s, self.backoff_initial_s * 2 ** (failures - 1))
            log.warning("MCP server %r: connecting failed (%s); retrying in %.1fs", self.name, error, delay)
            self._retry_at = time.monotonic() + delay
            self._set_state("backoff")
            await asyncio.sleep(delay)
            reconnect = True

    async def _wait_for_work(self) -> bool:
        """Wait for a request (False: closing)."""
        assert self._wakeup is not None
        while not self._pending:
            if self._closing:
                return False
            self._wakeup.clear()
            await self._wakeup.wait()
        return not self._closing

    async def _session(self) -> tuple[str, str]:
        """One session: open, list the tools, serve until it ends. Returns ("lost" | "idle" |
        "closed" | "failed", why)."""
        import anyio

        connected = False
        self._ended = False
        self._lost = ""
        try:
            await load_mcp()
            from mcp import ClientSession
            from mcp.types import Implementation

            async with self.open_transport() as (read, write):
                watched = _WatchedStream(read, self._observe, self._on_end)
                async with ClientSession(
                    watched, write, message_handler=self._on_message,
                    client_info=Implementation(name=self.client_name, version=self.client_version),
                ) as session:
                    with anyio.fail_after(self.connect_timeout_s):
                        await session.initialize()
                        changes = self._changes
                        tools = await self._list(session)
                    self._install(tools, changes)
                    connected = True
                    self.generation += 1
                    self.last_error = ""
                    self._set_state("connected")
                    log.info("MCP server %r: connected (%d tools)", self.name, len(tools))
                    outcome = await self._serve(session)
            return outcome, (self._lost or "the server closed the connection") if outcome == "lost" else ""
        except Exception as exc:  # noqa: BLE001 - any failure of the transport or the session
            if self._closing:
                return "closed", ""
            if isinstance(exc, TimeoutError) and not connected:
                return "failed", f"no answer within {self.connect_timeout_s:g}s"
            return ("lost" if connected else "failed"), describe(exc)

    async def _serve(self, session: Any) -> str:
        import anyio

        assert self._wakeup is not None
        loop = asyncio.get_running_loop()
        last_work = loop.time()
        async with anyio.create_task_group() as group:
            while True:
                if self._closing:
                    outcome = "closed"
                    break
                if self._ended or self._lost:
                    outcome = "lost"
                    break
                for request in list(self._inflight):
                    if request.abandoned and request.scope is not None:
                        request.scope.cancel()
                while self._pending:
                    request = self._pending.popleft()
                    if request.abandoned or request.future.done():
                        continue
                    if request.kind == "list" and not request.force and not self.tools_stale:
                        request.future.set_result(self.tools)  # listed since it was asked for (on connecting)
                        continue
                    self._inflight.add(request)
                    group.start_soon(self._run, session, request)
                if self._inflight:
                    last_work = loop.time()
                self._wakeup.clear()
                if self.idle_timeout_s is None or self._inflight:
                    await self._wakeup.wait()
                    continue
                remaining = self.idle_timeout_s - (loop.time() - last_work)
                if remaining <= 0:
                    outcome = "idle"
                    break
                with anyio.move_on_after(remaining):
                    await self._wakeup.wait()
            group.cancel_scope.cancel()
        return outcome

    async def _run(self, session: Any, request: _Request) -> None:
        import anyio
        from mcp.shared.exceptions import MCPError
        from mcp_types import CONNECTION_CLOSED, INVALID_REQUEST

        requeued = False
        probe = CallContext(request.headers)
        CURRENT_CALL.set(probe)
        try:
            with anyio.CancelScope() as scope:
                request.scope = scope
                if request.abandoned:
                    scope.cancel()
                if request.kind == "list":
                    changes = self._changes
                    tools = await self._list(session)
                    self._install(tools, changes)
                    value: Any = self.tools
                else:
                    value = await session.call_tool(request.name, request.arguments, meta=request.meta)
                if not request.future.done():
                    request.future.set_result(value)
        except MCPError as exc:
            terminated = probe.session_gone or (exc.code == INVALID_REQUEST and exc.message == "Session terminated")
            if exc.code == CONNECTION_CLOSED or terminated:
                self._lost = "the server ended the session" if terminated else "the connection closed"
                self._wake()
                if terminated and not request.resent and not request.abandoned:
                    # The server does not know the session (it restarted, or expired it) and said so
                    # before handling the request: it was not executed, so a new session sends it.
                    request.resent, request.scope, requeued = True, None, True
                    self._pending.appendleft(request)
                    return
                error: Exception = MCPUnavailableError(f"{self._lost} during the request")
            else:
                error = MCPCallError(exc.message, exc.code)
            if not request.future.done():
                request.future.set_exception(error)
        except Exception as exc:  # noqa: BLE001 - the session's own failure (a malformed result...)
            if not request.future.done():
                request.future.set_exception(MCPCallError(describe(exc)))
        finally:
            self._inflight.discard(request)
            if not request.future.done() and not requeued:  # the session ended under it
                request.future.set_exception(MCPUnavailableError("the connection closed during the request"))

    async def _list(self, session: Any) -> tuple[Any, ...]:
        from mcp.types import PaginatedRequestParams

        tools: list[Any] = []
        cursor: str | None = None
        for _ in range(MAX_LIST_PAGES):
            params = PaginatedRequestParams(cursor=cursor) if cursor else None
            result = await session.list_tools(params=params)
            tools.extend(result.tools)
            cursor = result.next_cursor
            if not cursor or len(tools) >= MAX_LISTED_TOOLS:
                break
        if len(tools) > MAX_LISTED_TOOLS or cursor:
            log.warning("MCP server %r lists more than %d tools; only the first are read", self.name, MAX_LISTED_TOOLS)
        return tuple(tools[:MAX_LISTED_TOOLS])

    def _install(self, tools: tuple[Any, ...], changes: int) -> None:
        self.tools = tools
        self.tools_version += 1
        self._listed_changes = changes
        if self._changes != changes:  # changed again while listing: list once more
            self._refresh_soon()

    def _refresh_soon(self) -> None:
        try:
            self._request_listing()
        except MCPUnavailableError:
            pass

    # -- what the session reports -----------------------------------------------------------

    def _observe(self, item: Any) -> None:
        message = getattr(item, "message", None)
        if getattr(message, "method", None) == "notifications/tools/list_changed" and getattr(message, "id", None) is None:
            self._changes += 1
            self._refresh_soon()

    def _on_end(self) -> None:
        self._ended = True
        self._wake()

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, Exception):
            log.debug("MCP server %r: transport error: %s", self.name, describe(message))
