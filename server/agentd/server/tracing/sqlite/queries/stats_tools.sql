-- Run stats, 4 of 4: the tool calls of the page's runs per group and tool: calls, errors, duration
-- percentiles (nearest-rank, as stats_runs.sql), the :max_tools most called tools of each group
-- (then by name) and how many tools the group called in all.
WITH calls AS (
    SELECT t.agent AS agent, {version} AS v, c.tool_name AS tool, c.is_error AS e, c.duration_ns AS d
    FROM traces t {indexed}
    JOIN trace_tool_calls c ON c.trace_id = t.trace_id
    WHERE {filters}
      AND (+t.agent, {version}) >= (:first_agent, :first_version)
      AND (+t.agent, {version}) <= (:last_agent, :last_version)
), ranked AS (
    SELECT calls.*,
           row_number() OVER (PARTITION BY agent, v, tool ORDER BY d) AS k,
           count(*) OVER (PARTITION BY agent, v, tool) AS n
    FROM calls
), per_tool AS (
    SELECT agent, v, tool, count(*) AS calls, sum(e) AS errors,
           max(CASE WHEN k = (50 * n + 99) / 100 THEN d END) AS p50,
           max(CASE WHEN k = (95 * n + 99) / 100 THEN d END) AS p95,
           max(CASE WHEN k = (99 * n + 99) / 100 THEN d END) AS p99
    FROM ranked
    GROUP BY agent, v, tool
), placed AS (
    SELECT per_tool.*,
           row_number() OVER (PARTITION BY agent, v ORDER BY calls DESC, tool) AS place,
           count(*) OVER (PARTITION BY agent, v) AS tools
    FROM per_tool
)
SELECT agent, v, tool, calls, errors, p50, p95, p99, tools
FROM placed
WHERE place <= :max_tools
ORDER BY agent, v, place
