-- KEYS: the session's index. ARGV: base, limit, cursor create_time ('' = first page),
-- cursor run id. {more (0/1), run id, record, ...} newest first; entries whose record is
-- gone are removed on the way.
local index = KEYS[1]
local want = tonumber(ARGV[2]) + 1
local pos, cs, cm = 0, nil, ARGV[4]
if ARGV[3] ~= '' then
  cs = tonumber(ARGV[3])
  pos = redis.call('ZCOUNT', index, '(' .. ARGV[3], '+inf')
end
-- Byte order, as the sorted set orders equal scores (Lua's < follows the locale).
local function less(a, b)
  for i = 1, math.min(#a, #b) do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
local out, gone, found = {0}, {}, 0
while found < want do
  local batch = redis.call('ZRANGE', index, pos, pos + 2 * want - 1, 'REV', 'WITHSCORES')
  if #batch == 0 then break end
  for i = 1, #batch, 2 do
    local id = batch[i]
    if not (cs and tonumber(batch[i + 1]) == cs and not less(id, cm)) then
      local record = redis.call('HGETALL', run_key(id))
      if #record == 0 then
        gone[#gone + 1] = id
      else
        found = found + 1
        if found == want then out[1] = 1; break end
        out[#out + 1] = id
        out[#out + 1] = record
      end
    end
  end
  pos = pos + #batch / 2
end
for i = 1, #gone, 1000 do redis.call('ZREM', index, unpack(gone, i, math.min(i + 999, #gone))) end
return out
