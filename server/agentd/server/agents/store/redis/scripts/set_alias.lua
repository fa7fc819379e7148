-- ARGV: tenant, name, alias, the alias's value (JSON [update_time, routes]), then the
-- routes' versions. Returns 1; 0 when there is no live agent; -i when the i-th route's
-- version does not exist (versions 1..latest all do).
local latest = live()
if not latest then return 0 end
for i = 5, #ARGV do
  if tonumber(ARGV[i]) > latest then return -(i - 4) end
end
redis.call('HSET', ALIASES, ARGV[3], ARGV[4])
bump()
return 1
