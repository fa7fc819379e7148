"""The session store's Lua scripts, ``scripts/*.lua``, read once at import and called by SHA.

Every per-session script is ``scripts/_prelude.lua`` (its KEYS: info, items, state,
meta, requests; ARGV[1]: now; and the helpers they share) followed by its own file,
which opens with its ARGV and reply. ``zfix.lua``, index maintenance on one sorted set,
is not a session script: it stands alone.
"""

from __future__ import annotations

from importlib.resources import files

from agentd.server.redis_common import LuaScript

__all__ = [
    "APPEND", "CLEAR", "CREATE", "DELETE", "GET", "HISTORY", "LIST_ITEMS", "POP", "REAP", "SCRIPTS", "UPDATE", "ZFIX",
]

_CHUNK = 1000  # values per command inside scripts: Lua's unpack() has a stack limit

_DIR = files(__package__).joinpath("scripts")


def _read(name: str) -> str:
    return _DIR.joinpath(f"{name}.lua").read_text(encoding="utf-8")


_PRELUDE = _read("_prelude")


def _session_script(name: str) -> LuaScript:
    # A blank line before and after the prelude: each script's text, hence its SHA, stays as it has been.
    return LuaScript(f"\n{_PRELUDE}\n{_read(name)}")


CREATE = _session_script("create")
GET = _session_script("get")
HISTORY = _session_script("history")
APPEND = _session_script("append")
LIST_ITEMS = _session_script("list_items")
UPDATE = _session_script("update")
POP = _session_script("pop")
CLEAR = _session_script("clear")
DELETE = _session_script("delete")
REAP = _session_script("reap")
ZFIX = LuaScript(f"\n{_read('zfix')}")
SCRIPTS = (CREATE, GET, HISTORY, APPEND, LIST_ITEMS, UPDATE, POP, CLEAR, DELETE, REAP, ZFIX)
