"""One contract suite for every SessionStore backend.

Each test runs against every entry of ``STORE_FACTORIES``: an async context manager
that yields an opened store on a fresh, private namespace (a temp file, a Postgres
schema, a Redis key prefix) and removes it afterwards. Postgres and Redis are the real
servers on this machine; an unreachable one fails the run, it is never skipped. Tests at
the bottom cover what only the SQLite backend has: a file.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import sqlite3
import time
from pathlib import Path
from contextlib import asynccontextmanager
from typing import Any, AsyncContextManager, AsyncIterator, Awaitable, Callable

import pytest

from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.runtime.items import Item, MessageItem, ToolCallItem, ToolResultItem
from agentd.server.sessions.base import SessionRecord, SessionStore, StoredItem
from agentd.server.sessions.memory import MemorySessionStore
from agentd.server.sessions.sqlite import SqliteSessionStore
from agentd.server.tenancy import scoped
from tests.backends_postgres import postgres_store
from tests.backends_postgres import replica as postgres_replica
from tests.backends_redis import redis_store
from tests.backends_redis import replica_of as redis_replica



@asynccontextmanager
async def opened(store: SessionStore) -> AsyncIterator[SessionStore]:
    await store.open()
    try:
        yield store
    finally:
        await store.close()


STORE_FACTORIES: dict[str, Callable[[Path], AsyncContextManager[SessionStore]]] = {
    "memory": lambda tmp_path: opened(MemorySessionStore()),
    "sqlite": lambda tmp_path: opened(SqliteSessionStore(tmp_path / "sessions.db")),
    "postgres": lambda tmp_path: postgres_store(),
    "redis": lambda tmp_path: redis_store(),
}


@pytest.fixture(params=list(STORE_FACTORIES))
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[SessionStore]:
    async with STORE_FACTORIES[request.param](tmp_path) as backend:
        yield backend


# A second store on the same data (file, schema, key prefix): another server replica.
# The memory store has no shared data, so it has no replicas.
REPLICA_FACTORIES: dict[str, Callable[[SessionStore], AsyncContextManager[SessionStore]]] = {
    "sqlite": lambda s: opened(SqliteSessionStore(s._path)),  # type: ignore[attr-defined]
    "postgres": lambda s: opened(postgres_replica(s.schema)),  # type: ignore[attr-defined]
    "redis": lambda s: redis_replica(s),  # type: ignore[arg-type]
}


@pytest.fixture(params=list(REPLICA_FACTORIES))
async def replicas(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[tuple[SessionStore, SessionStore]]:
    async with STORE_FACTORIES[request.param](tmp_path) as first:
        async with REPLICA_FACTORIES[request.param](first) as second:
            yield first, second


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Callable[[float], None]:
    """Deterministic ``time.time``: strictly increasing by 1s per call, or frozen via ``clock(step=0)``."""
    state = {"now": 1_700_000_000.0, "step": 1.0}

    def fake_time() -> float:
        state["now"] += state["step"]
        return state["now"]

    def set_step(step: float) -> None:
        state["step"] = step

    monkeypatch.setattr(time, "time", fake_time)
    return set_step


class ManualClock:
    """``time.time`` standing still until the test moves it on (``advance``)."""

    def __init__(self, now: float) -> None:
        self.now = now

    def time(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def manual_clock(monkeypatch: pytest.MonkeyPatch) -> ManualClock:
    clock = ManualClock(1_700_000_000.0)
    monkeypatch.setattr(time, "time", clock.time)
    return clock


def msg(text: str, role: str = "user") -> MessageItem:
    return MessageItem(role=role, text=text)  # type: ignore[arg-type]


def seqs(stored: list[StoredItem]) -> list[int]:
    return [s.sequence for s in stored]


async def append_texts(store: SessionStore, session_id: str, count: int, prefix: str = "m") -> list[StoredItem]:
    return await store.append_items(session_id, [msg(f"{prefix}{i}") for i in range(count)])


# --- sessions --------------------------------------------------------------------------


async def test_create_and_get(store: SessionStore) -> None:
    before = time.time()
    created = await store.create_session("s1", metadata={"title": "Hi 👋"}, state={"n": 1, "nested": {"a": [1, 2]}})
    after = time.time()
    assert created.session_id == "s1"
    assert created.metadata == {"title": "Hi 👋"}
    assert created.state == {"n": 1, "nested": {"a": [1, 2]}}
    assert created.item_count == 0
    assert before <= created.created_at <= after
    assert created.updated_at == created.created_at
    assert await store.get_session("s1") == created


async def test_create_defaults_to_empty_metadata_and_state(store: SessionStore) -> None:
    created = await store.create_session("s1")
    assert (created.metadata, created.state) == ({}, {})


async def test_create_existing_raises(store: SessionStore) -> None:
    await store.create_session("s1", metadata={"a": "1"})
    with pytest.raises(SessionExistsError) as info:
        await store.create_session("s1", metadata={"a": "2"})
    assert info.value.session_id == "s1"
    assert (await store.get_session("s1")).metadata == {"a": "1"}


async def test_get_missing_raises(store: SessionStore) -> None:
    with pytest.raises(SessionNotFoundError) as info:
        await store.get_session("nope")
    assert info.value.session_id == "nope"


async def test_read_history_can_create_the_session(store: SessionStore) -> None:
    assert await store.read_history("s1") == []
    with pytest.raises(SessionNotFoundError):
        await store.get_session("s1")
    assert await store.read_history("s1", create=True) == []
    first = await store.get_session("s1")
    assert (first.session_id, first.metadata, first.state, first.item_count) == ("s1", {}, {}, 0)
    await store.append_items("s1", [msg("hello")])
    assert await store.read_history("s1", create=True) == [msg("hello")]
    again = await store.get_session("s1")
    assert again.created_at == first.created_at and again.item_count == 1

    await store.create_session("s2", metadata={"k": "v"}, state={"x": 1})
    await store.read_history("s2", create=True)
    existing = await store.get_session("s2")
    assert (existing.metadata, existing.state) == ({"k": "v"}, {"x": 1})


async def test_update_session(store: SessionStore, clock: Callable[[float], None]) -> None:
    created = await store.create_session("s1", metadata={"a": "1"}, state={"s": 1})

    r1 = await store.update_session("s1", metadata={"b": "2"})
    assert (r1.metadata, r1.state) == ({"b": "2"}, {"s": 1})
    assert r1.updated_at > created.updated_at
    assert r1.created_at == created.created_at

    r2 = await store.update_session("s1", state={"t": [1, "two"]})
    assert (r2.metadata, r2.state) == ({"b": "2"}, {"t": [1, "two"]})
    assert r2.updated_at > r1.updated_at

    r3 = await store.update_session("s1", metadata={}, state={})
    assert (r3.metadata, r3.state) == ({}, {})

    r4 = await store.update_session("s1")
    assert (r4.metadata, r4.state) == ({}, {})
    assert r4.updated_at > r3.updated_at
    assert await store.get_session("s1") == r4


async def test_returned_and_given_dicts_do_not_alias_the_store(store: SessionStore) -> None:
    metadata = {"k": "v"}
    state: dict[str, Any] = {"list": [1], "inner": {"x": 1}}
    record = await store.create_session("s1", metadata=metadata, state=state)

    metadata["k"] = "changed"
    state["list"].append(2)
    state["inner"]["x"] = 99
    record.metadata["k"] = "changed too"
    record.state["inner"]["y"] = 2

    fetched = await store.get_session("s1")
    assert fetched.metadata == {"k": "v"}
    assert fetched.state == {"list": [1], "inner": {"x": 1}}

    fetched.state["list"].append(3)
    new_state: dict[str, Any] = {"z": {"deep": True}}
    updated = await store.update_session("s1", state=new_state)
    new_state["z"]["deep"] = False
    updated.state["z"]["deep"] = None
    assert (await store.get_session("s1")).state == {"z": {"deep": True}}


async def test_delete_session_cascades(store: SessionStore) -> None:
    await store.create_session("s1")
    await store.create_session("other")
    await store.append_items("s1", [msg("a"), msg("b"), msg("c")], request_id="req")
    await store.append_items("other", [msg("keep")])

    await store.delete_session("s1")
    with pytest.raises(SessionNotFoundError):
        await store.get_session("s1")
    assert await store.read_history("s1") == []
    assert await store.read_history("other") == [msg("keep")]

    # A recreated session starts from scratch: sequence 1, no remembered request ids.
    record = await store.create_session("s1")
    assert record.item_count == 0
    assert await store.read_history("s1") == []
    stored = await store.append_items("s1", [msg("new")], request_id="req")
    assert seqs(stored) == [1]
    assert await store.read_history("s1") == [msg("new")]


async def test_list_sessions_empty(store: SessionStore) -> None:
    page = await store.list_sessions(10)
    assert page.sessions == []
    assert page.next_cursor is None


async def _collect_pages(store: SessionStore, limit: int) -> list[list[SessionRecord]]:
    pages: list[list[SessionRecord]] = []
    cursor: str | None = None
    while True:
        page = await store.list_sessions(limit, cursor)
        pages.append(page.sessions)
        if page.next_cursor is None:
            return pages
        assert len(pages) < 100, "pagination does not terminate"
        cursor = page.next_cursor


async def test_list_sessions_pages_newest_first(store: SessionStore, clock: Callable[[float], None]) -> None:
    ids = [f"s{i}" for i in range(8)]
    for sid in ["s3", "s0", "s7", "s1", "s5", "s2", "s6", "s4"]:  # creation order != id order
        await store.create_session(sid)
    # Updating an old session must not move it: the order is by creation.
    await store.update_session("s3", metadata={"touched": "yes"})

    pages = await _collect_pages(store, 3)
    assert [len(p) for p in pages] == [3, 3, 2]
    listed = [r.session_id for page in pages for r in page]
    assert listed == ["s4", "s6", "s2", "s5", "s1", "s7", "s0", "s3"]
    assert sorted(listed) == ids
    created = [r.created_at for page in pages for r in page]
    assert created == sorted(created, reverse=True)
    assert pages[-1][-1].metadata == {"touched": "yes"}


async def test_tenants_own_the_same_ids_apart_and_list_only_their_own(store: SessionStore) -> None:
    """The services qualify ids by tenant (agentd.server.tenancy); every store keeps them apart
    and lists each tenant's sessions from its own index, paging included."""
    await store.create_session("alice", metadata={"who": "default"})
    await store.create_session(scoped("acme", "alice"), metadata={"who": "acme"})
    for i in range(5):
        await store.create_session(scoped("acme", f"s{i}"))
    await store.create_session(scoped("acme-2", "alice"))
    await store.append_items(scoped("acme", "alice"), [MessageItem("user", "acme's secret")])

    assert (await store.get_session("alice")).metadata == {"who": "default"}
    assert (await store.list_items("alice", 10)) == []
    assert [r.session_id for r in (await store.list_sessions(10)).sessions] == ["alice"]
    pages, cursor, listed = 0, None, []
    while True:
        page = await store.list_sessions(2, cursor, tenant="acme")
        listed += [r.session_id for r in page.sessions]
        pages += 1
        cursor = page.next_cursor
        if cursor is None:
            break
    assert sorted(listed) == sorted(scoped("acme", i) for i in ["alice", "s0", "s1", "s2", "s3", "s4"])
    assert pages == 3
    assert [r.session_id for r in (await store.list_sessions(10, tenant="acme-2")).sessions] == ["acme-2/alice"]
    assert (await store.list_sessions(10, tenant="nobody")).sessions == []
    await store.delete_session(scoped("acme", "alice"))
    assert (await store.get_session("alice")).metadata == {"who": "default"}
    assert len((await store.list_sessions(10, tenant="acme")).sessions) == 5


