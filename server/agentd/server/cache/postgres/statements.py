"""The statements the Postgres result cache sends."""

from __future__ import annotations

from dataclasses import dataclass, fields, replace

__all__ = ["Statements"]


@dataclass(frozen=True, slots=True)
class Statements:
    """Every statement the cache sends: constant, so asyncpg prepares each once per connection.
    ``{s}`` is the quoted schema. Each is one round trip and one transaction."""

    get: str = "SELECT value FROM {s}.result_cache WHERE tenant = $1 AND key = $2 AND expires_at > $3"
    put: str = (
        "INSERT INTO {s}.result_cache (tenant, key, value, created_at, expires_at) VALUES ($1, $2, $3, $4, $5)"
        " ON CONFLICT (tenant, key) DO UPDATE SET value = excluded.value, created_at = excluded.created_at,"
        " expires_at = excluded.expires_at"
    )
    # At most $2 expired rows; rows another replica's sweep holds are skipped, not waited for.
    sweep: str = (
        "WITH doomed AS (SELECT tenant, key FROM {s}.result_cache WHERE expires_at <= $1 LIMIT $2"
        " FOR UPDATE SKIP LOCKED), gone AS (DELETE FROM {s}.result_cache r USING doomed d"
        " WHERE r.tenant = d.tenant AND r.key = d.key RETURNING 1) SELECT count(*) FROM gone"
    )

    def for_schema(self, quoted_schema: str) -> Statements:
        return replace(self, **{f.name: getattr(self, f.name).format(s=quoted_schema) for f in fields(self)})
