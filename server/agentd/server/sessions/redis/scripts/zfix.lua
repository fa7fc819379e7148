-- KEYS[1]: a sorted set. ARGV: (member, expected score, new score or '' to remove)...
-- Each change applies only while the member still has the expected score, so an entry
-- a concurrent writer has just (re)written is left alone. Returns how many changed.
local changed = 0
for i = 1, #ARGV, 3 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    end
    changed = changed + 1
  end
end
return changed
