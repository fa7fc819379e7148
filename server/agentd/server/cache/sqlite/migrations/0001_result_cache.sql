-- Version 1: the result cache (agentd.server.cache), beside the session and agent tables in
-- the same file, with its own version table (result_cache_schema_version). One row per (tenant,
-- request key). A row whose expires_at has passed is never read and is deleted by the sweep.
CREATE TABLE result_cache (
    tenant TEXT NOT NULL,
    key TEXT NOT NULL,  -- the request's SHA-256, 64 lowercase hex digits
    value TEXT NOT NULL,  -- the entry, ASCII JSON
    created_at REAL NOT NULL,  -- unix seconds
    expires_at REAL NOT NULL,  -- unix seconds
    PRIMARY KEY (tenant, key)
) WITHOUT ROWID;
CREATE INDEX result_cache_expiry ON result_cache (expires_at)