async def test_list_sessions_exact_multiple_has_no_empty_last_page(store: SessionStore) -> None:
    for i in range(6):
        await store.create_session(f"s{i}")
    first = await store.list_sessions(3)
    assert first.next_cursor is not None
    second = await store.list_sessions(3, first.next_cursor)
    assert len(second.sessions) == 3
    assert second.next_cursor is None
    assert {r.session_id for r in first.sessions + second.sessions} == {f"s{i}" for i in range(6)}


async def test_list_sessions_ties_break_by_id_descending(store: SessionStore, clock: Callable[[float], None]) -> None:
    clock(0)  # every session gets the same created_at
    for sid in ["b", "d", "a", "e", "c", "ü", "Z"]:
        await store.create_session(sid)
    pages = await _collect_pages(store, 3)
    assert [len(p) for p in pages] == [3, 3, 1]
    assert [r.session_id for page in pages for r in page] == ["ü", "e", "d", "c", "b", "a", "Z"]


async def test_list_sessions_rejects_bad_cursor_and_limit(store: SessionStore) -> None:
    await store.create_session("s1")
    for bad in ["%%%", base64.urlsafe_b64encode(b"no separator").decode(), "bm90|YSBmbG9hdA"]:
        with pytest.raises(ValueError):
            await store.list_sessions(10, bad)
    with pytest.raises(ValueError):
        await store.list_sessions(0)


