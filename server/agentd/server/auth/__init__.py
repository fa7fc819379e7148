"""Who is calling: the principal, the ways to establish it, and the gRPC interceptor that does.

- ``principal``: ``Principal`` (subject, tenant, scopes) and the scope names.
- ``methods``: the scope each RPC needs, in one table.
- ``api_keys``, ``jwt_bearer``, ``mtls``: one ``Authenticator`` each.
- ``interceptor``: establishes the principal for every RPC, streaming ones included.
- ``tls``: server credentials whose certificate files are re-read when they change.
- ``factory``: builds all of it from ``Settings``.

Nothing here imports generated protobuf code except the interceptor, which sits at the
gRPC edge with the services.
"""

from agentd.server.auth.principal import ANONYMOUS, DEFAULT_TENANT, Principal, Scope, current_principal

__all__ = ["ANONYMOUS", "DEFAULT_TENANT", "Principal", "Scope", "current_principal"]
