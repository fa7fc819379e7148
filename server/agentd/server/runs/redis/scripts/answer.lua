-- KEYS: run. ARGV: base, now, then four per answer: its action key, its record field
-- ('action:' .. key), the action JSON, and the fields that make it the answer it is (','
-- separated). 0 unknown; else {0, {0-based positions of the answers recorded now}, record
-- afterwards}, or {1, 0-based position of the first answer refused, record} (nothing recorded).
-- An answer equal to the key's recorded one is a repeat: taken, whatever the run does now.
local key = KEYS[1]
local status = redis.call('HGET', key, 'status')
if not status then return 0 end

-- The action keys the run's checkpoint waits for, as a set: from the 'awaiting' field
-- ("<size of its checkpoint>:<JSON array>", written with the checkpoint), or from the
-- checkpoint itself when that field belongs to no checkpoint of this size (written by an
-- older replica), so the checkpoint (the run's whole history) is seldom decoded here.
local function awaited()
  local set, list = {}, nil
  local size = redis.call('HSTRLEN', key, 'checkpoint')
  if size == 0 then return set end
  local field = redis.call('HGET', key, 'awaiting')
  if field then
    local bytes, json = string.match(field, '^(%d+):(.*)$')
    if bytes and tonumber(bytes) == size then list = cjson.decode(json) end
  end
  if not list then list = cjson.decode(redis.call('HGET', key, 'checkpoint')).awaiting or {} end
  for _, k in ipairs(list) do set[k] = true end
  return set
end

local function same(recorded, given, fields)
  local a, b = cjson.decode(recorded), cjson.decode(given)
  for name in string.gmatch(fields, '[^,]+') do
    if a[name] ~= b[name] then return false end
  end
  return true
end

local waits = nil
local fresh = {}
for i = 3, #ARGV, 4 do
  local recorded = redis.call('HGET', key, ARGV[i + 1])
  local taken
  if recorded then
    taken = same(recorded, ARGV[i + 2], ARGV[i + 3])
  elseif TERMINAL[status] then
    taken = false
  else
    waits = waits or awaited()
    taken = waits[ARGV[i]] == true
    if taken then fresh[#fresh + 1] = i end
  end
  if not taken then return {1, (i - 3) / 4, redis.call('HGETALL', key)} end
end
local positions = {}
for _, i in ipairs(fresh) do
  redis.call('HSET', key, ARGV[i + 1], ARGV[i + 2])
  positions[#positions + 1] = (i - 3) / 4
end
if #fresh > 0 then redis.call('HSET', key, 'update_time', ARGV[2]) end
return {0, positions, redis.call('HGETALL', key)}