# --- items -----------------------------------------------------------------------------


def varied_items() -> list[Item]:
    big = "agentd 🙂 漢字テスト ✓ " * 65_000  # ~1.2 MB of text, multi-byte
    assert len(big.encode("utf-8")) > 1_000_000
    return [
        MessageItem(role="system", text="Be terse.", agent="triage"),
        MessageItem(role="user", text="Hello 👋 — 你好, مرحبا, emoji 🧑‍💻 and a NUL-free \u2028 line sep"),
        ToolCallItem(call_id="call_1", tool_name="lookup", arguments='{"q": "天気", "n": 3}', agent="triage"),
        ToolResultItem(call_id="call_1", tool_name="lookup", output="晴れ ☀️", is_error=False, agent="triage"),
        ToolResultItem(call_id="call_2", tool_name="fail", output="boom", is_error=True),
        MessageItem(role="assistant", text=big, agent="writer"),
    ]


async def test_append_and_read_history_round_trip(store: SessionStore) -> None:
    await store.create_session("s1")
    items = varied_items()
    before = time.time()
    stored = await store.append_items("s1", items)
    after = time.time()

    assert seqs(stored) == [1, 2, 3, 4, 5, 6]
    assert [s.item for s in stored] == items
    assert all(s.session_id == "s1" for s in stored)
    assert all(before <= s.created_at <= after for s in stored)

    assert await store.read_history("s1") == items
    listed = await store.list_items("s1", 100)
    assert listed == stored
    assert (await store.get_session("s1")).item_count == 6


async def test_append_bumps_updated_at(store: SessionStore, clock: Callable[[float], None]) -> None:
    created = await store.create_session("s1")
    stored = await store.append_items("s1", [msg("a")])
    record = await store.get_session("s1")
    assert record.updated_at > created.updated_at
    assert record.updated_at == stored[0].created_at


async def test_empty_append_writes_nothing(store: SessionStore, clock: Callable[[float], None]) -> None:
    created = await store.create_session("s1")
    assert await store.append_items("s1", []) == []
    assert await store.append_items("s1", [], request_id="r") == []
    assert await store.get_session("s1") == created
    # The empty request was not recorded, so the id is still usable.
    assert seqs(await store.append_items("s1", [msg("a")], request_id="r")) == [1]


async def test_append_is_all_or_nothing(store: SessionStore) -> None:
    class Exploding:
        def to_dict(self) -> dict[str, Any]:
            raise RuntimeError("cannot serialise")

    class Unknown:
        def to_dict(self) -> dict[str, Any]:
            return {"type": "hologram"}

    await store.create_session("s1")
    with pytest.raises(RuntimeError):
        await store.append_items("s1", [msg("a"), Exploding()], request_id="r1")  # type: ignore[list-item]
    with pytest.raises(ValueError):
        await store.append_items("s1", [msg("a"), Unknown()], request_id="r1")  # type: ignore[list-item]

    assert await store.read_history("s1") == []
    assert (await store.get_session("s1")).item_count == 0
    # Nothing was consumed: neither sequence numbers nor the request id.
    assert seqs(await store.append_items("s1", [msg("ok")], request_id="r1")) == [1]


async def test_sequences_are_never_reused(store: SessionStore) -> None:
    await store.create_session("s1")
    assert seqs(await append_texts(store, "s1", 3)) == [1, 2, 3]
    popped = await store.pop_item("s1")
    assert popped is not None and popped.sequence == 3
    assert seqs(await store.append_items("s1", [msg("x")])) == [4]

    assert await store.clear_items("s1") == 3
    assert seqs(await store.append_items("s1", [msg("y"), msg("z")])) == [5, 6]
    assert seqs(await store.list_items("s1", 10)) == [5, 6]
    assert (await store.get_session("s1")).item_count == 2


async def test_sequences_are_per_session(store: SessionStore) -> None:
    await store.create_session("a")
    await store.create_session("b")
    assert seqs(await append_texts(store, "a", 2)) == [1, 2]
    assert seqs(await append_texts(store, "b", 1)) == [1]
    assert seqs(await append_texts(store, "a", 1)) == [3]


async def test_list_items_oldest_first_paging(store: SessionStore) -> None:
    await store.create_session("s1")
    await append_texts(store, "s1", 10)
    pages: list[list[int]] = []
    after = 0
    while page := await store.list_items("s1", 3, after_sequence=after):
        pages.append(seqs(page))
        after = page[-1].sequence
    assert pages == [[1, 2, 3], [4, 5, 6], [7, 8, 9], [10]]
    assert [s.item for s in await store.list_items("s1", 2, after_sequence=4)] == [msg("m4"), msg("m5")]
    assert await store.list_items("s1", 5, after_sequence=10) == []


async def test_list_items_newest_first_paging(store: SessionStore) -> None:
    await store.create_session("s1")
    await append_texts(store, "s1", 10)
    pages: list[list[int]] = []
    before: int | None = None
    while page := await store.list_items("s1", 4, newest_first=True, before_sequence=before):
        pages.append(seqs(page))
        before = page[-1].sequence
    assert pages == [[10, 9, 8, 7], [6, 5, 4, 3], [2, 1]]
    assert seqs(await store.list_items("s1", 100, newest_first=True, before_sequence=3)) == [2, 1]
    assert await store.list_items("s1", 5, newest_first=True, before_sequence=1) == []


