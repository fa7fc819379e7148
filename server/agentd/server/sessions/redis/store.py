"""``RedisSessionStore``: sessions in Redis, one Lua script per operation (see the package
docstring for the keys, what is atomic, expiry and retries)."""

from __future__ import annotations

import time
from typing import Any, Callable, Sequence

from redis.asyncio.cluster import RedisCluster
from redis.exceptions import NoScriptError

from agentd.server.redis_common import FAILURES, LuaScript, RedisClient, RedisEngine, text, utf8
from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import (
    History,
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
from agentd.server.sessions.redis import lua
from agentd.server.sessions.redis.values import (
    decode_metadata,
    decode_state,
    dumps,
    encode_metadata,
    encode_state,
    encode_ttl,
    history_item,
    score_pairs,
    session_record,
    stored_item,
)
from agentd.server.tenancy import DEFAULT_TENANT, tenant_of

__all__ = ["RedisSessionStore"]

_SWEEP_BATCH = 500
_LIST_READ_AHEAD_MAX = 1000
_MAX_SEQ = 2**63 - 1  # what the other stores' sequences can reach; beyond it there are no items


class RedisSessionStore(RedisEngine, SessionStore):
    """Sessions in Redis; any number of server replicas may share one prefix.

    ``client`` is owned by the store from now on (``close`` closes it). Build it with
    ``connect_redis``: a client with redis-py's own per-command retries enabled would
    also resend writes whose outcome is unknown (see the package docstring).
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
        super().__init__(
            client, what="redis store", lua=lua, prefix=prefix, location=location, timeout_s=ping_timeout_s
        )
        self._cluster = isinstance(client, RedisCluster)
        self._key_head = utf8(f"{prefix}:session:")
        self._index = utf8(f"{prefix}:sessions")  # the default tenant's; others: _index_of(tenant)
        self._expiries = utf8(f"{prefix}:expiries")
        self._default_ttl_s = resolve_ttl(default_ttl_s, None)

    # --- plumbing -------------------------------------------------------------------

    def _keys(self, session_id: str) -> tuple[bytes, bytes, bytes, bytes, bytes]:
        """info, items, state, meta, requests: one hash tag, so one Cluster slot."""
        tag = session_id.replace("%", "%25").replace("}", "%7D") or "%"
        base = self._key_head + b"{" + utf8(tag) + b"}:"
        return base + b"info", base + b"items", base + b"state", base + b"meta", base + b"requests"

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
    def _evalsha(pipe: Any, script: LuaScript, keys: Sequence[bytes], args: Sequence[Any]) -> None:
        # Not pipe.evalsha(): redis-py's ClusterPipeline blocks that method, though it
        # routes the command itself correctly (by its keys, which share one slot here).
        pipe.execute_command("EVALSHA", script.sha, len(keys), *keys, *args)

    async def _fix_index(self, key: bytes, changes: list[Any]) -> int:
        """Apply (member, expected score, new score or '') triples; see ``scripts/zfix.lua``."""
        if not changes:
            return 0
        changed: int = await self._eval(lua.ZFIX, (key,), changes)
        return changed

    # lifecycle (open, close, ping): RedisEngine's

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
        meta_args = encode_metadata(metadata or {})
        state_args = encode_state(state or {})
        now = time.time()
        now_arg = repr(now)
        keys, member = self._keys(session_id), utf8(session_id)
        index = self._index_of(tenant_of(session_id))
        args = [now_arg, encode_ttl(ttl), len(meta_args) // 2, *meta_args, *state_args]
        attempts = 0

        def build(pipe: Any) -> None:
            pipe.zadd(index, {member: now}, nx=True)
            if ttl:
                pipe.zadd(self._expiries, {member: now + ttl}, nx=True)
            self._evalsha(pipe, lua.CREATE, keys, args)

        async def op() -> None:
            nonlocal attempts
            attempts += 1
            results = await self._pipeline(build, atomic=True)
            indexed, existing = results[0], results[-1]
            # A retry that finds the session stamped with its own timestamp created it.
            if existing is not None and not (attempts > 1 and existing == now_arg.encode()):
                if indexed:  # it had no index entry (a partial failure once); give it its own
                    await self._fix_index(index, [member, now_arg, existing])
                raise SessionExistsError(session_id)
            if not indexed:  # a stale entry of an expired namesake held the old score
                await self._client.zadd(index, {member: now})

        await self._run(op, idempotent=True)
        return SessionRecord(
            session_id=session_id,
            created_at=now,
            updated_at=now,
            metadata=decode_metadata(meta_args),
            state=decode_state(state_args),
            item_count=0,
            ttl_s=float(ttl) if ttl else None,
            expires_at=expiry(now, ttl),
        )

    async def get_session(self, session_id: str) -> SessionRecord:
        keys, args = self._keys(session_id), (repr(time.time()),)
        reply = await self._run(lambda: self._eval(lua.GET, keys, args), idempotent=True)
        if reply is None:
            raise SessionNotFoundError(session_id)
        return session_record(session_id, reply)

    async def list_sessions(
        self, limit: int, cursor: str | None = None, *, tenant: str = DEFAULT_TENANT
    ) -> SessionPage:
        check_limit(limit)
        after = decode_cursor(cursor) if cursor is not None else None
        now = repr(time.time())
        position = (after[0], utf8(after[1])) if after is not None else None
        index = self._index_of(tenant)
        return await self._run(lambda: self._list(index, limit, position, now), idempotent=True)

    def _index_of(self, tenant: str) -> bytes:
        """The listing index of ``tenant``'s sessions: each tenant lists from its own sorted set."""
        return self._index if tenant == DEFAULT_TENANT else self._index + utf8(f":{tenant}")

    async def _index_page(
        self, index: bytes, position: tuple[float, bytes] | None, count: int
    ) -> list[tuple[bytes, float]]:
        """Up to ``count`` index entries after ``position`` in (created_at, id) descending order."""
        if position is None:
            top = await self._client.zrange(
                index, "+inf", "-inf", desc=True, byscore=True, offset=0, num=count, withscores=True
            )
            return score_pairs(top)
        score, member = position
        ties, older = await self._pipeline(
            lambda pipe: (
                pipe.zrange(index, repr(score), repr(score), desc=True, byscore=True, withscores=True),
                pipe.zrange(
                    index, f"({score!r}", "-inf", desc=True, byscore=True, offset=0, num=count, withscores=True
                ),
            ),
            atomic=False,
        )
        # Equal scores are ordered by member bytes; UTF-8 byte order is code point order.
        return ([(m, s) for m, s in score_pairs(ties) if m < member] + score_pairs(older))[:count]

    async def _list(self, index: bytes, limit: int, position: tuple[float, bytes] | None, now: str) -> SessionPage:
        want = limit + 1  # one more than the page tells whether another page exists
        found: list[tuple[float, str, SessionRecord]] = []
        changes: list[Any] = []
        batch = want
        while len(found) < want:
            entries = await self._index_page(index, position, batch)
            if not entries:
                break
            ids = [text(member) for member, _ in entries]
            replies = await self._pipeline(
                lambda pipe: [self._evalsha(pipe, lua.GET, self._keys(sid), (now,)) for sid in ids], atomic=False
            )
            for (member, score), sid, reply in zip(entries, ids, replies):
                if reply is None:  # deleted or expired: drop the entry (unless rewritten meanwhile)
                    changes += (member, repr(score), "")
                    continue
                record = session_record(sid, reply)
                if record.created_at != score:  # left by a partial failure: re-score it
                    changes += (member, repr(score), repr(record.created_at))
                found.append((score, sid, record))
            if len(entries) < batch:
                break
            position = entries[-1][1], entries[-1][0]
            # Stale entries were in the way: read further ahead, within reason.
            batch = max(want - len(found), min(batch * 2, _LIST_READ_AHEAD_MAX))
        if changes:
            await self._fix_index(index, changes)
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
        ttl_arg = "" if ttl_s is None else (encode_ttl(new_ttl) or "0")
        meta_args = encode_metadata(metadata) if metadata is not None else None
        state_args = encode_state(state) if state is not None else None
        now = time.time()
        keys, member = self._keys(session_id), utf8(session_id)
        args: list[Any] = [repr(now), ttl_arg]
        for pairs in (meta_args, state_args):
            args += [-1] if pairs is None else [len(pairs) // 2, *pairs]

        def build(pipe: Any) -> None:
            self._evalsha(pipe, lua.UPDATE, keys, args)
            if new_ttl:
                pipe.zadd(self._expiries, {member: now + new_ttl})
            else:
                pipe.zrem(self._expiries, member)

        async def op() -> Any:
            if ttl_s is None:  # the TTL stays: the index is not involved
                return await self._eval(lua.UPDATE, keys, args)
            return (await self._pipeline(build, atomic=True))[0]

        reply = await self._run(op, idempotent=True)
        if reply is None:
            raise SessionNotFoundError(session_id)
        return session_record(session_id, reply)

    async def delete_session(self, session_id: str) -> None:
        keys, member = self._keys(session_id), utf8(session_id)
        created_at = await self._run(lambda: self._eval(lua.DELETE, keys, (repr(time.time()),)), idempotent=False)
        if created_at is None:
            raise SessionNotFoundError(session_id)
        # The session is gone; the index entries are clean-up. If this fails, listing
        # and the sweeper remove them later, so the delete still succeeded.
        try:
            await self._pipeline(
                lambda pipe: (
                    self._evalsha(pipe, lua.ZFIX, (self._index_of(tenant_of(session_id)),), (member, created_at, "")),
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
            entries = score_pairs(due)
            if not entries:
                break

            def build(pipe: Any) -> None:
                for member, _ in entries:
                    self._evalsha(pipe, lua.REAP, self._keys(text(member)), (now_arg,))
                    pipe.zscore(self._index_of(tenant_of(text(member))), member)

            results = await self._pipeline(build, atomic=False)
            index_changes: dict[bytes, list[Any]] = {}
            hint_changes: list[Any] = []
            for (member, hint), reaped, score in zip(entries, results[::2], results[1::2]):
                if isinstance(reaped, list):  # still alive: its expiry moved on (or went away)
                    updated_at, ttl = reaped
                    new_hint = repr(float(updated_at) + float(ttl)) if ttl is not None else ""
                    hint_changes += (member, repr(hint), new_hint)
                    continue
                hint_changes += (member, repr(hint), "")
                if score is not None:
                    index = self._index_of(tenant_of(text(member)))
                    index_changes.setdefault(index, []).extend((member, repr(float(score)), ""))
                if reaped or score is not None:
                    removed += 1
            await self._pipeline(
                lambda pipe: [
                    self._evalsha(pipe, lua.ZFIX, (key,), changes)
                    for key, changes in (*index_changes.items(), (self._expiries, hint_changes))
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
        args = [repr(now), "0" if request_id is None else "1", request_id or "", *map(dumps, dicts)]
        reply = await self._run(lambda: self._eval(lua.APPEND, keys, args), idempotent=request_id is not None)
        if reply is None:
            raise SessionNotFoundError(session_id)
        if isinstance(reply, list):  # a replayed request: what it stored and still exists
            return [stored_item(session_id, record) for record in reply]
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
        reply = await self._run(lambda: self._eval(lua.LIST_ITEMS, keys, args), idempotent=True)
        if reply is None:
            raise SessionNotFoundError(session_id)
        if newest_first:
            reply.reverse()
        return [stored_item(session_id, record) for record in reply]

    async def read_history(self, session_id: str, *, create: bool = False, limit: int | None = None) -> History:
        if limit is not None:
            check_limit(limit)
        now = time.time()
        now_arg = repr(now)
        keys, member = self._keys(session_id), utf8(session_id)
        index = self._index_of(tenant_of(session_id))
        ttl = self._default_ttl_s
        args = (now_arg, "1" if create else "0", encode_ttl(ttl), "" if limit is None else int(limit))

        def build(pipe: Any) -> None:
            pipe.zadd(index, {member: now}, nx=True)
            if ttl:
                pipe.zadd(self._expiries, {member: now + ttl}, nx=True)
            self._evalsha(pipe, lua.HISTORY, keys, args)

        async def op() -> Any:
            if not create:
                return await self._eval(lua.HISTORY, keys, args)
            # Index entry and session in one round trip: a new session costs no extra trip.
            results = await self._pipeline(build, atomic=True)
            indexed, reply = results[0], results[-1]
            if reply == 1 and not indexed:  # created, but a stale entry held an old score
                await self._client.zadd(index, {member: now})
            elif isinstance(reply, list) and indexed:  # existed without an entry: use its own
                await self._fix_index(index, [member, now_arg, reply[0]])
            return reply

        reply = await self._run(op, idempotent=True)
        if not isinstance(reply, list):
            return History()
        records = reply[1]
        return History((history_item(record) for record in records), max(0, int(reply[2]) - len(records)))

    async def pop_item(self, session_id: str) -> StoredItem | None:
        keys = self._keys(session_id)
        reply = await self._run(lambda: self._eval(lua.POP, keys, (repr(time.time()),)), idempotent=False)
        if reply is None:
            raise SessionNotFoundError(session_id)
        return stored_item(session_id, reply) if reply != 0 else None

    async def clear_items(self, session_id: str) -> int:
        keys = self._keys(session_id)
        removed: int = await self._run(lambda: self._eval(lua.CLEAR, keys, (repr(time.time()),)), idempotent=False)
        if removed < 0:
            raise SessionNotFoundError(session_id)
        return removed

    async def drop_items_through(self, session_id: str, sequence: int) -> int:
        keys = self._keys(session_id)
        args = (repr(time.time()), max(0, min(int(sequence), _MAX_SEQ)))
        # Not retried after a lost reply: the data would come out the same, but the retry
        # would report 0 removed. The caller may repeat the drop itself; it is harmless.
        removed: int = await self._run(lambda: self._eval(lua.DROP_THROUGH, keys, args), idempotent=False)
        if removed < 0:
            raise SessionNotFoundError(session_id)
        return removed
