"""The thin agentd client: typed run events, sessions and traces over gRPC (grpcio + protobuf only)."""

from agentd.client._requests import python_value
from agentd.client.async_client import AgentdClient, RunStream
from agentd.client.errors import RunCancelledError, RunError, RunFailedError
from agentd.client.sync_client import SyncAgentdClient, SyncRunStream

__all__ = [
    "AgentdClient",
    "RunStream",
    "SyncAgentdClient",
    "SyncRunStream",
    "RunError",
    "RunFailedError",
    "RunCancelledError",
    "python_value",
]
