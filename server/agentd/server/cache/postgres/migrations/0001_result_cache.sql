-- Version 1: the result cache (agentd.server.cache), in the session store's schema; its
-- version table is result_cache_schema_version. One row per (tenant, request key); a row
-- whose expires_at has passed is never read and is deleted by the sweep.
-- UNLOGGED: a cache needs no write-ahead log. Its writes cost less, it is not copied to
-- standbys, and Postgres empties it after a crash: entries are made again on the next miss.
CREATE UNLOGGED TABLE result_cache (
    tenant text COLLATE "C" NOT NULL,
    key text COLLATE "C" NOT NULL,  -- the request's SHA-256, 64 lowercase hex digits
    value text NOT NULL,  -- the entry, ASCII JSON
    created_at double precision NOT NULL,  -- unix seconds
    expires_at double precision NOT NULL,  -- unix seconds
    PRIMARY KEY (tenant, key)
);
CREATE INDEX result_cache_expiry ON result_cache (expires_at);
