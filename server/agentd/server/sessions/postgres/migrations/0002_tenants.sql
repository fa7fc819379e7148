-- Version 2: tenants. A session belongs to the tenant named before the '/' in its id, or to
-- "default" when there is none (agentd.server.tenancy), so sessions made before tenants
-- existed are the default tenant's. Listing reads one tenant's sessions from its own index.
ALTER TABLE sessions ADD COLUMN tenant text COLLATE "C" GENERATED ALWAYS AS (
    CASE WHEN strpos(id, '/') > 0 THEN split_part(id, '/', 1) ELSE 'default' END
) STORED;
CREATE INDEX sessions_by_tenant ON sessions (tenant, created_at DESC, id DESC);
DROP INDEX sessions_by_created;
