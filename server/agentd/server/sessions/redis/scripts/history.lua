-- ARGV: now, create ('1'/'0'), ttl_s of a created session ('' = none), limit ('' = all).
-- {created_at, records, item count} for a live session (with a limit, only its newest
-- `limit` records, oldest first); 1 when it was created; nil when missing.
local f = live('created_at')
if f then
  local n = redis.call('LLEN', items)
  local limit = tonumber(ARGV[4])
  if limit and limit < n then return {f[3], redis.call('LRANGE', items, n - limit, -1), n} end
  return {f[3], redis.call('LRANGE', items, 0, -1), n}
end
if ARGV[2] ~= '1' then return false end
create(ARGV[3], 5, 4)  -- no metadata, no state: ARGV ends at the limit
return 1
