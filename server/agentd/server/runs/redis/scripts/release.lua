-- KEYS: run. ARGV: base, run id, attempt, now. 1 when handed back, else 0.
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
requeue(KEYS[1], ARGV[2], ARGV[4], 'handed off')
return 1
