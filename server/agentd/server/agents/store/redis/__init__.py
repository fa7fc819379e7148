"""Agent store on Redis (standalone, Sentinel or Cluster), beside the sessions under the
same key prefix.

Every operation that reads and then writes is one Lua script called by SHA: one round
trip, atomic, its checks before its first write, so a refused write leaves nothing. All
agent keys share one hash tag, ``{<prefix>:agents}``, so a script may touch any of them,
in Cluster too (where all agents therefore live in one slot: they are few and small):

    <prefix>:{<prefix>:agents}:revision              STRING  the store-wide write counter
    <prefix>:{<prefix>:agents}:changes               LIST    "<revision>:<tenant>:<name>" per
                                                             write, newest first, the newest
                                                             1000 (``CHANGE_FEED_LIMIT``)
    <prefix>:{<prefix>:agents}:tenants               ZSET    tenants with live agents (score 0)
    <prefix>:{<prefix>:agents}:agent:<t>:<name>      HASH    latest_version, create_time,
                                                             update_time, deleted ("1" once
                                                             soft-deleted; the key stays, so
                                                             numbering continues)
    <prefix>:{<prefix>:agents}:versions:<t>:<name>   HASH    version -> JSON [create_time,
                                                             created_by, definition]
    <prefix>:{<prefix>:agents}:aliases:<t>:<name>    HASH    alias -> JSON [update_time,
                                                             [[version, weight], ...]]
    <prefix>:{<prefix>:agents}:index:<t>             ZSET    the tenant's live agent names
                                                             (score 0: listed by name)

Tenants cannot contain ``:`` (``tenancy.TENANT_RE``), so the key of (tenant, name) is
unambiguous. Times travel as ``repr(float)`` and are never formatted by Lua, so they
round-trip exactly. The index and ``tenants`` are written by the same scripts as the
agents, so they are exact, never hints.

Retries follow ``redis_common.RetryPolicy``: reads are retried on connection errors and
once after a timeout; writes only on errors that prove Redis refused them unexecuted
(a resent update would make a second version), else ``StoreUnavailableError``.

The package: ``store.py`` (``RedisAgentStore``); ``lua.py`` loads ``scripts/*.lua``.
"""

from agentd.server.agents.store.redis.store import RedisAgentStore

__all__ = ["RedisAgentStore"]
