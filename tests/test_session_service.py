"""SessionService over the wire."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentd.server import Script, say
from agentd.v1 import item_pb2, session_service_pb2
from tests.conftest import start_harness
from tests.runs_util import collect


def text(t: str, role: int = item_pb2.ROLE_USER) -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=role, text=t))


async def test_session_lifecycle(harness):
    client = harness.client
    created = await client.create_session("s-1", metadata={"user": "ada"}, state={"step": 1, "tags": ["a"]})
    assert created.name == "sessions/s-1" and created.metadata["user"] == "ada"
    assert created.state["step"] == 1 and list(created.state["tags"]) == ["a"]

    stored = await client.add_items("s-1", [
        text("hello"),
        text("hi!", item_pb2.ROLE_ASSISTANT),
        item_pb2.Item(tool_call=item_pb2.ToolCall(call_id="c1", tool_name="get_weather", arguments={"city": "Paris"})),
        item_pb2.Item(tool_result=item_pb2.ToolResult(call_id="c1", tool_name="get_weather", output="sunny")),
    ])
    assert [i.sequence for i in stored] == [1, 2, 3, 4]
    assert stored[0].name == "sessions/s-1/items/1" and stored[0].HasField("create_time")

    oldest = await client.list_items("s-1", page_size=3)
    assert [i.sequence for i in oldest.items] == [1, 2, 3] and oldest.next_page_token
    rest = await client.list_items("s-1", page_size=3, page_token=oldest.next_page_token)
    assert [i.sequence for i in rest.items] == [4] and not rest.next_page_token
    assert rest.items[0].tool_result.output == "sunny"
    newest = await client.list_items("s-1", newest_first=True, page_size=2)
    assert [i.sequence for i in newest.items] == [4, 3]
    older = await client.list_items("s-1", newest_first=True, page_size=2, page_token=newest.next_page_token)
    assert [i.sequence for i in older.items] == [2, 1]
    assert (await client.list_items("s-1", newest_first=True, page_size=1)).items[0].tool_result.call_id == "c1"
    call_item = (await client.list_items("s-1", page_size=3)).items[2]
    assert call_item.tool_call.arguments["city"] == "Paris"

    popped = await client.pop_item("s-1")
    assert popped.sequence == 4
    assert (await client.get_session("s-1")).item_count == 3
    # Sequence numbers are not reused after a pop.
    again = await client.add_items("s-1", [text("next")])
    assert again[0].sequence == 5

    updated = await client.sessions.UpdateSession(session_service_pb2.UpdateSessionRequest(
        session=session_service_pb2.Session(name="sessions/s-1", metadata={"user": "grace"}),
        update_mask={"paths": ["metadata"]},
    ))
    assert updated.session.metadata["user"] == "grace" and updated.session.state["step"] == 1

    assert await client.clear_items("s-1") == 4
    assert (await client.get_session("s-1")).item_count == 0
    assert await client.pop_item("s-1") is None

    await client.delete_session("s-1")
    with pytest.raises(grpc.aio.AioRpcError) as gone:
        await client.get_session("s-1")
    assert gone.value.code() == grpc.StatusCode.NOT_FOUND


async def test_add_items_is_idempotent_with_a_request_id(harness):
    await harness.client.create_session("idem")
    first = await harness.client.add_items("idem", [text("a"), text("b")], request_id="r-1")
    retry = await harness.client.add_items("idem", [text("a"), text("b")], request_id="r-1")
    assert [i.sequence for i in retry] == [i.sequence for i in first] == [1, 2]
    assert (await harness.client.get_session("idem")).item_count == 2


async def test_create_with_request_id_returns_the_same_session(harness):
    first = await harness.client.create_session(request_id="create-1", metadata={"k": "v"})
    retry = await harness.client.create_session(request_id="create-1")
    assert first.name == retry.name and retry.metadata["k"] == "v"
    other = await harness.client.create_session()
    assert other.name not in (first.name,)
    # Concurrent retries of one create all get the same session, none an error.
    racing = await asyncio.gather(*(harness.client.create_session(request_id="create-2") for _ in range(5)))
    assert len({s.name for s in racing}) == 1


async def test_list_sessions_pages_newest_first(harness):
    for i in range(5):
        await harness.client.create_session(f"page-{i}")
    seen: list[str] = []
    token = ""
    while True:
        page = await harness.client.list_sessions(page_size=2, page_token=token)
        assert len(page.sessions) <= 2
        seen.extend(s.name for s in page.sessions)
        token = page.next_page_token
        if not token:
            break
    assert seen == [f"sessions/page-{i}" for i in reversed(range(5))]


async def test_session_ttl_over_the_wire(harness):
    client = harness.client
    created = await client.create_session("ttl-1", ttl_s=0.5)
    assert created.ttl.ToNanoseconds() == 500_000_000
    assert created.expire_time.ToNanoseconds() > created.update_time.ToNanoseconds()
    forever = await client.create_session("ttl-forever")
    assert not forever.HasField("ttl") and not forever.HasField("expire_time")

    # Setting the ttl in the update mask changes it; zero removes the expiry.
    request = session_service_pb2.UpdateSessionRequest(
        session=session_service_pb2.Session(name="sessions/ttl-forever", ttl={"seconds": 3600}),
        update_mask={"paths": ["ttl"]},
    )
    updated = (await client.sessions.UpdateSession(request)).session
    assert updated.ttl.seconds == 3600 and updated.expire_time.seconds >= updated.update_time.seconds + 3599
    request.session.ttl.Clear()
    cleared = (await client.sessions.UpdateSession(request)).session
    assert not cleared.HasField("ttl") and not cleared.HasField("expire_time")

    with pytest.raises(grpc.aio.AioRpcError) as info:
        await client.create_session("ttl-bad", ttl_s=-1)
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "session.ttl" in info.value.details()

    await asyncio.sleep(0.7)
    for call in (client.get_session("ttl-1"), client.add_items("ttl-1", [text("late")]), client.pop_item("ttl-1")):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call
        assert info.value.code() == grpc.StatusCode.NOT_FOUND and "ttl-1" in info.value.details()
    names = [s.name for s in (await client.list_sessions()).sessions]
    assert "sessions/ttl-1" not in names and "sessions/ttl-forever" in names
    # An expired id can be taken again.
    assert (await client.create_session("ttl-1")).item_count == 0


async def test_server_default_ttl_applies_to_new_sessions(model_server, tmp_path):
    h = await start_harness(model_server, tmp_path, session_ttl_s=120)
    try:
        assert (await h.client.create_session("defaulted")).ttl.seconds == 120
        assert not (await h.client.create_session("explicit-never", ttl_s=0)).HasField("ttl")
        # A session a run creates implicitly gets the default too.
        h.model.set_script("assistant", Script.of(say("hi")))
        await collect(h.client.run("assistant", "hello", session_id="by-run"))
        by_run = await h.client.get_session("by-run")
        assert by_run.ttl.seconds == 120 and by_run.item_count == 2
        assert by_run.expire_time.seconds >= by_run.update_time.seconds + 119
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_server_sweeps_expired_sessions_in_the_background(model_server, tmp_path):
    import sqlite3

    h = await start_harness(model_server, tmp_path, session_sweep_interval_s=0.1)
    try:
        await h.client.create_session("brief", ttl_s=0.2)
        await h.client.add_items("brief", [text("soon gone")])
        await h.client.create_session("lasting")
        deadline = asyncio.get_running_loop().time() + 5
        while True:
            with sqlite3.connect(tmp_path / "agentd.db") as raw:
                ids = [row[0] for row in raw.execute("SELECT id FROM sessions ORDER BY id")]
                items = raw.execute("SELECT count(*) FROM items").fetchone()[0]
            raw.close()
            if ids == ["lasting"]:
                break
            assert asyncio.get_running_loop().time() < deadline, f"expired session never swept: {ids}"
            await asyncio.sleep(0.05)
        assert items == 0  # its items went with it
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
