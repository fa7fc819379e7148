"""``RedisAgentStore``: agents in Redis, one Lua script per operation (see the package
docstring for the keys, what is atomic and retries)."""

from __future__ import annotations

import json
import time
from typing import Any, Iterable, Sequence

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
    Changes,
    VersionConflictError,
    check_limit,
    check_name,
    check_revision,
    check_routes,
    check_tenant,
    decode_cursor,
    dedupe,
    dump_definition,
    dump_routes,
    encode_cursor,
    load_definition,
)
from agentd.server.agents.store.redis import lua
from agentd.server.redis_common import LuaScript, RedisClient, RedisEngine, text, utf8

__all__ = ["RedisAgentStore"]

_MAX_VERSION = 2**63 - 1  # what the SQL stores' versions can reach


def _version_value(now: float, created_by: str, definition_json: str) -> str:
    """A version as stored: JSON [create_time, created_by, definition] (the definition verbatim)."""
    return f"[{now!r},{json.dumps(created_by)},{definition_json}]"


def _version(tenant: str, name: str, version: int, value: bytes) -> AgentVersionRecord:
    create_time, created_by, definition = json.loads(value)
    return AgentVersionRecord(tenant, name, version, definition, float(create_time), created_by)


def _alias(tenant: str, agent: str, alias: str, value: bytes) -> AliasRecord:
    update_time, routes = json.loads(value)
    return AliasRecord(tenant, agent, alias, tuple((int(v), int(w)) for v, w in routes), float(update_time))


