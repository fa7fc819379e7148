"""Session store on Redis (standalone, Sentinel or Cluster) through ``redis.asyncio``.

Why this shape: MULTI/EXEC cannot branch on what it reads, but a Lua script can and
runs atomically. So every operation on one session is one script (one round trip,
called by SHA) over that session's keys, which share one hash tag (one Cluster slot):

    {prefix}:session:{<tag>}:info      HASH  created_at, updated_at, last_seq, ttl_s
                                             (the session exists while this key does)
    {prefix}:session:{<tag>}:items     LIST  "<seq>|<created_at>|<item JSON>", ascending seq
    {prefix}:session:{<tag>}:state     HASH  field -> JSON value
    {prefix}:session:{<tag>}:meta      HASH  metadata key -> string
    {prefix}:session:{<tag>}:requests  HASH  append request id -> "<first seq>:<last seq>"
    {prefix}:sessions                  ZSET  id, score created_at (listing, newest first)
    {prefix}:expiries                  ZSET  id, score a lower bound of its expiry (sweeper)

``<tag>`` is the session id with ``%`` written ``%25`` and ``}`` written ``%7D`` (the
empty id is ``%``, which no other id can produce): Cluster hashes the text between the
first ``{`` and the next ``}``, so the tag must not contain ``}``; ``{`` inside it is
harmless. The mapping is injective, so distinct ids never share keys, and common ids
stay readable in ``redis-cli``. The prefix may not contain braces.

What is atomic. Each session operation is one script over its own keys: atomic in
every deployment, which is what makes sequences gap-free and unique under any number
of writers and request ids apply exactly once. The two index sets live in other slots,
so in Cluster they cannot be in that script; they are maintained by separate commands
sent in the same round trip (standalone and Sentinel wrap them with the script in
MULTI/EXEC, so there the batch applies as a unit; Cluster runs them independently).
Nothing depends on the index being exact: entries are added with NX before or with the
session write and removed only after it, conditionally on the score they were read
with (so a concurrent re-creation of the id is never un-indexed); listing checks each
entry against the session's own keys, skips and removes stale ones and keeps reading
until the page is full; ``expiries`` is only a hint that the sweeper re-scores when the
session turned out to be still alive. Rare races (a crash between round trips, a
re-created id whose stale entry still held the old score) cost one corrective command.

Expiry. A session with a TTL is live until ``updated_at + ttl_s``, judged against the
caller's clock (``time.time()``, like the other stores) inside every script, and each
write also PEXPIREs all of its keys (milliseconds, rounded up, so fractional TTLs
work) so Redis reclaims the space by itself; the index entries are reclaimed by
``sweep_expired`` or lazily by listing. Timestamps travel as ``repr(float)`` and are
never formatted by Lua, so they round-trip exactly.

Retries. Clients from ``connect_redis`` have redis-py's per-command retry switched off:
it would resend a write whose reply was lost (a timeout after sending is ambiguous) and
a resent pop pops twice. The store instead retries, with redis-py's own ``Retry`` and
exponential backoff, only operations whose repetition is harmless: reads,
``read_history`` (create-if-missing), ``update_session`` (same values, same timestamp),
appends with a request id (replayed, not duplicated), ``create_session`` (a retry that
finds the session created at its own timestamp knows it was its own) and the sweep.
Deletes, pops, clears and appends without a request id are retried only on errors that
prove the command was refused unexecuted (CLUSTERDOWN, TRYAGAIN, LOADING, NOSCRIPT);
otherwise the failure surfaces as ``StoreUnavailableError`` and the caller decides
(the run loop retries its step with a request id). A timeout is retried once only:
against a partitioned server every attempt costs a full socket timeout.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any, Awaitable, Callable, Sequence, TypeVar

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError, RedisError

from agentd.server.redis_common import (
    FAILURES,
    LuaScript,
    RedisClient,
    RedisTooOldError,
    RetryPolicy,
    check_server_version,
    describe_client,
    text,
    utf8,
)
from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import (
    SessionPage,
    SessionRecord,
    SessionStore,
    StoredItem,
    check_limit,
    decode_cursor,
    encode_cursor,
    expiry,
    resolve_ttl,
)

__all__ = ["RedisSessionStore"]

T = TypeVar("T")

_CHUNK = 1000  # values per command inside scripts: Lua's unpack() has a stack limit
_SWEEP_BATCH = 500
_LIST_READ_AHEAD_MAX = 1000

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


def _dumps(value: Any) -> bytes:
    return utf8(_encode_json(value))


def _ttl_arg(ttl_s: float | None) -> str:
    return repr(float(ttl_s)) if ttl_s else ""


# --- Lua ---------------------------------------------------------------------------

# Shared by every per-session script. KEYS: info, items, state, meta, requests; ARGV[1]: now.
_PRELUDE = r"""
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
"""

_CREATE = r"""
-- ARGV: now, ttl_s ('' = none), #metadata pairs, metadata k/v..., state k/v...
-- Returns the live session's created_at when the id is taken, else nil (created).
local f = live('created_at')
if f then return f[3] end
create(ARGV[2], 4, 3 + 2 * tonumber(ARGV[3]))
return false
"""

_GET = r"""
-- ARGV: now. The record, or nil.
local f = live('created_at')
if not f then return false end
return record(f[3], f[1], f[2])
"""

_HISTORY = r"""
-- ARGV: now, create ('1'/'0'), ttl_s of a created session ('' = none).
-- {created_at, records} for a live session; 1 when it was created; nil when missing.
local f = live('created_at')
if f then return {f[3], redis.call('LRANGE', items, 0, -1)} end
if ARGV[2] ~= '1' then return false end
create(ARGV[3], 4, 3)
return 1
"""

_APPEND = r"""
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
"""

_LIST_ITEMS = r"""
-- ARGV: now, newest first ('1'/'0'), bound ('' = none; after or before sequence), limit.
-- Records in list order (the caller reverses newest-first pages); nil when missing.
if not live() then return false end
local n = redis.call('LLEN', items)
local limit = tonumber(ARGV[4])
if ARGV[2] == '1' then
  local hi = n
  if ARGV[3] ~= '' then hi = lower_bound(tonumber(ARGV[3]), n) end
  if hi == 0 then return {} end
  return redis.call('LRANGE', items, math.max(0, hi - limit), hi - 1)
