-- ARGV: tenant, name, alias. Returns 1; 0 when there is no live agent; -1 when it has no
-- such alias.
if not live() then return 0 end
if redis.call('HEXISTS', ALIASES, ARGV[3]) == 0 then return -1 end
redis.call('HDEL', ALIASES, ARGV[3])
bump()
return 1
