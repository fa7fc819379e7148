local B = ARGV[1]
local QUEUE, LEASES, EXPIRIES = B .. 'queue', B .. 'leases', B .. 'expiries'
-- Queued runs waiting behind their session's active run (not in QUEUE yet, but queued: they
-- count against max_queued with it).
local BEHIND = B .. 'behind'
local GROUP = 'workers'
local TERMINAL = {completed = true, failed = true, cancelled = true}

local function run_key(id) return B .. 'run:' .. id end

-- A tenant's index ('active': its unfinished runs, 'queued': its runs in the queue). Only
-- runs created under a per-tenant limit carry the record field 'tenant' and are indexed.
local function tenant_key(tenant, what) return B .. 'tenant:' .. tenant .. ':' .. what end

-- The session's oldest active run, dropping ids whose record is gone.
local function first_active(active)
  while true do
    local head = redis.call('LINDEX', active, 0)
    if not head then return nil end
    if redis.call('EXISTS', run_key(head)) == 1 then return head end
    redis.call('LPOP', active)
  end
end

local function enqueue(key, id)
  redis.call('SREM', BEHIND, id)
  redis.call('HSET', key, 'queue_entry', redis.call('XADD', QUEUE, '*', 'r', id))
  local tenant = redis.call('HGET', key, 'tenant')
  if tenant then redis.call('SADD', tenant_key(tenant, 'queued'), id) end
end

-- The run left the tenant's indexes: it ended (or is deleted).
local function unindex(tenant, id)
  if tenant then
    redis.call('SREM', tenant_key(tenant, 'active'), id)
    redis.call('SREM', tenant_key(tenant, 'queued'), id)
  end
end

-- Back in the queue after an execution began; why ('lease expired', 'handed off') is kept for
-- the RunResumed event of the replica that claims it.
local function requeue(key, id, now, why)
  redis.call('HSET', key, 'status', 'queued', 'owner', '', 'lease_expires', '0', 'update_time', now,
             'requeued', why)
  redis.call('ZREM', LEASES, id)
  enqueue(key, id)
end

-- Append events given as ARGV[from..] (sequence, JSON) pairs to a log whose last
-- sequence is `last`; the new last sequence, or nil when the first does not follow.
local function append(events, last, from)
  if #ARGV < from then return last end
  if tonumber(ARGV[from]) ~= tonumber(last) + 1 then return nil end
  for i = from, #ARGV, 2 do redis.call('XADD', events, '0-' .. ARGV[i], 'e', ARGV[i + 1]) end
  return ARGV[#ARGV - 1]
end

-- "<#id>:<#session or -1>:<id><session><request id>": what sweep needs of an ended run.
local function pack(id, sid, req)
  return #id .. ':' .. (sid and #sid or -1) .. ':' .. id .. (sid or '') .. (req or '')
end

-- The run ended (status, result JSON): release its session, start its retention.
local function end_run(key, id, status, result, now, retention_ms, retention_end)
  local f = redis.call('HMGET', key, 'session', 'request_id', 'tenant')
  redis.call('HSET', key, 'status', status, 'result', result, 'owner', '', 'lease_expires', '0',
             'update_time', now, 'queue_entry', '')
  redis.call('ZREM', LEASES, id)
  redis.call('SREM', BEHIND, id)
  unindex(f[3], id)
  local sid, req = f[1], f[2]
  if sid then
    local active = B .. 'active:' .. sid
    redis.call('LREM', active, 1, id)
    local head = first_active(active)
    if head then  -- the session's next run may go now
      local hkey = run_key(head)
      local h = redis.call('HMGET', hkey, 'status', 'queue_entry')
      if h[1] == 'queued' and (not h[2] or h[2] == '') then enqueue(hkey, head) end
    end
  end
  redis.call('PEXPIRE', key, retention_ms)
  redis.call('PEXPIRE', B .. 'events:' .. id, retention_ms)
  if req then
    local rkey = B .. 'request:' .. req
    if redis.call('GET', rkey) == id then redis.call('PEXPIRE', rkey, retention_ms) end
  end
  redis.call('ZADD', EXPIRIES, retention_end, pack(id, sid, req))
end
