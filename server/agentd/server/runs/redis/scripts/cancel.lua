-- KEYS: run, events. ARGV: base, run id, reason, now, retention ms, retention end, and for a
-- QUEUED run: its expected attempt, expected last sequence, the RunCancelled event's
-- sequence and JSON, and the result JSON.
-- 0 unknown; {1, record} done; {2, record} queued: call again with the event for this record.
local key, id = KEYS[1], ARGV[2]
local f = redis.call('HMGET', key, 'status', 'attempt', 'last_sequence', 'cancel_reason', 'queue_entry')
if not f[1] then return 0 end
if TERMINAL[f[1]] then return {1, redis.call('HGETALL', key)} end
if f[1] == 'queued' then
  if #ARGV < 11 or f[2] ~= ARGV[7] or f[3] ~= ARGV[8] then return {2, redis.call('HGETALL', key)} end
  if f[5] and f[5] ~= '' then
    redis.pcall('XACK', QUEUE, GROUP, f[5])
    redis.call('XDEL', QUEUE, f[5])
  end
  redis.call('XADD', KEYS[2], '0-' .. ARGV[9], 'e', ARGV[10])
  redis.call('HSET', key, 'last_sequence', ARGV[9])
  end_run(key, id, 'cancelled', ARGV[11], ARGV[4], ARGV[5], ARGV[6])
elseif not f[4] or f[4] == '' then
  redis.call('HSET', key, 'cancel_reason', ARGV[3], 'update_time', ARGV[4])
end
return {1, redis.call('HGETALL', key)}
