-- ARGV: tenant, name, alias. The alias's value; 0 when the agent has no such alias; nil
-- when there is no live agent.
if not live() then return false end
return redis.call('HGET', ALIASES, ARGV[3]) or 0
