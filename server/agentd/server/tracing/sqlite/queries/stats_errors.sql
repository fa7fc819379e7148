-- Run stats, 3 of 4: the page's failed runs by error code ('' when the trace recorded none), per
-- bucket and over the whole window (b = -1).
WITH failed AS (
    SELECT t.agent AS agent, {version} AS v, t.start_ns / :bucket_ns AS b, coalesce(t.error_code, '') AS code
    FROM traces t {indexed}
    WHERE {filters}
      AND (+t.agent, {version}) >= (:first_agent, :first_version)
      AND (+t.agent, {version}) <= (:last_agent, :last_version)
      AND t.outcome = 'failed'
)
SELECT agent, v, b, code, count(*) FROM failed GROUP BY agent, v, b, code
UNION ALL
SELECT agent, v, -1, code, count(*) FROM failed GROUP BY agent, v, code
