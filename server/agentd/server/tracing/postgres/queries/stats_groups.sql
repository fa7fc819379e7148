-- Run stats, 1 of 4: the groups of one page. The (agent, version) keys of the tenant's runs in the
-- window, ascending (agent ids in the "C" collation: code point order, as the other backends
-- sort), after the previous page's last key (none on the first page), at most :limit (one more
-- than the page holds, to tell whether more follow).
-- {filters}: the tenant, window, agent and version conditions over traces t (archive.py).
-- {version}: a key's version, t.agent_version when grouping by version, else -1.
-- {s}: the schema.
SELECT DISTINCT t.agent COLLATE "C" AS agent, {version} AS v
FROM {s}.traces t
WHERE {filters}
  AND (:after_agent::text IS NULL
       OR (t.agent COLLATE "C", {version}) > (:after_agent::text COLLATE "C", :after_version::bigint))
ORDER BY 1, 2
LIMIT :limit::bigint
