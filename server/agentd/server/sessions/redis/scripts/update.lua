-- ARGV: now, ttl ('' keep, '0' never expire, else seconds),
--       #metadata pairs (-1 keep), metadata k/v..., #state pairs (-1 keep), state k/v...
-- The updated record, or nil.
local f = live('created_at')
if not f then return false end
local p = 3
local nmeta = tonumber(ARGV[p])
if nmeta >= 0 then
  redis.call('DEL', meta)
  if nmeta > 0 then call_chunked('HSET', meta, ARGV, p + 1, p + 2 * nmeta) end
  p = p + 2 * nmeta
end
p = p + 1
local nstate = tonumber(ARGV[p])
if nstate >= 0 then
  redis.call('DEL', state)
  if nstate > 0 then call_chunked('HSET', state, ARGV, p + 1, p + 2 * nstate) end
end
local ttl = f[2]
if ARGV[2] == '0' then
  ttl = false
  redis.call('HDEL', info, 'ttl_s')
  for i = 1, 5 do redis.call('PERSIST', KEYS[i]) end
elseif ARGV[2] ~= '' then
  ttl = ARGV[2]
  redis.call('HSET', info, 'ttl_s', ttl)
end
touch(ttl)
return record(f[3], now, ttl)
