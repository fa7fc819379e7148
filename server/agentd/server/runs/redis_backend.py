"""Runs on Redis (standalone, Sentinel or Cluster): Streams, a consumer group, pub/sub.

Every operation that reads and then writes is one Lua script called by SHA: one round
trip, atomic, with its checks and its writes together. All run keys share one hash tag,
``{<prefix>:runs}``, so every script may touch any of them, in Cluster too:

    <prefix>:{<prefix>:runs}:run:<id>         HASH    the record: status, owner, attempt,
                                                      lease_expires, last_sequence, create_time,
                                                      update_time, spec, checkpoint, result (JSON
                                                      from ``runs.codec``), cancel_reason, trace_id,
                                                      session, request_id, queue_entry, and one
                                                      field ``action:<key>`` per answer of the
                                                      caller (``codec.encode_action`` JSON)
    <prefix>:{<prefix>:runs}:events:<id>      STREAM  the event log; entry ``0-<sequence>``,
                                                      field ``e`` = ``codec.encode_event`` JSON
    <prefix>:{<prefix>:runs}:queue            STREAM  claimable runs (field ``r`` = run id), oldest
                                                      first; consumer group ``workers``
    <prefix>:{<prefix>:runs}:leases           ZSET    RUNNING run ids by lease expiry
    <prefix>:{<prefix>:runs}:active:<session> LIST    the session's active runs, creation order
    <prefix>:{<prefix>:runs}:session:<session> ZSET   the session's runs by create_time (listing)
    <prefix>:{<prefix>:runs}:request:<req>    STRING  request id -> run id
    <prefix>:{<prefix>:runs}:expiries         ZSET    ended runs by end of retention (sweep)
    <prefix>:runs:control                     pub/sub channel of the ControlBus (not a key)

The accepted limit of the single tag: in Cluster all run coordination lives in one slot,
so on one shard (sessions still spread over the cluster). Scripts derive the names of the
keys they reach through another key (a session's list named in the run's record, the run
a queue entry names) from the key base passed as ``ARGV[1]``, and declare the keys the
caller knows as KEYS; with one slot the declared keys route every script to the node
that holds all of them, which is what Cluster checks.

Event IDs are the sequences (``0-<n>``): XADD refuses any ID not above the last, and
``XREAD ... 0-<after>`` / ``XRANGE (0-<after>`` read exactly the events after a sequence.

Queue. ``claim`` runs one script that first takes over entries another claimer read but
never processed (XAUTOCLAIM, idle longer than ``reclaim_idle_s``: a crashed claimer, or a
call cut off between its read and its script), then reads new entries (XREADGROUP) and
claims each atomically: the run must still be QUEUED with that entry as its current one,
else the entry is just dropped; every entry is XACKed and XDELed, so the queue's length is
the number of claimable runs (``max_queued`` compares it, inside ``create_run``'s
script). Only when nothing is claimable does ``claim`` block, in XREADGROUP BLOCK on a
separate client (so waiting claimers and event watchers never starve the pool of the
short commands), and then claims what it got with the same script: a wake-up costs two
more round trips. A run created RUNNING never touches the queue; requeues XADD again.

Caller actions. ``submit_action`` runs one script: HSETNX of the answer's field in the
record, when the record exists and is not terminal (the first answer wins). Being fields
of the record, the answers come back with every HGETALL (``get_run``, ``claim``,
``list_runs``, ``cancel``, ``create_run``'s existing run) and share its TTL and deletion.

Retention. ``finish`` and a queued ``cancel`` PEXPIRE the record (answers included), its
log and its request id (Redis reclaims them by itself) and note the run in ``expiries``;
``sweep`` deletes what is due there and drops the runs from their session's listing,
which also skips and removes entries whose record is gone.

Round trips: one for ``create_run``, ``get_run``, ``list_runs``, ``active_run``, ``renew``,
``record_progress``, ``finish``, ``release``, ``submit_action``, ``read_events``,
``wait_events`` (XREAD BLOCK), ``requeue_expired`` and ``sweep`` (per 500 due runs), and
``cancel`` of a running, ended or unknown run; two for ``cancel`` of a queued run (its
RunCancelled event is built from the record by ``codec`` and written by a second script
that re-checks the record is unchanged); ``claim`` one when a run is claimable, else one
plus the blocking read plus one on wake-up.

Retries follow ``redis_common.RetryPolicy``, as in the session store: reads, ``renew``,
``create_run`` (a retry finds its own run id and reports it created), ``cancel``,
``submit_action`` (HSETNX: a repeat changes nothing), ``requeue_expired`` and ``sweep`` are
retried on connection errors and once on a timeout; ``claim``, ``record_progress``,
``finish`` and ``release`` only on errors proving Redis refused them unexecuted. Everything
else surfaces as ``StoreUnavailableError`` naming the location.
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence, TypeVar

from redis.exceptions import NoScriptError, ResponseError

from agentd.server.redis_common import (
    FAILURES,
    LuaScript,
    RedisClient,
    RedisTooOldError,
    RetryPolicy,
    check_server_version,
    connect_redis,
    describe_client,
    text,
    utf8,
)

from agentd.server.runs import codec
from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.records import (
    Control,
    CreatedRun,
    LeaseLostError,
    QueueFullError,
    RenewOutcome,
    RunRecord,
    RunStatus,
    SessionBusyError,
    SessionPolicy,
    terminal_status,
)
from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.events import RunCancelled, RunEvent
from agentd.server.runtime.run_loop import RunInput
from agentd.server.runtime.usage import Usage
from agentd.server.settings import Settings

__all__ = ["RedisControlBus", "RedisRunStore", "build_redis_runs"]

log = logging.getLogger("agentd.runs")
T = TypeVar("T")

GROUP = "workers"
_BATCH = 500  # runs per script in requeue_expired and sweep
_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode

# --- Lua ---------------------------------------------------------------------------

_PRELUDE = r"""
local B = ARGV[1]
local QUEUE, LEASES, EXPIRIES = B .. 'queue', B .. 'leases', B .. 'expiries'
local GROUP = 'workers'
local TERMINAL = {completed = true, failed = true, cancelled = true}

