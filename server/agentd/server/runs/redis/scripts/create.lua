-- KEYS: run. ARGV: base, run id, session ('' + has_session '0' = none), has_session,
-- request id, policy, owner, lease_expires, max_queued, now, spec JSON.
-- {0, id, record}: exists (a retry of this create, or the request id's run);
-- {1, run id}: session busy; {2}: queue full; {3, status}: created.
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
if owner == '' and not behind and redis.call('XLEN', QUEUE) >= tonumber(ARGV[9]) then return {2} end
local running = owner ~= '' and not behind
local status = running and 'running' or 'queued'
redis.call('HSET', key, 'status', status, 'owner', running and owner or '', 'attempt', running and '1' or '0',
           'lease_expires', running and ARGV[8] or '0', 'last_sequence', '0', 'create_time', now,
           'update_time', now, 'spec', ARGV[11], 'cancel_reason', '', 'trace_id', '', 'queue_entry', '')
if running then
  redis.call('ZADD', LEASES, ARGV[8], id)
elseif not behind then
  enqueue(key, id)
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
return {3, status}
