-- Version 6: submit_answers, the caller's answers checked against the run as stored, in the
-- transaction that records them: a repeat of a recorded answer is taken (whatever the run
-- does now), a different answer for an answered call and an answer for a call the run does
-- not wait for are refused, and one refused answer records none of the call's answers.

-- What makes an answer the answer it is (records.answer_identity: JSON text of the fields
-- compared), written by submit_answers: two answers for a key are the same exactly when their
-- identities are equal. Postgres cannot read fields back out of a json value holding \u0000,
-- hence the column. NULL for answers recorded without it (submit_action, older versions):
-- those compare by their whole text.
ALTER TABLE run_actions ADD COLUMN ident text;

-- Returns no row for an unknown run (or past retention); else one row: o_code 0 taken
-- (o_recorded: the 0-based positions of the answers recorded now), 1 the answer at 0-based
-- position o_refused refused (nothing recorded); then the run afterwards, as
-- agentd_run_submit_action returns it, then its requeue reason.
CREATE FUNCTION agentd_run_submit_answers(
    p_run text, p_keys text[], p_data text[], p_idents text[], p_now double precision
) RETURNS TABLE (
    o_code integer, o_refused integer, o_recorded integer[],
    o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
    o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
    o_trace text, o_create double precision, o_update double precision, o_actions json, o_requeue text
) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_status text;
    v_awaiting json;
    v_data json;
    v_ident text;
    v_code integer := 0;
    v_refused integer := 0;
    v_fresh integer[] := '{}';
BEGIN
    -- The row lock orders answers against each other and against progress, finish and cancel.
    SELECT r.status, r.checkpoint -> 'awaiting' INTO v_status, v_awaiting FROM runs r
    WHERE r.run_id = p_run AND (r.expire_time IS NULL OR r.expire_time > p_now)
    FOR NO KEY UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    FOR i IN 1 .. coalesce(cardinality(p_keys), 0) LOOP
        SELECT a.data, a.ident INTO v_data, v_ident FROM run_actions a WHERE a.run_id = p_run AND a.key = p_keys[i];
        IF FOUND THEN
            IF (v_ident IS NOT NULL AND v_ident <> p_idents[i]) OR (v_ident IS NULL AND v_data::text <> p_data[i]) THEN
                v_code := 1;
            END IF;
        ELSIF v_status IN ('queued', 'running', 'requires_action') AND EXISTS (
                SELECT 1 FROM json_array_elements_text(coalesce(v_awaiting, '[]'::json)) AS w (key)
                WHERE w.key = p_keys[i]) THEN
            v_fresh := v_fresh || (i - 1);
        ELSE
            v_code := 1;
        END IF;
        IF v_code <> 0 THEN
            v_refused := i - 1;
            v_fresh := '{}';
            EXIT;
        END IF;
    END LOOP;
    IF cardinality(v_fresh) > 0 THEN
        INSERT INTO run_actions (run_id, key, data, ident)
        SELECT p_run, p_keys[f.n + 1], p_data[f.n + 1]::json, p_idents[f.n + 1] FROM unnest(v_fresh) AS f (n)
        ON CONFLICT DO NOTHING;
        UPDATE runs r SET update_time = p_now WHERE r.run_id = p_run;
    END IF;
    RETURN QUERY
        SELECT v_code, v_refused, v_fresh,
               r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence,
               r.checkpoint, r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time,
               agentd_run_actions(p_run), r.requeue_reason
        FROM runs r WHERE r.run_id = p_run;
END $$;
