-- Version 2: the caller's answers (caller-executed tool outputs, approvals), first answer per key.
CREATE TABLE run_actions (
    -- Deleted with its run (sweep, a request id past retention), by any agentd version.
    run_id text COLLATE "C" NOT NULL REFERENCES runs (run_id) ON DELETE CASCADE,
    key text COLLATE "C" NOT NULL,
    data json NOT NULL,  -- the codec's action text (json: a tool output may hold \u0000)
    PRIMARY KEY (run_id, key)
);

-- The run's answers as one JSON object (NULL: none). VOLATILE: it reads with its own
-- snapshot, so after a statement that locked or wrote the run it sees every answer
-- committed before that (the statement's snapshot may be older).
CREATE FUNCTION agentd_run_actions(p_run text) RETURNS json
LANGUAGE plpgsql VOLATILE SET search_path FROM CURRENT AS $$
BEGIN
    RETURN (SELECT json_object_agg(a.key, a.data ORDER BY a.key) FROM run_actions a WHERE a.run_id = p_run);
END $$;

-- submit_action: record the answer when the run is active and the key unanswered
-- (the row lock orders it against finish and cancel). Returns the run afterwards
-- (no row: unknown or past retention).
CREATE FUNCTION agentd_run_submit_action(p_run text, p_key text, p_data text, p_now double precision)
RETURNS TABLE (
    o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
    o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
    o_trace text, o_create double precision, o_update double precision, o_actions json
) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
BEGIN
    SELECT r.status INTO v_status FROM runs r
    WHERE r.run_id = p_run AND (r.expire_time IS NULL OR r.expire_time > p_now)
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_status IN ('queued', 'running', 'requires_action') THEN
        INSERT INTO run_actions (run_id, key, data) VALUES (p_run, p_key, p_data::json)
        ON CONFLICT DO NOTHING;
        IF FOUND THEN
            UPDATE runs r SET update_time = p_now WHERE r.run_id = p_run;
        END IF;
    END IF;
    RETURN QUERY
        SELECT r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence,
               r.checkpoint, r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time,
               agentd_run_actions(p_run)
        FROM runs r WHERE r.run_id = p_run;
END $$;
