"""SessionService: sessions, their items, state and metadata over gRPC.

Every session id is the caller's: it is qualified by the caller's tenant
(``tenancy.scoped``) before it reaches the store, so a session of another tenant
answers exactly as a missing one does, and lists hold only the caller's sessions.
"""

from __future__ import annotations

import uuid

import grpc

from agentd.server.auth.principal import current_principal
from agentd.server.runs.manager import RunManager
from agentd.server.runtime.errors import SessionExistsError
from agentd.server.services import validation
from agentd.server.services.convert import (
    dict_from_struct,
    item_from_proto,
    session_to_proto,
    stored_item_to_proto,
)
from agentd.server.services.errors import FailedPrecondition, unary_errors
from agentd.server.services.validation import InvalidArgument
from agentd.server.sessions.base import SessionStore
from agentd.server.tenancy import local, scoped
from agentd.v1 import session_service_pb2 as pb
from agentd.v1 import session_service_pb2_grpc as pb_grpc

DEFAULT_SESSION_PAGE = 50
DEFAULT_ITEM_PAGE = 100
MAX_ITEMS_PER_ADD = 1000
_REQUEST_ID_NAMESPACE = uuid.UUID("6f1d2c1e-3b0a-4c8e-9a57-2f5f0c1d7a10")
# The Session fields UpdateSession can change (update_mask paths); "*" names them all.
_UPDATABLE = ("metadata", "state", "ttl")


# A page of ListSessionItems holds at most this many bytes of items (at least one item): items
# with images or files are big, and a reply must stay under the message limit
# (AGENTD_MAX_MESSAGE_BYTES, 8 MiB by default); one item's data is at most 4 MiB.
MAX_ITEM_PAGE_BYTES = 4 * 1024 * 1024

