-- Run stats, 2 of 4: the figures of the page's groups (keys :first_* to :last_*), per bucket
-- (b: start_ns / :bucket_ns) and over the whole window (b = -1), in one pass with grouping sets.
-- Percentiles are percentile_disc: the value ranked ceil(fraction * n) in ascending order, which
-- is nearest-rank (memory.nearest_rank); NULLs (runs without a first token) are not ranked.
WITH runs AS (
    SELECT t.agent COLLATE "C" AS agent, {version} AS v, t.start_ns / :bucket_ns::bigint AS b,
           t.outcome AS outcome, t.end_ns - t.start_ns AS d, t.ttft_ms AS ttft, t.input_tokens AS tin,
           t.output_tokens AS tout, t.cached_input_tokens AS tcached, t.reasoning_tokens AS treason,
           t.cost_usd_nanos AS cost, t.unpriced_calls AS unpriced, t.tool_calls AS tc, t.tool_errors AS te
    FROM {s}.traces t
    WHERE {filters}
      AND (t.agent COLLATE "C", {version}) >= (:first_agent::text COLLATE "C", :first_version::bigint)
      AND (t.agent COLLATE "C", {version}) <= (:last_agent::text COLLATE "C", :last_version::bigint)
)
SELECT agent, v, CASE WHEN grouping(b) = 1 THEN -1 ELSE b END,
       count(*),
       count(*) FILTER (WHERE outcome = 'completed'),
       count(*) FILTER (WHERE outcome = 'failed'),
       count(*) FILTER (WHERE outcome = 'cancelled'),
       percentile_disc(0.5) WITHIN GROUP (ORDER BY d),
       percentile_disc(0.95) WITHIN GROUP (ORDER BY d),
       percentile_disc(0.99) WITHIN GROUP (ORDER BY d),
       count(ttft),
       percentile_disc(0.5) WITHIN GROUP (ORDER BY ttft),
       percentile_disc(0.95) WITHIN GROUP (ORDER BY ttft),
       percentile_disc(0.99) WITHIN GROUP (ORDER BY ttft),
       sum(tin)::bigint,
       sum(tout)::bigint,
       sum(tcached)::bigint,
       sum(treason)::bigint,
       coalesce(sum(cost), 0)::bigint,
       count(*) FILTER (WHERE unpriced > 0),
       sum(tc)::bigint,
       sum(te)::bigint
FROM runs
GROUP BY GROUPING SETS ((agent, v, b), (agent, v))
ORDER BY 1, 2, 3
