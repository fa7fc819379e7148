"""The caller of an RPC as agentd sees it, and the scopes a caller may hold."""

from __future__ import annotations

import contextvars
import enum
from dataclasses import dataclass, field

from agentd.server.tenancy import DEFAULT_TENANT


class Scope(str, enum.Enum):
    """What a principal may do. ``admin`` implies every other scope and may act in any tenant."""

    AGENTS_READ = "agents:read"
    AGENTS_WRITE = "agents:write"  # create, update and delete the tenant's agents and aliases
    RUNS_READ = "runs:read"  # GetRun, ListRuns, WatchRun
    RUNS_WRITE = "runs:write"  # start, cancel, answer tool calls and approvals
    SESSIONS_READ = "sessions:read"
    SESSIONS_WRITE = "sessions:write"
    TRACES_READ = "traces:read"
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


def parse_scopes(values: list[str] | tuple[str, ...] | str) -> frozenset[Scope]:
    """Scope names (a list, or one space-separated string as in OAuth's ``scope`` claim).

    Names agentd does not know are ignored: a token minted for several services carries
    scopes of the others too.
    """
    names = values.split() if isinstance(values, str) else list(values)
    known = {scope.value: scope for scope in Scope}
    return frozenset(known[name] for name in names if isinstance(name, str) and name in known)


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is calling: ``subject`` (a user or service), the ``tenant`` owning what it touches, its scopes.

    ``method`` says how it was established (``api_key``, ``jwt``, ``mtls``, ``none``), for
    audit lines; ``key_id`` names the API key or certificate, never a secret.
    """

    subject: str
    tenant: str
    scopes: frozenset[Scope] = field(default_factory=frozenset)
    method: str = "none"
    key_id: str = ""

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes

    @property
    def is_admin(self) -> bool:
        return Scope.ADMIN in self.scopes

    def acting_in(self, tenant: str) -> "Principal":
        """The same caller acting in another tenant (admins only; checked by the interceptor)."""
        return Principal(self.subject, tenant, self.scopes, self.method, self.key_id)

    def to_dict(self) -> dict[str, object]:
        return {
            "subject": self.subject, "tenant": self.tenant, "scopes": sorted(s.value for s in self.scopes),
            "method": self.method, "key_id": self.key_id,
        }

    @classmethod
    def from_dict(cls, data: dict[str, object]) -> "Principal":
        scopes = data.get("scopes") or []
        return cls(
            subject=str(data.get("subject", "")), tenant=str(data.get("tenant", DEFAULT_TENANT)),
            scopes=parse_scopes(scopes if isinstance(scopes, (list, tuple, str)) else []),
            method=str(data.get("method", "none")), key_id=str(data.get("key_id", "")),
        )


# The caller on a server with no authentication configured (allowed on loopback only, or
# with the explicit insecure flag): one tenant, every scope.
ANONYMOUS = Principal(subject="anonymous", tenant=DEFAULT_TENANT, scopes=ALL_SCOPES, method="none")

_CURRENT: contextvars.ContextVar[Principal] = contextvars.ContextVar("agentd_principal", default=ANONYMOUS)


def current_principal() -> Principal:
    """The principal of the RPC being served (each RPC runs in its own task and context)."""
    return _CURRENT.get()


def set_current_principal(principal: Principal) -> None:
    _CURRENT.set(principal)
