-- ARGV: tenant, name, below (0: from the newest), limit. {the first version listed, the
-- values of it and the ones below it, newest first}; nil when there is no live agent.
local latest = live()
if not latest then return false end
local top = latest
if ARGV[3] ~= '0' then top = math.min(latest, tonumber(ARGV[3]) - 1) end
local stop = math.max(1, top - tonumber(ARGV[4]) + 1)
local out = {}
local v = top
while v >= stop do  -- HMGET in slices small enough for unpack()
  local lo = math.max(stop, v - 999)
  local fields = {}
  for x = v, lo, -1 do fields[#fields + 1] = x end
  local values = redis.call('HMGET', VERSIONS, unpack(fields))
  for i = 1, #values do out[#out + 1] = values[i] end
  v = lo - 1
end
return {top, out}
