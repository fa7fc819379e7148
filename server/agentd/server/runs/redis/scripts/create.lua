-- KEYS: run, the tenant's 'active' index, its 'queued' index, its start bucket.
-- ARGV: base, run id, session ('' + has_session '0' = none), has_session, request id, policy,
-- owner, lease_expires, max_queued, now, spec JSON, tenant, the tenant's max active runs,
-- max queued runs, start rate (per second) and start burst (0 = no such limit).
-- {0, id, record}: exists (a retry of this create, or the request id's run);
-- {1, run id}: session busy; {2}: queue full (claimable runs plus runs behind their session); {3, status}: created;
-- {4, 'active' | 'queued'}: the tenant's limit; {5, seconds until a token}: the tenant's start rate.
local key, id = KEYS[1], ARGV[2]
local existing = redis.call('HGETALL', key)
if #existing > 0 then return {0, id, existing} end
local req = ARGV[5]
if req ~= '' then
  local other = redis.call('GET', B .. 'request:' .. req)
  if other then
    local record = redis.call('HGETALL', run_key(other))
    if #record > 0 then return {0, other, record} end
  end
end
local behind, active = false, nil
if ARGV[4] == '1' then
  active = B .. 'active:' .. ARGV[3]
  local head = first_active(active)
  if head then
    if ARGV[6] == 'reject' then return {1, head} end
    behind = true
  end
end
local owner, now = ARGV[7], ARGV[10]
local running = owner ~= '' and not behind
local joins_queue = owner == '' and not behind

-- Per-tenant limits. The indexes are kept by every script that moves a run (enqueue, claim,
-- end_run, sweep); a count at the limit first drops a few members that are no longer what
-- the index says (a record deleted or changed outside these scripts), so it cannot stay stuck.
local tenant = ARGV[12]
local max_active, max_queued_t = tonumber(ARGV[13]), tonumber(ARGV[14])
local rate, burst = tonumber(ARGV[15]), tonumber(ARGV[16])
local function at_limit(index, limit, still)
  if redis.call('SCARD', index) < limit then return false end
  for _, member in ipairs(redis.call('SRANDMEMBER', index, 32)) do
    if not still(member) then redis.call('SREM', index, member) end
  end
  return redis.call('SCARD', index) >= limit
end
local function unfinished(member)
  local status = redis.call('HGET', run_key(member), 'status')
  return status and not TERMINAL[status]
end
local function in_queue(member)
  local f = redis.call('HMGET', run_key(member), 'status', 'queue_entry')
  return f[1] == 'queued' and f[2] and f[2] ~= ''
end
if max_active > 0 and at_limit(KEYS[2], max_active, unfinished) then return {4, 'active'} end
if joins_queue and max_queued_t > 0 and at_limit(KEYS[3], max_queued_t, in_queue) then return {4, 'queued'} end
-- Runs queued behind their session count against max_queued too (they are queued, only not
-- claimable yet); members that are no longer waiting (deleted, changed outside these scripts)
-- are dropped first, as for the tenant's indexes.
if joins_queue or behind then
  local room = tonumber(ARGV[9]) - redis.call('XLEN', QUEUE)
  local function waiting(member)
    local f = redis.call('HMGET', run_key(member), 'status', 'queue_entry')
    return f[1] == 'queued' and (not f[2] or f[2] == '')
  end
  if room <= 0 or at_limit(BEHIND, room, waiting) then return {2} end
end
-- The start bucket: {tokens, time of the last take} (absent: full). Taken last, so a start
-- refused by any other check takes no token; a clock behind the bucket's refills nothing.
local tokens, taken_at
if rate > 0 then
  local b = redis.call('HMGET', KEYS[4], 'tokens', 'at')
  local t = tonumber(now)
  tokens, taken_at = tonumber(b[1]) or burst, tonumber(b[2]) or t
  if t < taken_at then t = taken_at end
  tokens = math.min(burst, tokens + (t - taken_at) * rate)
  if tokens < 1 then return {5, string.format('%.17g', (1 - tokens) / rate)} end
  tokens, taken_at = tokens - 1, t
end

local status = running and 'running' or 'queued'
local tracked = max_active > 0 or max_queued_t > 0
redis.call('HSET', key, 'status', status, 'owner', running and owner or '', 'attempt', running and '1' or '0',
           'lease_expires', running and ARGV[8] or '0', 'last_sequence', '0', 'create_time', now,
           'update_time', now, 'spec', ARGV[11], 'cancel_reason', '', 'trace_id', '', 'queue_entry', '')
if tracked then  -- before enqueue, which indexes the run in the tenant's queue by this field
  redis.call('HSET', key, 'tenant', tenant)
  redis.call('SADD', KEYS[2], id)
end
if running then
  redis.call('ZADD', LEASES, ARGV[8], id)
elseif not behind then
  enqueue(key, id)
else
  redis.call('SADD', BEHIND, id)
end
if req ~= '' then
  redis.call('HSET', key, 'request_id', req)
  redis.call('SET', B .. 'request:' .. req, id)
end
if active then
  redis.call('HSET', key, 'session', ARGV[3])
  redis.call('RPUSH', active, id)
  redis.call('ZADD', B .. 'session:' .. ARGV[3], now, id)
end
if rate > 0 then
  -- Absent once full again (plus a second for replicas' clocks): an idle tenant costs no key.
  redis.call('HSET', KEYS[4], 'tokens', string.format('%.17g', tokens), 'at', string.format('%.17g', taken_at))
  redis.call('PEXPIRE', KEYS[4], math.ceil((burst - tokens) / rate * 1000) + 1000)
end
return {3, status}
