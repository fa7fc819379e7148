-- KEYS: run, events. ARGV: base, run id, attempt, now, retention ms, retention end, status,
-- result JSON, trace id of the first event, then (sequence, event JSON) pairs.
-- 0; -1 lease lost; {last sequence} gap.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'attempt', 'last_sequence', 'trace_id')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return -1 end
local last = append(KEYS[2], f[3], 10)
if not last then return {f[3]} end
if not f[4] or f[4] == '' then redis.call('HSET', key, 'trace_id', ARGV[9]) end
redis.call('HSET', key, 'last_sequence', last)
end_run(key, ARGV[2], ARGV[7], ARGV[8], ARGV[4], ARGV[5], ARGV[6])
return 0
