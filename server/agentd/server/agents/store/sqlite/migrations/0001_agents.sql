-- Version 1: agents, their versions and aliases, and the change feed. Every table is named
-- agent*, beside the session tables in the same file: the version table is
-- agent_schema_version. Names order by code point (BINARY compares UTF-8 bytes).
CREATE TABLE agents (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    latest_version INTEGER NOT NULL,  -- never rewinds, not even across a delete
    create_time REAL NOT NULL,
    update_time REAL NOT NULL,
    deleted INTEGER NOT NULL DEFAULT 0,  -- soft delete: the versions stay
    PRIMARY KEY (tenant, name)
) WITHOUT ROWID;
CREATE INDEX agents_live ON agents (tenant, name) WHERE deleted = 0;
CREATE TABLE agent_versions (
    tenant TEXT NOT NULL,
    name TEXT NOT NULL,
    version INTEGER NOT NULL,
    definition TEXT NOT NULL,  -- ASCII JSON, verbatim
    create_time REAL NOT NULL,
    created_by TEXT NOT NULL,
    PRIMARY KEY (tenant, name, version)
) WITHOUT ROWID;
CREATE TABLE agent_aliases (
    tenant TEXT NOT NULL,
    agent TEXT NOT NULL,
    alias TEXT NOT NULL,
    routes TEXT NOT NULL,  -- JSON [[version, weight], ...]
    update_time REAL NOT NULL,
    PRIMARY KEY (tenant, agent, alias)
) WITHOUT ROWID;
-- The store-wide write counter: one row, bumped by every write in its own transaction.
CREATE TABLE agent_revision (
    id INTEGER PRIMARY KEY CHECK (id = 1),
    revision INTEGER NOT NULL
);
INSERT INTO agent_revision (id, revision) VALUES (1, 0);
-- What each revision touched: the newest 1000 (base.CHANGE_FEED_LIMIT) are kept.
CREATE TABLE agent_changes (
    revision INTEGER PRIMARY KEY,
    tenant TEXT NOT NULL,
    name TEXT NOT NULL
)
