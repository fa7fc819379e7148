"""Client certificates mapped to principals: for services that authenticate with mTLS alone.

TLS has already verified the certificate against the client CA; this maps its identity
(the subject common name, or any DNS/URI subject alternative name) to a tenant and
scopes, from a JSON file::

    {"identities": [{"match": "billing.svc.internal", "tenant": "acme", "scopes": ["runs:write"]}]}

A verified certificate that no entry matches is UNAUTHENTICATED: the CA vouches for who
the caller is, the file says what it may do.
"""

from __future__ import annotations

import json
from pathlib import Path

from agentd.server.auth.base import AuthenticationError, Authenticator, Credentials
from agentd.server.auth.principal import Principal, Scope, parse_scopes
from agentd.server.tenancy import valid_tenant


def load_identities(path: Path) -> dict[str, tuple[str, frozenset[Scope]]]:
    data = json.loads(path.read_text(encoding="utf-8"))
    entries = data.get("identities") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{path}: expected an object with an 'identities' list")
    mapping: dict[str, tuple[str, frozenset[Scope]]] = {}
    for index, raw in enumerate(entries):
        if not isinstance(raw, dict) or not raw.get("match") or not raw.get("tenant"):
            raise ValueError(f"{path}: identities[{index}] needs 'match' and 'tenant'")
        if not valid_tenant(str(raw["tenant"])):
            raise ValueError(f"{path}: identities[{index}].tenant must be 1-64 characters of A-Z a-z 0-9 . _ -")
        scopes = raw.get("scopes", [])
        mapping[str(raw["match"])] = (str(raw["tenant"]), parse_scopes(scopes if isinstance(scopes, list) else []))
    return mapping


class MtlsAuthenticator(Authenticator):
    name = "mtls"

    def __init__(self, identities: dict[str, tuple[str, frozenset[Scope]]]) -> None:
        self._identities = identities

    def accepts(self, credentials: Credentials) -> bool:
        return bool(credentials.certificate_identities) and not credentials.bearer

    async def authenticate(self, credentials: Credentials) -> Principal:
        for identity in credentials.certificate_identities:
            found = self._identities.get(identity)
            if found is not None:
                tenant, scopes = found
                return Principal(identity, tenant, scopes, method=self.name, key_id=identity[:128])
        raise AuthenticationError("the client certificate is valid but not mapped to a tenant on this server")