class SessionService(pb_grpc.SessionServiceServicer):
    def __init__(self, store: SessionStore, runs: RunManager) -> None:
        self._store = store
        self._runs = runs

    @unary_errors
    async def CreateSession(self, request: pb.CreateSessionRequest, context: grpc.aio.ServicerContext) -> pb.CreateSessionResponse:
        derived = False
        ttl = validation.ttl_seconds("session.ttl", request.session.ttl) if request.session.HasField("ttl") else None
        metadata = validation.check_string_map("session.metadata", request.session.metadata)
        validation.check_struct("session.state", request.session.state)
        request_id = validation.check_id("request_id", request.request_id)
        if request.session_id:
            validation.check_session_id("session_id", request.session_id)
            session_id = _scoped(request.session_id)
        elif request_id:
            # Derived from the request id: a retried create finds the session it already made.
            session_id = _scoped(uuid.uuid5(_REQUEST_ID_NAMESPACE, request.request_id).hex)
            derived = True
        else:
            session_id = _scoped(uuid.uuid4().hex)
        try:
            record = await self._store.create_session(
                session_id,
                metadata=metadata,
                state=dict_from_struct(request.session.state),
                ttl_s=ttl,
            )
        except SessionExistsError:
            if not derived:
                raise
            record = await self._store.get_session(session_id)
        return pb.CreateSessionResponse(session=session_to_proto(record))

    @unary_errors
    async def GetSession(self, request: pb.GetSessionRequest, context: grpc.aio.ServicerContext) -> pb.GetSessionResponse:
        session_id = _scoped(validation.session_id("name", request.name))
        return pb.GetSessionResponse(session=session_to_proto(await self._store.get_session(session_id)))

    @unary_errors
    async def ListSessions(self, request: pb.ListSessionsRequest, context: grpc.aio.ServicerContext) -> pb.ListSessionsResponse:
        size = validation.page_size(request.page_size, DEFAULT_SESSION_PAGE)
        tenant = current_principal().tenant
        cursor = validation.decode_page_token("sessions", request.page_token, scope=tenant)
        try:
            page = await self._store.list_sessions(size, cursor, tenant=tenant)
        except ValueError:
            raise validation.corrupted_token() from None
        response = pb.ListSessionsResponse(sessions=[session_to_proto(s) for s in page.sessions])
        if page.next_cursor is not None:
            response.next_page_token = validation.encode_page_token("sessions", page.next_cursor, scope=tenant)
        return response

    @unary_errors
    async def UpdateSession(self, request: pb.UpdateSessionRequest, context: grpc.aio.ServicerContext) -> pb.UpdateSessionResponse:
        """AIP-134: with an update mask, exactly the masked fields (one masked but empty is
        cleared; ``*`` masks them all); without one, the fields set in ``session``."""
        session_id = _scoped(validation.session_id("session.name", request.session.name))
        paths = _update_paths(request)
        if "state" in paths:
            validation.check_struct("session.state", request.session.state)
        record = await self._store.update_session(
            session_id,
            metadata=validation.check_string_map("session.metadata", request.session.metadata)
            if "metadata" in paths else None,
            state=dict_from_struct(request.session.state) if "state" in paths else None,
            ttl_s=validation.ttl_seconds("session.ttl", request.session.ttl) if "ttl" in paths else None,
        )
        return pb.UpdateSessionResponse(session=session_to_proto(record))

    @unary_errors
    async def DeleteSession(self, request: pb.DeleteSessionRequest, context: grpc.aio.ServicerContext) -> pb.DeleteSessionResponse:
        session_id = await self._idle_session("name", request.name)
        await self._store.delete_session(session_id)
        return pb.DeleteSessionResponse()

    @unary_errors
    async def ListSessionItems(
        self, request: pb.ListSessionItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListSessionItemsResponse:
        session_id = _scoped(validation.session_id("parent", request.parent))
        size = validation.page_size(request.page_size, DEFAULT_ITEM_PAGE)
        newest_first = request.order == pb.ITEM_ORDER_NEWEST_FIRST
        kind = "items-newest" if newest_first else "items-oldest"
        cursor = validation.decode_page_token(kind, request.page_token, scope=session_id)
        position = None if cursor is None else validation.token_int(cursor)
        if newest_first:
            stored = await self._store.list_items(session_id, size + 1, newest_first=True, before_sequence=position)
        else:
            stored = await self._store.list_items(session_id, size + 1, after_sequence=position or 0)
        response = pb.ListSessionItemsResponse()
        page_bytes = 0
        for i, item in enumerate(stored[:size]):
            message = stored_item_to_proto(item)
            page_bytes += message.ByteSize()
            if i and page_bytes > MAX_ITEM_PAGE_BYTES:  # big items (images): a shorter page, never a reply too big
                size = i
                break
            response.items.append(message)
        if len(stored) > size:
            response.next_page_token = validation.encode_page_token(kind, str(stored[size - 1].sequence),
                                                                    scope=session_id)
        return response

    @unary_errors
    async def AddSessionItems(
        self, request: pb.AddSessionItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.AddSessionItemsResponse:
        session_id = await self._idle_session("parent", request.parent)
        if not request.items:
            raise InvalidArgument("items", "must contain at least one item")
        if len(request.items) > MAX_ITEMS_PER_ADD:
            raise InvalidArgument("items", f"has {len(request.items)} items; send at most {MAX_ITEMS_PER_ADD} per call")
        items = [item_from_proto(item, f"items[{i}]") for i, item in enumerate(request.items)]
        request_id = validation.check_id("request_id", request.request_id)
        stored = await self._store.append_items(session_id, items, request_id or None)
        return pb.AddSessionItemsResponse(items=[stored_item_to_proto(s) for s in stored])

    @unary_errors
    async def PopSessionItem(self, request: pb.PopSessionItemRequest, context: grpc.aio.ServicerContext) -> pb.PopSessionItemResponse:
        session_id = await self._idle_session("parent", request.parent)
        stored = await self._store.pop_item(session_id)
        response = pb.PopSessionItemResponse()
        if stored is not None:
            response.item.CopyFrom(stored_item_to_proto(stored))
        return response

    @unary_errors
    async def ClearSessionItems(
        self, request: pb.ClearSessionItemsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ClearSessionItemsResponse:
        session_id = await self._idle_session("parent", request.parent)
        return pb.ClearSessionItemsResponse(deleted_count=await self._store.clear_items(session_id))

    async def _idle_session(self, field: str, name: str) -> str:
        """The session id, refusing writes while a run (on any replica) owns the session's item list."""
        session_id = _scoped(validation.session_id(field, name))
        run_id = await self._runs.active_run_for_session(session_id)
        if run_id is not None:
            raise FailedPrecondition(
                f"session {local(session_id)!r} has an active run ({run_id}); wait for it to end or cancel it",
                reason="SESSION_BUSY",
                metadata={"session": f"sessions/{local(session_id)}", "active_run": f"runs/{local(run_id)}"},
            )
        return session_id


def _update_paths(request: pb.UpdateSessionRequest) -> set[str]:
    """The Session fields an UpdateSession request replaces (AIP-134).

    With an update mask: exactly its paths, each one of ``_UPDATABLE`` or ``*`` (all of
    them); a masked field left empty in ``session`` is cleared (a ttl masked but unset
    removes the expiry). Without one (or with no paths): the fields ``session`` sets, that
    is a non-empty ``metadata`` or ``state``, and a ``ttl`` that is present (zero removes
    the expiry); a field not sent is left as it is.
    """
    session = request.session
    if not request.update_mask.paths:
        implied = {"metadata"} if session.metadata else set()
        if session.state.fields:
            implied.add("state")
        if session.HasField("ttl"):
            implied.add("ttl")
        return implied
    paths: set[str] = set()
    for index, path in enumerate(request.update_mask.paths):
        if path == "*":
            paths.update(_UPDATABLE)
        elif path in _UPDATABLE:
            paths.add(path)
        else:
            raise InvalidArgument(
                f"update_mask.paths[{index}]",
                f"{validation.quote(path)} is not a field UpdateSession can change; "
                "use 'metadata', 'state', 'ttl' or '*' (all three)",
            )
    return paths


def _scoped(session_id: str) -> str:
    """The store key of the caller's session ``session_id``."""
    return scoped(current_principal().tenant, session_id)

