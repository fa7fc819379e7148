"""The agent store's Lua scripts, ``scripts/*.lua``, read once at import and called by SHA.

Every per-agent script is ``scripts/_prelude.lua`` (its KEYS, ARGV[1..2]: tenant and name,
and the helpers they share) followed by its own file, which opens with its ARGV and
reply. ``list.lua`` (one tenant's listing) and ``changes.lua`` (the change feed) are not
per-agent: they stand alone.
"""

from __future__ import annotations

from agentd.server.redis_common import ScriptFolder

__all__ = [
    "ALIAS", "ALIASES", "CHANGES", "CREATE", "DELETE", "DELETE_ALIAS", "GET", "LIST", "SCRIPTS", "SET_ALIAS", "UPDATE",
    "VERSIONS",
]

_FOLDER = ScriptFolder(__package__)
_agent_script = _FOLDER.with_prelude

CREATE = _agent_script("create")
UPDATE = _agent_script("update")
DELETE = _agent_script("delete")
SET_ALIAS = _agent_script("set_alias")
DELETE_ALIAS = _agent_script("delete_alias")
GET = _agent_script("get")
VERSIONS = _agent_script("versions")
ALIAS = _agent_script("alias")
ALIASES = _agent_script("aliases")
LIST = _FOLDER.alone("list")
CHANGES = _FOLDER.alone("changes")
SCRIPTS = (CREATE, UPDATE, DELETE, SET_ALIAS, DELETE_ALIAS, GET, VERSIONS, ALIAS, ALIASES, LIST, CHANGES)
