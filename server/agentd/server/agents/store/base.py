"""The one interface every agent store implements.

Agents are data: a caller creates an agent, and every change makes a new, immutable
version, numbered 1, 2, 3... per agent. Named aliases (``prod``, ``canary``) point at a
version, or split traffic between versions by weight. Definitions are opaque JSON-able
dicts here (the service layer validates them); the store keeps them verbatim, normalised
through JSON as a persistent backend would (so a dict read back equals the one written).

Tenants. Every method takes the caller's tenant (``agentd.server.tenancy``) apart from the
name: agents of two tenants never meet, and another tenant's agent answers exactly as a
missing one does. Error messages name the agent as its owner knows it, never the tenant.

Numbering. Versions are never reused, not even across a delete: ``delete_agent`` is soft
(the agent disappears from ``get_agent``, listings and aliases, but its versions stay for
``get_version``, so a run pinned to one can still be taken over), and creating the name
again continues after the newest version ever made: a pinned ``v1`` never changes meaning.
Every version from 1 to ``latest_version`` exists.

Atomicity. Every method is one atomic operation on the backend (one transaction, one
Postgres function, one Lua script): on failure nothing was written and
``StoreUnavailableError`` (or one of the errors below) is raised. Two concurrent updates
of one agent never get the same version; with ``expected_version`` the loser of a race
gets ``VersionConflictError`` (optimistic concurrency).

Change feed. A store-wide ``revision`` counts every write of every tenant: each write
bumps it by exactly one, atomically with the write, and logs which (tenant, agent) it
touched. Replicas poll ``revision`` (one round trip) or ``changed_since`` (one round trip,
reading at most ``CHANGE_FEED_LIMIT`` log entries) to see each other's changes. The log
keeps the newest ``CHANGE_FEED_LIMIT`` entries only; when a caller is further behind (or
its revision is ahead of the store's: the data was replaced) ``changed_since`` answers
``None`` instead of a list: reload everything.
"""

from __future__ import annotations

import abc
import base64
import binascii
import json
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Sequence

from agentd.server.runtime.errors import AgentdError
from agentd.server.sessions.base import SchemaStatus, check_limit
from agentd.server.tenancy import valid_tenant

__all__ = [
    "CHANGE_FEED_LIMIT",
    "AgentExistsError",
    "AgentNotFoundError",
    "AgentRecord",
    "AgentStore",
    "AgentVersionNotFoundError",
    "AgentVersionRecord",
    "AliasNotFoundError",
    "AliasRecord",
    "Changes",
    "VersionConflictError",
    "check_limit",
    "check_name",
    "check_revision",
    "check_routes",
    "check_tenant",
    "decode_cursor",
    "dedupe",
    "dump_definition",
    "dump_routes",
    "encode_cursor",
    "load_definition",
    "load_routes",
]

# How many changes ``changed_since`` reports at most, and how many the log keeps: further
# behind than this, a caller reloads everything.
CHANGE_FEED_LIMIT = 1000

# (current revision, the (tenant, agent) pairs changed since, or None: reload everything).
Changes = tuple[int, list[tuple[str, str]] | None]


# --- errors ----------------------------------------------------------------------------
# Not-found errors are also LookupErrors, so callers may catch "missing" of any kind at once.


class AgentExistsError(AgentdError):
    def __init__(self, tenant: str, name: str) -> None:
        super().__init__(f"agent {name!r} already exists")
        self.tenant = tenant
        self.name = name


class AgentNotFoundError(AgentdError, LookupError):
    """The agent does not exist in the tenant, or was deleted."""

    def __init__(self, tenant: str, name: str) -> None:
        super().__init__(f"agent {name!r} does not exist")
        self.tenant = tenant
        self.name = name


class AgentVersionNotFoundError(AgentdError, LookupError):
    def __init__(self, tenant: str, name: str, version: int) -> None:
        super().__init__(f"agent {name!r} has no version {version}")
        self.tenant = tenant
        self.name = name
        self.version = version


class AliasNotFoundError(AgentdError, LookupError):
    def __init__(self, tenant: str, agent: str, alias: str) -> None:
        super().__init__(f"agent {agent!r} has no alias {alias!r}")
        self.tenant = tenant
        self.agent = agent
        self.alias = alias


class VersionConflictError(AgentdError):
    """``update_agent(expected_version=...)`` found another latest version: someone else changed it."""

    def __init__(self, tenant: str, name: str, expected: int, latest: int) -> None:
        super().__init__(
            f"agent {name!r} is at version {latest}, not {expected}: read it again and reapply the change"
        )
        self.tenant = tenant
        self.name = name
        self.expected = expected
        self.latest = latest


