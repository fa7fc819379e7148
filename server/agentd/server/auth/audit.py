"""One audit line per mutating call: who, what, outcome — never content.

Written to the ``agentd.audit`` logger (JSON fields with ``AGENTD_LOG_FORMAT=json``):
``subject``, ``tenant``, ``auth`` (how the caller authenticated), ``key_id``, ``method``,
``resource`` (the resource names the request carries: run, session, agent), ``outcome``
(the status code name). Inputs, items, tool outputs and tokens are never logged.
"""

from __future__ import annotations

import logging
from typing import Any

from agentd.server.auth.principal import Principal

log = logging.getLogger("agentd.audit")

_RESOURCE_FIELDS = ("name", "session", "parent")
_MAX_RESOURCE_CHARS = 200


def resource_of(request: Any) -> str:
    """The resource names a request carries (``name``, ``session``, ``start.agent``/``start.session``)."""
    if request is None or not hasattr(request, "DESCRIPTOR"):  # none, or a request that did not decode
        return ""
    found: list[str] = []
    fields = request.DESCRIPTOR.fields_by_name
    for field in _RESOURCE_FIELDS:
        if field in fields and isinstance(getattr(request, field), str) and getattr(request, field):
            found.append(getattr(request, field))
    if "session_id" in fields and request.session_id:  # CreateSession names the session it makes
        found.append(f"sessions/{request.session_id}")
    if "start" in fields and request.HasField("start"):
        start = request.start
        found.extend(value for value in (start.agent, start.session) if value)
    return ",".join(found)[:_MAX_RESOURCE_CHARS]


def audit(principal: Principal, method: str, resource: str, outcome: str) -> None:
    if not log.isEnabledFor(logging.INFO):
        return
    fields = {
        "subject": principal.subject, "tenant": principal.tenant, "auth": principal.method,
        "key_id": principal.key_id, "method": method, "resource": resource, "outcome": outcome,
    }
    log.info(
        "audit %s %s by %s@%s: %s", method.rsplit("/", 1)[-1], resource or "-", principal.subject,
        principal.tenant, outcome, extra=fields,
    )
