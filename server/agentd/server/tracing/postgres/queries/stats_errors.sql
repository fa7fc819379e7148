-- Run stats, 3 of 4: the page's failed runs by error code ('' when the trace recorded none), per
-- bucket and over the whole window (b = -1).
WITH failed AS (
    SELECT t.agent COLLATE "C" AS agent, {version} AS v, t.start_ns / :bucket_ns::bigint AS b,
           coalesce(t.error_code, '') AS code
    FROM {s}.traces t
    WHERE {filters}
      AND (t.agent COLLATE "C", {version}) >= (:first_agent::text COLLATE "C", :first_version::bigint)
      AND (t.agent COLLATE "C", {version}) <= (:last_agent::text COLLATE "C", :last_version::bigint)
      AND t.outcome = 'failed'
)
SELECT agent, v, CASE WHEN grouping(b) = 1 THEN -1 ELSE b END, code, count(*)
FROM failed
GROUP BY GROUPING SETS ((agent, v, b, code), (agent, v, code))
