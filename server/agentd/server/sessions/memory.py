"""In-process session store: the reference semantics, for tests and single-run use.

Every method does all its work without awaiting, so on one event loop each call is
atomic without locks. Values are normalised the way a persistent backend would
(items through ``to_dict``/``item_from_dict``, metadata and state through JSON), so
code tested against this store behaves the same on SQLite.
"""

from __future__ import annotations

import bisect
import json
import time
from dataclasses import dataclass, field
from typing import Any, Sequence

from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import (
    History,
    SessionPage,
    SessionRecord,
    SessionStore,
    StoredItem,
    check_limit,
    decode_cursor,
    encode_cursor,
    expiry,
    is_expired,
    resolve_ttl,
)
from agentd.server.tenancy import DEFAULT_TENANT, in_tenant

__all__ = ["MemorySessionStore"]


def _json_copy(value: dict[str, Any]) -> dict[str, Any]:
    """A deep copy with the same normalisation (and errors) as a JSON-backed store."""
    result: dict[str, Any] = json.loads(json.dumps(value, ensure_ascii=False))
    return result


@dataclass(slots=True)
class _Session:
    created_at: float
    updated_at: float
    metadata: dict[str, str]
    state: dict[str, Any]
    ttl_s: float | None = None
    expires_at: float | None = None
    last_seq: int = 0
    items: list[StoredItem] = field(default_factory=list)  # ascending sequence
    requests: dict[str, tuple[int, int]] = field(default_factory=dict)  # request id -> seq range