async def test_list_items_skips_gaps_and_ignores_other_sessions(store: SessionStore) -> None:
    await store.create_session("s1")
    await store.create_session("s2")
    await append_texts(store, "s1", 3)
    await append_texts(store, "s2", 5, prefix="other")
    await store.pop_item("s1")
    await append_texts(store, "s1", 2, prefix="n")  # sequences 4, 5
    assert seqs(await store.list_items("s1", 10)) == [1, 2, 4, 5]
    assert seqs(await store.list_items("s1", 10, after_sequence=2)) == [4, 5]
    assert seqs(await store.list_items("s1", 2, newest_first=True, before_sequence=5)) == [4, 2]
    assert [s.item for s in await store.list_items("s1", 10)] == [msg("m0"), msg("m1"), msg("n0"), msg("n1")]


async def test_list_items_rejects_bad_limit(store: SessionStore) -> None:
    await store.create_session("s1")
    with pytest.raises(ValueError):
        await store.list_items("s1", 0)


async def test_read_history_of_missing_session_is_empty(store: SessionStore) -> None:
    assert await store.read_history("never-created") == []


async def test_pop_item(store: SessionStore, clock: Callable[[float], None]) -> None:
    created = await store.create_session("s1")
    assert await store.pop_item("s1") is None
    assert await store.get_session("s1") == created  # a no-op pop changes nothing

    appended = await store.append_items("s1", [msg("a"), msg("b")])
    popped = await store.pop_item("s1")
    assert popped == appended[1]
    record = await store.get_session("s1")
    assert record.item_count == 1
    assert record.updated_at > appended[1].created_at
    assert await store.read_history("s1") == [msg("a")]

    assert await store.pop_item("s1") == appended[0]
    assert await store.pop_item("s1") is None
    assert (await store.get_session("s1")).item_count == 0


async def test_clear_items_keeps_metadata_and_state(store: SessionStore, clock: Callable[[float], None]) -> None:
    await store.create_session("s1", metadata={"m": "1"}, state={"s": 2})
    assert await store.clear_items("s1") == 0
    await append_texts(store, "s1", 4)
    before = await store.get_session("s1")

    assert await store.clear_items("s1") == 4
    after = await store.get_session("s1")
    assert (after.metadata, after.state, after.item_count) == ({"m": "1"}, {"s": 2}, 0)
    assert after.updated_at > before.updated_at
    assert await store.read_history("s1") == []
    assert await store.clear_items("s1") == 0
    assert await store.get_session("s1") == after


# --- idempotency and concurrency -------------------------------------------------------


async def test_request_id_makes_append_idempotent(store: SessionStore) -> None:
    await store.create_session("s1")
    first = await store.append_items("s1", [msg("a"), msg("b")], request_id="req-1")
    retry = await store.append_items("s1", [msg("a"), msg("b")], request_id="req-1")
    assert seqs(first) == [1, 2]
    assert retry == first
    # The retry is recognised by id alone, even with a different payload.
    assert await store.append_items("s1", [msg("different")], request_id="req-1") == first
    assert await store.read_history("s1") == [msg("a"), msg("b")]
    assert (await store.get_session("s1")).item_count == 2

    assert seqs(await store.append_items("s1", [msg("c")], request_id="req-2")) == [3]
    assert seqs(await store.append_items("s1", [msg("d")])) == [4]
    assert seqs(await store.append_items("s1", [msg("d")])) == [5]  # no request id: no dedup


async def test_request_ids_are_per_session(store: SessionStore) -> None:
    await store.create_session("s1")
    await store.create_session("s2")
    await append_texts(store, "s2", 2)
    a = await store.append_items("s1", [msg("for s1")], request_id="shared")
    b = await store.append_items("s2", [msg("for s2")], request_id="shared")
    assert (seqs(a), seqs(b)) == ([1], [3])
    assert await store.read_history("s1") == [msg("for s1")]
    assert await store.read_history("s2") == [msg("m0"), msg("m1"), msg("for s2")]


async def test_request_id_replay_returns_only_surviving_items(store: SessionStore) -> None:
    await store.create_session("s1")
    first = await store.append_items("s1", [msg("a"), msg("b"), msg("c")], request_id="req")
    await store.pop_item("s1")
    assert await store.append_items("s1", [msg("a"), msg("b"), msg("c")], request_id="req") == first[:2]
    await store.clear_items("s1")
    assert await store.append_items("s1", [msg("a")], request_id="req") == []
    assert await store.read_history("s1") == []


# --- dropping items (history compaction) -----------------------------------------------


async def test_drop_items_through_removes_exactly_the_older_items(
    store: SessionStore, clock: Callable[[float], None]
) -> None:
    await store.create_session("s1", metadata={"m": "1"}, state={"s": 2}, ttl_s=3600)
    appended = await append_texts(store, "s1", 4) + await append_texts(store, "s1", 6, prefix="n")
    assert seqs(appended) == list(range(1, 11))
    before = await store.get_session("s1")

    assert await store.drop_items_through("s1", 4) == 4
    after = await store.get_session("s1")
    assert (after.item_count, after.metadata, after.state) == (6, {"m": "1"}, {"s": 2})
    assert after.created_at == before.created_at
    assert after.updated_at > before.updated_at  # a write: the idle clock restarts
    assert after.expires_at == pytest.approx(after.updated_at + 3600)
    # The later items are untouched: same sequences, times and payloads.
    assert await store.list_items("s1", 100) == appended[4:]
    assert await store.read_history("s1") == [s.item for s in appended[4:]]

    # Dropping again through the same sequence removes nothing and writes nothing.
    assert await store.drop_items_through("s1", 4) == 0
    assert await store.drop_items_through("s1", 2) == 0
    assert await store.get_session("s1") == after

    assert await store.drop_items_through("s1", 6) == 2
    assert seqs(await store.list_items("s1", 100)) == [7, 8, 9, 10]
    assert (await store.get_session("s1")).item_count == 4


