-- Version 3: the history window. agentd_read_history_create gets an overload with a limit:
-- like the 3-argument one it creates a missing session, else it returns the live session's
-- newest p_limit items (oldest first, read backwards through the items' primary key) with
-- the session's item_count on every row, so the caller knows how many older items it left
-- out. A live session with no items gives one row (item_count, NULL); a created one, none.
-- The 3-argument function stays for replicas that do not pass a limit.
CREATE FUNCTION agentd_read_history_create(
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
