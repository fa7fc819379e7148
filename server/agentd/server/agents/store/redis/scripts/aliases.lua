-- ARGV: tenant, name. Every alias and value (HGETALL); nil when there is no live agent.
if not live() then return false end
return redis.call('HGETALL', ALIASES)
