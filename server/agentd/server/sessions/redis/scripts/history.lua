-- ARGV: now, create ('1'/'0'), ttl_s of a created session ('' = none).
-- {created_at, records} for a live session; 1 when it was created; nil when missing.
local f = live('created_at')
if f then return {f[3], redis.call('LRANGE', items, 0, -1)} end
if ARGV[2] ~= '1' then return false end
create(ARGV[3], 4, 3)
return 1
