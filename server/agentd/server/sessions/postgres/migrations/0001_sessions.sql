-- Version 1: sessions, items, request ids, and the multi-step writes as functions.
CREATE TABLE sessions (
    id text COLLATE "C" PRIMARY KEY,  -- "C": ids order by code point, like every other store
    created_at timestamptz NOT NULL,
    updated_at timestamptz NOT NULL,
    metadata jsonb NOT NULL,
    state jsonb NOT NULL,
    last_seq bigint NOT NULL DEFAULT 0,  -- never rewinds: sequences are not reused
    item_count bigint NOT NULL DEFAULT 0,
    ttl_s double precision CHECK (ttl_s > 0),  -- NULL: never expires
    expires_at timestamptz  -- last write + ttl_s; NULL without a TTL
) WITH (fillfactor = 90);  -- room for HOT updates: every append rewrites the row
CREATE INDEX sessions_by_created ON sessions (created_at DESC, id DESC);
CREATE INDEX sessions_by_expiry ON sessions (expires_at) WHERE expires_at IS NOT NULL;

CREATE TABLE items (
    session_id text COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    seq bigint NOT NULL,
    created_at timestamptz NOT NULL,
    type text NOT NULL,
    role text,  -- messages only
    data json NOT NULL,
    PRIMARY KEY (session_id, seq)  -- serves history, paging both ways, pop and cascades
);

CREATE TABLE append_requests (
    session_id text COLLATE "C" NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    request_id text NOT NULL,
    first_seq bigint NOT NULL,
    last_seq bigint NOT NULL,
    PRIMARY KEY (session_id, request_id)
);

-- Create a session; an expired one holding the id is replaced (its rows cascade).
-- AG409 when a live session has the id.
CREATE FUNCTION agentd_create(
    p_id text, p_now double precision, p_metadata jsonb, p_state jsonb, p_ttl double precision
) RETURNS SETOF sessions LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now timestamptz := to_timestamp(p_now);
BEGIN
    DELETE FROM sessions s WHERE s.id = p_id AND s.expires_at <= v_now;
    RETURN QUERY
        INSERT INTO sessions AS s (id, created_at, updated_at, metadata, state, ttl_s, expires_at)
        VALUES (p_id, v_now, v_now, p_metadata, p_state, p_ttl, v_now + make_interval(secs => p_ttl))
        ON CONFLICT (id) DO NOTHING
        RETURNING s.*;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % already exists', p_id USING ERRCODE = 'AG409';
    END IF;
END $$;

-- A run's history, creating the session (over an expired one) when it is missing.
-- One row per item in order; a live session without items gives one NULL row.
CREATE FUNCTION agentd_read_history_create(p_id text, p_now double precision, p_ttl double precision)
RETURNS TABLE (data json) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now timestamptz := to_timestamp(p_now);
BEGIN
    -- Loops only if a concurrent delete removes the session between two statements.
    FOR attempt IN 1..3 LOOP
        DELETE FROM sessions s WHERE s.id = p_id AND s.expires_at <= v_now;
        INSERT INTO sessions (id, created_at, updated_at, metadata, state, ttl_s, expires_at)
        VALUES (p_id, v_now, v_now, '{}', '{}', p_ttl, v_now + make_interval(secs => p_ttl))
        ON CONFLICT (id) DO NOTHING;
        IF FOUND THEN
            RETURN;  -- new: no items
        END IF;
        -- One snapshot for the session and its items: a consistent history.
        RETURN QUERY
            SELECT i.data FROM sessions s LEFT JOIN items i ON i.session_id = s.id
            WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
            ORDER BY i.seq;
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'session % keeps disappearing', p_id USING ERRCODE = '40001';
END $$;

-- Append a run's items, numbered after last_seq, all or nothing. With a request id
-- already used on the session: append nothing and return the stored items of that
-- request that still exist. Otherwise return one row: the first new sequence, the
-- stored created_at and a NULL payload (the caller has the items). AG404: no session.
CREATE FUNCTION agentd_append(
    p_id text, p_request text, p_now double precision, p_types text[], p_roles text[], p_data text[]
) RETURNS TABLE (seq bigint, created_at double precision, data json)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now timestamptz := to_timestamp(p_now);
    v_count bigint := cardinality(p_data);
    v_last bigint;
    v_first bigint;
    v_final bigint;