async def test_history_window_and_paging_after_a_drop(store: SessionStore) -> None:
    await store.create_session("s1")
    items = [msg(f"m{i}") for i in range(12)]
    await store.append_items("s1", items[:5])
    await store.append_items("s1", items[5:])
    assert await store.drop_items_through("s1", 5) == 5  # left: sequences 6..12

    window = await store.read_history("s1", limit=3)
    assert window == items[9:] and window.omitted == 4
    exact = await store.read_history("s1", limit=7)
    assert exact == items[5:] and exact.omitted == 0
    larger = await store.read_history("s1", create=True, limit=100)
    assert larger == items[5:] and larger.omitted == 0
    everything = await store.read_history("s1")
    assert everything == items[5:] and everything.omitted == 0

    pages: list[list[int]] = []
    after = 0
    while page := await store.list_items("s1", 3, after_sequence=after):
        pages.append(seqs(page))
        after = page[-1].sequence
    assert pages == [[6, 7, 8], [9, 10, 11], [12]]
    assert seqs(await store.list_items("s1", 2, after_sequence=3)) == [6, 7]
    assert seqs(await store.list_items("s1", 2, after_sequence=7)) == [8, 9]

    pages = []
    before: int | None = None
    while page := await store.list_items("s1", 3, newest_first=True, before_sequence=before):
        pages.append(seqs(page))
        before = page[-1].sequence
    assert pages == [[12, 11, 10], [9, 8, 7], [6]]
    assert await store.list_items("s1", 5, newest_first=True, before_sequence=6) == []
    assert await store.list_items("s1", 5, newest_first=True, before_sequence=3) == []
    assert seqs(await store.list_items("s1", 2, newest_first=True, before_sequence=8)) == [7, 6]

    # Appends continue after the newest sequence ever given; pop takes the newest.
    assert seqs(await store.append_items("s1", [msg("new")])) == [13]
    assert (await store.get_session("s1")).item_count == 8
    popped = await store.pop_item("s1")
    assert popped is not None and (popped.sequence, popped.item) == (13, msg("new"))
    window = await store.read_history("s1", limit=2)
    assert window == items[10:] and window.omitted == 5

    # Pop down to the cut: the session then holds nothing, and says so.
    for expected in range(12, 5, -1):
        popped = await store.pop_item("s1")
        assert popped is not None and popped.sequence == expected
    assert await store.pop_item("s1") is None
    empty = await store.read_history("s1", limit=2)
    assert empty == [] and empty.omitted == 0
    assert (await store.get_session("s1")).item_count == 0
    assert seqs(await store.append_items("s1", [msg("after")])) == [14]


async def test_drop_items_through_out_of_range_sequences(store: SessionStore, clock: Callable[[float], None]) -> None:
    created = await store.create_session("s1")
    assert await store.drop_items_through("s1", 5) == 0  # no items at all
    assert await store.get_session("s1") == created  # a no-op drop writes nothing

    await append_texts(store, "s1", 5)
    before = await store.get_session("s1")
    for below in (0, -1, -(2**70)):
        assert await store.drop_items_through("s1", below) == 0
    assert await store.get_session("s1") == before
    assert seqs(await store.list_items("s1", 10)) == [1, 2, 3, 4, 5]

    # Through a gap: after a pop and an append the items are 1-4 and 6; through 5 removes four.
    await store.pop_item("s1")
    await store.append_items("s1", [msg("x")])  # 6
    assert await store.drop_items_through("s1", 5) == 4
    assert seqs(await store.list_items("s1", 10)) == [6]

    await append_texts(store, "s1", 3, prefix="n")  # 7, 8, 9
    assert await store.drop_items_through("s1", 2**70) == 4  # beyond the newest: all
    record = await store.get_session("s1")
    assert record.item_count == 0
    history = await store.read_history("s1", limit=3)
    assert history == [] and history.omitted == 0
    assert await store.list_items("s1", 10) == []
    assert await store.list_items("s1", 10, newest_first=True) == []
    assert await store.pop_item("s1") is None
    assert seqs(await store.append_items("s1", [msg("again")])) == [10]

    await append_texts(store, "s1", 2, prefix="k")  # 11, 12
    assert await store.drop_items_through("s1", 12) == 3  # exactly the newest: all
    assert seqs(await store.append_items("s1", [msg("more")])) == [13]
    assert await store.drop_items_through("s1", 2**63 - 1) == 1


async def test_a_retried_append_whose_items_were_dropped_is_not_appended_again(store: SessionStore) -> None:
    """Request ids outlive dropped items (as they do popped and cleared ones): the retry
    appends nothing and returns what is left of its items, so dropped originals never
    come back."""
    await store.create_session("s1")
    r1 = await store.append_items("s1", [msg("a"), msg("b"), msg("c")], request_id="r1")
    r2 = await store.append_items("s1", [msg("d"), msg("e")], request_id="r2")
    assert (seqs(r1), seqs(r2)) == ([1, 2, 3], [4, 5])

    assert await store.drop_items_through("s1", 2) == 2
    assert await store.append_items("s1", [msg("a"), msg("b"), msg("c")], request_id="r1") == r1[2:]
    assert await store.drop_items_through("s1", 3) == 1
    assert await store.append_items("s1", [msg("a"), msg("b"), msg("c")], request_id="r1") == []
    assert await store.append_items("s1", [msg("d"), msg("e")], request_id="r2") == r2
    assert await store.read_history("s1") == [msg("d"), msg("e")]
    assert (await store.get_session("s1")).item_count == 2

    assert await store.drop_items_through("s1", 100) == 2
    assert await store.append_items("s1", [msg("d"), msg("e")], request_id="r2") == []
    assert await store.read_history("s1") == []
    assert (await store.get_session("s1")).item_count == 0
    # A new request id appends as usual, after the newest sequence ever given.
    assert seqs(await store.append_items("s1", [msg("f")], request_id="r3")) == [6]


