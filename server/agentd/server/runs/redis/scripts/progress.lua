-- KEYS: run, events. ARGV: base, attempt, now, checkpoint JSON ('' = keep), the checkpoint's
-- awaiting action keys (a JSON array), trace id of the first event, then (sequence, event JSON)
-- pairs. 0, or the recorded cancel reason (a string); -1 lease lost; {last sequence} gap.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'attempt', 'last_sequence', 'trace_id', 'cancel_reason')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return -1 end
local last = append(KEYS[2], f[3], 7)
if not last then return {f[3]} end
if ARGV[4] ~= '' then
  -- 'awaiting' names the checkpoint it belongs to by its size, so the answer script can tell a
  -- checkpoint written without it (an older replica, mid-upgrade) and read that one instead.
  redis.call('HSET', key, 'checkpoint', ARGV[4], 'awaiting', #ARGV[4] .. ':' .. ARGV[5])
end
if (not f[4] or f[4] == '') and #ARGV >= 7 then redis.call('HSET', key, 'trace_id', ARGV[6]) end
redis.call('HSET', key, 'last_sequence', last, 'update_time', ARGV[3])
if f[5] and f[5] ~= '' then return f[5] end
return 0
