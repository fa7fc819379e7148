-- KEYS: the tenant's listing index. ARGV: the tenant's agent key head ("<base>agent:<tenant>:"),
-- the name to start after ('' from the first), how many. {name, latest_version,
-- create_time, update_time} per live agent, by name. (The agent hashes share the index's
-- hash tag: one slot, so Cluster serves the script on the node that holds them all.)
local from = '-'
if ARGV[2] ~= '' then from = '(' .. ARGV[2] end
local names = redis.call('ZRANGEBYLEX', KEYS[1], from, '+', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {}
for i = 1, #names do
  local f = redis.call('HMGET', ARGV[1] .. names[i], 'latest_version', 'create_time', 'update_time')
  out[i] = {names[i], f[1], f[2], f[3]}
end
return out