async def check_drop_racing_appends(stores: list[SessionStore], writers: int = 4, per_writer: int = 40) -> None:
    """Writers on ``stores`` append (some with request ids) while a dropper repeatedly
    drops through the newest sequence an append has returned so far."""
    await stores[0].create_session("s1")
    appended = list(await append_texts(stores[0], "s1", 10, prefix="old"))
    requests: dict[str, list[StoredItem]] = {}

    async def writer(w: int) -> None:
        store = stores[w % len(stores)]
        for i in range(per_writer):
            rid = f"w{w}-{i}" if i % 2 else None
            stored = await store.append_items("s1", [msg(f"w{w}-{i}a"), msg(f"w{w}-{i}b")], request_id=rid)
            appended.extend(stored)
            if rid is not None:
                requests[rid] = stored
            await asyncio.sleep(0)

    async def dropper() -> tuple[int, int]:
        store = stores[-1]
        removed = cut = 0
        for _ in range(30):
            cut = max(s.sequence for s in appended)  # every item up to here exists already
            removed += await store.drop_items_through("s1", cut)
            await asyncio.sleep(0)
        return removed, cut

    *_, (removed, cut) = await asyncio.gather(*(writer(w) for w in range(writers)), dropper())

    total = 10 + 2 * writers * per_writer
    assert sorted(seqs(appended)) == list(range(1, total + 1))  # unique, gapless sequences
    survivors = sorted((s for s in appended if s.sequence > cut), key=lambda s: s.sequence)
    listed = await stores[0].list_items("s1", total + 10)
    assert listed == survivors  # every item above the cut exactly once, none at or below it
    assert removed + len(listed) == total  # each item was removed by exactly one drop
    assert (await stores[0].get_session("s1")).item_count == len(listed)
    window = await stores[-1].read_history("s1", limit=5)
    assert window == [s.item for s in survivors[-5:]] and window.omitted == max(0, len(listed) - 5)

    # Retried requests append nothing and return exactly their surviving items.
    for rid, stored in requests.items():
        replay = await stores[0].append_items("s1", [msg("retry")], request_id=rid)
        assert replay == [s for s in stored if s.sequence > cut]
    assert await stores[-1].list_items("s1", total + 10) == listed
    assert seqs(await stores[0].append_items("s1", [msg("last")])) == [total + 1]


async def test_drop_racing_appends_leaves_a_consistent_session(store: SessionStore) -> None:
    await check_drop_racing_appends([store])


async def test_drop_racing_appends_on_two_replicas(replicas: tuple[SessionStore, SessionStore]) -> None:
    await check_drop_racing_appends(list(replicas))


async def check_concurrent_writers(stores: list[SessionStore], writers: int = 8, per_writer: int = 500) -> None:
    """``writers`` tasks spread over ``stores`` append one item at a time to one session."""
    await stores[0].create_session("s1")

    async def writer(w: int) -> list[int]:
        store = stores[w % len(stores)]
        got = []
        for i in range(per_writer):
            stored = await store.append_items("s1", [msg(f"w{w}-{i}")])
            got.append(stored[0].sequence)
            await asyncio.sleep(0)
        return got

    results = await asyncio.gather(*(writer(w) for w in range(writers)))
    total = writers * per_writer
    assert sorted(itertools.chain.from_iterable(results)) == list(range(1, total + 1))
    for got in results:
        assert got == sorted(got)  # each writer's appends land in its own order

    items = await stores[-1].list_items("s1", total + 10)
    assert seqs(items) == list(range(1, total + 1))
    assert (await stores[0].get_session("s1")).item_count == total
    by_writer: dict[str, list[int]] = {}
    for stored in items:
        assert isinstance(stored.item, MessageItem)
        w, i = stored.item.text[1:].split("-")
        by_writer.setdefault(w, []).append(int(i))
    assert by_writer == {str(w): list(range(per_writer)) for w in range(writers)}


async def test_read_history_with_a_limit_reads_the_newest_items(store: SessionStore) -> None:
    """The history window: only the newest ``limit`` items, oldest first, and how many older
    ones were left out; without a limit, everything (omitted 0), as before."""
    items = [msg(f"m{i}") for i in range(7)]
    await store.create_session("s1")
    await store.append_items("s1", items[:3])
    await store.append_items("s1", items[3:])
    window = await store.read_history("s1", limit=3)
    assert window == items[4:] and window.omitted == 4
    everything = await store.read_history("s1")
    assert everything == items and everything.omitted == 0
    exact = await store.read_history("s1", limit=7)
    assert exact == items and exact.omitted == 0
    larger = await store.read_history("s1", create=True, limit=100)
    assert larger == items and larger.omitted == 0
    one = await store.read_history("s1", create=True, limit=1)
    assert one == items[6:] and one.omitted == 6
    # Popped and cleared items are not counted as omitted: the count is of what the session holds.
    await store.pop_item("s1")
    popped = await store.read_history("s1", limit=2)
    assert popped == items[4:6] and popped.omitted == 4
    await store.clear_items("s1")
    cleared = await store.read_history("s1", limit=2)
    assert cleared == [] and cleared.omitted == 0
    # A missing session: empty, and created with ``create`` exactly as without a limit.
    missing = await store.read_history("new", limit=5)
    assert missing == [] and missing.omitted == 0
    with pytest.raises(SessionNotFoundError):
        await store.get_session("new")
    created = await store.read_history("new", create=True, limit=5)
    assert created == [] and created.omitted == 0
    assert (await store.get_session("new")).item_count == 0
    with pytest.raises(ValueError):
        await store.read_history("s1", limit=0)


async def test_a_history_window_of_a_long_session_reads_only_the_window(store: SessionStore) -> None:
    await store.create_session("long")
    for batch in range(5):
        await store.append_items("long", [msg(f"m{batch * 1000 + i}") for i in range(1000)])
    window = await store.read_history("long", create=True, limit=50)
    assert window == [msg(f"m{i}") for i in range(4950, 5000)] and window.omitted == 4950
    assert (await store.get_session("long")).item_count == 5000


async def test_concurrent_appends_get_unique_gapless_sequences(store: SessionStore) -> None:
    await check_concurrent_writers([store])


async def test_writers_on_two_replicas_get_unique_gapless_sequences(
    replicas: tuple[SessionStore, SessionStore],
) -> None:
    await check_concurrent_writers(list(replicas))  # four writers on each replica


async def test_one_request_id_on_two_replicas_appends_once(replicas: tuple[SessionStore, SessionStore]) -> None:
    a, b = replicas
    await asyncio.gather(*(s.read_history("s1", create=True) for s in [a, b] * 5))
    await a.append_items("s1", [msg("before")])
    results = await asyncio.gather(
        *(s.append_items("s1", [msg("x"), msg("y")], request_id="retry-me") for s in [a, b] * 5)
    )
    assert all(seqs(r) == [2, 3] and r == results[0] for r in results)
    assert await b.read_history("s1") == [msg("before"), msg("x"), msg("y")]
    assert [r.session_id for r in (await a.list_sessions(10)).sessions] == ["s1"]


