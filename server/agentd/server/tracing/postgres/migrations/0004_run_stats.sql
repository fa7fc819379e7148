-- Version 4: run stats (StatsService.GetStats), aggregated by SQL over the traces of a tenant and a
-- time window. Each trace keeps what its run span says about the run (archive.run_facts): the
-- outcome (completed, failed or cancelled), the error code of a failed run, the time to the first
-- token in ms (NULL: no token came), the cost in nano-dollars (NULL: no call had a price), the
-- count of unpriced model calls, cached input and reasoning tokens, and its tool calls and errors.
-- Every tool call is a row of trace_tool_calls (tool, error or not, duration), deleted with its
-- trace. Traces archived before this version get their outcome and tool calls from what is
-- stored (their status, error and tool spans), and no code, TTFT or cost.
ALTER TABLE traces
    ADD COLUMN outcome text NOT NULL DEFAULT '',
    ADD COLUMN error_code text,
    ADD COLUMN ttft_ms double precision,
    ADD COLUMN cost_usd_nanos bigint,
    ADD COLUMN unpriced_calls bigint NOT NULL DEFAULT 0,
    ADD COLUMN cached_input_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN reasoning_tokens bigint NOT NULL DEFAULT 0,
    ADD COLUMN tool_calls bigint NOT NULL DEFAULT 0,
    ADD COLUMN tool_errors bigint NOT NULL DEFAULT 0;
CREATE TABLE trace_tool_calls (
    trace_id text NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
    span_id text NOT NULL,
    tool_name text NOT NULL,
    is_error boolean NOT NULL,
    duration_ns bigint NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
INSERT INTO trace_tool_calls (trace_id, span_id, tool_name, is_error, duration_ns)
    SELECT trace_id, span_id, coalesce(attributes ->> 'tool_name', name), error <> '',
           greatest(end_ns - start_ns, 0)
    FROM trace_spans WHERE kind = 'function';
UPDATE traces SET outcome = CASE
    WHEN status = 'ok' THEN 'completed' WHEN left(error, 9) = 'cancelled' THEN 'cancelled' ELSE 'failed' END;
UPDATE traces t SET tool_calls = c.calls, tool_errors = c.errors
FROM (
    SELECT trace_id, count(*) AS calls, count(*) FILTER (WHERE is_error) AS errors
    FROM trace_tool_calls GROUP BY trace_id
) c
WHERE c.trace_id = t.trace_id;
-- A tenant's window, all agents (traces_by_tenant) or one agent: both read only that range.
CREATE INDEX traces_by_tenant_agent ON traces (tenant, agent, start_ns);
