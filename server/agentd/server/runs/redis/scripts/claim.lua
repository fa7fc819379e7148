-- KEYS: queue. ARGV: base, owner, max runs, lease_expires, now, reclaim min idle (ms),
-- then (entry id, run id) pairs already read by a blocking XREADGROUP (else read here).
-- {run id, record, ...} of the runs claimed, oldest first.
local owner, lease, now = ARGV[2], ARGV[4], ARGV[5]
local want = tonumber(ARGV[3])
local taken = {}
local function take(entry, id)
  redis.call('XACK', QUEUE, GROUP, entry)
  redis.call('XDEL', QUEUE, entry)
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'queue_entry', 'tenant')
  if f[1] ~= 'queued' or f[2] ~= entry then return end  -- ended, or requeued under a newer entry
  if f[3] then redis.call('SREM', tenant_key(f[3], 'queued'), id) end
  redis.call('HINCRBY', key, 'attempt', 1)
  redis.call('HSET', key, 'status', 'running', 'owner', owner, 'lease_expires', lease,
             'update_time', now, 'queue_entry', '')
  redis.call('ZADD', LEASES, lease, id)
  taken[#taken + 1] = id
  taken[#taken + 1] = redis.call('HGETALL', key)
end
local function take_all(entries)
  for _, e in ipairs(entries) do
    if e[2] then take(e[1], e[2][2]) else redis.call('XACK', QUEUE, GROUP, e[1]) end
  end
end
if #ARGV > 6 then
  for i = 7, #ARGV, 2 do take(ARGV[i], ARGV[i + 1]) end
  return taken
end
-- Entries a claimer read but never processed (it crashed, or its call was cut off).
take_all(redis.call('XAUTOCLAIM', QUEUE, GROUP, owner, ARGV[6], '0-0', 'COUNT', want)[2])
for _ = 1, 16 do
  local n = #taken / 2
  if n >= want then break end
  local got = redis.call('XREADGROUP', 'GROUP', GROUP, owner, 'COUNT', want - n, 'STREAMS', QUEUE, '>')
  if not got then break end
  take_all(got[1][2])
end
return taken
