-- Version 7: the two helpers every create and finish calls, in PL/pgSQL instead of SQL.
-- A SQL function with a SET clause is never inlined: each call from a function re-plans its
-- body, once per transaction; PL/pgSQL keeps its plan for the connection. Same names,
-- arguments and results, so the functions calling them (and older replicas) are unchanged,
-- and the same lock key and channel names (channel_name() in Python mirrors the latter).

-- Serialises the session gate of one session on every replica, until commit.
CREATE OR REPLACE FUNCTION agentd_run_lock_session(p_session text) RETURNS void
LANGUAGE plpgsql SET search_path FROM CURRENT AS $$
BEGIN
    PERFORM pg_advisory_xact_lock(hashtextextended('agentd.runs/' || current_schema() || '/' || p_session, 0));
END $$;

-- The NOTIFY channel of a kind ('run_work', 'run_events', 'run_control').
CREATE OR REPLACE FUNCTION agentd_run_channel(p_kind text) RETURNS text
LANGUAGE plpgsql STABLE SET search_path FROM CURRENT AS $$
BEGIN
    RETURN CASE WHEN octet_length(current_schema()) + 1 + octet_length(p_kind) <= 63
                THEN current_schema() || '_' || p_kind
                ELSE 'agentd_' || left(md5(current_schema()), 16) || '_' || p_kind END;
END $$;
