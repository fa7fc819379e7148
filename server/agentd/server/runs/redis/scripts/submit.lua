-- KEYS: run. ARGV: base, the answer's field ('action:' .. key), action JSON, now.
-- 0 unknown; else the record afterwards (the answer recorded unless the run ended or
-- the key was answered before).
local key = KEYS[1]
local status = redis.call('HGET', key, 'status')
if not status then return 0 end
if not TERMINAL[status] and redis.call('HSETNX', key, ARGV[2], ARGV[3]) == 1 then
  redis.call('HSET', key, 'update_time', ARGV[4])
end
return redis.call('HGETALL', key)