class MemorySessionStore(SessionStore):
    """Sessions in plain dicts; lost when the process exits."""

    backend = "memory"

    def __init__(self, *, default_ttl_s: float | None = None) -> None:
        self._sessions: dict[str, _Session] = {}
        self._default_ttl_s = resolve_ttl(default_ttl_s, None)

    def _live(self, session_id: str, now: float) -> _Session | None:
        """The session unless it is missing or expired (an expired one is dropped here)."""
        session = self._sessions.get(session_id)
        if session is not None and is_expired(session.expires_at, now):
            del self._sessions[session_id]
            return None
        return session

    def _get(self, session_id: str, now: float | None = None) -> _Session:
        session = self._live(session_id, time.time() if now is None else now)
        if session is None:
            raise SessionNotFoundError(session_id)
        return session

    @staticmethod
    def _touch(session: _Session, now: float) -> None:
        """Every write restarts the idle clock."""
        session.updated_at = now
        session.expires_at = expiry(now, session.ttl_s)

    async def sweep_expired(self) -> int:
        now = time.time()
        expired = [sid for sid, s in self._sessions.items() if is_expired(s.expires_at, now)]
        for sid in expired:
            del self._sessions[sid]
        return len(expired)

    @staticmethod
    def _record(session_id: str, session: _Session) -> SessionRecord:
        return SessionRecord(
            session_id=session_id,
            created_at=session.created_at,
            updated_at=session.updated_at,
            metadata=_json_copy(session.metadata),
            state=_json_copy(session.state),
            item_count=len(session.items),
            ttl_s=session.ttl_s,
            expires_at=session.expires_at,
        )

    def _new(
        self,
        session_id: str,
        metadata: dict[str, str] | None,
        state: dict[str, Any] | None,
        ttl_s: float | None,
        now: float,
    ) -> _Session:
        session = _Session(
            created_at=now,
            updated_at=now,
            metadata=_json_copy(metadata or {}),
            state=_json_copy(state or {}),
            ttl_s=ttl_s,
            expires_at=expiry(now, ttl_s),
        )
        self._sessions[session_id] = session
        return session

    async def create_session(
        self,
        session_id: str,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        ttl = resolve_ttl(ttl_s, self._default_ttl_s)
        now = time.time()
        if self._live(session_id, now) is not None:
            raise SessionExistsError(session_id)
        return self._record(session_id, self._new(session_id, metadata, state, ttl, now))

    async def get_session(self, session_id: str) -> SessionRecord:
        return self._record(session_id, self._get(session_id))

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> SessionPage:
        check_limit(limit)
        now = time.time()
        keys = sorted(
            (
                (s.created_at, sid)
                for sid, s in self._sessions.items()
                if not is_expired(s.expires_at, now) and in_tenant(sid, tenant)
            ),
            reverse=True,
        )
        if cursor is not None:
            after = decode_cursor(cursor)
            keys = [key for key in keys if key < after]
        page = keys[:limit]
        next_cursor = encode_cursor(*page[-1]) if len(keys) > limit else None
        return SessionPage(
            sessions=[self._record(sid, self._sessions[sid]) for _, sid in page],
            next_cursor=next_cursor,
        )

    async def update_session(
        self,
        session_id: str,
        *,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        new_ttl = resolve_ttl(ttl_s, None) if ttl_s is not None else None
        now = time.time()
        session = self._get(session_id, now)
        # Copy both before assigning either, so a bad value changes nothing.
        new_metadata = _json_copy(metadata) if metadata is not None else session.metadata
        new_state = _json_copy(state) if state is not None else session.state
        session.metadata, session.state = new_metadata, new_state
        if ttl_s is not None:
            session.ttl_s = new_ttl
        self._touch(session, now)
        return self._record(session_id, session)

    async def delete_session(self, session_id: str) -> None:
        self._get(session_id)
        del self._sessions[session_id]

    async def append_items(
        self, session_id: str, items: Sequence[Item], request_id: str | None = None
    ) -> list[StoredItem]:
        now = time.time()
        session = self._get(session_id, now)
        if not items:
            return []
        if request_id is not None and request_id in session.requests:
            first, last = session.requests[request_id]
            return self._between(session, first, last)
        # Normalise everything before touching the session: all or nothing.
        normalised = [item_from_dict(item.to_dict()) for item in items]
        first = session.last_seq + 1
        stored = [
            StoredItem(session_id=session_id, sequence=first + i, created_at=now, item=item)
            for i, item in enumerate(normalised)
        ]
        session.items.extend(stored)
        session.last_seq = stored[-1].sequence
        self._touch(session, now)
        if request_id is not None:
            session.requests[request_id] = (first, session.last_seq)
        return list(stored)

    @staticmethod
    def _between(session: _Session, first: int, last: int) -> list[StoredItem]:
        lo = bisect.bisect_left(session.items, first, key=lambda s: s.sequence)
        hi = bisect.bisect_right(session.items, last, key=lambda s: s.sequence)
        return session.items[lo:hi]

    async def list_items(
        self,
        session_id: str,
        limit: int,
        *,
        newest_first: bool = False,
        after_sequence: int = 0,
        before_sequence: int | None = None,
    ) -> list[StoredItem]:
        check_limit(limit)
        items = self._get(session_id).items
        if newest_first:
            hi = len(items)
            if before_sequence is not None:
                hi = bisect.bisect_left(items, before_sequence, key=lambda s: s.sequence)
            return items[max(0, hi - limit) : hi][::-1]
        lo = bisect.bisect_right(items, after_sequence, key=lambda s: s.sequence)
        return items[lo : lo + limit]

    async def read_history(self, session_id: str, *, create: bool = False, limit: int | None = None) -> History:
        if limit is not None:
            check_limit(limit)
        now = time.time()
        session = self._live(session_id, now)
        if session is None:
            if create:
                self._new(session_id, None, None, self._default_ttl_s, now)
            return History()
        items = session.items
        start = 0 if limit is None else max(0, len(items) - limit)
        return History((stored.item for stored in items[start:]), start)

    async def pop_item(self, session_id: str) -> StoredItem | None:
        session = self._get(session_id)
        if not session.items:
            return None
        self._touch(session, time.time())
        return session.items.pop()

    async def clear_items(self, session_id: str) -> int:
        session = self._get(session_id)
        removed = len(session.items)
        if removed:
            session.items.clear()
            self._touch(session, time.time())
        return removed

    async def drop_items_through(self, session_id: str, sequence: int) -> int:
        session = self._get(session_id)
        # Request ids stay in ``session.requests``: a retried append still replays, never re-adds.
        removed = bisect.bisect_right(session.items, sequence, key=lambda s: s.sequence)
        if removed:
            del session.items[:removed]
            self._touch(session, time.time())
        return removed
