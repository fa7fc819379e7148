-- Run stats, 2 of 4: the figures of the page's groups (keys :first_* to :last_*), per bucket
-- (b: start_ns / :bucket_ns) and over the whole window (b = -1). Percentiles are nearest-rank:
-- the value ranked ceil(p * n / 100) in ascending order, the rank as an integer expression
-- (memory.nearest_rank). Time to first token ranks only the runs that have one: row_number puts
-- them first, count(ttft) counts them, and with none the rank is 0, which no row has (NULL).
-- The page's key range reads +t.agent (no index on it): the window is read through its index,
-- traces_by_tenant (all agents) or traces_by_tenant_agent (an agent filter), not all time's runs.
WITH runs AS (
    SELECT t.agent AS agent, {version} AS v, t.start_ns / :bucket_ns AS b, t.outcome AS outcome,
           t.end_ns - t.start_ns AS d, t.ttft_ms AS ttft, t.input_tokens AS tin, t.output_tokens AS tout,
           t.cached_input_tokens AS tcached, t.reasoning_tokens AS treason, t.cost_usd_nanos AS cost,
           t.unpriced_calls AS unpriced, t.tool_calls AS tc, t.tool_errors AS te
    FROM traces t {indexed}
    WHERE {filters}
      AND (+t.agent, {version}) >= (:first_agent, :first_version)
      AND (+t.agent, {version}) <= (:last_agent, :last_version)
), sets AS (
    SELECT agent, v, b, outcome, d, ttft, tin, tout, tcached, treason, cost, unpriced, tc, te FROM runs
    UNION ALL
    SELECT agent, v, -1, outcome, d, ttft, tin, tout, tcached, treason, cost, unpriced, tc, te FROM runs
), ranked AS (
    SELECT sets.*,
           row_number() OVER (PARTITION BY agent, v, b ORDER BY d) AS dk,
           row_number() OVER (PARTITION BY agent, v, b ORDER BY ttft IS NULL, ttft) AS tk,
           count(*) OVER (PARTITION BY agent, v, b) AS n,
           count(ttft) OVER (PARTITION BY agent, v, b) AS tn
    FROM sets
)
SELECT agent, v, b,
       count(*),
       sum(outcome = 'completed'),
       sum(outcome = 'failed'),
       sum(outcome = 'cancelled'),
       max(CASE WHEN dk = (50 * n + 99) / 100 THEN d END),
       max(CASE WHEN dk = (95 * n + 99) / 100 THEN d END),
       max(CASE WHEN dk = (99 * n + 99) / 100 THEN d END),
       max(tn),
       max(CASE WHEN tk = (50 * tn + 99) / 100 THEN ttft END),
       max(CASE WHEN tk = (95 * tn + 99) / 100 THEN ttft END),
       max(CASE WHEN tk = (99 * tn + 99) / 100 THEN ttft END),
       sum(tin),
       sum(tout),
       sum(tcached),
       sum(treason),
       coalesce(sum(cost), 0),
       sum(unpriced > 0),
       sum(tc),
       sum(te)
FROM ranked
GROUP BY agent, v, b
ORDER BY 1, 2, 3
