"""Tenants: how a caller's ids become store keys that no other tenant can reach.

Every id a caller names — a session id, a run's request id — is qualified by the
caller's tenant before it reaches a store: ``scoped("acme", "alice") == "acme/alice"``.
Two tenants may both own ``sessions/alice`` and both use request id ``r-1``; they name
different keys, so neither can read, list, write or even detect the other's. Session ids
cannot contain ``/`` (validation), so the qualified form is unambiguous.

The default tenant's ids are stored unqualified: data written before tenants existed
(and every server with authentication off) is the default tenant's without migrating a
row. Run ids are server-made and global; a run records its tenant, and a run of another
tenant answers exactly as a missing one does. Callers never see the qualified form:
the services turn ids back with ``local`` before answering.
"""

from __future__ import annotations

import re

DEFAULT_TENANT = "default"
SEPARATOR = "/"
TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def valid_tenant(tenant: str) -> bool:
    return bool(TENANT_RE.match(tenant))


def scoped(tenant: str, local_id: str) -> str:
    """The store key of ``local_id`` in ``tenant``."""
    return local_id if tenant == DEFAULT_TENANT else f"{tenant}{SEPARATOR}{local_id}"


def tenant_of(scoped_id: str) -> str:
    tenant, separator, _ = scoped_id.partition(SEPARATOR)
    return tenant if separator else DEFAULT_TENANT


def local(scoped_id: str) -> str:
    """The id as its tenant knows it (the inverse of ``scoped``)."""
    _, separator, rest = scoped_id.partition(SEPARATOR)
    return rest if separator else scoped_id


def in_tenant(scoped_id: str, tenant: str) -> bool:
    return tenant_of(scoped_id) == tenant


def key_range(tenant: str) -> tuple[str, str] | None:
    """For stores that list by key: ids of ``tenant`` are ``>= low`` and ``< high`` (None for
    the default tenant, whose ids are the ones without a separator)."""
    if tenant == DEFAULT_TENANT:
        return None
    return f"{tenant}{SEPARATOR}", f"{tenant}{chr(ord(SEPARATOR) + 1)}"