class RedisAgentStore(RedisEngine, AgentStore):
    """Agents in Redis; any number of replicas share one prefix (the session store's).

    ``client`` is owned by the store from now on (``close`` closes it). Build it with
    ``connect_redis``: a client with redis-py's own per-command retries would also resend
    writes whose outcome is unknown.
    """

    backend = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "agentd",
        location: str = "",
        timeout_s: float = 5.0,
    ) -> None:
        super().__init__(
            client, what="redis agent store", lua=lua, prefix=prefix, location=location, timeout_s=timeout_s
        )
        base = f"{prefix}:{{{prefix}:agents}}:"
        self._base_str = base
        self._base = utf8(base)
        self._revision_key = self._base + b"revision"
        self._changes_key = self._base + b"changes"
        self._tenants_key = self._base + b"tenants"

    @property
    def key_base(self) -> str:
        """Every agent key starts with this (it carries the one hash tag)."""
        return self._base_str

    # --- keys and plumbing ------------------------------------------------------------

    def _index_key(self, tenant: str) -> bytes:
        return self._base + b"index:" + utf8(tenant)

    def _keys(self, tenant: str, name: str) -> tuple[bytes, ...]:
        """The KEYS of every per-agent script (``scripts/_prelude.lua``)."""
        own = utf8(f"{tenant}:{name}")
        return (
            self._revision_key,
            self._changes_key,
            self._tenants_key,
            self._base + b"agent:" + own,
            self._base + b"versions:" + own,
            self._base + b"aliases:" + own,
            self._index_key(tenant),
        )

    async def _script(self, script: LuaScript, tenant: str, name: str, *args: Any, idempotent: bool) -> Any:
        keys = self._keys(tenant, name)
        argv = (tenant, name, *args)
        return await self._run(lambda: self._eval(script, keys, argv), idempotent=idempotent)

    # lifecycle (open, close, ping) and location: RedisEngine's

    # --- agents and versions ---------------------------------------------------------

    async def create_agent(
        self, tenant: str, name: str, definition: dict[str, Any], created_by: str = ""
    ) -> AgentVersionRecord:
        check_tenant(tenant)
        check_name("an agent name", name)
        definition_json = dump_definition(definition)
        now = time.time()
        value = _version_value(now, created_by, definition_json)
        version = await self._script(lua.CREATE, tenant, name, repr(now), value, idempotent=False)
        if version == 0:
            raise AgentExistsError(tenant, name)
        return AgentVersionRecord(tenant, name, int(version), load_definition(definition_json), now, created_by)

    async def update_agent(
        self,
        tenant: str,
        name: str,
        definition: dict[str, Any],
        *,
        expected_version: int | None = None,
        created_by: str = "",
    ) -> AgentVersionRecord:
        check_tenant(tenant)
        if expected_version is not None and expected_version < 1:
            raise ValueError(f"expected_version starts at 1, got {expected_version}")
        definition_json = dump_definition(definition)
        now = time.time()
        value = _version_value(now, created_by, definition_json)
        expected = "" if expected_version is None else str(int(expected_version))
        version = await self._script(lua.UPDATE, tenant, name, repr(now), value, expected, idempotent=False)
        if version == 0:
            raise AgentNotFoundError(tenant, name)
        if version < 0:
            assert expected_version is not None
            raise VersionConflictError(tenant, name, expected_version, -version)
        return AgentVersionRecord(tenant, name, int(version), load_definition(definition_json), now, created_by)

    async def get_agent(self, tenant: str, name: str) -> tuple[AgentRecord, AgentVersionRecord]:
        check_tenant(tenant)
        reply = await self._script(lua.GET, tenant, name, idempotent=True)
        if reply is None:
            raise AgentNotFoundError(tenant, name)
        latest, create_time, update_time, value = reply
        version = int(latest)
        return (
            AgentRecord(tenant, name, version, float(create_time), float(update_time)),
            _version(tenant, name, version, value),
        )

    async def get_version(self, tenant: str, name: str, version: int) -> AgentVersionRecord:
        check_tenant(tenant)
        if not 1 <= version <= _MAX_VERSION:
            raise AgentVersionNotFoundError(tenant, name, version)
        key = self._keys(tenant, name)[4]
        value = await self._run(lambda: self._client.hget(key, str(version)), idempotent=True)
        if value is None:
            raise AgentVersionNotFoundError(tenant, name, version)
        return _version(tenant, name, version, value)

    async def list_agents(self, tenant: str, limit: int, cursor: str = "") -> tuple[list[AgentRecord], str]:
        check_tenant(tenant)
        check_limit(limit)
        after = decode_cursor(cursor)
        keys = (self._index_key(tenant),)
        args = (self._base + utf8(f"agent:{tenant}:"), utf8(after), limit + 1)
        rows = await self._run(lambda: self._eval(lua.LIST, keys, args), idempotent=True)
        records = [
            AgentRecord(tenant, text(n), int(latest), float(created), float(updated))
            for n, latest, created, updated in rows[:limit]
        ]
        return records, encode_cursor(records[-1].name) if len(rows) > limit else ""

    async def list_versions(
        self, tenant: str, name: str, limit: int, before_version: int = 0
    ) -> list[AgentVersionRecord]:
        check_tenant(tenant)
        check_limit(limit)
        if before_version < 0:
            raise ValueError(f"before_version must be 0 (from the newest) or a version, got {before_version}")
        below = min(before_version, _MAX_VERSION)
        reply = await self._script(lua.VERSIONS, tenant, name, below, min(limit, _MAX_VERSION), idempotent=True)
        if reply is None:
            raise AgentNotFoundError(tenant, name)
        top, values = reply
        return [_version(tenant, name, int(top) - i, value) for i, value in enumerate(values)]

    async def delete_agent(self, tenant: str, name: str) -> None:
        check_tenant(tenant)
        if not await self._script(lua.DELETE, tenant, name, repr(time.time()), idempotent=False):
            raise AgentNotFoundError(tenant, name)

    async def tenants(self) -> list[str]:
        members = await self._run(lambda: self._client.zrange(self._tenants_key, 0, -1), idempotent=True)
        return [text(member) for member in members]

    # --- aliases ---------------------------------------------------------------------

    async def set_alias(
        self, tenant: str, agent: str, alias: str, routes: Iterable[Sequence[int]]
    ) -> AliasRecord:
        check_tenant(tenant)
        check_name("an alias name", alias)
        checked = check_routes(routes)
        now = time.time()
        value = f"[{now!r},{dump_routes(checked)}]"
        versions = [min(version, _MAX_VERSION) for version, _ in checked]
        result = await self._script(lua.SET_ALIAS, tenant, agent, alias, value, *versions, idempotent=False)
        if result == 0:
            raise AgentNotFoundError(tenant, agent)
        if result < 0:
            raise AgentVersionNotFoundError(tenant, agent, checked[-result - 1][0])
        return AliasRecord(tenant, agent, alias, checked, now)

    async def get_alias(self, tenant: str, agent: str, alias: str) -> AliasRecord:
        check_tenant(tenant)
        reply = await self._script(lua.ALIAS, tenant, agent, alias, idempotent=True)
        if reply is None:
            raise AgentNotFoundError(tenant, agent)
        if reply == 0:
            raise AliasNotFoundError(tenant, agent, alias)
        return _alias(tenant, agent, alias, reply)

    async def list_aliases(self, tenant: str, agent: str) -> list[AliasRecord]:
        check_tenant(tenant)
        reply = await self._script(lua.ALIASES, tenant, agent, idempotent=True)
        if reply is None:
            raise AgentNotFoundError(tenant, agent)
        found = [_alias(tenant, agent, text(alias), value) for alias, value in zip(reply[::2], reply[1::2])]
        return sorted(found, key=lambda record: record.alias)

    async def delete_alias(self, tenant: str, agent: str, alias: str) -> None:
        check_tenant(tenant)
        result = await self._script(lua.DELETE_ALIAS, tenant, agent, alias, idempotent=False)
        if result == 0:
            raise AgentNotFoundError(tenant, agent)
        if result < 0:
            raise AliasNotFoundError(tenant, agent, alias)

    # --- change feed -----------------------------------------------------------------

    async def revision(self) -> int:
        value = await self._run(lambda: self._client.get(self._revision_key), idempotent=True)
        return int(value or 0)

    async def changed_since(self, revision: int) -> Changes:
        check_revision(revision)
        keys = (self._revision_key, self._changes_key)
        args = (min(revision, _MAX_VERSION), CHANGE_FEED_LIMIT)
        reply = await self._run(lambda: self._eval(lua.CHANGES, keys, args), idempotent=True)
        current = int(reply[0])
        if revision > current or current - revision > CHANGE_FEED_LIMIT:
            return current, None
        entries = reply[1] if len(reply) > 1 else []
        if len(entries) != current - revision:  # the log was trimmed further than it should be
            return current, None
        pairs = []
        for entry in reversed(entries):  # the log is newest first
            _, tenant, name = text(entry).split(":", 2)
            pairs.append((tenant, name))
        return current, dedupe(pairs)
