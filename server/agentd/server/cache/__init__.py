"""The result cache: the end of completed runs, kept for identical requests of agents that opt in.

``base.py`` holds the ``ResultCache`` interface (get, put with a TTL, sweep, counts; the
bounds), ``key.py`` the request key (SHA-256 of canonical JSON) and the agents' fingerprint,
``memory.py`` the reference engine, ``sqlite/``, ``postgres/`` and ``redis/`` the persistent
ones (each beside the session store of the same settings), ``factory.py`` builds the one the
settings select, ``upkeep.py`` sweeps expired entries. Which runs are looked up and stored,
and what a hit emits, is ``agentd.server.runs.cached``; the opt-in is
``runtime.agent.ResultCaching``.
"""

from agentd.server.cache.base import CacheCounts, CachedResult, ResultCache

__all__ = ["CacheCounts", "CachedResult", "ResultCache"]