async def test_concurrent_creates_and_idempotent_appends(store: SessionStore) -> None:
    await asyncio.gather(*(store.read_history("s1", create=True) for _ in range(10)))
    assert (await store.list_sessions(10)).sessions == [await store.get_session("s1")]
    results = await asyncio.gather(*(store.append_items("s1", [msg("once")], request_id="r") for _ in range(10)))
    assert all(seqs(r) == [1] for r in results)
    assert await store.read_history("s1") == [msg("once")]


# --- expiry ----------------------------------------------------------------------------
# Every store judges expiry by the caller's clock (``time.time()``, passed to Postgres and to
# the Redis scripts as a parameter), so these tests move a manual clock on instead of waiting
# for real time to pass: what is alive and what has expired never depends on how fast the test
# ran. TTL is long in real time too: Redis also PEXPIREs the keys on its own clock (to reclaim
# space; see test_redis_store.py), which must not fire while a test runs.

TTL = 3600.0


async def test_ttl_is_reported_and_idle_expiry_hides_the_session(store: SessionStore, manual_clock: ManualClock) -> None:
    record = await store.create_session("short", metadata={"k": "v"}, ttl_s=TTL)
    await store.create_session("forever")
    assert record.ttl_s == pytest.approx(TTL)
    assert record.expires_at == pytest.approx(manual_clock.now + TTL, abs=0.01)
    assert (await store.get_session("forever")).expires_at is None
    await store.append_items("short", [msg("a")], request_id="r1")

    manual_clock.advance(TTL - 1)  # idle, but not for a whole TTL yet
    assert (await store.get_session("short")).item_count == 1
    manual_clock.advance(2)  # idle for longer than its TTL
    with pytest.raises(SessionNotFoundError):
        await store.get_session("short")
    with pytest.raises(SessionNotFoundError):
        await store.append_items("short", [msg("late")])
    with pytest.raises(SessionNotFoundError):
        await store.list_items("short", 10)
    with pytest.raises(SessionNotFoundError):
        await store.update_session("short", metadata={"k": "w"})
    with pytest.raises(SessionNotFoundError):
        await store.drop_items_through("short", 10)
    assert await store.read_history("short") == []
    assert [r.session_id for r in (await store.list_sessions(10)).sessions] == ["forever"]

    # The id is free again and the new session starts empty, from sequence 1.
    fresh = await store.create_session("short")
    assert (fresh.metadata, fresh.item_count, fresh.expires_at) == ({}, 0, None)
    assert seqs(await store.append_items("short", [msg("b")], request_id="r1")) == [1]
    assert await store.read_history("short") == [msg("b")]


async def test_writes_restart_the_idle_clock_and_reads_do_not(store: SessionStore, manual_clock: ManualClock) -> None:
    await store.create_session("s1", ttl_s=TTL)
    for _ in range(3):  # each write lands before the previous expiry, so the session lives on
        manual_clock.advance(TTL * 0.6)
        await store.append_items("s1", [msg("keep alive")])
    # 1.8 TTL after it was created: alive because every write restarted the idle clock.
    assert (await store.get_session("s1")).item_count == 3
    manual_clock.advance(TTL * 0.6)
    await store.get_session("s1")  # a read...
    await store.read_history("s1")
    manual_clock.advance(TTL * 0.6)  # ...does not extend it: 1.2 TTL after the last write
    with pytest.raises(SessionNotFoundError):
        await store.get_session("s1")


async def test_update_sets_and_removes_ttl(store: SessionStore, manual_clock: ManualClock) -> None:
    await store.create_session("s1")
    record = await store.update_session("s1", ttl_s=TTL)
    assert record.ttl_s == pytest.approx(TTL) and record.expires_at is not None
    cleared = await store.update_session("s1", ttl_s=0)
    assert (cleared.ttl_s, cleared.expires_at) == (None, None)
    manual_clock.advance(TTL + 1)  # past the TTL it no longer has
    assert (await store.get_session("s1")).ttl_s is None
    with pytest.raises(ValueError):
        await store.update_session("s1", ttl_s=-1)
    with pytest.raises(ValueError):
        await store.create_session("s2", ttl_s=-1)
    with pytest.raises(SessionNotFoundError):
        await store.get_session("s2")


async def test_run_creates_over_an_expired_session(store: SessionStore, manual_clock: ManualClock) -> None:
    await store.create_session("s1", ttl_s=TTL)
    await store.append_items("s1", [msg("old")])
    manual_clock.advance(TTL + 1)
    assert await store.read_history("s1", create=True) == []
    record = await store.get_session("s1")
    assert (record.item_count, record.ttl_s) == (0, None)
    assert seqs(await store.append_items("s1", [msg("new")])) == [1]


async def test_sweep_removes_only_expired_sessions(store: SessionStore, manual_clock: ManualClock) -> None:
    await store.create_session("gone", ttl_s=TTL)
    await store.append_items("gone", [msg("x")])
    await store.create_session("kept", ttl_s=TTL * 10)
    await store.create_session("forever")
    manual_clock.advance(TTL + 1)
    assert await store.sweep_expired() == 1
    assert await store.sweep_expired() == 0
    listed = {r.session_id for r in (await store.list_sessions(10)).sessions}
    assert listed == {"kept", "forever"}


# --- missing sessions ------------------------------------------------------------------

MISSING_SESSION_CALLS: dict[str, Callable[[SessionStore], Awaitable[object]]] = {
    "get_session": lambda s: s.get_session("ghost"),
    "update_session": lambda s: s.update_session("ghost", metadata={"a": "b"}),
    "update_session_noop": lambda s: s.update_session("ghost"),
    "delete_session": lambda s: s.delete_session("ghost"),
    "append_items": lambda s: s.append_items("ghost", [msg("x")]),
    "append_items_empty": lambda s: s.append_items("ghost", []),
    "append_items_request_id": lambda s: s.append_items("ghost", [msg("x")], request_id="r"),
    "list_items": lambda s: s.list_items("ghost", 10),
    "list_items_newest": lambda s: s.list_items("ghost", 10, newest_first=True),
    "pop_item": lambda s: s.pop_item("ghost"),
    "clear_items": lambda s: s.clear_items("ghost"),
    "drop_items_through": lambda s: s.drop_items_through("ghost", 5),
    "drop_items_through_nothing": lambda s: s.drop_items_through("ghost", 0),
}


