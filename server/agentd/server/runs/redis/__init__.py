"""Runs on Redis (standalone, Sentinel or Cluster): Streams, a consumer group, pub/sub.

Every operation that reads and then writes is one Lua script called by SHA: one round
trip, atomic, with its checks and its writes together. All run keys share one hash tag,
``{<prefix>:runs}``, so every script may touch any of them, in Cluster too:

    <prefix>:{<prefix>:runs}:run:<id>         HASH    the record: status, owner, attempt,
                                                      lease_expires, last_sequence, create_time,
                                                      update_time, spec, checkpoint, result (JSON
                                                      from ``runs.codec``), cancel_reason, trace_id,
                                                      session, request_id, queue_entry, requeued
                                                      (why it was last requeued), awaiting
                                                      ("<bytes of its checkpoint>:<JSON array>":
                                                      the checkpoint's awaiting action keys),
                                                      and one field ``action:<key>`` per answer
                                                      of the caller (``codec.encode_action`` JSON)
    <prefix>:{<prefix>:runs}:events:<id>      STREAM  the event log; entry ``0-<sequence>``,
                                                      field ``e`` = ``codec.encode_event`` JSON
    <prefix>:{<prefix>:runs}:queue            STREAM  claimable runs (field ``r`` = run id), oldest
                                                      first; consumer group ``workers``
    <prefix>:{<prefix>:runs}:leases           ZSET    RUNNING run ids by lease expiry
    <prefix>:{<prefix>:runs}:active:<session> LIST    the session's active runs, creation order
    <prefix>:{<prefix>:runs}:session:<session> ZSET   the session's runs by create_time (listing)
    <prefix>:{<prefix>:runs}:request:<req>    STRING  request id -> run id
    <prefix>:{<prefix>:runs}:expiries         ZSET    ended runs by end of retention (sweep)
    <prefix>:{<prefix>:runs}:tenant:<t>:active SET    the tenant's unfinished runs  } runs created
    <prefix>:{<prefix>:runs}:tenant:<t>:queued SET    its runs in the queue         } under a limit
    <prefix>:{<prefix>:runs}:tenant:<t>:bucket HASH   its start bucket: tokens, at (time of the
                                                      last take); expires once full again
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

Caller actions. ``submit_answers`` runs one script (``answer.lua``) that decides every
answer of the call from the record and writes them only when all are taken: a field
``action:<key>`` already there is compared with the answer on the fields that make it the
answer it is (``records.answer_fields``, decoded with cjson): equal is a repeat, taken
without a write; different refuses the call. A new answer is taken when the run is not
terminal and its checkpoint waits for the key, read from the ``awaiting`` field that
``record_progress``'s script writes beside every checkpoint, so the checkpoint (the run's
whole history) is not decoded in Redis. That field starts with the byte size of the
checkpoint it belongs to; when the checkpoint has another size (written by an older
replica during an upgrade, without the field) the script decodes the checkpoint instead.
``submit_action`` is the bare write: HSETNX of the answer's field when the record exists
and is not terminal (the first answer wins). Being fields of the record, the answers come
back with every HGETALL (``get_run``, ``claim``, ``list_runs``, ``cancel``,
``create_run``'s existing run) and share its TTL and deletion.

Tenant limits (``TenantLimits``). ``create_run``'s script counts the tenant's indexes
(SCARD) and takes a token from its bucket, in the same script as the creation, so every
replica enforces one limit per tenant. A run created with an active or queued limit in
force records its tenant (field ``tenant``) and joins the ``active`` index; from then on
the helpers every script shares keep it right: ``enqueue`` (creation, promotion, release,
requeue) adds it to ``queued``, ``claim`` removes it from there, ``end_run`` (``finish``,
cancel of a queued run) removes it from both, and ``sweep`` makes sure. Runs created with
no such limit carry no field and touch no index key (no cost when limits are off), hence
runs created before a limit was switched on do not count against it until they end. A
count found at the limit first re-checks up to 32 of its members and drops the ones whose
record is gone or changed (eviction, a replica of an older version during an upgrade).

Retention. ``finish`` and a queued ``cancel`` PEXPIRE the record (answers included), its
log and its request id (Redis reclaims them by itself) and note the run in ``expiries``;
``sweep`` deletes what is due there and drops the runs from their session's listing,
which also skips and removes entries whose record is gone.

Round trips: one for ``create_run``, ``get_run``, ``list_runs``, ``active_run``, ``renew``,
``record_progress``, ``finish``, ``release``, ``submit_action``, ``submit_answers``, ``read_events``,
``wait_events`` (XREAD BLOCK), ``requeue_expired`` and ``sweep`` (per 500 due runs), and
``cancel`` of a running, ended or unknown run; two for ``cancel`` of a queued run (its
RunCancelled event is built from the record by ``codec`` and written by a second script
that re-checks the record is unchanged); ``claim`` one when a run is claimable, else one
plus the blocking read plus one on wake-up.

Retries follow ``redis_common.RetryPolicy``, as in the session store: reads, ``renew``,
``create_run`` (a retry finds its own run id and reports it created), ``cancel``,
``submit_action`` (HSETNX: a repeat changes nothing), ``submit_answers`` (a repeat finds
its answers recorded: taken again, none recorded), ``requeue_expired`` and ``sweep`` are
retried on connection errors and once on a timeout; ``claim``, ``record_progress``,
``finish`` and ``release`` only on errors proving Redis refused them unexecuted. Everything
else surfaces as ``StoreUnavailableError`` naming the location.

The package: ``store.py`` (``RedisRunStore``), ``bus.py`` (``RedisControlBus``),
``build.py`` (both, from the settings); ``lua.py`` loads the scripts, ``scripts/*.lua``
(``_prelude.lua`` first in each); ``values.py`` turns records and events into script
arguments and replies back into records. The retries, error mapping and lifecycle the
store and the bus share with the other Redis engines are ``redis_common``'s
(``RedisOps``, ``RedisEngine``).
"""

from agentd.server.runs.redis.build import build_redis_runs
from agentd.server.runs.redis.bus import RedisControlBus
from agentd.server.runs.redis.store import GROUP, RedisRunStore

__all__ = ["GROUP", "RedisControlBus", "RedisRunStore", "build_redis_runs"]
