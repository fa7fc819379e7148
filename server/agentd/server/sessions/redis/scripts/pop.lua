-- ARGV: now. The popped record; 0 when there are no items; nil when missing.
local f = live()
if not f then return false end
local r = redis.call('RPOP', items)
if not r then return 0 end
touch(f[2])
return r
