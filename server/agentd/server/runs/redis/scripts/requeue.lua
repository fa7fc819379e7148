-- KEYS: leases. ARGV: base, now, batch. {how many leases were looked at, requeued ids...}
local now = ARGV[2]
local due = redis.call('ZRANGE', LEASES, '-inf', '(' .. now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#due}
for _, id in ipairs(due) do
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'lease_expires')
  if f[1] ~= 'running' then
    redis.call('ZREM', LEASES, id)
  elseif tonumber(f[2]) < tonumber(now) then
    requeue(key, id, now, 'lease expired')
    out[#out + 1] = id
  else  -- renewed after the index was read: put the entry right
    redis.call('ZADD', LEASES, f[2], id)
  end
end
return out
