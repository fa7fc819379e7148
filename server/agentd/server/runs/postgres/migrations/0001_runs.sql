-- Version 1: runs, their event logs, and every multi-step operation as a function.
-- Creation order across all replicas: the session gate and the queue both follow it.
CREATE SEQUENCE run_pos;

CREATE TABLE runs (
    run_id text COLLATE "C" PRIMARY KEY,
    session_id text COLLATE "C",
    request_id text COLLATE "C",  -- NULL without one
    status text NOT NULL
        CHECK (status IN ('queued', 'running', 'requires_action', 'completed', 'failed', 'cancelled')),
    spec json NOT NULL,
    owner text NOT NULL DEFAULT '',  -- RUNNING only
    attempt integer NOT NULL DEFAULT 0,  -- the fencing token
    lease_expires double precision NOT NULL DEFAULT 0,  -- unix seconds; RUNNING only
    last_sequence bigint NOT NULL DEFAULT 0,
    checkpoint json,
    result json,  -- the terminal payload
    cancel_reason text NOT NULL DEFAULT '',
    trace_id text NOT NULL DEFAULT '',
    create_time double precision NOT NULL,
    update_time double precision NOT NULL,
    expire_time double precision,  -- set when the run ends: retention
    claimable boolean NOT NULL DEFAULT false,  -- QUEUED and not behind its session's earlier runs
    pos bigint NOT NULL DEFAULT nextval('run_pos')
) WITH (fillfactor = 80);  -- room for HOT updates: every step rewrites the row
ALTER SEQUENCE run_pos OWNED BY runs.pos;

CREATE INDEX runs_claimable ON runs (pos) WHERE claimable;
CREATE INDEX runs_leases ON runs (lease_expires) WHERE status = 'running';
CREATE INDEX runs_by_session ON runs (session_id, create_time, run_id) WHERE session_id IS NOT NULL;
CREATE INDEX runs_active_by_session ON runs (session_id, pos)
    WHERE session_id IS NOT NULL AND status IN ('queued', 'running', 'requires_action');
CREATE UNIQUE INDEX runs_by_request ON runs (request_id) WHERE request_id IS NOT NULL;
CREATE INDEX runs_by_expiry ON runs (expire_time) WHERE expire_time IS NOT NULL;

CREATE TABLE run_events (
    run_id text COLLATE "C" NOT NULL,  -- no foreign key: deleted with the run by sweep
    seq bigint NOT NULL,
    data json NOT NULL,  -- the codec's event text
    PRIMARY KEY (run_id, seq)
);

-- The NOTIFY channel of a kind ('run_work', 'run_events', 'run_control'); mirrored by
-- channel_name() in Python. Names over 63 bytes would be refused, so long schemas hash.
CREATE FUNCTION agentd_run_channel(p_kind text) RETURNS text
LANGUAGE sql STABLE SET search_path FROM CURRENT AS $$
    SELECT CASE WHEN octet_length(current_schema()) + 1 + octet_length(p_kind) <= 63
                THEN current_schema() || '_' || p_kind
                ELSE 'agentd_' || left(md5(current_schema()), 16) || '_' || p_kind END
$$;

-- Serialises the session gate of one session on every replica, until commit. Always
-- taken before any row lock, so it cannot take part in a deadlock.
CREATE FUNCTION agentd_run_lock_session(p_session text) RETURNS void
LANGUAGE sql SET search_path FROM CURRENT AS $$
    SELECT pg_advisory_xact_lock(hashtextextended('agentd.runs/' || current_schema() || '/' || p_session, 0))
$$;

