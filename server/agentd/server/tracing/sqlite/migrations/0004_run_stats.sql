-- Version 4: run stats (StatsService.GetStats), aggregated by SQL over the traces of a tenant and a
-- time window. Each trace keeps what its run span says about the run (archive.run_facts): the
-- outcome (completed, failed or cancelled), the error code of a failed run, the time to the first
-- token in ms (NULL: no token came), the cost in nano-dollars (NULL: no call had a price), the
-- count of unpriced model calls, cached input and reasoning tokens, and its tool calls and errors.
-- Every tool call is a row of trace_tool_calls (tool, error or not, duration), deleted with its
-- trace. Traces archived before this version get their outcome and tool calls from what is
-- stored (their status, error and tool spans), and no code, TTFT or cost.
ALTER TABLE traces ADD COLUMN outcome TEXT NOT NULL DEFAULT '';
ALTER TABLE traces ADD COLUMN error_code TEXT;
ALTER TABLE traces ADD COLUMN ttft_ms REAL;
ALTER TABLE traces ADD COLUMN cost_usd_nanos INTEGER;
ALTER TABLE traces ADD COLUMN unpriced_calls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traces ADD COLUMN cached_input_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traces ADD COLUMN reasoning_tokens INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traces ADD COLUMN tool_calls INTEGER NOT NULL DEFAULT 0;
ALTER TABLE traces ADD COLUMN tool_errors INTEGER NOT NULL DEFAULT 0;
CREATE TABLE trace_tool_calls (
    trace_id TEXT NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
    span_id TEXT NOT NULL,
    tool_name TEXT NOT NULL,
    is_error INTEGER NOT NULL,
    duration_ns INTEGER NOT NULL,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
INSERT INTO trace_tool_calls (trace_id, span_id, tool_name, is_error, duration_ns)
    SELECT trace_id, span_id, coalesce(json_extract(attributes, '$.tool_name'), name), error <> '',
           max(end_ns - start_ns, 0)
    FROM trace_spans WHERE kind = 'function';
UPDATE traces SET
    outcome = CASE WHEN status = 'ok' THEN 'completed' WHEN substr(error, 1, 9) = 'cancelled' THEN 'cancelled' ELSE 'failed' END,
    tool_calls = (SELECT count(*) FROM trace_tool_calls c WHERE c.trace_id = traces.trace_id),
    tool_errors = (SELECT coalesce(sum(c.is_error), 0) FROM trace_tool_calls c WHERE c.trace_id = traces.trace_id);
-- A tenant's window, all agents (traces_by_tenant) or one agent: both read only that range.
CREATE INDEX traces_by_tenant_agent ON traces (tenant, agent, start_ns)
