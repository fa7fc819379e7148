"""History compaction: an agent's policy summarises a long session's older items into one
summary item with a model call before the run's first turn; the run's events show it, the
session keeps or drops the originals, and later runs send the summary instead of them."""

from __future__ import annotations

from pathlib import Path
from typing import AsyncIterator

import pytest

from agentd.client import AgentdClient
from agentd.server import Agent, App, Compaction, Script, call, calls, say
from agentd.server.runs.codec import decode_payload, encode_payload
from agentd.server.runtime import events as ev
from agentd.server.runtime.history import history_view, plan_compaction, transcript
from agentd.server.runtime.items import MessageItem, SummaryItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.run_loop import AgentRunner, Resume, RunInput
from agentd.server.sessions.memory import MemorySessionStore
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.testing import ScriptedOpenAIServer
from tests.conftest import Harness
from tests.runs_util import assert_well_formed, collect, of_kind
from tests.test_history_window import RecordingProvider, Sink, add_all, conversation, sent_texts, start

keeping = Agent(
    name="keeping", model="main", instructions="Be brief.",
    compaction=Compaction(trigger_items=10, keep_items=4, model="summariser"),
)
dropping = Agent(
    name="dropping", model="main",
    compaction=Compaction(trigger_items=10, keep_items=4, model="summariser", drop_originals=True),
)


