-- Version 1: traces, their spans and the agents that ran in them.
CREATE TABLE traces (
    trace_id text PRIMARY KEY,
    run_id text NOT NULL,
    workflow_name text NOT NULL,
    group_id text NOT NULL,
    metadata jsonb NOT NULL,
    agent text NOT NULL,
    agents jsonb NOT NULL,
    status text NOT NULL,
    error text NOT NULL,
    start_ns bigint NOT NULL,
    end_ns bigint NOT NULL,
    input_tokens bigint NOT NULL,
    output_tokens bigint NOT NULL,
    span_count integer NOT NULL
);
CREATE INDEX traces_by_start ON traces (start_ns DESC, trace_id DESC);
CREATE INDEX traces_by_workflow ON traces (workflow_name, start_ns DESC, trace_id DESC);
CREATE INDEX traces_by_group ON traces (group_id, start_ns DESC, trace_id DESC);
CREATE TABLE trace_spans (
    trace_id text NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
    span_id text NOT NULL,
    parent_id text NOT NULL,
    kind text NOT NULL,
    name text NOT NULL,
    start_ns bigint NOT NULL,
    end_ns bigint NOT NULL,
    error text NOT NULL,
    attributes jsonb NOT NULL,
    PRIMARY KEY (trace_id, span_id)
);
CREATE TABLE trace_agents (
    trace_id text NOT NULL REFERENCES traces (trace_id) ON DELETE CASCADE,
    agent text NOT NULL,
    PRIMARY KEY (trace_id, agent)
);
CREATE INDEX trace_agents_by_agent ON trace_agents (agent, trace_id);
