-- Run stats, 1 of 4: the groups of one page. The (agent, version) keys of the tenant's runs in the
-- window, ascending, after the previous page's last key (none on the first page), at most :limit
-- (one more than the page holds, to tell whether more follow).
-- {filters}: the tenant, window, agent and version conditions over traces t (archive.py).
-- {version}: a key's version, t.agent_version when grouping by version, else -1.
-- {indexed}: the index that reads just the window: traces_by_tenant, or traces_by_tenant_agent
-- with an agent filter (the planner, without statistics, may otherwise scan all the tenant's runs).
SELECT DISTINCT t.agent AS agent, {version} AS v
FROM traces t {indexed}
WHERE {filters}
  AND (:after_agent IS NULL OR (t.agent, {version}) > (:after_agent, :after_version))
ORDER BY 1, 2
LIMIT :limit
