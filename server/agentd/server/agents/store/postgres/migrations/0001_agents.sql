-- Version 1: agents, their versions and aliases, the change feed, and every write as a
-- function. Recorded in agent_schema_version, beside the session and run tables.
-- Times are the caller's unix seconds as double precision: they read back exactly.
CREATE TABLE agents (
    tenant text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,  -- "C": names order by code point, like every other store
    latest_version bigint NOT NULL,  -- never rewinds, not even across a delete
    create_time double precision NOT NULL,
    update_time double precision NOT NULL,
    deleted boolean NOT NULL DEFAULT false,  -- soft delete: the versions stay
    PRIMARY KEY (tenant, name)
);
CREATE INDEX agents_live ON agents (tenant, name) WHERE NOT deleted;

CREATE TABLE agent_versions (
    tenant text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL,
    version bigint NOT NULL,
    definition json NOT NULL,  -- verbatim (ASCII JSON from the store), never queried inside
    create_time double precision NOT NULL,
    created_by text NOT NULL,
    PRIMARY KEY (tenant, name, version)
);

CREATE TABLE agent_aliases (
    tenant text COLLATE "C" NOT NULL,
    agent text COLLATE "C" NOT NULL,
    alias text COLLATE "C" NOT NULL,
    routes json NOT NULL,  -- [[version, weight], ...]
    update_time double precision NOT NULL,
    PRIMARY KEY (tenant, agent, alias)
);

-- The store-wide write counter: one row. Every write function bumps it first, so its row
-- lock serialises all agent writes of the schema on every replica (they are rare), and a
-- reader that sees revision N sees every write up to N and its log entry.
CREATE TABLE agent_revision (
    id smallint PRIMARY KEY CHECK (id = 1),
    revision bigint NOT NULL
);
INSERT INTO agent_revision (id, revision) VALUES (1, 0);

-- What each revision touched: the newest 1000 (base.CHANGE_FEED_LIMIT) are kept.
CREATE TABLE agent_changes (
    revision bigint PRIMARY KEY,
    tenant text COLLATE "C" NOT NULL,
    name text COLLATE "C" NOT NULL
);

-- Count a write of (tenant, name) and log it. Called first by every write function.
CREATE FUNCTION agentd_agent_bump(p_tenant text, p_name text) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_revision bigint;
BEGIN
    UPDATE agent_revision SET revision = revision + 1 WHERE id = 1 RETURNING revision INTO v_revision;
    INSERT INTO agent_changes (revision, tenant, name) VALUES (v_revision, p_tenant, p_name);
    DELETE FROM agent_changes WHERE revision <= v_revision - 1000;
    RETURN v_revision;
END $$;

-- The live agent's latest version, locked; AGA01 when it is missing or deleted.
CREATE FUNCTION agentd_agent_live(p_tenant text, p_name text) RETURNS bigint
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_latest bigint;
BEGIN
    SELECT a.latest_version INTO v_latest FROM agents a
    WHERE a.tenant = p_tenant AND a.name = p_name AND NOT a.deleted FOR UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % does not exist', p_name USING ERRCODE = 'AGA01';
    END IF;
    RETURN v_latest;
END $$;

-- Create (or bring back a deleted) agent with its next version; returns that version.
-- AGA02 when a live agent has the name.
CREATE FUNCTION agentd_agent_create(
    p_tenant text, p_name text, p_definition json, p_created_by text, p_now double precision
) RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_latest bigint;
    v_deleted boolean;