-- Make the session's oldest active run claimable when it is a queued one waiting.
CREATE FUNCTION agentd_run_promote(p_session text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE runs r SET claimable = true
    WHERE r.run_id = (
            SELECT a.run_id FROM runs a
            WHERE a.session_id = p_session AND a.status IN ('queued', 'running', 'requires_action')
            ORDER BY a.pos LIMIT 1)
      AND r.status = 'queued' AND NOT r.claimable;
    IF FOUND THEN
        PERFORM pg_notify(agentd_run_channel('run_work'), '');
    END IF;
END $$;

-- create_run: request id, session gate, owner, queue limit, in that order. Returns the
-- run (spec NULL when created: the caller has it). AGR03 busy (DETAIL: the active run),
-- AGR04 queue full, AGR05 the run id is taken.
CREATE FUNCTION agentd_run_create(
    p_run text, p_session text, p_request text, p_spec text, p_reject boolean,
    p_owner text, p_lease_until double precision, p_max_queued integer, p_now double precision
) RETURNS TABLE (
    o_created boolean, o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
    o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
    o_trace text, o_create double precision, o_update double precision
) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_found text;
    v_expire double precision;
    v_behind boolean := false;
    v_status text;
    v_claimable boolean;
BEGIN
    IF p_session IS NOT NULL THEN
        PERFORM agentd_run_lock_session(p_session);
    END IF;
    IF p_request IS NOT NULL THEN
        SELECT r.run_id, r.expire_time INTO v_found, v_expire FROM runs r WHERE r.request_id = p_request;
        IF FOUND THEN
            IF v_expire IS NOT NULL AND v_expire <= p_now THEN
                -- Past retention: forgotten with its run, as if swept already.
                DELETE FROM runs r WHERE r.run_id = v_found;
                DELETE FROM run_events e WHERE e.run_id = v_found;
            ELSE
                RETURN QUERY
                    SELECT false, r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires,
                           r.last_sequence, r.checkpoint, r.result, r.cancel_reason, r.trace_id,
                           r.create_time, r.update_time
                    FROM runs r WHERE r.run_id = v_found;
                RETURN;
            END IF;
        END IF;
    END IF;
    IF p_session IS NOT NULL THEN
        SELECT a.run_id INTO v_found FROM runs a
        WHERE a.session_id = p_session AND a.status IN ('queued', 'running', 'requires_action')
        ORDER BY a.pos LIMIT 1;
        IF FOUND THEN
            IF p_reject THEN
                RAISE EXCEPTION 'session % already has an active run', p_session
                    USING ERRCODE = 'AGR03', DETAIL = v_found;
            END IF;
            v_behind := true;
        END IF;
    END IF;
    IF p_owner IS NOT NULL AND NOT v_behind THEN
        v_status := 'running';
        v_claimable := false;
    ELSE
        v_status := 'queued';
        v_claimable := NOT v_behind;
        IF v_claimable
           AND (SELECT count(*) FROM (SELECT 1 FROM runs q WHERE q.claimable LIMIT p_max_queued) n)
               >= p_max_queued THEN
            RAISE EXCEPTION '% runs are already queued', p_max_queued USING ERRCODE = 'AGR04';
        END IF;
    END IF;
    RETURN QUERY
        INSERT INTO runs AS r (run_id, session_id, request_id, status, spec, owner, attempt, lease_expires,
                               claimable, create_time, update_time)
        VALUES (p_run, p_session, p_request, v_status, p_spec::json,
                CASE WHEN v_status = 'running' THEN p_owner ELSE '' END,
                CASE WHEN v_status = 'running' THEN 1 ELSE 0 END,
                CASE WHEN v_status = 'running' THEN p_lease_until ELSE 0 END,
                v_claimable, p_now, p_now)
        ON CONFLICT DO NOTHING
        RETURNING true, r.run_id, r.status, NULL::json, r.owner, r.attempt, r.lease_expires,
                  r.last_sequence, r.checkpoint, r.result, r.cancel_reason, r.trace_id,
                  r.create_time, r.update_time;
    IF FOUND THEN
        IF v_claimable THEN
            PERFORM pg_notify(agentd_run_channel('run_work'), '');
        END IF;
        RETURN;
    END IF;
    -- Another replica committed a run with this request id meanwhile (this statement
    -- sees it now): that one is the run.
    RETURN QUERY
        SELECT false, r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires,
               r.last_sequence, r.checkpoint, r.result, r.cancel_reason, r.trace_id,
               r.create_time, r.update_time
        FROM runs r WHERE r.request_id = p_request;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % already exists', p_run USING ERRCODE = 'AGR05';
    END IF;
END $$;

-- record_progress: fenced append (numbered from p_first, which must follow the log)
-- and, when given, the new checkpoint. AGR01 lease lost, AGR02 sequence gap.
CREATE FUNCTION agentd_run_progress(
    p_run text, p_attempt integer, p_first bigint, p_events text[], p_trace text, p_checkpoint text,
    p_now double precision
) RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_count integer := coalesce(cardinality(p_events), 0);
    v_last bigint;
BEGIN
    UPDATE runs r
    SET last_sequence = r.last_sequence + v_count,
        checkpoint = coalesce(p_checkpoint::json, r.checkpoint),
        trace_id = CASE WHEN r.trace_id = '' AND v_count > 0 THEN p_trace ELSE r.trace_id END,
        update_time = p_now
    WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt
    RETURNING r.last_sequence - v_count INTO v_last;
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
END $$;

-- finish: the final events, the terminal status and result, retention, and the
-- session's next run made claimable. AGR01 / AGR02 as for progress.
CREATE FUNCTION agentd_run_finish(
    p_run text, p_attempt integer, p_first bigint, p_events text[], p_trace text, p_status text,
    p_result text, p_expire double precision, p_now double precision
) RETURNS void LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_count integer := coalesce(cardinality(p_events), 0);
    v_session text;
    v_last bigint;
BEGIN
    SELECT r.session_id INTO v_session FROM runs r WHERE r.run_id = p_run;
    IF NOT FOUND THEN
        RAISE EXCEPTION 'run % is no longer executed by attempt %', p_run, p_attempt USING ERRCODE = 'AGR01';
    END IF;
    IF v_session IS NOT NULL THEN
        PERFORM agentd_run_lock_session(v_session);
    END IF;
    UPDATE runs r
    SET status = p_status, result = p_result::json, owner = '', lease_expires = 0, claimable = false,
        last_sequence = r.last_sequence + v_count,
        trace_id = CASE WHEN r.trace_id = '' AND v_count > 0 THEN p_trace ELSE r.trace_id END,
        update_time = p_now, expire_time = p_expire
    WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt
    RETURNING r.last_sequence - v_count INTO v_last;
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
    IF v_session IS NOT NULL THEN
        PERFORM agentd_run_promote(v_session);
    END IF;
END $$;

-- release (drain): RUNNING with this attempt -> QUEUED and claimable, checkpoint kept.
CREATE FUNCTION agentd_run_release(p_run text, p_attempt integer, p_now double precision)
RETURNS boolean LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    UPDATE runs r SET status = 'queued', owner = '', lease_expires = 0, claimable = true, update_time = p_now
    WHERE r.run_id = p_run AND r.status = 'running' AND r.attempt = p_attempt;
    IF NOT FOUND THEN
        RETURN false;
    END IF;
    PERFORM pg_notify(agentd_run_channel('run_work'), '');
    RETURN true;
END $$;

-- Requeue every RUNNING run whose lease ended before p_now. Rows another transaction
-- holds (a renewal, a finish) are skipped, never waited for: the next call sees them.
CREATE FUNCTION agentd_run_requeue_expired(p_now double precision)
RETURNS SETOF text LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    RETURN QUERY
        UPDATE runs r SET status = 'queued', owner = '', lease_expires = 0, claimable = true, update_time = p_now
        WHERE r.run_id = ANY (ARRAY(
                SELECT x.run_id FROM runs x WHERE x.status = 'running' AND x.lease_expires < p_now
                ORDER BY x.lease_expires FOR UPDATE SKIP LOCKED))
          AND r.status = 'running' AND r.lease_expires < p_now
        RETURNING r.run_id;
    IF FOUND THEN
        PERFORM pg_notify(agentd_run_channel('run_work'), '');
    END IF;
END $$;

-- cancel: a QUEUED run ends here with a RunCancelled event (the codec's shape); an
-- executing one records the first reason. Returns the run afterwards (no row: unknown).
CREATE FUNCTION agentd_run_cancel(
    p_run text, p_reason text, p_event_ns bigint, p_expire double precision, p_now double precision
) RETURNS TABLE (
    o_run_id text, o_status text, o_spec json, o_owner text, o_attempt integer,
    o_lease double precision, o_last bigint, o_checkpoint json, o_result json, o_cancel text,
    o_trace text, o_create double precision, o_update double precision
) LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
DECLARE
    v_session text;
    v_run runs%ROWTYPE;
    v_seq bigint;
    v_payload jsonb;
BEGIN
    SELECT r.session_id INTO v_session FROM runs r
    WHERE r.run_id = p_run AND (r.expire_time IS NULL OR r.expire_time > p_now);
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_session IS NOT NULL THEN
        PERFORM agentd_run_lock_session(v_session);
    END IF;
    SELECT * INTO v_run FROM runs r WHERE r.run_id = p_run FOR UPDATE;
    IF NOT FOUND THEN
        RETURN;
    END IF;
    IF v_run.status = 'queued' THEN
        v_seq := v_run.last_sequence + 1;
        v_payload := jsonb_build_object(
            't', 'run_cancelled', 'reason', p_reason,
            'usage', coalesce(v_run.checkpoint -> 'usage', '[0, 0, 0]'::json),
            'turns', coalesce((v_run.checkpoint ->> 'turns')::bigint, 0));
        INSERT INTO run_events (run_id, seq, data)
        VALUES (p_run, v_seq, (v_payload || jsonb_build_object(
            'seq', v_seq, 'ts', p_event_ns, 'trace', v_run.trace_id))::json);
        UPDATE runs r
        SET status = 'cancelled', result = v_payload::json, owner = '', lease_expires = 0, claimable = false,
            last_sequence = v_seq, update_time = p_now, expire_time = p_expire
        WHERE r.run_id = p_run;
        PERFORM pg_notify(agentd_run_channel('run_events'), p_run);
        IF v_session IS NOT NULL THEN
            PERFORM agentd_run_promote(v_session);
        END IF;
    ELSIF v_run.status IN ('running', 'requires_action') AND v_run.cancel_reason = '' THEN
        UPDATE runs r SET cancel_reason = p_reason, update_time = p_now WHERE r.run_id = p_run;
    END IF;
    RETURN QUERY
        SELECT r.run_id, r.status, r.spec, r.owner, r.attempt, r.lease_expires, r.last_sequence,
               r.checkpoint, r.result, r.cancel_reason, r.trace_id, r.create_time, r.update_time
        FROM runs r WHERE r.run_id = p_run;
END $$;
