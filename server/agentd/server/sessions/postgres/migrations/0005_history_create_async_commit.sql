-- Version 5: a run creating its missing session does not wait for the disk. The session
-- row an agentd_read_history_create inserts (an empty session, or an expired one replaced
-- by an empty one) commits without waiting for its WAL to be flushed (synchronous_commit
-- off for that transaction only). It is visible at once, and durable with the next write
-- that waits for the disk: WAL is flushed in order, so the run's first event on a Postgres
-- run store in this database (flushed before any stream sees it), or the run's first step
-- appended to the session, or within 3 x wal_writer_delay at the latest. A crash of the
-- database in that window loses only the empty session that run was about to fill. Reading
-- an existing session writes nothing, and waits for nothing, as before. Otherwise as in
-- versions 1 (the whole history) and 3 (the window).
CREATE OR REPLACE FUNCTION agentd_read_history_create(p_id text, p_now double precision, p_ttl double precision)
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
            PERFORM set_config('synchronous_commit', 'off', true);
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

CREATE OR REPLACE FUNCTION agentd_read_history_create(
    p_id text, p_now double precision, p_ttl double precision, p_limit bigint
)
RETURNS TABLE (total bigint, data json) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
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
            PERFORM set_config('synchronous_commit', 'off', true);
            RETURN;  -- new: no items
        END IF;
        -- One snapshot for the session and its items: a consistent window and count.
        RETURN QUERY
            SELECT s.item_count, i.data FROM sessions s LEFT JOIN LATERAL (
                SELECT it.seq, it.data FROM items it WHERE it.session_id = s.id
                ORDER BY it.seq DESC LIMIT p_limit
            ) i ON true
            WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
            ORDER BY i.seq;
        IF FOUND THEN
            RETURN;
        END IF;
    END LOOP;
    RAISE EXCEPTION 'session % keeps disappearing', p_id USING ERRCODE = '40001';
END $$;