BEGIN
    PERFORM agentd_agent_bump(p_tenant, p_name);
    SELECT a.latest_version, a.deleted INTO v_latest, v_deleted FROM agents a
    WHERE a.tenant = p_tenant AND a.name = p_name;
    IF FOUND AND NOT v_deleted THEN
        RAISE EXCEPTION 'agent % already exists', p_name USING ERRCODE = 'AGA02';
    END IF;
    v_latest := coalesce(v_latest, 0) + 1;
    INSERT INTO agents AS a (tenant, name, latest_version, create_time, update_time, deleted)
    VALUES (p_tenant, p_name, v_latest, p_now, p_now, false)
    ON CONFLICT (tenant, name) DO UPDATE SET latest_version = excluded.latest_version,
        create_time = excluded.create_time, update_time = excluded.update_time, deleted = false;
    INSERT INTO agent_versions (tenant, name, version, definition, create_time, created_by)
    VALUES (p_tenant, p_name, v_latest, p_definition, p_now, p_created_by);
    RETURN v_latest;
END $$;

-- Add the next version; returns it. AGA01: no live agent. AGA04 (DETAIL: the latest
-- version) when p_expected is given and is not the latest.
CREATE FUNCTION agentd_agent_update(
    p_tenant text, p_name text, p_definition json, p_expected bigint, p_created_by text, p_now double precision
) RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_latest bigint;
BEGIN
    PERFORM agentd_agent_bump(p_tenant, p_name);
    v_latest := agentd_agent_live(p_tenant, p_name);
    IF p_expected IS NOT NULL AND p_expected <> v_latest THEN
        RAISE EXCEPTION 'agent % is at version %', p_name, v_latest USING ERRCODE = 'AGA04', DETAIL = v_latest::text;
    END IF;
    UPDATE agents a SET latest_version = v_latest + 1, update_time = p_now
    WHERE a.tenant = p_tenant AND a.name = p_name;
    INSERT INTO agent_versions (tenant, name, version, definition, create_time, created_by)
    VALUES (p_tenant, p_name, v_latest + 1, p_definition, p_now, p_created_by);
    RETURN v_latest + 1;
END $$;

-- Soft delete: hidden, aliases removed, versions kept. AGA01: no live agent.
CREATE FUNCTION agentd_agent_delete(p_tenant text, p_name text, p_now double precision) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM agentd_agent_bump(p_tenant, p_name);
    PERFORM agentd_agent_live(p_tenant, p_name);
    UPDATE agents a SET deleted = true, update_time = p_now WHERE a.tenant = p_tenant AND a.name = p_name;
    DELETE FROM agent_aliases l WHERE l.tenant = p_tenant AND l.agent = p_name;
END $$;

-- Create or replace an alias. AGA01: no live agent; AGA03 (DETAIL: the version) for the
-- first of p_versions the agent does not have (versions 1..latest all exist).
CREATE FUNCTION agentd_agent_set_alias(
    p_tenant text, p_agent text, p_alias text, p_versions bigint[], p_routes json, p_now double precision
) RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_latest bigint;
    v_version bigint;
BEGIN
    PERFORM agentd_agent_bump(p_tenant, p_agent);
    v_latest := agentd_agent_live(p_tenant, p_agent);
    FOREACH v_version IN ARRAY p_versions LOOP
        IF v_version < 1 OR v_version > v_latest THEN
            RAISE EXCEPTION 'agent % has no version %', p_agent, v_version
                USING ERRCODE = 'AGA03', DETAIL = v_version::text;
        END IF;
    END LOOP;
    INSERT INTO agent_aliases AS l (tenant, agent, alias, routes, update_time)
    VALUES (p_tenant, p_agent, p_alias, p_routes, p_now)
    ON CONFLICT (tenant, agent, alias) DO UPDATE SET routes = excluded.routes, update_time = excluded.update_time;
END $$;

-- AGA01: no live agent; AGA05: no such alias.
CREATE FUNCTION agentd_agent_delete_alias(p_tenant text, p_agent text, p_alias text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM agentd_agent_bump(p_tenant, p_agent);
    PERFORM agentd_agent_live(p_tenant, p_agent);
    DELETE FROM agent_aliases l WHERE l.tenant = p_tenant AND l.agent = p_agent AND l.alias = p_alias;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'agent % has no alias %', p_agent, p_alias USING ERRCODE = 'AGA05';
    END IF;
END $$;
