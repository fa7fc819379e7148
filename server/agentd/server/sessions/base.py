"""The one interface every session store implements.

A session is an ordered list of items plus a key/value ``state`` and string
``metadata``. Items get per-session sequence numbers 1, 2, 3... assigned atomically
at append; numbers are never reused (a pop, clear or drop does not rewind the counter).
Every method is a single atomic operation on the backend: on failure nothing was
written and ``StoreUnavailableError`` (or a not-found/exists error) is raised.

Expiry is idle-based: a session with a TTL expires ``ttl_s`` seconds after its last
write (create, update, append, pop, clear, drop; reads do not extend it). From then on it
behaves exactly like a session that does not exist, even before ``sweep_expired``
(or the backend's own expiry) has removed its data.
"""

from __future__ import annotations

import abc
import base64
import binascii
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

from agentd.server.runtime.items import Item
from agentd.server.tenancy import DEFAULT_TENANT


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


def resolve_ttl(requested: float | None, default: float | None) -> float | None:
    """The TTL a new session gets: None asks for the store default, 0 means never expire."""
    ttl = default if requested is None else requested
    if ttl is not None and ttl < 0:
        raise ValueError(f"ttl must be 0 (never expire) or positive seconds, got {ttl}")
    return ttl or None


def expiry(now: float, ttl_s: float | None) -> float | None:
    """When a session written at ``now`` expires; None when it has no TTL."""
    return now + ttl_s if ttl_s else None


def is_expired(expires_at: float | None, now: float) -> bool:
    return expires_at is not None and expires_at <= now


def check_limit(limit: int) -> None:
    """Stores refuse empty pages: a limit below 1 is a caller bug, not a request for nothing."""
    if limit < 1:
        raise ValueError(f"limit must be at least 1, got {limit}")


class History(list[Item]):
    """What ``read_history`` returns: the items, oldest first (it is a plain list of them), and
    ``omitted``, how many older items of the session a ``limit`` left out."""

    __slots__ = ("omitted",)

    def __init__(self, items: Iterable[Item] = (), omitted: int = 0) -> None:
        super().__init__(items)
        self.omitted = omitted


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
    # Idle TTL in seconds and the resulting expiry (unix seconds); None: never expires.
    ttl_s: float | None = None
    expires_at: float | None = None


@dataclass(slots=True, frozen=True)
class SchemaStatus:
    """Where a backend's versioned schema stands (``agentd db status``)."""

    backend: str
    location: str  # file path or database/schema, for the operator
    current: int  # 0: no schema created yet
    latest: int  # the version this code migrates to

    @property
    def pending(self) -> int:
        return max(0, self.latest - self.current)


@dataclass(slots=True, frozen=True)
class SessionPage:
    sessions: list[SessionRecord]
    # Opaque cursor for the next page; None when this was the last page.
    next_cursor: str | None


class SessionStore(abc.ABC):
    """Backend-neutral session storage. Implementations: memory, SQLite, Postgres, Redis.

    Constructors take ``default_ttl_s``: the TTL of sessions created without one
    (including those a run creates implicitly); None means they never expire.
    """

    backend: str = "abstract"

    async def open(self) -> None:
        """Connect and bring the schema up to date; called once at server start."""

    async def close(self) -> None:
        """Release connections; called once at shutdown."""

    async def ping(self) -> None:
        """Raise ``StoreUnavailableError`` when the backend cannot serve requests right now.

        Cheap enough to call every few seconds: health checking uses it.
        """

    async def schema_status(self) -> SchemaStatus | None:
        """The versioned schema's state; None for backends without one (memory, Redis)."""
        return None

    async def migrate(self) -> SchemaStatus | None:
        """Apply pending schema migrations (idempotent, safe to run from several replicas)."""
        return None

    @abc.abstractmethod
    async def sweep_expired(self) -> int:
        """Delete expired sessions' data now; returns how many sessions were removed.

        Correctness never depends on it (expired sessions are already invisible); it
        reclaims space. The server calls it periodically.
        """

    @abc.abstractmethod
    async def create_session(
        self,
        session_id: str,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        """Create a session; ``SessionExistsError`` if the id is taken by a live session.

        ``ttl_s``: None takes the store default, 0 never expires. An expired session's
        id is free again: creating it starts a new, empty session.
        """

    @abc.abstractmethod
    async def get_session(self, session_id: str) -> SessionRecord:
        """``SessionNotFoundError`` if missing."""

    @abc.abstractmethod
    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> SessionPage:
        """``tenant``'s sessions (see ``agentd.server.tenancy``) newest-created first, ``limit`` at a time."""

    @abc.abstractmethod
    async def update_session(
        self,
        session_id: str,
        *,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        """Replace metadata, state and/or TTL (None leaves a field as is; ``ttl_s=0`` removes expiry).

        Like every write it restarts the idle clock of a session with a TTL.
        """

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
    async def read_history(self, session_id: str, *, create: bool = False, limit: int | None = None) -> History:
        """All items oldest first; an empty list for a session that does not exist.

        With ``create``, a missing session is created in the same atomic operation: a run
        naming a new session needs one round trip to start, not two.

        With a ``limit`` (at least 1), only the session's newest ``limit`` items, still oldest
        first, and ``History.omitted`` says how many older ones there are: the store reads
        those items only, never the whole session (a run's history window). None reads all.
        """

    @abc.abstractmethod
    async def pop_item(self, session_id: str) -> StoredItem | None:
        """Remove and return the newest item; None when there are none."""

    @abc.abstractmethod
    async def clear_items(self, session_id: str) -> int:
        """Remove all items (state and metadata stay); returns how many were removed."""

    @abc.abstractmethod
    async def drop_items_through(self, session_id: str, sequence: int) -> int:
        """Remove every item whose sequence is <= ``sequence``; return how many were removed.

        Atomic (all those items or none), for history compaction dropping the originals a
        summary stands for. Later items keep their sequences (sequences are never reused or
        renumbered, so the next append still continues after the newest sequence ever
        given). Afterwards the session's ``item_count``, ``read_history`` (its window and
        ``History.omitted``), ``list_items`` paging and ``pop_item`` see only the remaining
        items, exactly as if the dropped ones had never been appended.

        Request ids are the exception: they outlive the items they stored, as they do across
        ``pop_item`` and ``clear_items``. A retried ``append_items`` whose request id was used
        before the drop is still recognised: it appends nothing and returns only that
        request's items that still exist (an empty list when the drop removed them all), so
        compaction can never bring dropped originals back.

        Like the other writes it restarts the idle clock, but only when it removed something
        (as ``clear_items``). Repeating a drop is harmless: it removes nothing more and
        returns 0. ``SessionNotFoundError`` for a missing or expired session, whatever
        ``sequence`` is. A ``sequence`` below 1 removes nothing; beyond the newest item it
        removes all items.
        """