end
local lo = lower_bound(tonumber(ARGV[3]) + 1, n)
if lo >= n then return {} end
return redis.call('LRANGE', items, lo, lo + limit - 1)
"""

_UPDATE = r"""
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
"""

_POP = r"""
-- ARGV: now. The popped record; 0 when there are no items; nil when missing.
local f = live()
if not f then return false end
local r = redis.call('RPOP', items)
if not r then return 0 end
touch(f[2])
return r
"""

_CLEAR = r"""
-- ARGV: now. How many items were removed; -1 when missing.
local f = live()
if not f then return -1 end
local n = redis.call('LLEN', items)
if n > 0 then
  redis.call('DEL', items)
  touch(f[2])
end
return n
"""

_DELETE = r"""
-- ARGV: now. Deletes every key; returns the live session's created_at, else nil.
local f = live('created_at')
redis.call('DEL', info, items, state, meta, requests)
if f then return f[3] end
return false
"""

_REAP = r"""
-- ARGV: now. A live session's {updated_at, ttl_s}; otherwise deletes whatever is
-- left of it and returns 1 if there was something, 0 if not.
local f = live()
if f then return {f[1], f[2]} end
if redis.call('DEL', info, items, state, meta, requests) > 0 then return 1 end
return 0
"""

# Not a session script: one sorted set, for index maintenance.
_ZFIX = r"""
-- KEYS[1]: a sorted set. ARGV: (member, expected score, new score or '' to remove)...
-- Each change applies only while the member still has the expected score, so an entry
-- a concurrent writer has just (re)written is left alone. Returns how many changed.
local changed = 0
for i = 1, #ARGV, 3 do
  local s = redis.call('ZSCORE', KEYS[1], ARGV[i])
  if s and tonumber(s) == tonumber(ARGV[i + 1]) then
    if ARGV[i + 2] == '' then
      redis.call('ZREM', KEYS[1], ARGV[i])
    else
      redis.call('ZADD', KEYS[1], ARGV[i + 2], ARGV[i])
    end
    changed = changed + 1
  end
