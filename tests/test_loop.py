"""The agent loop in process: built-in scripted model, memory store, recording sink."""

from __future__ import annotations

import asyncio
import dataclasses
from dataclasses import dataclass, field

from agentd.server import Agent, App, Script, call, calls, function_tool, say
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.runtime import events as ev
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.runtime.items import MessageItem, ToolCallItem, ToolResultItem
from agentd.server.runtime.run_loop import AgentRunner, RunInput, Resume
from agentd.server.sessions.memory import MemorySessionStore
from agentd.server.tracing.memory import InMemoryTraceStore


@dataclass
class ListSink:
    trace_id: str = ""
    cancel_reason: str = ""
    payloads: list = field(default_factory=list)
    checkpoints: list = field(default_factory=list)
    actions: dict = field(default_factory=dict)  # the caller's answers, by action key

    def emit(self, payload) -> None:
        self.payloads.append(payload)

    async def checkpoint(self, checkpoint) -> None:
        self.checkpoints.append(checkpoint)

    async def wait_action(self, key: str) -> dict:
        while key not in self.actions:
            await asyncio.sleep(0.005)
        return self.actions[key]

    def of(self, kind: type) -> list:
        return [p for p in self.payloads if isinstance(p, kind)]


@function_tool
def double(n: int) -> int:
    """Double a number."""
    return n * 2


helper = Agent(name="helper", instructions="helper", tools=[double])
main = Agent(name="main", instructions=lambda ctx, agent: f"main for {ctx.context.get('who')}", tools=[double],
             handoffs=[helper])
app = App(agents=[main])


def runner(script: Script, store=None) -> tuple[AgentRunner, MemorySessionStore, InMemoryTraceStore]:
    store = store or MemorySessionStore()
    traces = InMemoryTraceStore()
    return AgentRunner(app, ScriptedProvider(default=script), store, traces, tool_timeout_s=1), store, traces


async def test_loop_runs_tools_hands_off_and_completes():
    script = Script.of(
        calls(call("double", n=2), call("double", n=5)),
        calls(call("transfer_to_helper")),
        say("Twice 2 is 4 and twice 5 is 10."),
    )
    loop, store, traces = runner(script)
    sink = ListSink()
    await loop.run(RunInput("run_1", "main", "double 2 and 5", session_id="s", context={"who": "me"}), sink)
    kinds = [type(p).__name__ for p in sink.payloads]
    assert kinds[0] == "RunStarted" and kinds[-1] == "RunCompleted"
    assert [o.item.output for o in sink.of(ev.ToolOutput) if o.item.tool_name == "double"] == ["4", "10"]
    assert sink.of(ev.Handoff) == [ev.Handoff("main", "helper", sink.of(ev.Handoff)[0].call_id)]
    done = sink.of(ev.RunCompleted)[0]
    assert done.last_agent == "helper" and done.turns == 3 and done.usage.requests == 3
    assert "".join(d.text for d in sink.of(ev.TextDelta)) == done.final_output
    # The session holds whole steps in order: input, calls with their results, handoff, answer.
    history = await store.read_history("s")
    assert [type(i).__name__ for i in history] == [
        "MessageItem", "ToolCallItem", "ToolCallItem", "ToolResultItem", "ToolResultItem",
        "ToolCallItem", "ToolResultItem", "MessageItem",
    ]
    assert history[0] == MessageItem("user", "double 2 and 5")
    assert isinstance(history[5], ToolCallItem) and history[5].tool_name == "transfer_to_helper"
    assert history[-1].agent == "helper"
    trace = traces.get_trace(sink.trace_id)
    assert trace is not None and trace.end_ns and not trace.error


async def test_loop_reports_store_failures_instead_of_dropping_items():
    class BrokenStore(MemorySessionStore):
        async def append_items(self, session_id, items, request_id=None):
            raise StoreUnavailableError("disk full")

    loop, _, _ = runner(Script.of(say("hello")), store=BrokenStore())
    sink = ListSink()
    await loop.run(RunInput("run_2", "main", "hi", session_id="s"), sink)
    failed = sink.payloads[-1]
    assert isinstance(failed, ev.RunFailed)
    assert failed.code is ev.RunErrorCode.SESSION_UNAVAILABLE and "disk full" in failed.message
    assert not sink.of(ev.RunCompleted)


