-- Run stats, 4 of 4: the tool calls of the page's runs per group and tool: calls, errors, duration
-- percentiles (percentile_disc, as stats_runs.sql), the :max_tools most called tools of each group
-- (then by name, in the "C" collation) and how many tools the group called in all.
WITH calls AS (
    SELECT t.agent COLLATE "C" AS agent, {version} AS v, c.tool_name COLLATE "C" AS tool, c.is_error AS e,
           c.duration_ns AS d
    FROM {s}.traces t
    JOIN {s}.trace_tool_calls c ON c.trace_id = t.trace_id
    WHERE {filters}
      AND (t.agent COLLATE "C", {version}) >= (:first_agent::text COLLATE "C", :first_version::bigint)
      AND (t.agent COLLATE "C", {version}) <= (:last_agent::text COLLATE "C", :last_version::bigint)
), per_tool AS (
    SELECT agent, v, tool, count(*) AS calls, count(*) FILTER (WHERE e) AS errors,
           percentile_disc(0.5) WITHIN GROUP (ORDER BY d) AS p50,
           percentile_disc(0.95) WITHIN GROUP (ORDER BY d) AS p95,
           percentile_disc(0.99) WITHIN GROUP (ORDER BY d) AS p99
    FROM calls
    GROUP BY agent, v, tool
), placed AS (
    SELECT per_tool.*,
           row_number() OVER (PARTITION BY agent, v ORDER BY calls DESC, tool) AS place,
           count(*) OVER (PARTITION BY agent, v) AS tools
    FROM per_tool
)
SELECT agent, v, tool, calls, errors, p50, p95, p99, tools
FROM placed
WHERE place <= :max_tools::bigint
ORDER BY agent, v, place