@pytest.mark.parametrize("call", list(MISSING_SESSION_CALLS))
async def test_missing_session_raises(store: SessionStore, call: str) -> None:
    await store.create_session("real")
    with pytest.raises(SessionNotFoundError) as info:
        await MISSING_SESSION_CALLS[call](store)
    assert info.value.session_id == "ghost"
    # Nothing was created as a side effect.
    page = await store.list_sessions(10)
    assert [r.session_id for r in page.sessions] == ["real"]


async def test_delete_twice_raises(store: SessionStore) -> None:
    await store.create_session("s1")
    await store.delete_session("s1")
    with pytest.raises(SessionNotFoundError):
        await store.delete_session("s1")


# --- SQLite only -----------------------------------------------------------------------


async def test_sqlite_persists_across_reopen(tmp_path: Path) -> None:
    path = tmp_path / "persist.db"
    first = SqliteSessionStore(path)
    await first.open()
    await first.create_session("s1", metadata={"title": "漢字"}, state={"k": [1, 2]})
    stored = await first.append_items("s1", varied_items()[:3], request_id="req")
    await first.pop_item("s1")
    await first.close()

    second = SqliteSessionStore(path)
    await second.open()
    try:
        record = await second.get_session("s1")
        assert (record.metadata, record.state, record.item_count) == ({"title": "漢字"}, {"k": [1, 2]}, 2)
        assert await second.read_history("s1") == varied_items()[:2]
        # The counter and request ids survive too.
        assert seqs(await second.append_items("s1", [msg("after reopen")])) == [4]
        assert await second.append_items("s1", [msg("retry")], request_id="req") == stored[:2]
    finally:
        await second.close()

    with sqlite3.connect(path) as raw:
        assert raw.execute("SELECT version FROM schema_version").fetchall() == [(1,), (2,), (3,)]
        assert raw.execute("PRAGMA journal_mode").fetchone() == ("wal",)
        assert raw.execute("SELECT seq, type FROM items ORDER BY seq").fetchall() == [
            (1, "message"),
            (2, "message"),
            (4, "message"),
        ]
    raw.close()


async def test_sqlite_two_stores_share_one_file(tmp_path: Path) -> None:
    path = tmp_path / "shared.db"
    a, b = SqliteSessionStore(path), SqliteSessionStore(path)
    await a.open()
    await b.open()
    try:
        await a.create_session("s1", metadata={"by": "a"})
        assert (await b.get_session("s1")).metadata == {"by": "a"}
        assert seqs(await a.append_items("s1", [msg("from a")])) == [1]
        assert seqs(await b.append_items("s1", [msg("from b")])) == [2]
        assert await a.read_history("s1") == [msg("from a"), msg("from b")]
        with pytest.raises(SessionExistsError):
            await b.create_session("s1")
        await b.delete_session("s1")
        with pytest.raises(SessionNotFoundError):
            await a.get_session("s1")
    finally:
        await a.close()
        await b.close()


async def test_sqlite_creates_parent_directories(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "er" / "sessions.db"
    s = SqliteSessionStore(str(path))
    await s.open()
    try:
        await s.create_session("s1")
    finally:
        await s.close()
    assert path.is_file()


async def test_sqlite_in_memory(tmp_path: Path) -> None:
    s = SqliteSessionStore(":memory:")
    await s.open()
    try:
        await s.create_session("s1")
        assert seqs(await append_texts(s, "s1", 2)) == [1, 2]
    finally:
        await s.close()
    assert list(tmp_path.iterdir()) == []


async def test_sqlite_errors_become_store_unavailable(tmp_path: Path) -> None:
    unopened = SqliteSessionStore(tmp_path / "x.db")
    with pytest.raises(StoreUnavailableError):
        await unopened.get_session("s1")

    a_directory = SqliteSessionStore(tmp_path)
    with pytest.raises(StoreUnavailableError, match="sqlite store at"):
        await a_directory.open()

    path = tmp_path / "broken.db"
    s = SqliteSessionStore(path)
    await s.open()
    try:
        await s.create_session("s1")
        with sqlite3.connect(path) as raw:
            raw.execute("DROP TABLE items")
        raw.close()
        with pytest.raises(StoreUnavailableError, match=str(path)) as info:
            await s.append_items("s1", [msg("x")])
        assert isinstance(info.value.__cause__, sqlite3.Error)
        # The failed append rolled back as a whole: the counter did not move.
        assert (await s.get_session("s1")).item_count == 0
    finally:
        await s.close()
    with pytest.raises(StoreUnavailableError):
        await s.get_session("s1")


async def test_sqlite_upgrades_a_version_1_database(tmp_path: Path) -> None:
    from agentd.server.sessions.sqlite import MIGRATIONS

    path = tmp_path / "v1.db"
    raw = sqlite3.connect(path)
    raw.executescript(MIGRATIONS[0])
    raw.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    raw.execute("INSERT INTO schema_version VALUES (1)")
    raw.execute("INSERT INTO sessions (id, created_at, updated_at, metadata, state) VALUES ('old', 1, 1, '{}', '{}')")
    raw.commit()
    raw.close()

    pinned = SqliteSessionStore(path, auto_migrate=False)
    assert (await pinned.schema_status()).pending == 2
    with pytest.raises(StoreUnavailableError, match="agentd db migrate"):
        await pinned.open()

    async with opened(SqliteSessionStore(path)) as upgraded:
        status = await upgraded.schema_status()
        assert (status.current, status.latest, status.pending) == (3, 3, 0)
        record = await upgraded.get_session("old")
        assert (record.created_at, record.ttl_s) == (1.0, None)
        await upgraded.update_session("old", ttl_s=30)
        # Sessions from before tenants are the default tenant's.
        assert [r.session_id for r in (await upgraded.list_sessions(10)).sessions] == ["old"]
        assert (await upgraded.list_sessions(10, tenant="acme")).sessions == []
    assert (await SqliteSessionStore(path).migrate()).current == 3  # idempotent
