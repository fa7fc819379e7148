"""The run store's Lua scripts, ``scripts/*.lua``, read once at import and called by SHA.

Each script is ``scripts/_prelude.lua`` (the key names and helpers they all share: the
key base arrives as ``ARGV[1]``) followed by its own file, which opens with its KEYS,
ARGV and reply.
"""

from __future__ import annotations

from importlib.resources import files

from agentd.server.redis_common import LuaScript

__all__ = [
    "CANCEL", "CLAIM", "CREATE", "FINISH", "LIST", "PROGRESS", "RELEASE", "RENEW", "REQUEUE", "SCRIPTS", "SUBMIT",
    "SWEEP",
]

_DIR = files(__package__).joinpath("scripts")


def _read(name: str) -> str:
    return _DIR.joinpath(f"{name}.lua").read_text(encoding="utf-8")


_PRELUDE = _read("_prelude")


def _script(name: str) -> LuaScript:
    # A blank line before and after the prelude: each script's text, hence its SHA, stays as it has been.
    return LuaScript(f"\n{_PRELUDE}\n{_read(name)}")


CREATE = _script("create")
CLAIM = _script("claim")
RENEW = _script("renew")
PROGRESS = _script("progress")
FINISH = _script("finish")
RELEASE = _script("release")
REQUEUE = _script("requeue")
CANCEL = _script("cancel")
SUBMIT = _script("submit")
LIST = _script("list")
SWEEP = _script("sweep")
SCRIPTS = (CREATE, CLAIM, RENEW, PROGRESS, FINISH, RELEASE, REQUEUE, CANCEL, SUBMIT, LIST, SWEEP)
