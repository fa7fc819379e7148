"""The scope each RPC needs, and which RPCs change something (those get an audit line).

One table, checked by a test against the services' descriptors, so a new RPC cannot be
added without deciding who may call it: an RPC missing here is refused.
"""

from __future__ import annotations

from agentd.server.auth.principal import Scope

_AGENTS = "/agentd.v1.AgentService/"
_SESSIONS = "/agentd.v1.SessionService/"
_TRACES = "/agentd.v1.TraceService/"
_STATS = "/agentd.v1.StatsService/"

METHOD_SCOPES: dict[str, Scope] = {
    _AGENTS + "ListAgents": Scope.AGENTS_READ,
    _AGENTS + "GetAgent": Scope.AGENTS_READ,
    _AGENTS + "ListAgentVersions": Scope.AGENTS_READ,
    _AGENTS + "ListAgentAliases": Scope.AGENTS_READ,
    _AGENTS + "CreateAgent": Scope.AGENTS_WRITE,
    _AGENTS + "UpdateAgent": Scope.AGENTS_WRITE,
    _AGENTS + "DeleteAgent": Scope.AGENTS_WRITE,
    _AGENTS + "SetAgentAlias": Scope.AGENTS_WRITE,
    _AGENTS + "DeleteAgentAlias": Scope.AGENTS_WRITE,
    _AGENTS + "Run": Scope.RUNS_WRITE,
    _AGENTS + "StreamRun": Scope.RUNS_WRITE,
    _AGENTS + "CreateRun": Scope.RUNS_WRITE,
    _AGENTS + "CancelRun": Scope.RUNS_WRITE,
    _AGENTS + "SubmitToolOutputs": Scope.RUNS_WRITE,
    _AGENTS + "ApproveToolCall": Scope.RUNS_WRITE,
    _AGENTS + "GetRun": Scope.RUNS_READ,
    _AGENTS + "ListRuns": Scope.RUNS_READ,
    _AGENTS + "WatchRun": Scope.RUNS_READ,
    _SESSIONS + "CreateSession": Scope.SESSIONS_WRITE,
    _SESSIONS + "UpdateSession": Scope.SESSIONS_WRITE,
    _SESSIONS + "DeleteSession": Scope.SESSIONS_WRITE,
    _SESSIONS + "AddSessionItems": Scope.SESSIONS_WRITE,
    _SESSIONS + "PopSessionItem": Scope.SESSIONS_WRITE,
    _SESSIONS + "ClearSessionItems": Scope.SESSIONS_WRITE,
    _SESSIONS + "GetSession": Scope.SESSIONS_READ,
    _SESSIONS + "ListSessions": Scope.SESSIONS_READ,
    _SESSIONS + "ListSessionItems": Scope.SESSIONS_READ,
    _TRACES + "ListTraces": Scope.TRACES_READ,
    _TRACES + "GetTrace": Scope.TRACES_READ,
    # Aggregates of the same traces: who may read traces may read their stats.
    _STATS + "GetStats": Scope.TRACES_READ,
    # Every tenant's load (counts only) on the replica: an operator's view.
    _STATS + "GetLiveStats": Scope.ADMIN,
}

MUTATING = frozenset(method for method, scope in METHOD_SCOPES.items() if scope.value.endswith(":write"))

# Open to every caller: load balancers and Kubernetes probe health without credentials.
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = ("/grpc.reflection.v1alpha.ServerReflection/", "/grpc.reflection.v1.ServerReflection/")