async def test_loop_retries_a_save_whose_reply_was_lost_without_duplicating():
    class LostReplyStore(MemorySessionStore):
        """Commits, then fails the first append: a connection dropped after COMMIT."""

        def __init__(self) -> None:
            super().__init__()
            self.attempts: list[str | None] = []

        async def append_items(self, session_id, items, request_id=None):
            self.attempts.append(request_id)
            stored = await super().append_items(session_id, items, request_id)
            if len(self.attempts) == 1:
                raise StoreUnavailableError("connection lost while committing")
            return stored

    store = LostReplyStore()
    loop, _, _ = runner(Script.of(say("hello")), store=store)
    sink = ListSink()
    await loop.run(RunInput("run_9", "main", "hi", session_id="s"), sink)
    assert isinstance(sink.payloads[-1], ev.RunCompleted)
    assert store.attempts == ["run_9/1", "run_9/1"]  # the retry carries the same step id
    assert await store.read_history("s") == [MessageItem("user", "hi"), MessageItem("assistant", "hello", "main")]


async def test_loop_cancellation_emits_one_cancelled_event():
    loop, store, _ = runner(Script.of(say("slow", delay_s=10)))
    sink = ListSink()
    task = asyncio.create_task(loop.run(RunInput("run_3", "main", "hi", session_id="s"), sink))
    await asyncio.sleep(0.05)
    sink.cancel_reason = "test"
    task.cancel()
    await asyncio.wait_for(task, 1)  # the loop absorbs the cancellation and ends normally
    assert isinstance(sink.payloads[-1], ev.RunCancelled) and sink.payloads[-1].reason == "test"
    assert await store.read_history("s") == []


async def test_failing_dynamic_instructions_fail_the_run_as_internal():
    def broken(ctx, agent):
        raise LookupError("no tenant")

    bad = Agent(name="bad", instructions=broken)
    loop = AgentRunner(App(agents=[bad]), ScriptedProvider(default=Script.of(say("x"))), MemorySessionStore(),
                       InMemoryTraceStore())
    sink = ListSink()
    await loop.run(RunInput("run_4", "bad", "hi"), sink)
    failed = sink.payloads[-1]
    assert isinstance(failed, ev.RunFailed) and failed.code is ev.RunErrorCode.INTERNAL
    assert "LookupError" in failed.message and "no tenant" not in failed.message  # the text stays in the log


async def test_a_second_handoff_in_one_turn_is_refused_to_the_model():
    other = Agent(name="other", instructions="o")
    router = Agent(name="router", instructions="r", handoffs=[helper, other])
    script = Script.of(calls(call("transfer_to_helper"), call("transfer_to_other")), say("done"))
    loop = AgentRunner(App(agents=[router]), ScriptedProvider(default=script), MemorySessionStore(),
                       InMemoryTraceStore())
    sink = ListSink()
    await loop.run(RunInput("run_5", "router", "route"), sink)
    results = {o.item.tool_name: o.item for o in sink.of(ev.ToolOutput)}
    assert not results["transfer_to_helper"].is_error
    assert results["transfer_to_other"].is_error and "only the first handoff" in results["transfer_to_other"].output
    assert sink.of(ev.RunCompleted)[0].last_agent == "helper"
    assert isinstance(results["transfer_to_helper"], ToolResultItem)


