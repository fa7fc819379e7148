-- Version 2: tenants. Every trace belongs to the tenant owning its run (agentd.server.tenancy).
-- Traces archived before tenants existed are the default tenant's. Listings are always of
-- one tenant, so their indexes lead with it. traces_by_start stays for the retention sweep,
-- which is global.
ALTER TABLE traces ADD COLUMN tenant TEXT NOT NULL DEFAULT 'default';
CREATE INDEX traces_by_tenant ON traces (tenant, start_ns DESC, trace_id DESC);
CREATE INDEX traces_by_tenant_workflow ON traces (tenant, workflow_name, start_ns DESC, trace_id DESC);
CREATE INDEX traces_by_tenant_group ON traces (tenant, group_id, start_ns DESC, trace_id DESC);
DROP INDEX traces_by_workflow;
DROP INDEX traces_by_group;
