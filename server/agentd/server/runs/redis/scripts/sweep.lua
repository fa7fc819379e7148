-- KEYS: expiries. ARGV: base, now, batch. How many ended runs were deleted.
local due = redis.call('ZRANGE', EXPIRIES, '-inf', ARGV[2], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do
  local a, b, rest = string.match(m, '^(%d+):(%-?%d+):(.*)$')
  a, b = tonumber(a), tonumber(b)
  local id = string.sub(rest, 1, a)
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'tenant')
  if not f[1] or TERMINAL[f[1]] then
    unindex(f[2], id)  -- ended runs left their tenant's indexes already; this only makes sure
    redis.call('DEL', key, B .. 'events:' .. id)
  end
  local req_from = a + 1
  if b >= 0 then
    redis.call('ZREM', B .. 'session:' .. string.sub(rest, a + 1, a + b), id)
    req_from = a + b + 1
  end
  if req_from <= #rest then
    local rkey = B .. 'request:' .. string.sub(rest, req_from)
    if redis.call('GET', rkey) == id then redis.call('DEL', rkey) end
  end
  redis.call('ZREM', EXPIRIES, m)
end
return #due
