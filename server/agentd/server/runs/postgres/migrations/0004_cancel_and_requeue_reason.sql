-- Version 4: record_progress reports a recorded cancel (the writer starts no tool after
-- one), and a requeued run remembers why (its RunResumed event reports the cause).
ALTER TABLE runs ADD COLUMN requeue_reason text NOT NULL DEFAULT '';

-- record_progress, as in version 1, returning the run's cancel_reason ('' when none).
DROP FUNCTION agentd_run_progress(text, integer, bigint, text[], text, text, double precision);
CREATE FUNCTION agentd_run_progress(
    p_run text, p_attempt integer, p_first bigint, p_events text[], p_trace text, p_checkpoint text,
    p_now double precision
) RETURNS text LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_count integer := coalesce(cardinality(p_events), 0);
    v_last bigint;
    v_cancel text;
BEGIN
    UPDATE runs r
    SET last_sequence = r.last_sequence + v_count,
        checkpoint = coalesce(p_checkpoint::json, r.checkpoint),
        trace_id = CASE WHEN r.trace_id = '' AND v_count > 0 THEN p_trace ELSE r.trace_id END,
        update_time = p_now
    WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt
    RETURNING r.last_sequence - v_count, r.cancel_reason INTO v_last, v_cancel;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer executed by attempt %', p_run, p_attempt USING ERRCODE = 'AGR01';
    END IF;
    IF v_count > 0 THEN
        IF p_first <> v_last + 1 THEN
            RAISE EXCEPTION 'run %: event % does not follow %', p_run, p_first, v_last USING ERRCODE = 'AGR02';
        END IF;
        INSERT INTO run_events (run_id, seq, data)
        SELECT p_run, v_last + t.n, t.data::json FROM unnest(p_events) WITH ORDINALITY AS t (data, n);
        PERFORM pg_notify(agentd_run_channel('run_events'), p_run);
    END IF;
    RETURN v_cancel;
END $$;

-- release (drain), as in version 1, recording why.
CREATE OR REPLACE FUNCTION agentd_run_release(p_run text, p_attempt integer, p_now double precision)
RETURNS boolean LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE runs r SET status = 'queued', owner = '', lease_expires = 0, claimable = true, update_time = p_now,
                      requeue_reason = 'handed off'
    WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(agentd_run_channel('run_work'), '');
    RETURN true;
END $$;

-- requeue_expired, as in version 1, recording why.
CREATE OR REPLACE FUNCTION agentd_run_requeue_expired(p_now double precision)
RETURNS SETOF text LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RETURN QUERY
        UPDATE runs r SET status = 'queued', owner = '', lease_expires = 0, claimable = true, update_time = p_now,
                          requeue_reason = 'lease expired'
        WHERE r.run_id = ANY (ARRAY(
                SELECT x.run_id FROM runs x WHERE x.status = 'running' AND x.lease_expires < p_now
                ORDER BY x.lease_expires FOR UPDATE SKIP LOCKED))
          AND r.status = 'running' AND r.lease_expires < p_now
        RETURNING r.run_id;
    IF FOUND THEN
        PERFORM pg_notify(agentd_run_channel('run_work'), '');
    END IF;
END $$;
