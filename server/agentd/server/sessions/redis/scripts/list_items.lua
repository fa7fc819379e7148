-- ARGV: now, newest first ('1'/'0'), bound ('' = none; after or before sequence), limit.
-- Records in list order (the caller reverses newest-first pages); nil when missing.
if not live() then return false end
local n = redis.call('LLEN', items)
local limit = tonumber(ARGV[4])
if ARGV[2] == '1' then
  local hi = n
  if ARGV[3] ~= '' then hi = lower_bound(tonumber(ARGV[3]), n) end
  if hi == 0 then return {} end
  return redis.call('LRANGE', items, math.max(0, hi - limit), hi - 1)
end
local lo = lower_bound(tonumber(ARGV[3]) + 1, n)
if lo >= n then return {} end
return redis.call('LRANGE', items, lo, lo + limit - 1)
