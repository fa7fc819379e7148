-- ARGV: tenant, name, now. Soft delete: the versions stay. Returns 1, or 0 when there is
-- no live agent.
if not live() then return 0 end
redis.call('HSET', AGENT, 'deleted', '1', 'update_time', ARGV[3])
redis.call('DEL', ALIASES)
redis.call('ZREM', INDEX, name)
if redis.call('ZCARD', INDEX) == 0 then redis.call('ZREM', TENANTS, tenant) end
bump()
return 1