end
return changed
"""


def _Script(body: str, *, session: bool = True) -> LuaScript:
    """A session script: the shared prelude, then ``body`` (``session=False``: ``body`` alone)."""
    return LuaScript((_PRELUDE + body) if session else body)


_S_CREATE = _Script(_CREATE)
_S_GET = _Script(_GET)
_S_HISTORY = _Script(_HISTORY)
_S_APPEND = _Script(_APPEND)
_S_LIST_ITEMS = _Script(_LIST_ITEMS)
_S_UPDATE = _Script(_UPDATE)
_S_POP = _Script(_POP)
_S_CLEAR = _Script(_CLEAR)
_S_DELETE = _Script(_DELETE)
_S_REAP = _Script(_REAP)
_S_ZFIX = _Script(_ZFIX, session=False)
_SCRIPTS = (_S_CREATE, _S_GET, _S_HISTORY, _S_APPEND, _S_LIST_ITEMS, _S_UPDATE, _S_POP, _S_CLEAR, _S_DELETE, _S_REAP, _S_ZFIX)


# --- value encoding ----------------------------------------------------------------


def _metadata_args(metadata: dict[str, str]) -> list[bytes]:
    args: list[bytes] = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"session metadata must map strings to strings, got {key!r}: {value!r}")
        args += (utf8(key), utf8(value))
    return args


def _state_args(state: dict[str, Any]) -> list[bytes]:
    args: list[bytes] = []
    for key, value in state.items():
        if not isinstance(key, str):  # the key JSON would write for it (1 -> "1", True -> "true")
            key = next(iter(json.loads(_encode_json({key: None}))))
        args += (utf8(key), _dumps(value))
    return args


def _pairs(flat: list[bytes]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def _state_from(flat: list[bytes]) -> dict[str, Any]:
    return {text(flat[i]): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}


def _record(session_id: str, reply: list[Any]) -> SessionRecord:
    created_at, updated, ttl, metadata, state, count = reply
    updated_at = float(updated)
    ttl_s = float(ttl) if ttl is not None else None
    return SessionRecord(
        session_id=session_id,
        created_at=float(created_at),
        updated_at=updated_at,
        metadata=_pairs(metadata),
        state=_state_from(state),
        item_count=count,
        ttl_s=ttl_s,
        expires_at=expiry(updated_at, ttl_s),
    )


def _stored(session_id: str, record: bytes) -> StoredItem:
    seq, created_at, data = text(record).split("|", 2)  # one decode; JSON parses fastest from str
    return StoredItem(session_id, int(seq), float(created_at), item_from_dict(_decode_json(data)))


def _item(record: bytes) -> Item:
    return item_from_dict(_decode_json(text(record).split("|", 2)[2]))


def _score_pairs(reply: list[Any]) -> list[tuple[bytes, float]]:
    """ZRANGE ... WITHSCORES as redis-py parses it: (member, score) pairs."""
    return [(member, float(score)) for member, score in reply]


# --- the store ---------------------------------------------------------------------


class RedisSessionStore(SessionStore):
    """Sessions in Redis; any number of server replicas may share one prefix.

    ``client`` is owned by the store from now on (``close`` closes it). Build it with
    ``connect_redis``: a client with redis-py's own per-command retries enabled would
    also resend writes whose outcome is unknown (see the module docstring).
    """

    backend = "redis"

    def __init__(
        self,
        client: RedisClient,
        *,
        prefix: str = "agentd",
        default_ttl_s: float | None = None,
        location: str = "",
        ping_timeout_s: float = 5.0,
    ) -> None:
        if not prefix or "{" in prefix or "}" in prefix:
            raise ValueError(f"redis key prefix must be non-empty and free of braces, got {prefix!r}")
        self._client = client
        self._cluster = isinstance(client, RedisCluster)
        self._prefix = prefix
        self._key_head = utf8(f"{prefix}:session:")
        self._index = utf8(f"{prefix}:sessions")
        self._expiries = utf8(f"{prefix}:expiries")
        self._default_ttl_s = resolve_ttl(default_ttl_s, None)
        self._location = location or describe_client(client)
        self._ping_timeout_s = ping_timeout_s
        self._open = False
        self._retries = RetryPolicy()

    @property
    def prefix(self) -> str:
        return self._prefix

    @property
    def location(self) -> str:
        return self._location

    # --- plumbing -------------------------------------------------------------------

    def _keys(self, session_id: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """info, items, state, meta, requests: one hash tag, so one Cluster slot."""
        tag = session_id.replace("%", "%25").replace("}", "%7D") or "%"
        base = self._key_head + b"{" + utf8(tag) + b"}:"
        return base + b"info", base + b"items", base + b"state", base + b"meta", base + b"requests"

    def _unavailable(self, exc: BaseException) -> StoreUnavailableError:
        detail = str(exc) or type(exc).__name__
        return StoreUnavailableError(f"redis store at {self._location}: {detail}")

    async def _run(self, op: Callable[[], Awaitable[T]], *, idempotent: bool) -> T:
        """One store operation with the retry policy its idempotency allows."""
        if not self._open:
            raise StoreUnavailableError(f"redis store at {self._location}: not open")
        return await self._retries.run(op, idempotent=idempotent, unavailable=self._unavailable)

    async def _load_scripts(self) -> None:
        for script in _SCRIPTS:
            sha = await self._client.script_load(script.source)
            if isinstance(sha, bytes):
                sha = sha.decode("ascii")
            if sha != script.sha:  # pragma: no cover - would mean Redis hashes differently
                raise RedisError(f"SCRIPT LOAD returned {sha}, expected {script.sha}")

    async def _eval(self, script: _Script, keys: Sequence[bytes], args: Sequence[Any]) -> Any:
        try:
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:  # a restarted or failed-over server; the script did not run
            await self._load_scripts()
            return await self._client.evalsha(script.sha, len(keys), *keys, *args)

    async def _pipeline(self, build: Callable[[Any], None], *, atomic: bool) -> list[Any]:
        """One round trip; ``atomic`` wraps it in MULTI/EXEC where Redis allows (not Cluster).

        Every pipeline here is safe to resend after NOSCRIPT: its other commands are
        idempotent index updates and reads.
        """
        for attempt in (1, 2):
            pipe = self._client.pipeline(transaction=atomic and not self._cluster)
            build(pipe)
            results: list[Any] = await pipe.execute(raise_on_error=False)
            errors = [r for r in results if isinstance(r, Exception)]
            if not errors:
                return results
            if attempt == 1 and all(isinstance(e, NoScriptError) for e in errors):
                await self._load_scripts()
                continue
            raise errors[0]
        raise AssertionError("unreachable")

    @staticmethod
    def _evalsha(pipe: Any, script: _Script, keys: Sequence[bytes], args: Sequence[Any]) -> None:
        # Not pipe.evalsha(): redis-py's ClusterPipeline blocks that method, though it
        # routes the command itself correctly (by its keys, which share one slot here).
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _fix_index(self, key: bytes, changes: list[Any]) -> int:
        """Apply (member, expected score, new score or '') triples; see ``_ZFIX``."""
        if not changes:
            return 0
        changed: int = await self._eval(_S_ZFIX, (key,), changes)
        return changed

    # --- lifecycle ------------------------------------------------------------------

    async def open(self) -> None:
        if self._open:
            return

        async def connect() -> None:
            await asyncio.wait_for(self._client.ping(), self._ping_timeout_s)
            await check_server_version(self._client, self._location)
            await self._load_scripts()

        try:
            await self._retries.connect(connect)
        except RedisTooOldError as exc:
            raise StoreUnavailableError(str(exc)) from None
        except FAILURES as exc:
            raise self._unavailable(exc) from exc
        self._open = True

    async def close(self) -> None:
        self._open = False
        client = self._client
        await client.aclose()
        # A Sentinel-backed client's pool holds the Sentinel connections separately.
        manager = getattr(getattr(client, "connection_pool", None), "sentinel_manager", None)
        if manager is not None:
            await manager.aclose()

    async def ping(self) -> None:
        if not self._open:
            raise StoreUnavailableError(f"redis store at {self._location}: not open")
        try:
            await asyncio.wait_for(self._client.ping(), self._ping_timeout_s)
        except FAILURES as exc:
            raise self._unavailable(exc) from exc

    # --- sessions -------------------------------------------------------------------

    async def create_session(
        self,
        session_id: str,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        *,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        ttl = resolve_ttl(ttl_s, self._default_ttl_s)
        meta_args = _metadata_args(metadata or {})
        state_args = _state_args(state or {})
        now = time.time()
        now_arg = repr(now)
        keys, member = self._keys(session_id), utf8(session_id)
        args = [now_arg, _ttl_arg(ttl), len(meta_args) // 2, *meta_args, *state_args]
        attempts = 0

        def build(pipe: Any) -> None:
            pipe.zadd(self._index, {member: now}, nx=True)
            if ttl:
                pipe.zadd(self._expiries, {member: now + ttl}, nx=True)
            self._evalsha(pipe, _S_CREATE, keys, args)

        async def op() -> None:
            nonlocal attempts
            attempts += 1
            results = await self._pipeline(build, atomic=True)
            indexed, existing = results[0], results[-1]
            # A retry that finds the session stamped with its own timestamp created it.
            if existing is not None and not (attempts > 1 and existing == now_arg.encode()):
                if indexed:  # it had no index entry (a partial failure once); give it its own
                    await self._fix_index(self._index, [member, now_arg, existing])
                raise SessionExistsError(session_id)
            if not indexed:  # a stale entry of an expired namesake held the old score
                await self._client.zadd(self._index, {member: now})

        await self._run(op, idempotent=True)
        return SessionRecord(
            session_id=session_id,
            created_at=now,
            updated_at=now,
            metadata=_pairs(meta_args),
            state=_state_from(state_args),
            item_count=0,
            ttl_s=float(ttl) if ttl else None,
            expires_at=expiry(now, ttl),
        )

    async def get_session(self, session_id: str) -> SessionRecord:
        keys, args = self._keys(session_id), (repr(time.time()),)
        reply = await self._run(lambda: self._eval(_S_GET, keys, args), idempotent=True)
        if reply is None:
            raise SessionNotFoundError(session_id)
        return _record(session_id, reply)

    async def list_sessions(self, limit: int, cursor: str | None = None) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor is not None else None
        now = repr(time.time())
        position = (after[0], utf8(after[1])) if after is not None else None
        return await self._run(lambda: self._list(limit, position, now), idempotent=True)

    async def _index_page(self, position: tuple[float, bytes] | None, count: int) -> list[tuple[bytes, float]]:
        """Up to ``count`` index entries after ``position`` in (created_at, id) descending order."""
        if position is None:
            top = await self._client.zrange(
                self._index, "+inf", "-inf", desc=True, byscore=True, offset=0, num=count, withscores=True
            )
            return _score_pairs(top)
        score, member = position
        ties, older = await self._pipeline(
            lambda pipe: (
                pipe.zrange(self._index, repr(score), repr(score), desc=True, byscore=True, withscores=True),
                pipe.zrange(
                    self._index, f"({score!r}", "-inf", desc=True, byscore=True, offset=0, num=count, withscores=True
                ),
            ),
            atomic=False,
        )
        # Equal scores are ordered by member bytes; UTF-8 byte order is code point order.
        return ([(m, s) for m, s in _score_pairs(ties) if m < member] + _score_pairs(older))[:count]

    async def _list(self, limit: int, position: tuple[float, bytes] | None, now: str) -> SessionPage:
        want = limit + 1  # one more than the page tells whether another page exists
        found: list[tuple[float, str, SessionRecord]] = []
        changes: list[Any] = []
        batch = want
        while len(found) < want:
            entries = await self._index_page(position, batch)
            if not entries:
                break
            ids = [text(member) for member, _ in entries]
            replies = await self._pipeline(
                lambda pipe: [self._evalsha(pipe, _S_GET, self._keys(sid), (now,)) for sid in ids], atomic=False
            )
            for (member, score), sid, reply in zip(entries, ids, replies):
                if reply is None:  # deleted or expired: drop the entry (unless rewritten meanwhile)
                    changes += (member, repr(score), "")
                    continue
                record = _record(sid, reply)
                if record.created_at != score:  # left by a partial failure: re-score it
                    changes += (member, repr(score), repr(record.created_at))
                found.append((score, sid, record))
            if len(entries) < batch:
                break
            position = entries[-1][1], entries[-1][0]
            # Stale entries were in the way: read further ahead, within reason.
            batch = max(want - len(found), min(batch * 2, _LIST_READ_AHEAD_MAX))
        if changes:
            await self._fix_index(self._index, changes)
        page = found[:limit]
        next_cursor = encode_cursor(page[-1][0], page[-1][1]) if len(found) > limit else None
        return SessionPage(sessions=[record for _, _, record in page], next_cursor=next_cursor)

    async def update_session(
        self,
        session_id: str,
        *,
        metadata: dict[str, str] | None = None,
        state: dict[str, Any] | None = None,
        ttl_s: float | None = None,
    ) -> SessionRecord:
        new_ttl = resolve_ttl(ttl_s, None) if ttl_s is not None else None  # ValueError when negative
        ttl_arg = "" if ttl_s is None else (_ttl_arg(new_ttl) or "0")
        meta_args = _metadata_args(metadata) if metadata is not None else None
        state_args = _state_args(state) if state is not None else None
        now = time.time()
        keys, member = self._keys(session_id), utf8(session_id)
        args: list[Any] = [repr(now), ttl_arg]
        for pairs in (meta_args, state_args):
            args += [-1] if pairs is None else [len(pairs) // 2, *pairs]

        def build(pipe: Any) -> None:
            self._evalsha(pipe, _S_UPDATE, keys, args)
            if new_ttl:
                pipe.zadd(self._expiries, {member: now + new_ttl})
            else:
                pipe.zrem(self._expiries, member)

        async def op() -> Any:
            if ttl_s is None:  # the TTL stays: the index is not involved
                return await self._eval(_S_UPDATE, keys, args)
            return (await self._pipeline(build, atomic=True))[0]

        reply = await self._run(op, idempotent=True)
        if reply is None:
            raise SessionNotFoundError(session_id)
        return _record(session_id, reply)

    async def delete_session(self, session_id: str) -> None:
        keys, member = self._keys(session_id), utf8(session_id)
        created_at = await self._run(lambda: self._eval(_S_DELETE, keys, (repr(time.time()),)), idempotent=False)
        if created_at is None:
            raise SessionNotFoundError(session_id)
        # The session is gone; the index entries are clean-up. If this fails, listing
        # and the sweeper remove them later, so the delete still succeeded.
        try:
            await self._pipeline(
                lambda pipe: (
                    self._evalsha(pipe, _S_ZFIX, (self._index,), (member, created_at, "")),
                    pipe.zrem(self._expiries, member),
                ),
                atomic=False,
            )
        except FAILURES:
            pass

    async def sweep_expired(self) -> int:
        now = time.time()
        return await self._run(lambda: self._sweep(now), idempotent=True)

    async def _sweep(self, now: float) -> int:
        removed = 0
        now_arg = repr(now)
        for _ in range(100):  # bounded even if writers keep re-scoring entries under us
            due = await self._client.zrange(
                self._expiries, "-inf", now_arg, byscore=True, offset=0, num=_SWEEP_BATCH, withscores=True
            )
            entries = _score_pairs(due)
            if not entries:
                break

            def build(pipe: Any) -> None:
                for member, _ in entries:
                    self._evalsha(pipe, _S_REAP, self._keys(text(member)), (now_arg,))
                    pipe.zscore(self._index, member)

            results = await self._pipeline(build, atomic=False)
            index_changes: list[Any] = []
            hint_changes: list[Any] = []
            for (member, hint), reaped, score in zip(entries, results[::2], results[1::2]):
                if isinstance(reaped, list):  # still alive: its expiry moved on (or went away)
                    updated_at, ttl = reaped
                    new_hint = repr(float(updated_at) + float(ttl)) if ttl is not None else ""
                    hint_changes += (member, repr(hint), new_hint)
                    continue
                hint_changes += (member, repr(hint), "")
                if score is not None:
                    index_changes += (member, repr(float(score)), "")
                if reaped or score is not None:
                    removed += 1
            await self._pipeline(
                lambda pipe: [
                    self._evalsha(pipe, _S_ZFIX, (key,), changes)
                    for key, changes in ((self._index, index_changes), (self._expiries, hint_changes))
                    if changes
                ],
                atomic=False,
            )
            if len(entries) < _SWEEP_BATCH:
                break
        return removed

    # --- items ----------------------------------------------------------------------

    async def append_items(
        self, session_id: str, items: Sequence[Item], request_id: str | None = None
    ) -> list[StoredItem]:
        dicts = [item.to_dict() for item in items]
        normalised = [item_from_dict(d) for d in dicts]  # all or nothing: fail before writing
        now = time.time()
        keys = self._keys(session_id)
        args = [repr(now), "0" if request_id is None else "1", request_id or "", *map(_dumps, dicts)]
        reply = await self._run(lambda: self._eval(_S_APPEND, keys, args), idempotent=request_id is not None)
        if reply is None:
            raise SessionNotFoundError(session_id)
        if isinstance(reply, list):  # a replayed request: what it stored and still exists
            return [_stored(session_id, record) for record in reply]
        return [
            StoredItem(session_id=session_id, sequence=reply + i, created_at=now, item=item)
            for i, item in enumerate(normalised)
        ]

    async def list_items(
        self,
        session_id: str,
        limit: int,
        *,
        newest_first: bool = False,
        after_sequence: int = 0,
        before_sequence: int | None = None,
    ) -> list[StoredItem]:
        check_limit(limit)
        if newest_first:
            bound = "" if before_sequence is None else int(before_sequence)
        else:
            bound = int(after_sequence)
        keys = self._keys(session_id)
        args = (repr(time.time()), "1" if newest_first else "0", bound, limit)
        reply = await self._run(lambda: self._eval(_S_LIST_ITEMS, keys, args), idempotent=True)
        if reply is None:
            raise SessionNotFoundError(session_id)
        if newest_first:
            reply.reverse()
        return [_stored(session_id, record) for record in reply]

    async def read_history(self, session_id: str, *, create: bool = False) -> list[Item]:
        now = time.time()
        now_arg = repr(now)
        keys, member = self._keys(session_id), utf8(session_id)
        ttl = self._default_ttl_s
        args = (now_arg, "1" if create else "0", _ttl_arg(ttl))

        def build(pipe: Any) -> None:
            pipe.zadd(self._index, {member: now}, nx=True)
            if ttl:
                pipe.zadd(self._expiries, {member: now + ttl}, nx=True)
            self._evalsha(pipe, _S_HISTORY, keys, args)

        async def op() -> Any:
            if not create:
                return await self._eval(_S_HISTORY, keys, args)
            # Index entry and session in one round trip: a new session costs no extra trip.
            results = await self._pipeline(build, atomic=True)
            indexed, reply = results[0], results[-1]
            if reply == 1 and not indexed:  # created, but a stale entry held an old score
                await self._client.zadd(self._index, {member: now})
            elif isinstance(reply, list) and indexed:  # existed without an entry: use its own
                await self._fix_index(self._index, [member, now_arg, reply[0]])
            return reply

        reply = await self._run(op, idempotent=True)
        if not isinstance(reply, list):
            return []
        return [_item(record) for record in reply[1]]

    async def pop_item(self, session_id: str) -> StoredItem | None:
        keys = self._keys(session_id)
        reply = await self._run(lambda: self._eval(_S_POP, keys, (repr(time.time()),)), idempotent=False)
        if reply is None:
            raise SessionNotFoundError(session_id)
        return _stored(session_id, reply) if reply != 0 else None

    async def clear_items(self, session_id: str) -> int:
        keys = self._keys(session_id)
        removed: int = await self._run(lambda: self._eval(_S_CLEAR, keys, (repr(time.time()),)), idempotent=False)
        if removed < 0:
            raise SessionNotFoundError(session_id)
        return removed


