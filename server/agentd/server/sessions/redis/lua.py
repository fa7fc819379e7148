"""The session store's Lua scripts, ``scripts/*.lua``, read once at import and called by SHA.

Every per-session script is ``scripts/_prelude.lua`` (its KEYS: info, items, state,
meta, requests; ARGV[1]: now; and the helpers they share) followed by its own file,
which opens with its ARGV and reply. ``zfix.lua``, index maintenance on one sorted set,
is not a session script: it stands alone.
"""

from __future__ import annotations

from agentd.server.redis_common import ScriptFolder

__all__ = [
    "APPEND", "CLEAR", "CREATE", "DELETE", "DROP_THROUGH", "GET", "HISTORY", "LIST_ITEMS", "POP", "REAP", "SCRIPTS",
    "UPDATE", "ZFIX",
]

_CHUNK = 1000  # values per command inside scripts: Lua's unpack() has a stack limit

_FOLDER = ScriptFolder(__package__)
_session_script = _FOLDER.with_prelude

CREATE = _session_script("create")
GET = _session_script("get")
HISTORY = _session_script("history")
APPEND = _session_script("append")
LIST_ITEMS = _session_script("list_items")
UPDATE = _session_script("update")
POP = _session_script("pop")
CLEAR = _session_script("clear")
DROP_THROUGH = _session_script("drop_through")
DELETE = _session_script("delete")
REAP = _session_script("reap")
ZFIX = _FOLDER.alone("zfix")
SCRIPTS = (CREATE, GET, HISTORY, APPEND, LIST_ITEMS, UPDATE, POP, CLEAR, DROP_THROUGH, DELETE, REAP, ZFIX)
