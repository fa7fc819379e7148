-- ARGV: now. How many items were removed; -1 when missing.
local f = live()
if not f then return -1 end
local n = redis.call('LLEN', items)
if n > 0 then
  redis.call('DEL', items)
  touch(f[2])
end
return n
