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
    {prefix}:sessions                  ZSET  id, score created_at (listing, newest first): the
                                             default tenant's; tenant T's is {prefix}:sessions:T
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
Deletes, pops, clears, drops and appends without a request id are retried only on errors
that prove the command was refused unexecuted (CLUSTERDOWN, TRYAGAIN, LOADING, NOSCRIPT);
otherwise the failure surfaces as ``StoreUnavailableError`` and the caller decides
(the run loop retries its step with a request id). A timeout is retried once only:
against a partitioned server every attempt costs a full socket timeout.

The package: ``store.py`` (``RedisSessionStore``); ``lua.py`` loads the scripts,
``scripts/*.lua`` (``_prelude.lua`` first in each per-session one); ``values.py`` turns
sessions and items into script arguments and replies back into records.
"""

from agentd.server.sessions.redis.store import RedisSessionStore

__all__ = ["RedisSessionStore"]
