"""The thin agentd client: typed run events, sessions and traces over gRPC (grpcio + protobuf only).

One client can address several replicas (round-robin, retries of idempotent calls)
and its run streams resume across broken connections; see ``AgentdClient``.
"""

from agentd.client._requests import python_value
from agentd.client._security import TlsConfig
from agentd.client.async_client import AgentdClient, RunStream
from agentd.client.errors import (
    AgentdRpcError,
    FieldViolation,
    RunCancelledError,
    RunError,
    RunFailedError,
    RunStreamError,
    RunStreamGapError,
    SyncAgentdRpcError,
    error_reason,
)
from agentd.client.sync_client import SyncAgentdClient, SyncRunStream

__all__ = [
    "AgentdClient",
    "RunStream",
    "SyncAgentdClient",
    "SyncRunStream",
    "RunError",
    "RunFailedError",
    "RunCancelledError",
    "RunStreamError",
    "RunStreamGapError",
    "AgentdRpcError",
    "SyncAgentdRpcError",
    "FieldViolation",
    "error_reason",
    "python_value",
    "TlsConfig",
]
