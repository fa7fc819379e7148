"""The statements the Postgres agent store sends."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["Statements"]


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement the store sends: constant per store, so asyncpg prepares each once
    per connection. ``{s}`` is the quoted schema. Each is one round trip and one snapshot."""

    create: str = "SELECT {s}.agentd_agent_create($1, $2, $3::json, $4, $5)"
    update: str = "SELECT {s}.agentd_agent_update($1, $2, $3::json, $4, $5, $6)"
    delete: str = "SELECT {s}.agentd_agent_delete($1, $2, $3)"
    set_alias: str = "SELECT {s}.agentd_agent_set_alias($1, $2, $3, $4::bigint[], $5::json, $6)"
    delete_alias: str = "SELECT {s}.agentd_agent_delete_alias($1, $2, $3)"
    # The live agent and its latest version; no row when missing or deleted.
    get: str = (
        "SELECT a.latest_version, a.create_time, a.update_time, v.definition, v.create_time, v.created_by"
        " FROM {s}.agents a JOIN {s}.agent_versions v"
        " ON v.tenant = a.tenant AND v.name = a.name AND v.version = a.latest_version"
        " WHERE a.tenant = $1 AND a.name = $2 AND NOT a.deleted"
    )
    version: str = (
        "SELECT version, definition, create_time, created_by FROM {s}.agent_versions"
        " WHERE tenant = $1 AND name = $2 AND version = $3"
    )
    # $2: the name the page starts after ('' from the first).
    list_agents: str = (
        "SELECT name, latest_version, create_time, update_time FROM {s}.agents"
        " WHERE tenant = $1 AND name > $2 AND NOT deleted ORDER BY name LIMIT $3"
    )
    # A live agent without versions in range gives one row of NULLs; a missing one, no row.
    versions: str = (
        "SELECT v.version, v.definition, v.create_time, v.created_by FROM {s}.agents a LEFT JOIN LATERAL ("
        " SELECT version, definition, create_time, created_by FROM {s}.agent_versions"
        " WHERE tenant = a.tenant AND name = a.name AND version < $3 ORDER BY version DESC LIMIT $4) v ON true"
        " WHERE a.tenant = $1 AND a.name = $2 AND NOT a.deleted ORDER BY v.version DESC"
    )
    # The same shape: one row of NULLs for a live agent without (that) alias.
    alias: str = (
        "SELECT l.alias, l.routes, l.update_time FROM {s}.agents a LEFT JOIN {s}.agent_aliases l"
        " ON l.tenant = a.tenant AND l.agent = a.name AND l.alias = $3"
        " WHERE a.tenant = $1 AND a.name = $2 AND NOT a.deleted"
    )
    aliases: str = (
        "SELECT l.alias, l.routes, l.update_time FROM {s}.agents a LEFT JOIN {s}.agent_aliases l"
        " ON l.tenant = a.tenant AND l.agent = a.name"
        " WHERE a.tenant = $1 AND a.name = $2 AND NOT a.deleted ORDER BY l.alias"
    )
    tenants: str = "SELECT DISTINCT tenant FROM {s}.agents WHERE NOT deleted ORDER BY tenant"
    revision: str = "SELECT revision FROM {s}.agent_revision"
    # The current revision on every row, with the log entries after $1 (none when $1 is ahead,
    # or more than $2 behind: the caller reloads everything then).
    changes: str = (
        "SELECT r.revision, c.tenant, c.name FROM {s}.agent_revision r LEFT JOIN {s}.agent_changes c"
        " ON c.revision > $1::bigint AND c.revision <= r.revision AND r.revision - $1::bigint <= $2::bigint"
        " ORDER BY c.revision"
    )

    def for_schema(self, quoted_schema: str) -> Statements:
        return replace(self, **{f.name: getattr(self, f.name).format(s=quoted_schema) for f in fields(self)})
