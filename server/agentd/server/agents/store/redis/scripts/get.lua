-- ARGV: tenant, name. The live agent as {latest_version, create_time, update_time, the
-- latest version's value}; nil when missing or deleted.
local f = redis.call('HMGET', AGENT, 'latest_version', 'deleted', 'create_time', 'update_time')
if not f[1] or f[2] == '1' then return false end
return {f[1], f[3], f[4], redis.call('HGET', VERSIONS, f[1])}
