"""SessionService over the wire."""

from __future__ import annotations

import asyncio

import grpc
import pytest

from agentd.v1 import item_pb2, session_service_pb2


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