BEGIN
    IF p_request IS NULL THEN
        -- Without a request id, numbering and locking are one row update: the row
        -- lock it takes serialises appends to this session on every replica.
        UPDATE sessions s
        SET last_seq = s.last_seq + v_count, item_count = s.item_count + v_count, updated_at = v_now,
            expires_at = v_now + make_interval(secs => s.ttl_s)
        WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
        RETURNING s.last_seq - v_count INTO v_last;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
        END IF;
        INSERT INTO items (session_id, seq, created_at, type, role, data)
        SELECT p_id, v_last + t.n, v_now, t.type, t.role, t.data::json
        FROM unnest(p_types, p_roles, p_data) WITH ORDINALITY AS t (type, role, data, n);
        RETURN QUERY SELECT v_last + 1, extract(epoch FROM v_now)::float8, NULL::json;
        RETURN;
    END IF;
    -- The row lock serialises appends to this session on every replica.
    SELECT s.last_seq INTO v_last FROM sessions s
    WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
    END IF;
    IF p_request IS NOT NULL THEN
        SELECT r.first_seq, r.last_seq INTO v_first, v_final FROM append_requests r
        WHERE r.session_id = p_id AND r.request_id = p_request;
        IF FOUND THEN
            RETURN QUERY
                SELECT i.seq, extract(epoch FROM i.created_at)::float8, i.data FROM items i
                WHERE i.session_id = p_id AND i.seq BETWEEN v_first AND v_final ORDER BY i.seq;
            RETURN;
        END IF;
    END IF;
    INSERT INTO items (session_id, seq, created_at, type, role, data)
    SELECT p_id, v_last + t.n, v_now, t.type, t.role, t.data::json
    FROM unnest(p_types, p_roles, p_data) WITH ORDINALITY AS t (type, role, data, n);
    UPDATE sessions s
    SET last_seq = v_last + v_count, item_count = s.item_count + v_count, updated_at = v_now,
        expires_at = v_now + make_interval(secs => s.ttl_s)
    WHERE s.id = p_id;
    INSERT INTO append_requests (session_id, request_id, first_seq, last_seq)
    VALUES (p_id, p_request, v_last + 1, v_last + v_count);
    RETURN QUERY SELECT v_last + 1, extract(epoch FROM v_now)::float8, NULL::json;
END $$;

-- Remove and return the newest item (no row when there is none). AG404: no session.
CREATE FUNCTION agentd_pop(p_id text, p_now double precision)
RETURNS TABLE (seq bigint, created_at double precision, data json)
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now timestamptz := to_timestamp(p_now);
BEGIN
    PERFORM FROM sessions s
    WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
    END IF;
    RETURN QUERY
        DELETE FROM items i
        WHERE i.session_id = p_id
          AND i.seq = (SELECT max(i2.seq) FROM items i2 WHERE i2.session_id = p_id)
        RETURNING i.seq, extract(epoch FROM i.created_at)::float8, i.data;
    IF FOUND THEN
        UPDATE sessions s
        SET item_count = s.item_count - 1, updated_at = v_now,
            expires_at = v_now + make_interval(secs => s.ttl_s)
        WHERE s.id = p_id;
    END IF;
END $$;

-- Remove all items, keeping the session; returns how many. AG404: no session.
CREATE FUNCTION agentd_clear(p_id text, p_now double precision)
RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now timestamptz := to_timestamp(p_now);
    v_removed bigint;
BEGIN
    PERFORM FROM sessions s
    WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
    END IF;
    DELETE FROM items i WHERE i.session_id = p_id;
    GET DIAGNOSTICS v_removed = ROW_COUNT;
    IF v_removed > 0 THEN
        UPDATE sessions s
        SET item_count = 0, updated_at = v_now, expires_at = v_now + make_interval(secs => s.ttl_s)
        WHERE s.id = p_id;
    END IF;
    RETURN v_removed;
END $$;
