"""The run store's Lua scripts, ``scripts/*.lua``, read once at import and called by SHA.

Each script is ``scripts/_prelude.lua`` (the key names and helpers they all share: the
key base arrives as ``ARGV[1]``) followed by its own file, which opens with its KEYS,
ARGV and reply.
"""

from __future__ import annotations

from agentd.server.redis_common import ScriptFolder

__all__ = [
    "ANSWER", "CANCEL", "CLAIM", "CREATE", "FINISH", "LIST", "PROGRESS", "RELEASE", "RENEW", "REQUEUE", "SCRIPTS", "SUBMIT",
    "SWEEP",
]

_script = ScriptFolder(__package__).with_prelude

CREATE = _script("create")
CLAIM = _script("claim")
RENEW = _script("renew")
PROGRESS = _script("progress")
FINISH = _script("finish")
RELEASE = _script("release")
REQUEUE = _script("requeue")
CANCEL = _script("cancel")
SUBMIT = _script("submit")
ANSWER = _script("answer")
LIST = _script("list")
SWEEP = _script("sweep")
SCRIPTS = (CREATE, CLAIM, RENEW, PROGRESS, FINISH, RELEASE, REQUEUE, CANCEL, SUBMIT, ANSWER, LIST, SWEEP)