# --- records ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class AgentVersionRecord:
    """One immutable version of an agent. Times are unix seconds."""

    tenant: str
    name: str
    version: int
    definition: dict[str, Any]
    create_time: float
    created_by: str


@dataclass(frozen=True, slots=True)
class AgentRecord:
    """A live agent. ``create_time``: when this name was (last) created; ``update_time``:
    its last create or update (alias changes have their own ``AliasRecord.update_time``)."""

    tenant: str
    name: str
    latest_version: int
    create_time: float
    update_time: float


@dataclass(frozen=True, slots=True)
class AliasRecord:
    """A named pointer at versions of ``agent``: ``routes`` are (version, weight) pairs,
    weights positive and summing to 100, versions distinct, in the order they were set."""

    tenant: str
    agent: str
    alias: str
    routes: tuple[tuple[int, int], ...]
    update_time: float


# --- shared checks and encodings -------------------------------------------------------


def check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not valid_tenant(tenant):
        raise ValueError(f"invalid tenant {tenant!r}")


def check_name(what: str, name: str) -> None:
    """Names are the service's to validate; the store only refuses what no backend can key."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"{what} must be a non-empty string, got {name!r}")


def _int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_routes(routes: Iterable[Sequence[int]]) -> tuple[tuple[int, int], ...]:
    """``routes`` as a tuple of (version, weight) int pairs; ``ValueError`` unless there is at
    least one, versions are distinct and at least 1, weights at least 1 and summing to 100."""
    checked: list[tuple[int, int]] = []
    for route in routes:
        pair = tuple(route)
        if len(pair) != 2 or not _int(pair[0]) or not _int(pair[1]):
            raise ValueError(f"an alias route is a (version, weight) pair of integers, got {route!r}")
        version, weight = pair
        if version < 1:
            raise ValueError(f"alias route versions start at 1, got {version}")
        if weight < 1:
            raise ValueError(f"alias route weights must be positive, got {weight} for version {version}")
        if any(version == v for v, _ in checked):
            raise ValueError(f"version {version} appears twice in the alias routes")
        checked.append((version, weight))
    if not checked:
        raise ValueError("an alias needs at least one route")
    total = sum(weight for _, weight in checked)
    if total != 100:
        raise ValueError(f"alias route weights must sum to 100, got {total}")
    return tuple(checked)


# ASCII JSON: every backend stores and returns it byte for byte (lone surrogates and NUL
# included); NaN and Infinity are not JSON and fail here, as a ValueError.
_dumps: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def dump_definition(definition: dict[str, Any]) -> str:
    """A definition as the JSON text every store keeps; ``ValueError``/``TypeError`` for what JSON cannot hold."""
    if not isinstance(definition, dict):
        raise TypeError(f"an agent definition is a dict, got {type(definition).__name__}")
    return _dumps(definition)


def load_definition(text: str | bytes) -> dict[str, Any]:
    result: dict[str, Any] = json.loads(text)
    return result


def dump_routes(routes: tuple[tuple[int, int], ...]) -> str:
    return _dumps([list(route) for route in routes])


def load_routes(text: str | bytes) -> tuple[tuple[int, int], ...]:
    return tuple((int(v), int(w)) for v, w in json.loads(text))


def encode_cursor(name: str) -> str:
    """The position after ``name`` in a name-ordered listing."""
    return base64.urlsafe_b64encode(name.encode("utf-8", "surrogatepass")).decode("ascii")


def decode_cursor(cursor: str) -> str:
    """Inverse of ``encode_cursor`` (``""``: the start); ``ValueError`` for anything it did not produce."""
    if not cursor:
        return ""
    try:
        name = base64.urlsafe_b64decode(cursor.encode("ascii")).decode("utf-8", "surrogatepass")
    except (ValueError, UnicodeError, binascii.Error):
        raise ValueError(f"invalid agent list cursor {cursor!r}") from None
    if not name:
        raise ValueError(f"invalid agent list cursor {cursor!r}")
    return name


def check_revision(revision: int) -> None:
    if not _int(revision) or revision < 0:
        raise ValueError(f"a revision is an integer of at least 0, got {revision!r}")


def dedupe(pairs: Iterable[tuple[str, str]]) -> list[tuple[str, str]]:
    """Each (tenant, agent) once, in the order of its first change."""
    return list(dict.fromkeys(pairs))


# --- the interface ---------------------------------------------------------------------


class AgentStore(abc.ABC):
    """Backend-neutral storage of versioned agents. Implementations: memory, SQLite,
    Postgres, Redis; each lives beside the session store of the same settings (the same
    file, schema or key prefix), shared by every replica that points there."""

    backend: str = "abstract"

    async def open(self) -> None:
        """Connect and bring the schema up to date; called once at server start."""

    async def close(self) -> None:
        """Release connections; called once at shutdown."""

    async def ping(self) -> None:
        """Raise ``StoreUnavailableError`` when the backend cannot serve requests right now."""

    async def schema_status(self) -> SchemaStatus | None:
        """The agent tables' versioned schema; None for backends without one (memory, Redis)."""
        return None

    async def migrate(self) -> SchemaStatus | None:
        """Apply pending agent-table migrations (idempotent, safe to run from several replicas)."""
        return None

    # --- agents and versions ---------------------------------------------------------

    @abc.abstractmethod
    async def create_agent(
        self, tenant: str, name: str, definition: dict[str, Any], created_by: str = ""
    ) -> AgentVersionRecord:
        """Create the agent with ``definition`` as its first version and return that version.

        ``AgentExistsError`` when a live agent has the name. A deleted name may be created
        again: it starts without aliases, and its version numbers continue after the
        newest one it ever had (never 1 again).
        """

    @abc.abstractmethod
    async def update_agent(
        self,
        tenant: str,
        name: str,
        definition: dict[str, Any],
        *,
        expected_version: int | None = None,
        created_by: str = "",
    ) -> AgentVersionRecord:
        """Add the next version and return it; ``AgentNotFoundError`` for a missing (or deleted) agent.

        With ``expected_version`` (at least 1), ``VersionConflictError`` unless it is the
        latest version: nothing is written then.
        """

    @abc.abstractmethod
    async def get_agent(self, tenant: str, name: str) -> tuple[AgentRecord, AgentVersionRecord]:
        """The live agent and its latest version, read together; ``AgentNotFoundError`` otherwise."""

    @abc.abstractmethod
    async def get_version(self, tenant: str, name: str, version: int) -> AgentVersionRecord:
        """One version, also of a deleted agent; ``AgentVersionNotFoundError`` when there is none."""

    @abc.abstractmethod
    async def list_agents(self, tenant: str, limit: int, cursor: str = "") -> tuple[list[AgentRecord], str]:
        """``tenant``'s live agents by name (code point order), ``limit`` at a time; the
        cursor of the next page, ``""`` after the last one."""

    @abc.abstractmethod
    async def list_versions(
        self, tenant: str, name: str, limit: int, before_version: int = 0
    ) -> list[AgentVersionRecord]:
        """A live agent's versions newest first, below ``before_version`` (0: from the
        newest), at most ``limit``; ``AgentNotFoundError`` for a missing or deleted agent.
        Versions made before a delete and re-create are listed too."""

    @abc.abstractmethod
    async def delete_agent(self, tenant: str, name: str) -> None:
        """Soft delete: gone from ``get_agent``, listings and ``tenants``, its aliases removed,
        its versions kept for ``get_version``; ``AgentNotFoundError`` when not live."""

    @abc.abstractmethod
    async def tenants(self) -> list[str]:
        """Every tenant with at least one live agent, sorted: with ``list_agents``, a full reload."""

    # --- aliases ---------------------------------------------------------------------

    @abc.abstractmethod
    async def set_alias(
        self, tenant: str, agent: str, alias: str, routes: Iterable[Sequence[int]]
    ) -> AliasRecord:
        """Create or replace an alias of a live agent (``AgentNotFoundError`` otherwise).

        ``routes``: (version, weight) pairs (see ``check_routes``: ``ValueError`` when they
        are malformed); ``AgentVersionNotFoundError`` naming the first version that does not
        exist.
        """

    @abc.abstractmethod
    async def get_alias(self, tenant: str, agent: str, alias: str) -> AliasRecord:
        """``AgentNotFoundError`` for a missing or deleted agent, ``AliasNotFoundError`` for a missing alias."""

    @abc.abstractmethod
    async def list_aliases(self, tenant: str, agent: str) -> list[AliasRecord]:
        """A live agent's aliases by alias name; ``AgentNotFoundError`` otherwise."""

    @abc.abstractmethod
    async def delete_alias(self, tenant: str, agent: str, alias: str) -> None:
        """``AgentNotFoundError`` / ``AliasNotFoundError`` as ``get_alias``."""

    # --- change feed -----------------------------------------------------------------

    @abc.abstractmethod
    async def revision(self) -> int:
        """The store-wide write counter (0 before the first write): one round trip, no scan."""

    @abc.abstractmethod
    async def changed_since(self, revision: int) -> Changes:
        """(the current revision, the (tenant, agent) pairs written after ``revision``, each
        once, in order of first change); the list is None — reload everything — when more
        than ``CHANGE_FEED_LIMIT`` writes happened since, or ``revision`` is ahead of the
        store's (its data was replaced). One round trip, one consistent snapshot."""