local function run_key(id) return B .. 'run:' .. id end

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
  redis.call('HSET', key, 'queue_entry', redis.call('XADD', QUEUE, '*', 'r', id))
end

local function requeue(key, id, now)
  redis.call('HSET', key, 'status', 'queued', 'owner', '', 'lease_expires', '0', 'update_time', now)
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
  local f = redis.call('HMGET', key, 'session', 'request_id')
  redis.call('HSET', key, 'status', status, 'result', result, 'owner', '', 'lease_expires', '0',
             'update_time', now, 'queue_entry', '')
  redis.call('ZREM', LEASES, id)
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
"""

_CREATE = r"""
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
"""

_CLAIM = r"""
-- KEYS: queue. ARGV: base, owner, max runs, lease_expires, now, reclaim min idle (ms),
-- then (entry id, run id) pairs already read by a blocking XREADGROUP (else read here).
-- {run id, record, ...} of the runs claimed, oldest first.
local owner, lease, now = ARGV[2], ARGV[4], ARGV[5]
local want = tonumber(ARGV[3])
local taken = {}
local function take(entry, id)
  redis.call('XACK', QUEUE, GROUP, entry)
  redis.call('XDEL', QUEUE, entry)
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'queue_entry')
  if f[1] ~= 'queued' or f[2] ~= entry then return end  -- ended, or requeued under a newer entry
  redis.call('HINCRBY', key, 'attempt', 1)
  redis.call('HSET', key, 'status', 'running', 'owner', owner, 'lease_expires', lease,
             'update_time', now, 'queue_entry', '')
  redis.call('ZADD', LEASES, lease, id)
  taken[#taken + 1] = id
  taken[#taken + 1] = redis.call('HGETALL', key)
end
local function take_all(entries)
  for _, e in ipairs(entries) do
    if e[2] then take(e[1], e[2][2]) else redis.call('XACK', QUEUE, GROUP, e[1]) end
  end
end
if #ARGV > 6 then
  for i = 7, #ARGV, 2 do take(ARGV[i], ARGV[i + 1]) end
  return taken
end
-- Entries a claimer read but never processed (it crashed, or its call was cut off).
take_all(redis.call('XAUTOCLAIM', QUEUE, GROUP, owner, ARGV[6], '0-0', 'COUNT', want)[2])
for _ = 1, 16 do
  local n = #taken / 2
  if n >= want then break end
  local got = redis.call('XREADGROUP', 'GROUP', GROUP, owner, 'COUNT', want - n, 'STREAMS', QUEUE, '>')
  if not got then break end
  take_all(got[1][2])
end
return taken
"""

_RENEW = r"""
-- KEYS: leases. ARGV: base, owner, lease_expires, then (run id, attempt) pairs.
-- {lost run ids, {run id, cancel reason, ...}}
local lost, cancel = {}, {}
for i = 4, #ARGV, 2 do
  local id = ARGV[i]
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'owner', 'attempt', 'cancel_reason')
  if f[1] == 'running' and f[2] == ARGV[2] and f[3] == ARGV[i + 1] then
    redis.call('HSET', key, 'lease_expires', ARGV[3])
    redis.call('ZADD', LEASES, ARGV[3], id)
    if f[4] and f[4] ~= '' then
      cancel[#cancel + 1] = id
      cancel[#cancel + 1] = f[4]
    end
  else
    lost[#lost + 1] = id
  end
end
return {lost, cancel}
"""

_PROGRESS = r"""
-- KEYS: run, events. ARGV: base, attempt, now, checkpoint JSON ('' = keep), trace id of the
-- first event, then (sequence, event JSON) pairs. 0; -1 lease lost; {last sequence} gap.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'attempt', 'last_sequence', 'trace_id')
if f[1] ~= 'running' or f[2] ~= ARGV[2] then return -1 end
local last = append(KEYS[2], f[3], 6)
if not last then return {f[3]} end
if ARGV[4] ~= '' then redis.call('HSET', key, 'checkpoint', ARGV[4]) end
if (not f[4] or f[4] == '') and #ARGV >= 6 then redis.call('HSET', key, 'trace_id', ARGV[5]) end
redis.call('HSET', key, 'last_sequence', last, 'update_time', ARGV[3])
return 0
"""

_FINISH = r"""
-- KEYS: run, events. ARGV: base, run id, attempt, now, retention ms, retention end, status,
-- result JSON, trace id of the first event, then (sequence, event JSON) pairs.
-- 0; -1 lease lost; {last sequence} gap.
local key = KEYS[1]
local f = redis.call('HMGET', key, 'status', 'attempt', 'last_sequence', 'trace_id')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return -1 end
local last = append(KEYS[2], f[3], 10)
if not last then return {f[3]} end
if not f[4] or f[4] == '' then redis.call('HSET', key, 'trace_id', ARGV[9]) end
redis.call('HSET', key, 'last_sequence', last)
end_run(key, ARGV[2], ARGV[7], ARGV[8], ARGV[4], ARGV[5], ARGV[6])
return 0
"""

_RELEASE = r"""
-- KEYS: run. ARGV: base, run id, attempt, now. 1 when handed back, else 0.
local f = redis.call('HMGET', KEYS[1], 'status', 'attempt')
if f[1] ~= 'running' or f[2] ~= ARGV[3] then return 0 end
requeue(KEYS[1], ARGV[2], ARGV[4])
return 1
"""

_REQUEUE = r"""
-- KEYS: leases. ARGV: base, now, batch. {how many leases were looked at, requeued ids...}
local now = ARGV[2]
local due = redis.call('ZRANGE', LEASES, '-inf', '(' .. now, 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
local out = {#due}
for _, id in ipairs(due) do
  local key = run_key(id)
  local f = redis.call('HMGET', key, 'status', 'lease_expires')
  if f[1] ~= 'running' then
    redis.call('ZREM', LEASES, id)
  elseif tonumber(f[2]) < tonumber(now) then
    requeue(key, id, now)
    out[#out + 1] = id
  else  -- renewed after the index was read: put the entry right
    redis.call('ZADD', LEASES, f[2], id)
  end
end
return out
"""

_CANCEL = r"""
-- KEYS: run, events. ARGV: base, run id, reason, now, retention ms, retention end, and for a
-- QUEUED run: its expected attempt, expected last sequence, the RunCancelled event's
-- sequence and JSON, and the result JSON.
-- 0 unknown; {1, record} done; {2, record} queued: call again with the event for this record.
local key, id = KEYS[1], ARGV[2]
local f = redis.call('HMGET', key, 'status', 'attempt', 'last_sequence', 'cancel_reason', 'queue_entry')
if not f[1] then return 0 end
if TERMINAL[f[1]] then return {1, redis.call('HGETALL', key)} end
if f[1] == 'queued' then
  if #ARGV < 11 or f[2] ~= ARGV[7] or f[3] ~= ARGV[8] then return {2, redis.call('HGETALL', key)} end
  if f[5] and f[5] ~= '' then
    redis.pcall('XACK', QUEUE, GROUP, f[5])
    redis.call('XDEL', QUEUE, f[5])
  end
  redis.call('XADD', KEYS[2], '0-' .. ARGV[9], 'e', ARGV[10])
  redis.call('HSET', key, 'last_sequence', ARGV[9])
  end_run(key, id, 'cancelled', ARGV[11], ARGV[4], ARGV[5], ARGV[6])
elseif not f[4] or f[4] == '' then
  redis.call('HSET', key, 'cancel_reason', ARGV[3], 'update_time', ARGV[4])
end
return {1, redis.call('HGETALL', key)}
"""

_SUBMIT = r"""
-- KEYS: run. ARGV: base, the answer's field ('action:' .. key), action JSON, now.
-- 0 unknown; else the record afterwards (the answer recorded unless the run ended or
-- the key was answered before).
local key = KEYS[1]
local status = redis.call('HGET', key, 'status')
if not status then return 0 end
if not TERMINAL[status] and redis.call('HSETNX', key, ARGV[2], ARGV[3]) == 1 then
  redis.call('HSET', key, 'update_time', ARGV[4])
end
return redis.call('HGETALL', key)
"""

_LIST = r"""
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
"""

_SWEEP = r"""
-- KEYS: expiries. ARGV: base, now, batch. How many ended runs were deleted.
local due = redis.call('ZRANGE', EXPIRIES, '-inf', ARGV[2], 'BYSCORE', 'LIMIT', 0, tonumber(ARGV[3]))
for _, m in ipairs(due) do
  local a, b, rest = string.match(m, '^(%d+):(%-?%d+):(.*)$')
  a, b = tonumber(a), tonumber(b)
  local id = string.sub(rest, 1, a)
  local key = run_key(id)
  local status = redis.call('HGET', key, 'status')
  if not status or TERMINAL[status] then redis.call('DEL', key, B .. 'events:' .. id) end
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
"""


def _script(body: str) -> LuaScript:
    return LuaScript(_PRELUDE + body)


_S_CREATE = _script(_CREATE)
_S_CLAIM = _script(_CLAIM)
_S_RENEW = _script(_RENEW)
_S_PROGRESS = _script(_PROGRESS)
_S_FINISH = _script(_FINISH)
_S_RELEASE = _script(_RELEASE)
_S_REQUEUE = _script(_REQUEUE)
_S_CANCEL = _script(_CANCEL)
_S_SUBMIT = _script(_SUBMIT)
_S_LIST = _script(_LIST)
_S_SWEEP = _script(_SWEEP)
_SCRIPTS = (
    _S_CREATE, _S_CLAIM, _S_RENEW, _S_PROGRESS, _S_FINISH, _S_RELEASE, _S_REQUEUE, _S_CANCEL, _S_SUBMIT, _S_LIST,
    _S_SWEEP,
)


# --- values ------------------------------------------------------------------------

_STATUS = {status.value.encode(): status for status in RunStatus}
_ACTION = b"action:"  # the record field of an answer of the caller: this, then its key


def _actions(fields: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    return {
        text(name[len(_ACTION):]): codec.decode_action(text(value))
        for name, value in fields.items()
        if name.startswith(_ACTION)
    }


def _record(run_id: str, fields: dict[bytes, bytes]) -> RunRecord:
    checkpoint = fields.get(b"checkpoint")
    result = fields.get(b"result")
    return RunRecord(
        run_id=run_id,
        spec=codec.decode_spec(text(fields[b"spec"])),
        status=_STATUS[fields[b"status"]],
        create_time=float(fields[b"create_time"]),
        update_time=float(fields[b"update_time"]),
        owner=text(fields.get(b"owner", b"")),
        attempt=int(fields.get(b"attempt", 0)),
        lease_expires=float(fields.get(b"lease_expires", 0)),
        last_sequence=int(fields.get(b"last_sequence", 0)),
        checkpoint=codec.decode_checkpoint(text(checkpoint)) if checkpoint else None,
        result=codec.decode_payload(text(result)) if result else None,
        cancel_reason=text(fields.get(b"cancel_reason", b"")),
        trace_id=text(fields.get(b"trace_id", b"")),
        actions=_actions(fields),
    )


def _flat_record(run_id: bytes | str, flat: list[bytes]) -> RunRecord:
    """A record from a script's HGETALL reply (a flat field/value list)."""
    rid = run_id if isinstance(run_id, str) else text(run_id)
    return _record(rid, dict(zip(flat[::2], flat[1::2])))


def _event_args(events: Sequence[RunEvent]) -> list[Any]:
    """(sequence, JSON) pairs; ValueError unless the sequences are consecutive."""
    args: list[Any] = []
    if not events:
        return args
    first = events[0].sequence
    for i, event in enumerate(events):
        if event.sequence != first + i:
            raise ValueError(f"run {event.run_id}: event {event.sequence} does not follow {first + i - 1}")
        args.append(event.sequence)
        args.append(utf8(codec.encode_event(event)))
    return args


def _retention_ms(retention_s: float) -> int:
    return max(1, int(-(-retention_s * 1000 // 1)))  # rounded up: a retention never ends early


def _stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of the one stream an XREAD/XREADGROUP reply names (RESP2 list; RESP3 dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        (entries,) = reply.values()
        return list(entries[0] if entries and isinstance(entries[0], list) else entries)
    return list(reply[0][1])


# --- plumbing shared by the store and the bus ---------------------------------------


class _Closed(Exception):
    """A blocking wait ended because the store closed."""



class _RedisOps:
    _location: str

    def __init__(self) -> None:
        self._retries = RetryPolicy()
        self._open = False

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = str(exc) or type(exc).__name__
        return StoreUnavailableError(f"redis run store at {self._location}: {detail}")

    async def _run(self, op: Callable[[], Awaitable[T]], *, idempotent: bool) -> T:
        """One operation with the retry policy its idempotency allows (as the session store)."""
        if not self._open:
            raise StoreUnavailableError(f"redis run store at {self._location}: not open")
        return await self._retries.run(op, idempotent=idempotent, unavailable=self._unavailable)


async def _close_client(client: RedisClient) -> None:
    await client.aclose()
    manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
    if manager is not None:  # a Sentinel-backed client's pool holds the Sentinel connections separately
        await manager.aclose()


# --- the store ---------------------------------------------------------------------


class RedisRunStore(_RedisOps, RunStore):
    """Runs in Redis; any number of replicas share one prefix.

    ``client`` serves every short command; ``blocking_client`` only the blocking reads
    (XREADGROUP BLOCK in ``claim``, XREAD BLOCK in ``wait_events``). Build both with
    ``connect_redis`` (no per-command retries); give the blocking one no socket timeout
    (``socket_timeout_s=None``: each blocking call is bounded by its own wait plus
    ``timeout_s``) and room for every concurrent waiter. The store owns and closes both.
    """

    shared = True

    def __init__(
        self,
        client: RedisClient,
        blocking_client: RedisClient,
        *,
        prefix: str = "agentd",
        location: str = "",
        timeout_s: float = 5.0,
        reclaim_idle_s: float = 5.0,
    ) -> None:
        super().__init__()
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"redis key prefix must be non-empty and free of braces, got {prefix!r}")
        self._client = client
        self._blocking = blocking_client
        self._prefix = prefix
        self._location = location or describe_client(client)
        self._timeout_s = timeout_s
        self._reclaim_idle_ms = max(1, int(reclaim_idle_s * 1000))
        base = f"{prefix}:{{{prefix}:runs}}:"
        self._base_str = base
        self._base = utf8(base)
        self._queue = self._base + b"queue"
        self._leases = self._base + b"leases"
        self._expiries = self._base + b"expiries"
        self._waits: set[asyncio.Future[Any]] = set()

    # --- keys -------------------------------------------------------------------------

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def location(self) -> str:
        return self._location

    @property
    def key_base(self) -> str:
        """Every run key starts with this (it carries the one hash tag)."""
        return self._base_str

    def _run_key(self, run_id: str) -> bytes:
        return self._base + b"run:" + utf8(run_id)

    def _events_key(self, run_id: str) -> bytes:
        return self._base + b"events:" + utf8(run_id)

    # --- plumbing ---------------------------------------------------------------------

    async def _load_scripts(self) -> None:
        for script in _SCRIPTS:
            await self._client.script_load(script.source)

    async def _eval(self, script: LuaScript, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or failed-over server; the script did not run
            await self._load_scripts()
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def _wait(self, call: Callable[[], Awaitable[T]], timeout_s: float) -> T:
        """A blocking command, bounded by ``timeout_s`` (its client has no socket timeout) and
        ended by ``close`` (raising ``_Closed``). Cancelling it drops its connection."""
        task = asyncio.ensure_future(call())
        self._waits.add(task)
        try:
            done, _ = await asyncio.wait((task,), timeout=timeout_s)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            self._waits.discard(task)
        if not done:
            task.cancel()
            await asyncio.wait((task,))  # let it drop its connection
            raise asyncio.TimeoutError(f"no reply within {timeout_s:.1f}s")
        if task.cancelled():
            raise _Closed()
        return task.result()

    async def _ensure_group(self) -> None:
        try:
            await self._client.xgroup_create(self._queue, GROUP, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    # --- lifecycle --------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return

        async def connect() -> None:
            await asyncio.wait_for(self._client.ping(), self._timeout_s)
            await check_server_version(self._client, self._location)
            await self._load_scripts()
            await self._ensure_group()

        try:
            await self._retries.connect(connect)
        except RedisTooOldError as exc:
            raise StoreUnavailableError(str(exc)) from None
        except FAILURES as exc:
            raise self._unavailable(exc) from exc
        self._open = True

    async def close(self) -> None:
        self._open = False
        for waiting in list(self._waits):  # pending waits end (and return nothing)
            waiting.cancel()
        try:
            await _close_client(self._blocking)
        finally:
            await _close_client(self._client)

    async def ping(self) -> None:
        if not self._open:
            raise StoreUnavailableError(f"redis run store at {self._location}: not open")
        try:
            await asyncio.wait_for(self._client.ping(), self._timeout_s)
        except FAILURES as exc:
            raise self._unavailable(exc) from exc

    # --- records ----------------------------------------------------------------------

    async def create_run(
        self, spec: RunInput, *, policy: SessionPolicy, owner: str | None, lease_s: float, max_queued: int, now: float
    ) -> CreatedRun:
        sid = spec.session_id
        lease_expires = now + lease_s
        args = (
            self._base, spec.run_id, "" if sid is None else utf8(sid), "0" if sid is None else "1",
            utf8(spec.request_id), "reject" if policy is SessionPolicy.REJECT else "enqueue", owner or "",
            repr(lease_expires), max_queued, repr(now), utf8(codec.encode_spec(spec)),
        )
        keys = (self._run_key(spec.run_id),)
        reply = await self._run(lambda: self._eval(_S_CREATE, keys, args), idempotent=True)
        code = reply[0]
        if code == 3:
            if reply[1] == b"running":
                record = RunRecord(spec.run_id, spec, RunStatus.RUNNING, now, now, owner or "", 1, lease_expires)
            else:
                record = RunRecord(spec.run_id, spec, RunStatus.QUEUED, now, now)
            return CreatedRun(record, True)
        if code == 0:
            record = _flat_record(reply[1], reply[2])
            # Our own run id: an earlier attempt of this very call created it.
            return CreatedRun(record, record.run_id == spec.run_id)
        if code == 1:
            raise SessionBusyError(sid or "", text(reply[1]))
        raise QueueFullError(max_queued)

    async def get_run(self, run_id: str) -> RunRecord | None:
        key = self._run_key(run_id)
        fields = await self._run(lambda: self._client.hgetall(key), idempotent=True)
        return _record(run_id, fields) if fields else None

    async def list_runs(self, session_id: str, limit: int, cursor: str | None = None) -> tuple[list[RunRecord], str | None]:
        if limit <= 0:
            return [], None
        score, member = "", b""
        if cursor is not None:
            text_score, sep, run_id = cursor.partition("|")
            if not sep:
                raise ValueError(f"invalid cursor {cursor!r}")
            score, member = repr(float(text_score)), utf8(run_id)
        keys = (self._base + b"session:" + utf8(session_id),)
        args = (self._base, limit, score, member)
        reply = await self._run(lambda: self._eval(_S_LIST, keys, args), idempotent=True)
        records = [_flat_record(reply[i], reply[i + 1]) for i in range(1, len(reply), 2)]
        next_cursor = f"{records[-1].create_time!r}|{records[-1].run_id}" if reply[0] and records else None
        return records, next_cursor

    async def active_run(self, session_id: str) -> str | None:
        key = self._base + b"active:" + utf8(session_id)
        head = await self._run(lambda: self._client.lindex(key, 0), idempotent=True)
        return text(head) if head is not None else None

    # --- execution --------------------------------------------------------------------

    async def claim(self, owner: str, max_runs: int, *, lease_s: float, now: float, wait_s: float) -> list[RunRecord]:
        if max_runs <= 0:
            return []
        loop = asyncio.get_running_loop()
        started = loop.time()
        deadline = started + max(wait_s, 0.0)
        keys = (self._queue,)
        head = [self._base, utf8(owner), max_runs]

        def args_at(*entries: Any) -> list[Any]:
            # The caller's clock moved on while we waited: leases count from the claim.
            return [*head, repr(now + (loop.time() - started) + lease_s), repr(now + (loop.time() - started)),
                    self._reclaim_idle_ms, *entries]

        async def script(entries: Sequence[Any] = ()) -> Any:
            args = args_at(*entries)
            try:
                return await self._eval(_S_CLAIM, keys, args)
            except ResponseError as exc:
                if "NOGROUP" not in str(exc):
                    raise
                await self._ensure_group()  # the queue was deleted under us (the script wrote nothing)
                return await self._eval(_S_CLAIM, keys, args)

        while True:
            reply = await self._run(script, idempotent=False)
            if reply:
                return self._claimed(reply)
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            block_ms = max(1, int(remaining * 1000))

            async def read() -> Any:
                try:
                    return await self._wait(
                        lambda: self._blocking.xreadgroup(
                            GROUP, owner, {self._queue: ">"}, count=max_runs, block=block_ms
                        ),
                        remaining + self._timeout_s,
                    )
                except ResponseError as exc:
                    if "NOGROUP" not in str(exc):
                        raise
                    await self._ensure_group()
                    return None

            try:
                entries = _stream_entries(await self._run(read, idempotent=False))
            except (_Closed, StoreUnavailableError):
                if not self._open:  # closed while waiting
                    return []
                raise
            if entries:
                # Read, hence pending on this owner: claimed now, or reclaimed by anyone later.
                pairs = [value for entry_id, fields in entries for value in (entry_id, fields[b"r"])]
                reply = await self._run(lambda: script(pairs), idempotent=False)
                if reply:
                    return self._claimed(reply)
            elif loop.time() >= deadline:
                return []

    @staticmethod
    def _claimed(reply: list[Any]) -> list[RunRecord]:
        return [_flat_record(reply[i], reply[i + 1]) for i in range(0, len(reply), 2)]

    async def renew(self, owner: str, leases: dict[str, int], *, lease_s: float, now: float) -> RenewOutcome:
        if not leases:
            return RenewOutcome(frozenset(), {})
        args: list[Any] = [self._base, utf8(owner), repr(now + lease_s)]
        for run_id, attempt in leases.items():
            args.append(utf8(run_id))
            args.append(str(attempt))
        lost, cancel = await self._run(lambda: self._eval(_S_RENEW, (self._leases,), args), idempotent=True)
        return RenewOutcome(
            frozenset(text(run_id) for run_id in lost),
            {text(cancel[i]): text(cancel[i + 1]) for i in range(0, len(cancel), 2)},
        )

    async def record_progress(
        self, run_id: str, attempt: int, events: Sequence[RunEvent], checkpoint: Checkpoint | None, *, now: float
    ) -> None:
        args = [
            self._base, str(attempt), repr(now),
            utf8(codec.encode_checkpoint(checkpoint)) if checkpoint is not None else b"",
            events[0].trace_id if events else "",
            *_event_args(events),
        ]
        keys = (self._run_key(run_id), self._events_key(run_id))
        reply = await self._run(lambda: self._eval(_S_PROGRESS, keys, args), idempotent=False)
        if reply != 0:
            self._refused(run_id, attempt, events, reply)

    async def finish(self, run_id: str, attempt: int, events: Sequence[RunEvent], *, retention_s: float, now: float) -> None:
        if not events or not events[-1].is_terminal:
            raise ValueError("finish needs the run's terminal event last")
        payload = events[-1].payload
        args = [
            self._base, utf8(run_id), str(attempt), repr(now), _retention_ms(retention_s), repr(now + retention_s),
            terminal_status(payload).value, utf8(codec.encode_payload(payload)), events[0].trace_id,
            *_event_args(events),
        ]
        keys = (self._run_key(run_id), self._events_key(run_id))
        reply = await self._run(lambda: self._eval(_S_FINISH, keys, args), idempotent=False)
        if reply != 0:
            self._refused(run_id, attempt, events, reply)

    @staticmethod
    def _refused(run_id: str, attempt: int, events: Sequence[RunEvent], reply: Any) -> None:
        if reply == -1:
            raise LeaseLostError(f"run {run_id} is no longer executed by attempt {attempt}")
        raise ValueError(f"run {run_id}: event {events[0].sequence} does not follow {int(reply[0])}")

    async def release(self, run_id: str, attempt: int, *, now: float) -> bool:
        args = (self._base, utf8(run_id), str(attempt), repr(now))
        reply = await self._run(lambda: self._eval(_S_RELEASE, (self._run_key(run_id),), args), idempotent=False)
        return reply == 1

    async def requeue_expired(self, *, now: float) -> list[str]:
        args = (self._base, repr(now), _BATCH)
        requeued: list[str] = []
        for _ in range(100):  # bounded, even if leases keep expiring under us
            reply = await self._run(lambda: self._eval(_S_REQUEUE, (self._leases,), args), idempotent=True)
            requeued += [text(run_id) for run_id in reply[1:]]
            if reply[0] < _BATCH:
                break
        return requeued

    async def cancel(
        self, run_id: str, reason: str, *, event_time_ns: int, retention_s: float, now: float
    ) -> RunRecord | None:
        keys = (self._run_key(run_id), self._events_key(run_id))
        base_args = [self._base, utf8(run_id), utf8(reason), repr(now), _retention_ms(retention_s),
                     repr(now + retention_s)]
        args = base_args
        for _ in range(20):
            reply = await self._run(lambda: self._eval(_S_CANCEL, keys, args), idempotent=True)
            if reply == 0:
                return None
            code, flat = reply
            record = _flat_record(run_id, flat)
            if code == 1:
                return record
            # QUEUED: ended here with a RunCancelled event built for exactly this record.
            cp = record.checkpoint
            payload = RunCancelled(reason, cp.usage if cp is not None else Usage(), cp.turns if cp is not None else 0)
            sequence = record.last_sequence + 1
            event = RunEvent(run_id, sequence, event_time_ns, record.trace_id, payload)
            args = [*base_args, str(record.attempt), str(record.last_sequence), sequence,
                    utf8(codec.encode_event(event)), utf8(codec.encode_payload(payload))]
        raise StoreUnavailableError(f"redis run store at {self._location}: run {run_id} kept changing during cancel")

    async def submit_action(self, run_id: str, key: str, action: dict[str, Any], *, now: float) -> RunRecord | None:
        args = (self._base, _ACTION + utf8(key), utf8(codec.encode_action(action)), repr(now))
        keys = (self._run_key(run_id),)
        reply = await self._run(lambda: self._eval(_S_SUBMIT, keys, args), idempotent=True)
        return _flat_record(run_id, reply) if reply != 0 else None

    async def sweep(self, *, now: float) -> int:
        args = (self._base, repr(now), _BATCH)
        deleted = 0
        for _ in range(100):
            removed = await self._run(lambda: self._eval(_S_SWEEP, (self._expiries,), args), idempotent=True)
            deleted += removed
            if removed < _BATCH:
                break
        return deleted

    # --- event log --------------------------------------------------------------------

    async def read_events(self, run_id: str, after_sequence: int, limit: int) -> list[RunEvent]:
        if limit <= 0:
            return []
        key = self._events_key(run_id)
        low = f"(0-{after_sequence}" if after_sequence > 0 else "-"
        entries = await self._run(lambda: self._client.xrange(key, min=low, max="+", count=limit), idempotent=True)
        return [codec.decode_event(run_id, text(fields[b"e"])) for _, fields in entries]

    async def wait_events(self, run_id: str, after_sequence: int, *, limit: int, timeout_s: float) -> list[RunEvent]:
        if limit <= 0:
            return []
        if timeout_s <= 0:
            return await self.read_events(run_id, after_sequence, limit)
        key = self._events_key(run_id)
        streams = {key: f"0-{max(after_sequence, 0)}"}
        block_ms = max(1, int(timeout_s * 1000))

        async def read() -> Any:
            return await self._wait(
                lambda: self._blocking.xread(streams, count=limit, block=block_ms), timeout_s + self._timeout_s
            )

        try:
            reply = await self._run(read, idempotent=True)
        except (_Closed, StoreUnavailableError):
            if not self._open:  # closed while waiting
                return []
            raise
        return [codec.decode_event(run_id, text(fields[b"e"])) for _, fields in _stream_entries(reply)]


# --- the control bus ---------------------------------------------------------------


class RedisControlBus(_RedisOps, ControlBus):
    """``Control`` messages over Redis pub/sub on ``<prefix>:runs:control``.

    One subscribed connection per bus, read by a background task that hands every
    message to each local ``subscribe()`` iterator; it reconnects (with backoff) after
    a connection error, and PINGs an idle connection so a silent partition is noticed
    too. Messages published while it is disconnected are lost, as the interface allows.
    """

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "agentd",
        location: str = "",
        timeout_s: float = 5.0,
        idle_ping_s: float = 5.0,
    ) -> None:
        super().__init__()
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"redis key prefix must be non-empty and free of braces, got {prefix!r}")
        self._client = client
        self._location = location or describe_client(client)
        self._channel = utf8(f"{prefix}:runs:control")
        self._timeout_s = timeout_s
        self._idle_ping_s = idle_ping_s
        self._subscribers: set[asyncio.Queue[Control | None]] = set()
        self._reader: asyncio.Task[None] | None = None
        self._ready: asyncio.Event | None = None
        self._closed = False
        self._last_error: BaseException | None = None

    @property
    def channel(self) -> str:
        return text(self._channel)

    async def open(self) -> None:
        if self._reader is not None:
            return
        self._closed = False
        self._ready = asyncio.Event()
        self._reader = asyncio.create_task(self._read(), name="agentd-run-control")
        try:
            await asyncio.wait_for(self._ready.wait(), self._timeout_s)
        except asyncio.TimeoutError:
            error = self._last_error or TimeoutError("no subscription confirmation")
            await self._stop_reader()
            raise self._unavailable(error) from None
        self._open = True

    async def close(self) -> None:
        self._closed = True
        self._open = False
        await self._stop_reader()
        for queue in list(self._subscribers):
            queue.put_nowait(None)
        await _close_client(self._client)

    async def _stop_reader(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.cancel()
            try:
                await reader
            except (asyncio.CancelledError, Exception):
                pass

    async def publish(self, message: Control) -> None:
        data = utf8(_encode_json({"run_id": message.run_id, "kind": message.kind, "reason": message.reason}))
        await self._run(lambda: self._client.publish(self._channel, data), idempotent=False)

    async def subscribe(self) -> AsyncIterator[Control]:  # type: ignore[override]
        if self._closed:
            return
        queue: asyncio.Queue[Control | None] = asyncio.Queue()
        self._subscribers.add(queue)
        try:
            while (message := await queue.get()) is not None:
                yield message
        finally:
            self._subscribers.discard(queue)

    def _dispatch(self, data: bytes) -> None:
        try:
            d = _decode_json(text(data))
            message = Control(str(d["run_id"]), str(d["kind"]), str(d.get("reason", "")))
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("ignoring a malformed run control message: %s", exc)
            return
        for queue in self._subscribers:
            queue.put_nowait(message)

    async def _read(self) -> None:
        loop = asyncio.get_running_loop()
        failures = 0
        while not self._closed:
            pubsub = self._client.pubsub()
            try:
                await pubsub.subscribe(self._channel)
                last_seen, ping_at = loop.time(), None
                while True:
                    message = await pubsub.get_message(timeout=1.0)
                    t = loop.time()
                    if message is None:
                        if ping_at is not None:
                            if t - ping_at > self._timeout_s:
                                raise asyncio.TimeoutError(f"no reply to PING on {self.channel} in {self._timeout_s}s")
                        elif t - last_seen > self._idle_ping_s:
                            await pubsub.ping()
                            ping_at = t
                        continue
                    last_seen, ping_at = t, None
                    kind = message["type"]
                    if kind in ("message", b"message"):
                        self._dispatch(message["data"])
                    elif kind in ("subscribe", b"subscribe"):
                        failures = 0
                        if self._ready is not None:
                            self._ready.set()
            except asyncio.CancelledError:
                raise
            except FAILURES as exc:
                self._last_error = exc
                if not self._closed:
                    log.warning(
                        "run control channel at %s: %s; reconnecting", self._location, exc or type(exc).__name__
                    )
            finally:
                try:
                    await pubsub.aclose()
                except Exception:  # pragma: no cover - the connection is already gone
                    pass
            failures += 1
            await asyncio.sleep(min(2.0, 0.05 * 2 ** min(failures, 6)))


# --- construction ------------------------------------------------------------------


def build_redis_runs(settings: Settings) -> tuple[RunStore, ControlBus]:
    """The run store and control bus on the Redis deployment the AGENTD_REDIS_* settings name."""
    from agentd.server.sessions.factory import _redact, _redis_options, parse_nodes

    cluster = parse_nodes("AGENTD_REDIS_CLUSTER_NODES", settings.redis_cluster_nodes)
    sentinels = parse_nodes("AGENTD_REDIS_SENTINELS", settings.redis_sentinels)
    if sentinels and not settings.redis_sentinel_service:
        raise ValueError("AGENTD_REDIS_SENTINELS is set: also set AGENTD_REDIS_SENTINEL_SERVICE (the master's name)")
    deployment: dict[str, Any]
    if cluster:
        location = f"cluster {settings.redis_cluster_nodes}"
        deployment = {"cluster_nodes": cluster}
    elif sentinels:
        location = f"sentinel service {settings.redis_sentinel_service} via {settings.redis_sentinels}"
        deployment = {"sentinels": sentinels, "sentinel_service": settings.redis_sentinel_service}
    else:
        location = _redact(settings.redis_url)
        deployment = {"url": settings.redis_url}
    options: dict[str, Any] = dict(_redis_options(settings))
    client = connect_redis(**deployment, **options, client_name="agentd-runs")
    blocking = connect_redis(
        **deployment,
        **{**options, "socket_timeout_s": None, "max_connections": max(1000, settings.redis_max_connections)},
        client_name="agentd-runs-wait",
    )
    bus_client = connect_redis(**deployment, **{**options, "max_connections": 4}, client_name="agentd-runs-control")
    prefix, timeout = settings.redis_prefix, settings.redis_timeout_s
    store = RedisRunStore(client, blocking, prefix=prefix, location=location, timeout_s=timeout)
    bus = RedisControlBus(bus_client, prefix=prefix, location=location, timeout_s=timeout)
    return store, bus
