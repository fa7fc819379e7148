-- ARGV: now, has request id ('1'/'0'), request id, item JSON...
-- The first new sequence (0 for no items); the earlier request's surviving records
-- (a list) on a replay; nil when the session is missing.
local f = live()
if not f then return false end
local n = #ARGV - 3
if n == 0 then return 0 end
local rid = ARGV[2] == '1' and ARGV[3]
if rid then
  local done = redis.call('HGET', requests, rid)
  if done then
    local first, last = string.match(done, '^(%d+):(%d+)$')
    local len = redis.call('LLEN', items)
    local lo = lower_bound(tonumber(first), len)
    local hi = lower_bound(tonumber(last) + 1, len)
    if lo >= hi then return {} end
    return redis.call('LRANGE', items, lo, hi - 1)
  end
end
local last = redis.call('HINCRBY', info, 'last_seq', n)
local first = last - n + 1
local tail = '|' .. now .. '|'
local batch = {}
for i = 1, n do
  batch[#batch + 1] = (first + i - 1) .. tail .. ARGV[i + 3]
  if #batch == 1000 then redis.call('RPUSH', items, unpack(batch)); batch = {} end
end
if #batch > 0 then redis.call('RPUSH', items, unpack(batch)) end
if rid then redis.call('HSET', requests, rid, first .. ':' .. last) end
touch(f[2])
return first
