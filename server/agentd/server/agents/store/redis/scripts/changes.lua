-- KEYS: the revision counter, the change log. ARGV: since, the feed's limit.
-- {current} when nothing changed, `since` is ahead or too far behind (the caller decides
-- which); else {current, the entries after `since`, newest first}.
local current = tonumber(redis.call('GET', KEYS[1]) or '0')
local since = tonumber(ARGV[1])
if since >= current or current - since > tonumber(ARGV[2]) then return {current} end
return {current, redis.call('LRANGE', KEYS[2], 0, current - since - 1)}
