-- ARGV: tenant, name, now, the version's value (JSON [create_time, created_by, definition]).
-- Returns the new version, or 0 when a live agent has the name. A deleted agent comes
-- back with the version after its newest.
local f = redis.call('HMGET', AGENT, 'latest_version', 'deleted')
if f[1] and f[2] ~= '1' then return 0 end
local version = (tonumber(f[1]) or 0) + 1
redis.call('HSET', VERSIONS, version, ARGV[4])
redis.call('HSET', AGENT, 'latest_version', version, 'create_time', ARGV[3], 'update_time', ARGV[3], 'deleted', '0')
redis.call('DEL', ALIASES)
redis.call('ZADD', INDEX, 0, name)
redis.call('ZADD', TENANTS, 0, tenant)
bump()
return version
