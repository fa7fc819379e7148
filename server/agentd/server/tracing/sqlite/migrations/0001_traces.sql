-- Version 1: traces, their spans and the agents that ran in them.
CREATE TABLE traces (
    trace_id TEXT PRIMARY KEY,
    run_id TEXT NOT NULL,
    workflow_name TEXT NOT NULL,
    group_id TEXT NOT NULL,
    metadata TEXT NOT NULL,
    agent TEXT NOT NULL,
    agents TEXT NOT NULL,
    status TEXT NOT NULL,
    error TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    input_tokens INTEGER NOT NULL,
    output_tokens INTEGER NOT NULL,
    span_count INTEGER NOT NULL
);
CREATE INDEX traces_by_start ON traces (start_ns DESC, trace_id DESC);
CREATE INDEX traces_by_workflow ON traces (workflow_name, start_ns DESC, trace_id DESC);
CREATE INDEX traces_by_group ON traces (group_id, start_ns DESC, trace_id DESC);
CREATE TABLE trace_spans (
    trace_id TEXT NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
    span_id TEXT NOT NULL,
    parent_id TEXT NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL,
    start_ns INTEGER NOT NULL,
    end_ns INTEGER NOT NULL,
    error TEXT NOT NULL,
    attributes TEXT NOT NULL,
    PRIMARY KEY (trace_id, span_id)
) WITHOUT ROWID;
CREATE TABLE trace_agents (
    trace_id TEXT NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
    agent TEXT NOT NULL,
    PRIMARY KEY (trace_id, agent)
) WITHOUT ROWID;
CREATE INDEX trace_agents_by_agent ON trace_agents (agent, trace_id);
