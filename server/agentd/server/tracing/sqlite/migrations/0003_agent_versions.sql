-- Version 3: agent versions. A trace records the version of the agent its run started with
-- (RunInput.agent_version: 1, 2, 3... for agents made through the API, 0 for app-module and file
-- agents). Traces archived before versions were recorded read as version 0. A listing by
-- version (e.g. the versions a split alias sends traffic to) reads its own index, newest first.
ALTER TABLE traces ADD COLUMN agent_version INTEGER NOT NULL DEFAULT 0;
CREATE INDEX traces_by_tenant_version ON traces (tenant, agent_version, start_ns DESC, trace_id DESC);
