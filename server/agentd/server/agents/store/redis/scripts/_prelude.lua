-- KEYS (every per-agent script): the revision counter, the change log, the tenants with
-- live agents, and the agent's hash, versions, aliases and its tenant's listing index.
-- ARGV[1], ARGV[2]: tenant and agent name. Writes check everything before their first
-- write, and bump() is their last step: a refused write leaves nothing behind.
local REVISION, CHANGES, TENANTS = KEYS[1], KEYS[2], KEYS[3]
local AGENT, VERSIONS, ALIASES, INDEX = KEYS[4], KEYS[5], KEYS[6], KEYS[7]
local tenant, name = ARGV[1], ARGV[2]
local KEEP = 1000  -- base.CHANGE_FEED_LIMIT: the change log keeps this many entries

-- The live agent's latest version, or nil when it is missing or deleted.
local function live()
  local f = redis.call('HMGET', AGENT, 'latest_version', 'deleted')
  if not f[1] or f[2] == '1' then return nil end
  return tonumber(f[1])
end

-- Count the write store-wide and log "<revision>:<tenant>:<name>" (tenants hold no ':').
local function bump()
  local revision = redis.call('INCR', REVISION)
  redis.call('LPUSH', CHANGES, revision .. ':' .. tenant .. ':' .. name)
  redis.call('LTRIM', CHANGES, 0, KEEP - 1)
end