@pytest.fixture
async def compacting(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    h = await start(model_server, tmp_path, App(agents=[keeping, dropping]))
    model_server.set_script("main", Script.of(say("ok")))
    try:
        yield h
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


def requests_for(model: ScriptedOpenAIServer, name: str) -> list[dict]:
    return [r for r in model.requests if r["model"] == name]


async def test_a_long_history_is_summarised_before_the_first_turn_and_the_run_says_so(compacting: Harness) -> None:
    await add_all(compacting.client, "s", conversation(30))
    compacting.model.set_script("summariser", Script.of(say("SUMMARY ONE")))
    events = await collect(compacting.client.run("keeping", "next?", session_id="s"))
    assert_well_formed(events)
    kinds = [e.WhichOneof("payload") for e in events]
    assert kinds[:3] == ["run_started", "history_compacted", "usage_updated"]
    assert kinds[-1] == "run_completed"
    assert events[0].run_started.history_items == 30
    compacted = events[1].history_compacted
    assert (compacted.agent, compacted.summarised_items, compacted.kept_items, compacted.dropped_items) == (
        "keeping", 26, 4, 0
    )
    assert compacted.summary.summary.text == "SUMMARY ONE"
    assert (compacted.summary.summary.summarised_items, compacted.summary.summary.kept_items) == (26, 4)
    assert compacted.summary.name == "sessions/s/items/31" and compacted.summary.sequence == 31
    # The summary call's tokens count in the run's usage.
    assert events[2].usage_updated.model == "summariser"
    assert events[-1].run_completed.usage.requests == 2

    # The summariser read the 26 oldest items as a transcript, under the policy's instructions.
    (summary_request,) = requests_for(compacting.model, "summariser")
    assert summary_request["messages"][0]["role"] == "system"
    text = summary_request["messages"][1]["content"]
    assert "user: m0" in text and "assistant: m25" in text and "m26" not in text
    # The agent's turn got the summary (as context), then the 4 kept items and the input.
    (turn,) = requests_for(compacting.model, "main")
    system = [m["content"] for m in turn["messages"] if m["role"] == "system"]
    assert system == ["Be brief.", "Summary of the earlier conversation (26 items):\nSUMMARY ONE"]
    assert sent_texts(turn) == ["m26", "m27", "m28", "m29", "next?"]

    # The originals stay in the session (the policy keeps them): 30 + summary + input + answer.
    items = await compacting.client.all_items("s")
    assert len(items) == 33 and items[0].message.text == "m0"
    assert items[30].WhichOneof("content") == "summary" and items[30].summary.text == "SUMMARY ONE"


async def test_later_runs_send_the_summary_and_a_second_compaction_folds_the_first(compacting: Harness) -> None:
    await add_all(compacting.client, "s", conversation(30))
    compacting.model.set_script("summariser", Script.of(say("SUMMARY ONE")))
    await collect(compacting.client.run("keeping", "first", session_id="s"))

    # Under the trigger: no compaction; the summary, the kept items and what followed are sent.
    events = await collect(compacting.client.run("keeping", "second", session_id="s"))
    assert "history_compacted" not in [e.WhichOneof("payload") for e in events]
    assert (events[0].run_started.history_items, events[0].run_started.history_omitted) == (7, 26)
    turn = requests_for(compacting.model, "main")[-1]
    assert sent_texts(turn) == ["m26", "m27", "m28", "m29", "first", "ok", "second"]
    assert any("SUMMARY ONE" in (m["content"] or "") for m in turn["messages"] if m["role"] == "system")

    # Over it again: the earlier summary is folded into the new one.
    await compacting.client.add_items("s", conversation(6))
    compacting.model.set_script("summariser", Script.of(say("SUMMARY TWO")))
    events = await collect(compacting.client.run("keeping", "third", session_id="s"))
    compacted = of_kind(events, "history_compacted")[0]
    # Folded: the earlier summary (one item) and the 14 - 4 oldest verbatim items (m26..m29,
    # first, ok, second, ok, m0, m1).
    assert (compacted.summarised_items, compacted.kept_items) == (1 + 10, 4)
    assert compacted.summary.summary.summarised_items == 26 + 10
    summary_input = requests_for(compacting.model, "summariser")[-1]["messages"][1]["content"]
    assert summary_input.startswith("[summary of the 26 earlier items]\nSUMMARY ONE")
    turn = requests_for(compacting.model, "main")[-1]
    assert sent_texts(turn) == ["m2", "m3", "m4", "m5", "third"]
    assert [m["content"] for m in turn["messages"] if m["role"] == "system"][-1].endswith("SUMMARY TWO")


async def test_a_policy_that_drops_originals_leaves_the_summary_and_the_kept_items(compacting: Harness) -> None:
    await add_all(compacting.client, "d", conversation(30))
    compacting.model.set_script("summariser", Script.of(say("SHORT")))
    events = await collect(compacting.client.run("dropping", "go", session_id="d"))
    compacted = of_kind(events, "history_compacted")[0]
    assert (compacted.summarised_items, compacted.kept_items, compacted.dropped_items) == (26, 4, 26)
    items = await compacting.client.all_items("d")
    assert [i.WhichOneof("content") for i in items][:5] == ["message"] * 4 + ["summary"]
    assert [i.message.text for i in items[:4]] == ["m26", "m27", "m28", "m29"]
    assert [i.sequence for i in items] == list(range(27, 34))  # sequences are never reused
    session = await compacting.client.get_session("d")
    assert session.item_count == 7


async def test_a_failing_summariser_leaves_the_history_as_it_was_and_the_run_goes_on(compacting: Harness) -> None:
    await add_all(compacting.client, "f", conversation(30))
    compacting.model.fail_next(1, status=400, message="no such model")
    events = await collect(compacting.client.run("keeping", "go", session_id="f"))
    assert_well_formed(events)
    assert events[-1].WhichOneof("payload") == "run_completed"
    assert "history_compacted" not in [e.WhichOneof("payload") for e in events]
    assert sent_texts(requests_for(compacting.model, "main")[-1]) == [f"m{i}" for i in range(30)] + ["go"]
    assert len(await compacting.client.all_items("f")) == 32


async def test_a_tool_step_is_never_split_between_the_summary_and_the_kept_items(compacting: Harness) -> None:
    from tests.test_history_window import assistant, tool_call, tool_result, user

    # keep_items=4 would keep [result a, result b, "done", "thanks"]: the cut moves after the step.
    items = [*conversation(10), user("weather?"), tool_call("a"), tool_call("b"), tool_result("a"),
             tool_result("b"), assistant("done"), user("thanks")]
    await add_all(compacting.client, "t", items)
    compacting.model.set_script("summariser", Script.of(say("S")))
    events = await collect(compacting.client.run("keeping", "go", session_id="t"))
    compacted = of_kind(events, "history_compacted")[0]
    assert (compacted.summarised_items, compacted.kept_items) == (15, 2)
    turn = requests_for(compacting.model, "main")[-1]
    assert not any(m["role"] == "tool" for m in turn["messages"])
    assert "tool call get_weather [a]" in requests_for(compacting.model, "summariser")[-1]["messages"][1]["content"]


# --- the pure rules --------------------------------------------------------------------------


def test_history_view_puts_the_newest_summary_first_then_its_kept_items() -> None:
    m = [MessageItem("user", f"m{i}") for i in range(6)]
    old = SummaryItem("old", 2, 1)
    new = SummaryItem("new", 5, 2)
    assert history_view(m) == m
    assert history_view([*m[:3], old, *m[3:]]) == [old, m[2], *m[3:]]
    assert history_view([m[0], old, m[1], m[2], new, m[3]]) == [new, m[1], m[2], m[3]]
    # A kept range reaching past the window's start keeps what the window has.
    assert history_view([m[0], SummaryItem("s", 9, 5), m[1]]) == [SummaryItem("s", 9, 5), m[0], m[1]]


def test_plan_compaction_respects_the_trigger_and_folds_an_earlier_summary() -> None:
    policy = Compaction(trigger_items=3, keep_items=1)
    m = [MessageItem("user", f"m{i}") for i in range(4)]
    assert plan_compaction(m[:3], policy) is None
    plan = plan_compaction(m, policy)
    assert plan is not None and (plan.fold, plan.keep, plan.folded_items, plan.summarised_items) == (
        tuple(m[:3]), 1, 3, 3
    )
    earlier = SummaryItem("e", 10, 0)
    plan = plan_compaction([earlier, *m], policy)
    assert plan is not None and plan.fold == (earlier, *m[:3]) and plan.summarised_items == 13
    with pytest.raises(ValueError, match="keep_items"):
        Compaction(trigger_items=3, keep_items=3)
    with pytest.raises(ValueError, match="below history_limit"):
        Agent(name="x", history_limit=10, compaction=Compaction(trigger_items=10, keep_items=1))


def test_the_transcript_cuts_huge_items() -> None:
    text = transcript([ToolCallItem("c", "t", "x" * 10_000), ToolResultItem("c", "t", "y", True)])
    assert "tool call t [c]: " + "x" * 4000 + "… [6000 more characters]" in text
    assert text.endswith("tool result t [c] (error): y")


def test_history_compacted_round_trips_through_the_run_log() -> None:
    payload = ev.HistoryCompacted("a", "s", SummaryItem("sum", 12, 3, "a"), 40, 9, 3, 0)
    assert decode_payload(encode_payload(payload)) == payload


# --- in process: a run taken over after compacting sends the same history ------------------


async def test_a_resumed_run_after_compaction_sends_the_compacted_history() -> None:
    from agentd.server.runtime.tools import function_tool

    @function_tool
    def double(n: int) -> int:
        """Double a number."""
        return n * 2

    class Provider(RecordingProvider):
        def __init__(self, script: Script) -> None:
            super().__init__(script)
            self._scripts["summariser"] = Script.of(say("the gist"))

    agent = Agent(name="main", tools=[double],
                  compaction=Compaction(trigger_items=6, keep_items=2, model="summariser"))
    app = App(agents=[agent])
    prior = [MessageItem("user" if i % 2 == 0 else "assistant", f"m{i}") for i in range(10)]
    script = Script.of(calls(call("double", n=2)), say("4"))
    run = RunInput("run_1", "main", "double 2", session_id="s", request_id="r1")

    store = MemorySessionStore()
    await store.create_session("s")
    await store.append_items("s", prior)
    provider = Provider(script)
    first = Sink()
    await AgentRunner(app, provider, store, InMemoryTraceStore()).run(run, first)
    compacted = [p for p in first.payloads if isinstance(p, ev.HistoryCompacted)]
    assert len(compacted) == 1 and compacted[0].kept_items == 2
    turns = [r for r in provider.requests if len(r) > 1]  # the summariser's request is one transcript item
    expected = [compacted[0].summary, prior[8], prior[9], MessageItem("user", run.input)]
    assert all(r[:4] == expected for r in turns)

    # Take the run over at its first checkpoint (the tool turn) on a copy of the session as it was then.
    cp = first.checkpoints[0]
    fresh = MemorySessionStore()
    await fresh.create_session("s")
    await fresh.append_items("s", prior)
    await fresh.append_items("s", [compacted[0].summary], request_id="run_1/compaction")
    provider = Provider(script)
    resumed = Sink()
    await AgentRunner(app, provider, fresh, InMemoryTraceStore()).run(run, resumed, Resume(2, "lease expired", cp))
    assert isinstance(resumed.payloads[-1], ev.RunCompleted)
    assert not any(isinstance(p, ev.HistoryCompacted) for p in resumed.payloads)
    assert all(r[:4] == expected for r in provider.requests)
