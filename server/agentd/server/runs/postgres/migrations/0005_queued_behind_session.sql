-- Version 5: runs queued behind their session (SESSION_POLICY_ENQUEUE) count against
-- max_queued like claimable ones: every QUEUED run does, and a new run that would be queued
-- (claimable or behind its session) is refused with AGR04 once max_queued runs are.
CREATE INDEX runs_queued ON runs (pos) WHERE status = 'queued';

-- create_run, as in version 3, with the queue check above.
CREATE OR REPLACE FUNCTION agentd_run_create(
    p_run text, p_session text, p_request text, p_spec text, p_reject boolean,
    p_owner text, p_lease_until double precision, p_max_queued integer, p_now double precision,
    p_tenant_max_active integer, p_tenant_max_queued integer, p_start_rate double precision,
    p_start_burst integer
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
    v_tenant text;
    v_tokens double precision;
    v_taken_at double precision;
    v_at double precision;
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
    END IF;
    IF p_tenant_max_active > 0 OR p_tenant_max_queued > 0 OR p_start_rate > 0 THEN
        v_tenant := agentd_run_tenant(p_spec::json);
        -- Every count below is taken after this lock, with a fresh snapshot: it sees the runs
        -- of every create of this tenant that held the lock before (committed as they released it).
        PERFORM agentd_run_lock_tenant(v_tenant);
        IF p_tenant_max_active > 0
           AND (SELECT count(*) FROM (SELECT 1 FROM runs a WHERE a.tenant = v_tenant
                    AND a.status IN ('queued', 'running', 'requires_action') LIMIT p_tenant_max_active) n)
               >= p_tenant_max_active THEN
            RAISE EXCEPTION 'tenant % already has % unfinished runs', v_tenant, p_tenant_max_active
                USING ERRCODE = 'AGR06', DETAIL = 'active';
        END IF;
        IF p_tenant_max_queued > 0 AND v_claimable
           AND (SELECT count(*) FROM (SELECT 1 FROM runs q WHERE q.tenant = v_tenant AND q.claimable
                    LIMIT p_tenant_max_queued) n)
               >= p_tenant_max_queued THEN
            RAISE EXCEPTION 'tenant % already has % queued runs', v_tenant, p_tenant_max_queued
                USING ERRCODE = 'AGR06', DETAIL = 'queued';
        END IF;
    END IF;
    IF v_status = 'queued'
       AND (SELECT count(*) FROM (SELECT 1 FROM runs q WHERE q.status = 'queued' LIMIT p_max_queued) n)
           >= p_max_queued THEN
        RAISE EXCEPTION '% runs are already queued', p_max_queued USING ERRCODE = 'AGR04';
    END IF;
    IF p_start_rate > 0 THEN
        -- Taken last (written only once the run is), so a refused start takes no token; a
        -- clock behind the bucket's refills nothing.
        SELECT b.tokens, b.taken_at INTO v_tokens, v_taken_at FROM run_tenant_buckets b WHERE b.tenant = v_tenant;
        IF NOT FOUND THEN
            v_tokens := p_start_burst;
            v_taken_at := p_now;
        END IF;
        v_at := greatest(p_now, v_taken_at);
        v_tokens := least(p_start_burst::double precision, v_tokens + (v_at - v_taken_at) * p_start_rate);
        IF v_tokens < 1 THEN
            RAISE EXCEPTION 'tenant % starts runs too fast', v_tenant
                USING ERRCODE = 'AGR06', DETAIL = 'rate:' || ((1 - v_tokens) / p_start_rate)::text;
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
        IF p_start_rate > 0 THEN
            INSERT INTO run_tenant_buckets AS b (tenant, tokens, taken_at, full_at)
            VALUES (v_tenant, v_tokens - 1, v_at, v_at + (p_start_burst - (v_tokens - 1)) / p_start_rate)
            ON CONFLICT (tenant) DO UPDATE
                SET tokens = excluded.tokens, taken_at = excluded.taken_at, full_at = excluded.full_at;
        END IF;
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
