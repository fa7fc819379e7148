-- Version 4: history compaction. agentd_drop_through removes a session's items with
-- seq <= p_through (a range of the items' primary key), all or none, and returns how
-- many. last_seq does not move, so later items keep their sequences and new ones still
-- follow the newest ever given; append_requests stay, so a retried append whose items
-- were dropped replays (returning what survives of them) instead of appending them again.
-- Like agentd_clear it restarts the idle clock only when it removed something.
-- AG404: no session.
CREATE FUNCTION agentd_drop_through(p_id text, p_now double precision, p_through bigint)
RETURNS bigint LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_now timestamptz := to_timestamp(p_now);
    v_removed bigint;
BEGIN
    -- The row lock serialises this with appends, pops and clears on every replica.
    PERFORM FROM sessions s
    WHERE s.id = p_id AND (s.expires_at IS NULL OR s.expires_at > v_now)
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'session % does not exist', p_id USING ERRCODE = 'AG404';
    END IF;
    DELETE FROM items i WHERE i.session_id = p_id AND i.seq <= p_through;
    GET DIAGNOSTICS v_removed = ROW_COUNT;
    IF v_removed > 0 THEN
        UPDATE sessions s
        SET item_count = s.item_count - v_removed, updated_at = v_now,
            expires_at = v_now + make_interval(secs => s.ttl_s)
        WHERE s.id = p_id;
    END IF;
    RETURN v_removed;
END $$;
