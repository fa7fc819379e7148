"""The one interface every session store implements.

A session is an ordered list of items plus a key/value ``state`` and string
``metadata``. Items get per-session sequence numbers 1, 2, 3... assigned atomically
at append; numbers are never reused (a pop or clear does not rewind the counter).
Every method is a single atomic operation on the backend: on failure nothing was
written and ``StoreUnavailableError`` (or a not-found/exists error) is raised.
"""

from __future__ import annotations

import abc
import base64
import binascii
from dataclasses import dataclass
from typing import Any, Sequence

from agentd.server.runtime.items import Item


def encode_cursor(created_at: float, session_id: str) -> str:
    """Keyset position after (created_at, id); ``repr`` keeps the float exact."""
    raw = f"{created_at!r}|{session_id}".encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii")


def decode_cursor(cursor: str) -> tuple[float, str]:
    """Inverse of ``encode_cursor``; ``ValueError`` for anything it did not produce."""
    try:
        raw = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8")
        created, session_id = raw.split("|", 1)
        return float(created), session_id
    except (ValueError, UnicodeError, binascii.Error):
        raise ValueError(f"invalid session list cursor {cursor!r}") from None


def check_limit(limit: int) -> None:
    """Stores refuse empty pages: a limit below 1 is a caller bug, not a request for nothing."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


@dataclass(slots=True, frozen=True)
class StoredItem:
    session_id: str
    sequence: int
    created_at: float  # unix seconds
    item: Item


@dataclass(slots=True, frozen=True)
class SessionRecord:
    session_id: str
    created_at: float
    updated_at: float
    metadata: dict[str, str]
    state: dict[str, Any]
    item_count: int


@dataclass(slots=True, frozen=True)
class SessionPage:
    sessions: list[SessionRecord]
    # Opaque cursor for the next page; None when this was the last page.
    next_cursor: str | None


class SessionStore(abc.ABC):
    """Backend-neutral session storage. Implementations: memory, SQLite."""

    async def open(self) -> None:
        """Connect and create the schema; called once at server start."""

    async def close(self) -> None:
        """Release connections; called once at shutdown."""

    @abc.abstractmethod
    async def create_session(
        self, session_id: str, metadata: dict[str, str] | None = None, state: dict[str, Any] | None = None
    ) -> SessionRecord:
        """Create a session; ``SessionExistsError`` if the id is taken."""

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord:
        """``SessionNotFoundError`` if missing."""

    @abc.abstractmethod
    async def list_sessions(self, limit: int, cursor: str | None = None) -> SessionPage:
        """Sessions newest-created first, ``limit`` at a time."""

    @abc.abstractmethod
    async def update_session(
        self, session_id: str, *, metadata: dict[str, str] | None = None, state: dict[str, Any] | None = None
    ) -> SessionRecord:
        """Replace metadata and/or state (None leaves a field as is)."""

    @abc.abstractmethod
    async def delete_session(self, session_id: str) -> None:
        """Delete the session and its items; ``SessionNotFoundError`` if missing."""

    @abc.abstractmethod
    async def append_items(
        self, session_id: str, items: Sequence[Item], request_id: str | None = None
    ) -> list[StoredItem]:
        """Append all items or none, numbering them after the session's last sequence.

        With a ``request_id`` already used on this session, append nothing and return
        the items that request stored (a retried write is not duplicated).
        """

    @abc.abstractmethod
    async def list_items(
        self,
        session_id: str,
        limit: int,
        *,
        newest_first: bool = False,
        after_sequence: int = 0,
        before_sequence: int | None = None,
    ) -> list[StoredItem]:
        """A page of items: oldest first with sequence > ``after_sequence``, or newest
        first with sequence < ``before_sequence`` (None: from the newest)."""

    @abc.abstractmethod
    async def read_history(self, session_id: str, *, create: bool = False) -> list[Item]:
        """All items oldest first; an empty list for a session that does not exist.

        With ``create``, a missing session is created in the same atomic operation: a run
        naming a new session needs one round trip to start, not two.
        """

    @abc.abstractmethod
    async def pop_item(self, session_id: str) -> StoredItem | None:
        """Remove and return the newest item; None when there are none."""

    @abc.abstractmethod
    async def clear_items(self, session_id: str) -> int:
        """Remove all items (state and metadata stay); returns how many were removed."""
