local info, items, state, meta, requests = KEYS[1], KEYS[2], KEYS[3], KEYS[4], KEYS[5]
local now = ARGV[1]

-- HMGET updated_at, ttl_s and any extra fields of a session that is live at `now`;
-- nil when it is missing or its idle TTL has run out.
local function live(...)
  local f = redis.call('HMGET', info, 'updated_at', 'ttl_s', ...)
  if not f[1] then return nil end
  if f[2] and tonumber(f[1]) + tonumber(f[2]) <= tonumber(now) then return nil end
  return f
end

-- redis.call(cmd, key, args[from..to]) in slices small enough for unpack().
local function call_chunked(cmd, key, args, from, to)
  for i = from, to, 1000 do
    redis.call(cmd, key, unpack(args, i, math.min(i + 999, to)))
  end
end

-- A write: bump updated_at; with a TTL, every key of the session expires ttl_s from now.
local function touch(ttl)
  redis.call('HSET', info, 'updated_at', now)
  if ttl then
    local ms = math.max(1, math.ceil(tonumber(ttl) * 1000))
    for i = 1, 5 do redis.call('PEXPIRE', KEYS[i], ms) end
  end
end

-- A fresh session (dropping an expired one's leftovers): meta from ARGV[mf..mt],
-- state from ARGV[mt+1..#ARGV], both as field/value pairs.
local function create(ttl, mf, mt)
  redis.call('DEL', info, items, state, meta, requests)
  redis.call('HSET', info, 'created_at', now, 'updated_at', now, 'last_seq', 0)
  if ttl ~= '' then redis.call('HSET', info, 'ttl_s', ttl) end
  if mt >= mf then call_chunked('HSET', meta, ARGV, mf, mt) end
  if #ARGV > mt then call_chunked('HSET', state, ARGV, mt + 1, #ARGV) end
  if ttl ~= '' then touch(ttl) end
end

local function record(created_at, updated_at, ttl)
  return {created_at, updated_at, ttl, redis.call('HGETALL', meta),
          redis.call('HGETALL', state), redis.call('LLEN', items)}
end

local function seq_at(i)
  return tonumber(string.match(redis.call('LINDEX', items, i), '^%d+'))
end

-- Index of the first item with sequence >= s among n items (n when none). Sequences
-- strictly increase, so seq(i) >= first + i and seq(i) <= last - (n - 1 - i): the
-- answer lies in [s - last + n - 1, s - first], a single probe when there are no gaps.
local function lower_bound(s, n)
  if n == 0 then return 0 end
  local first = seq_at(0)
  if s <= first then return 0 end
  local last = seq_at(n - 1)
  if s > last then return n end
  local lo, hi = math.max(1, s - last + n - 1), math.min(n - 1, s - first)
  while lo < hi do
    local mid = math.floor((lo + hi) / 2)
    if seq_at(mid) < s then lo = mid + 1 else hi = mid end
  end
  return lo
end
