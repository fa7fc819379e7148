"""Agent definitions as versioned data, stored beside the sessions.

``base.py`` holds the ``AgentStore`` interface, its records and errors; ``memory.py`` the
reference engine; ``sqlite/``, ``postgres/`` and ``redis/`` the persistent engines, each a
package with its ``.sql`` migrations or ``.lua`` scripts beside its Python; ``factory.py``
builds the one the settings select (``build_agent_store``).
"""

from agentd.server.agents.store.base import (
    CHANGE_FEED_LIMIT,
    AgentExistsError,
    AgentNotFoundError,
    AgentRecord,
    AgentStore,
    AgentVersionNotFoundError,
    AgentVersionRecord,
    AliasNotFoundError,
    AliasRecord,
    VersionConflictError,
)

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
    "VersionConflictError",
]
