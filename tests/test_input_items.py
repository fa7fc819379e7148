"""StartRun.input_items: messages with content parts (text, images by URL or bytes, files),
over the real server and the scripted OpenAI endpoint, on both model APIs."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any, AsyncIterator

import grpc
import pytest

from agentd.server import Agent, App, Script, say
from agentd.server.runs.codec import decode_spec, encode_spec
from agentd.server.runtime.items import FilePart, ImagePart, MessageItem, TextPart, item_from_dict
from agentd.server.runtime.run_loop import RunInput
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import session_service_pb2 as spb
from agentd.v1 import item_pb2
from tests.conftest import Harness
from tests.runs_util import collect
from tests.test_responses_api import start

PNG = b"\x89PNG\r\n\x1a\nfake-image-bytes"
PNG_URL = "data:image/png;base64," + base64.b64encode(PNG).decode()

chat = Agent(name="chat", model="vision", model_api="chat_completions", instructions="Look.")
resp = Agent(name="resp", model="vision", model_api="responses", instructions="Look.")
APP = App(agents=[chat, resp])


@pytest.fixture
async def h(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    harness = await start(model_server, tmp_path, APP)
    try:
        yield harness
    finally:
        await harness.client.close()
        await harness.server.stop(grace_s=0)


def message(role: int, *parts: item_pb2.ContentPart, text: str = "") -> item_pb2.Item:
    return item_pb2.Item(message=item_pb2.Message(role=role, text=text, parts=list(parts)))


def text(value: str) -> item_pb2.ContentPart:
    return item_pb2.ContentPart(text=value)


def image(**fields: Any) -> item_pb2.ContentPart:
    return item_pb2.ContentPart(image=item_pb2.ImagePart(**fields))


def picture_message() -> item_pb2.Item:
    return message(
        item_pb2.ROLE_USER,
        text("What is in these pictures?"),
        image(url="https://example.com/cat.jpg", detail="low"),
        image(data=PNG, mime_type="image/png"),
    )


async def test_image_parts_reach_chat_completions_as_content_parts(h: Harness) -> None:
    h.model.set_script("vision", Script.of(say("Two cats.")))
    events = await collect(h.client.run("chat", "", input_items=[picture_message()]))
    assert events[-1].run_completed.final_output.string_value == "Two cats."
    request = h.model.requests[-1]
    assert request["messages"] == [
        {"role": "system", "content": "Look."},
        {"role": "user", "content": [
            {"type": "text", "text": "What is in these pictures?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/cat.jpg", "detail": "low"}},
            {"type": "image_url", "image_url": {"url": PNG_URL}},
        ]},
    ]


async def test_image_parts_reach_the_responses_api_as_input_parts(h: Harness) -> None:
    h.model.set_script("vision", Script.of(say("Two cats.")))
    events = await collect(h.client.run("resp", "And now?", input_items=[picture_message()]))
    assert events[-1].run_completed.final_output.string_value == "Two cats."
    request = h.model.requests[-1]
    assert request["input"] == [
        {"type": "message", "role": "user", "content": [
            {"type": "input_text", "text": "What is in these pictures?"},
            {"type": "input_image", "image_url": "https://example.com/cat.jpg", "detail": "low"},
            {"type": "input_image", "image_url": PNG_URL, "detail": "auto"},
        ]},
        {"type": "message", "role": "user", "content": "And now?"},  # input comes last
    ]


async def test_files_on_both_apis(h: Harness) -> None:
    pdf = item_pb2.ContentPart(file=item_pb2.FilePart(data=b"%PDF-1.4", filename="a.pdf", mime_type="application/pdf"))
    by_id = item_pb2.ContentPart(file=item_pb2.FilePart(file_id="file-123"))
    items = [message(item_pb2.ROLE_USER, text("Summarise"), pdf, by_id)]
    h.model.set_script("vision", Script.of(say("ok"), say("ok")))
    await collect(h.client.run("resp", "", input_items=items))
    assert h.model.requests[-1]["input"][0]["content"] == [
        {"type": "input_text", "text": "Summarise"},
        {"type": "input_file", "file_data": "data:application/pdf;base64," + base64.b64encode(b"%PDF-1.4").decode(),
         "filename": "a.pdf"},
        {"type": "input_file", "file_id": "file-123"},
    ]
    await collect(h.client.run("chat", "", input_items=items))
    assert h.model.requests[-1]["messages"][1]["content"] == [
        {"type": "text", "text": "Summarise"},
        {"type": "text", "text": "[file: a.pdf]"},
        {"type": "text", "text": "[file: file-123]"},
    ]


async def test_a_conversation_as_input_items_is_sent_in_order_and_stored(h: Harness) -> None:
    h.model.set_script("vision", Script.of(say("Paris."), say("Still Paris.")))
    conversation = [
        message(item_pb2.ROLE_DEVELOPER, text="Answer tersely."),
        message(item_pb2.ROLE_USER, text="Capital of France?"),
        message(item_pb2.ROLE_ASSISTANT, text="Paris."),
        message(item_pb2.ROLE_USER, text("And this one?"), image(url="https://example.com/map.png")),
    ]
    events = await collect(h.client.run("chat", "", input_items=conversation, session_id="s1"))
    assert events[-1].run_completed.final_output.string_value == "Paris."
    assert h.model.requests[-1]["messages"] == [
        {"role": "system", "content": "Look."},
        {"role": "system", "content": "Answer tersely."},
        {"role": "user", "content": "Capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": [
            {"type": "text", "text": "And this one?"},
            {"type": "image_url", "image_url": {"url": "https://example.com/map.png"}},
        ]},
    ]
    # The session stores the input items (parts included) before the reply.
    stored = await h.client.all_items("s1")
    assert [(i.message.role, i.message.text) for i in stored] == [
        (item_pb2.ROLE_DEVELOPER, "Answer tersely."),
        (item_pb2.ROLE_USER, "Capital of France?"),
        (item_pb2.ROLE_ASSISTANT, "Paris."),
        (item_pb2.ROLE_USER, "And this one?"),
        (item_pb2.ROLE_ASSISTANT, "Paris."),
    ]
    assert list(stored[3].message.parts) == [text("And this one?"), image(url="https://example.com/map.png")]
    assert all(not i.agent for i in stored[:4]) and stored[4].agent == "chat"
    # The next run (Responses API, text only) replays them as history, parts included.
    await collect(h.client.run("resp", "Sure?", session_id="s1"))
    sent = h.model.requests[-1]["input"]
    assert [m["role"] for m in sent] == ["developer", "user", "assistant", "user", "assistant", "user"]
    assert sent[3]["content"] == [
        {"type": "input_text", "text": "And this one?"},
        {"type": "input_image", "image_url": "https://example.com/map.png", "detail": "auto"},
    ]
    assert sent[-1]["content"] == "Sure?"


@pytest.mark.parametrize(
    ("items", "field"),
    [
        ([message(item_pb2.ROLE_USER, image(url="ftp://example.com/x.png"))], "start.input_items[0].message.parts[0].image.url"),
        ([message(item_pb2.ROLE_USER, text="ok"), message(item_pb2.ROLE_USER, text("a"), image())],
         "start.input_items[1].message.parts[1].image"),
        ([message(item_pb2.ROLE_USER, image(data=b"x"))], "start.input_items[0].message.parts[0].image.mime_type"),
        ([message(item_pb2.ROLE_USER, image(data=b"x", mime_type="text/plain"))],
         "start.input_items[0].message.parts[0].image.mime_type"),
        ([message(item_pb2.ROLE_USER, image(url="https://x.example/a.png", detail="ultra"))],
         "start.input_items[0].message.parts[0].image.detail"),
        ([message(item_pb2.ROLE_USER, item_pb2.ContentPart(file=item_pb2.FilePart(data=b"x")))],
         "start.input_items[0].message.parts[0].file.filename"),
        ([message(item_pb2.ROLE_USER, item_pb2.ContentPart())], "start.input_items[0].message.parts[0]"),
        ([message(item_pb2.ROLE_USER, text("a\x00b"))], "start.input_items[0].message.parts[0].text"),
        ([message(item_pb2.ROLE_UNSPECIFIED, text="hi")], "start.input_items[0].message.role"),
        ([message(item_pb2.ROLE_USER, text="  ")], "start.input_items[0].message"),
        ([item_pb2.Item(tool_result=item_pb2.ToolResult(call_id="c", output="x"))], "start.input_items[0]"),
        ([message(item_pb2.ROLE_USER, text="hi")] * 101, "start.input_items"),
        ([], "start.input"),
    ],
)
async def test_bad_input_items_are_invalid_argument_naming_the_field(
    h: Harness, items: list[item_pb2.Item], field: str
) -> None:
    with pytest.raises(grpc.aio.AioRpcError) as error:
        await h.client.create_run("chat", "", input_items=items)
    assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
    assert field in error.value.details()
    assert h.model.requests == []


async def test_image_and_file_data_is_limited_to_4_mib_in_all(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    harness = await start(model_server, tmp_path, APP)
    try:
        items = [message(item_pb2.ROLE_USER, image(data=b"x" * (3 << 20), mime_type="image/png")),
                 message(item_pb2.ROLE_USER, image(data=b"x" * (2 << 20), mime_type="image/png"))]
        with pytest.raises(grpc.aio.AioRpcError) as error:
            await harness.client.create_run("chat", "", input_items=items)
        assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT, error.value.details()
        assert "start.input_items[1].message.parts" in error.value.details()
        assert "4194304" in error.value.details()
    finally:
        await harness.client.close()
        await harness.server.stop(grace_s=0)


async def test_big_items_never_make_a_session_unreadable(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    # Three items of 3 MiB each: no reply may carry two (it would pass the 8 MiB message limit).
    harness = await start(model_server, tmp_path, APP)
    try:
        await harness.client.create_session("big")
        for i in range(3):
            await harness.client.add_items("big", [message(item_pb2.ROLE_USER, image(data=bytes([i]) * (3 << 20),
                                                                                      mime_type="image/png"))])
        items = await harness.client.all_items("big")  # follows next_page_token
        assert [len(item.message.parts[0].image.data) for item in items] == [3 << 20] * 3
        page = await harness.client.sessions.ListSessionItems(spb.ListSessionItemsRequest(parent="big", page_size=100))
        assert len(page.items) == 1 and page.next_page_token
    finally:
        await harness.client.close()
        await harness.server.stop(grace_s=0)


def test_parts_round_trip_through_items_and_the_run_spec() -> None:
    item = MessageItem("user", "hi", parts=(
        TextPart("hi"), ImagePart(data=PNG, mime_type="image/png", detail="high"),
        FilePart(file_id="file-1"), FilePart(data=b"\x00\x01", filename="b.bin"),
    ))
    assert item_from_dict(item.to_dict()) == item
    assert item_from_dict(MessageItem("developer", "x").to_dict()) == MessageItem("developer", "x")
    spec = RunInput(run_id="run_1", agent="chat", input="", input_items=(item,))
    assert decode_spec(encode_spec(spec)) == spec
    plain = RunInput(run_id="run_2", agent="chat", input="hi")
    assert decode_spec(encode_spec(plain)) == plain and "input_items" not in encode_spec(plain)