async def test_resuming_from_any_checkpoint_finishes_the_run_the_same_way():
    """A replica that dies after any checkpoint — before or after that step reached the session —
    is replaced by one that finishes with the same output and the same session, no item twice."""
    script = Script.of(
        calls(call("double", n=2), call("double", n=5)),
        calls(call("transfer_to_helper")),
        say("Twice 2 is 4 and twice 5 is 10."),
    )
    loop, store, _ = runner(script)
    sink = ListSink()
    run = RunInput("run_1", "main", "double 2 and 5", session_id="s", context={"who": "me"})
    await loop.run(run, sink)
    expected_output = sink.of(ev.RunCompleted)[0].final_output
    expected_history = await store.read_history("s")
    # A checkpoint after each model turn that asked for tools, and after each completed step.
    assert [(cp.turns, bool(cp.pending)) for cp in sink.checkpoints] == [
        (1, True), (1, False), (2, True), (2, False), (3, False)
    ]
    assert [cp.agent for cp in sink.checkpoints] == ["main", "main", "main", "helper", "helper"]
    assert sink.checkpoints[-1].done and sink.checkpoints[-1].final_output == expected_output

    for cp in sink.checkpoints:
        for step_saved in (False, True) if cp.step_items else (False,):
            fresh = MemorySessionStore()
            await fresh.read_history("s", create=True)  # the first execution created it
            # What the crash left in the session: every run item but the unsaved ones and, unless it
            # was saved, the checkpointed step.
            earlier = list(cp.run_items[: len(cp.run_items) - len(cp.step_items) - len(cp.unsaved)])
            if earlier:
                await fresh.append_items("s", earlier)
            if step_saved:
                await fresh.append_items("s", list(cp.step_items), request_id=cp.step_request_id)
            resumed_loop, _, _ = runner(script, fresh)
            resumed = ListSink()
            await resumed_loop.run(run, resumed, Resume(2, "taken over", cp))
            assert resumed.payloads[0] == ev.RunResumed(2, "taken over", cp.turns)
            done = resumed.of(ev.RunCompleted)
            assert done and done[0].final_output == expected_output, (cp.turns, step_saved, resumed.payloads[-1])
            assert done[0].turns == 3 and done[0].last_agent == "helper"
            history = await fresh.read_history("s")
            # Turns after the checkpoint are asked again, so their call ids are new; nothing else differs.
            assert _without_call_ids(history) == _without_call_ids(expected_history)
            assert history[: len(cp.run_items)] == list(cp.run_items)
            if cp.pending:
                # Calls whose tools had not finished run again with the same call ids.
                pending_ids = [i.call_id for i in cp.pending if isinstance(i, ToolCallItem)]
                rerun = [o.item.call_id for o in resumed.of(ev.ToolOutput)][: len(pending_ids)]
                assert sorted(rerun) == sorted(pending_ids)
                # They were announced before the checkpoint, so they are not announced again.
                assert all(p.item.call_id not in pending_ids for p in resumed.of(ev.ToolCalled))


def _without_call_ids(items: list) -> list:
    return [dataclasses.replace(i, call_id="") if hasattr(i, "call_id") else i for i in items]


async def test_a_run_waiting_for_the_caller_resumes_with_the_answers_it_already_has():
    """A takeover while a run waits for a caller-executed tool and an approval: the new execution
    re-announces the calls (same call ids) and goes on with the answers already given."""

    @function_tool(caller_executed=True)
    def crm(customer: str) -> str:
        """Caller's CRM lookup."""
        raise AssertionError("never runs here")

    executed: list[str] = []

    @function_tool(needs_approval=True)
    def refund(order: str) -> str:
        """Refund an order."""
        executed.append(order)
        return f"refunded {order}"

    agent = Agent(name="ops", instructions="ops", tools=[crm, refund])
    ops_app = App(agents=[agent])
    script = Script.of(calls(call("crm", customer="c1"), call("refund", order="A-1")), say("done"))
    loop = AgentRunner(ops_app, ScriptedProvider(default=script), MemorySessionStore(), InMemoryTraceStore(),
                       tool_timeout_s=1)
    first = ListSink()
    run = RunInput("run_w", "ops", "help c1")
    task = asyncio.create_task(loop.run(run, first))
    while len(first.of(ev.ActionRequired)) < 2:
        await asyncio.sleep(0.005)
    task.cancel()  # the replica dies while waiting
    await asyncio.gather(task, return_exceptions=True)
    waiting = next(cp for cp in first.checkpoints if cp.pending)
    calls_ = {i.tool_name: i.call_id for i in waiting.pending if isinstance(i, ToolCallItem)}
    assert set(waiting.awaiting) == {f"output:{calls_['crm']}", f"approval:{calls_['refund']}"}
    assert executed == []

    resumed = ListSink(actions={f"output:{calls_['crm']}": {"output": "gold", "is_error": False},
                                f"approval:{calls_['refund']}": {"approved": True, "reason": ""}})
    await loop.run(run, resumed, Resume(2, "taken over", waiting))
    assert {a.item.call_id for a in resumed.of(ev.ActionRequired)} == set(calls_.values())
    outputs = {o.item.tool_name: o.item for o in resumed.of(ev.ToolOutput)}
    assert outputs["crm"].output == "gold" and outputs["crm"].call_id == calls_["crm"]
    assert outputs["refund"].output == "refunded A-1" and executed == ["A-1"]
    assert resumed.of(ev.RunCompleted)[0].final_output == "done"
