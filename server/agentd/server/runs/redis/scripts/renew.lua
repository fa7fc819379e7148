-- KEYS: leases. ARGV: base, owner, lease_expires, then (run id, attempt) pairs.
-- {lost run ids, {run id, cancel reason, ...}}
local lost, cancel = {}, {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'owner', 'attempt', 'cancel_reason')
  if f[1] == 'running' and f[2] == ARGV[2] and f[3] == ARGV[i + 1] then
    redis.call('HSET', key, 'lease_expires', ARGV[3])
    redis.call('ZADD', LEASES, ARGV[3], id)
    if f[4] and f[4] ~= '' then
      cancel[#cancel + 1] = id
      cancel[#cancel + 1] = f[4]
    end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancel}
