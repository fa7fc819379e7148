"""Terminal views that fit a terminal: `traces list`, `traces show` and `sessions show` at 80 and 200 columns.

Run as a person runs them: the agentd command in a subprocess against a real server, its output piped
(not a terminal), the width given by COLUMNS.
"""

from __future__ import annotations

import asyncio
import io
from dataclasses import dataclass

import pytest
from rich.cells import cell_len

from agentd.server import Script, call, calls, say
from agentd.v1 import trace_service_pb2
from tests.test_cli import agentd

# Ids set through a W3C traceparent, so that two traces share a known prefix.
TRACE_A = "feedc0de1" + "0" * 23
TRACE_B = "feedc0de2" + "0" * 23
SESSION = "views-session-with-a-long-identifier-that-still-must-print-whole"
BLOCKS = set("█░")


@dataclass
class Views:
    target: str
    spans: list[trace_service_pb2.Span]
    run_id: str


def traceparent(trace_id: str) -> list[tuple[str, str]]:
    return [("traceparent", f"00-{trace_id}-{'1' * 16}-01")]


@pytest.fixture
async def views(harness) -> Views:
    """Two traces: A, a handoff between two agents in a session with long messages; B, one short reply."""
    conversation = Script.of(  # turns count over the whole conversation, so both agents follow one script
        calls(call("get_weather", city="Paris")),
        calls(call("transfer_to_specialist")),
        say("Paris is sunny today, with a light breeze from the west and a high of twenty-one degrees; "
            "tomorrow brings clouds in the morning and showers later."),
    )
    harness.model.set_script("assistant", conversation)
    harness.model.set_script("specialist", conversation)
    async for _ in harness.client.run("assistant", "What is the weather in Paris this week?", session_id=SESSION,
                                      workflow_name="weather lookup for the views test", group_id="views-group",
                                      metadata=traceparent(TRACE_A)):
        pass
    harness.model.set_script("assistant", Script.of(say("Hello.")))
    async for _ in harness.client.run("assistant", "hi", metadata=traceparent(TRACE_B)):
        pass
    trace = await harness.client.get_trace(TRACE_A)
    return Views(harness.target, list(trace.spans), trace.trace.run_id)


async def view(target: str, width: int, *args: str) -> list[str]:
    code, out, err = await agentd(*args, "--target", target, env={"COLUMNS": str(width)})
    assert code == 0, err
    lines = out.splitlines()
    too_long = [line for line in lines if cell_len(line) > width]
    assert not too_long, f"lines wider than {width}:\n" + "\n".join(too_long)
    return lines


def words(lines: list[str]) -> set[str]:
    """The words of a view, less bars and rules, whose length follows the width."""
    return {word for line in lines for word in line.split() if not set(word) <= BLOCKS | {"─"}}


def assert_no_broken_words(narrow: list[str], wide: list[str]) -> None:
    """Every word of the narrow view is a whole word of the wide one, or one cut with an ellipsis:
    a cell wrapped mid-word would leave fragments that the wide view does not have."""
    whole = words(wide)
    for word in words(narrow):
        if word.endswith("…"):
            assert any(w.startswith(word[:-1]) for w in whole), word
        else:
            assert word in whole, f"{word!r} is not a whole word of the wide view"


def bar_start(line: str) -> int:
    return min(line.index(block) for block in BLOCKS if block in line)


async def test_traces_list_fits_and_keeps_ids_whole(views: Views):
    wide, narrow = await asyncio.gather(view(views.target, 200, "traces", "list"),
                                        view(views.target, 80, "traces", "list"))
    for lines in (wide, narrow):
        rows = [line for line in lines if TRACE_A in line.split() or TRACE_B in line.split()]
        assert len(rows) == 2 and len(lines) == 3 + len(rows), "\n".join(lines)  # title, header, rule: no wraps
        assert "assistant → specialist" in rows[1] and "ok" in rows[1].split()
    assert "weather lookup for the views test" in wide[4] and "tokens in/out" in wide[1]  # newest (B) first
    assert_no_broken_words(narrow, wide)


async def test_traces_show_draws_a_waterfall_that_fits(views: Views):
    wide, narrow = await asyncio.gather(view(views.target, 200, "traces", "show", TRACE_A),
                                        view(views.target, 80, "traces", "show", TRACE_A))
    parents = {span.span_id: index for index, span in enumerate(views.spans)}
    for lines in (wide, narrow):
        text = "\n".join(lines)
        assert TRACE_A in text.split() and views.run_id in text.split(), text
        rows = [line for line in lines if BLOCKS & set(line)]
        assert len(rows) == len(views.spans), text  # one line per span: no cell wrapped
        starts = [bar_start(row) for row in rows]
        assert starts == sorted(starts), text  # spans come in start order, so do their bars
        for index, span in enumerate(views.spans):
            kind = trace_service_pb2.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_").lower()
            assert kind in rows[index].split(), rows[index]
            agent = span.attributes.fields.get("agent") or span.attributes.fields.get("from_agent")
            if agent is not None:
                assert agent.string_value in rows[index].split(), rows[index]
            if span.parent_span_id in parents:
                assert starts[index] >= starts[parents[span.parent_span_id]], text
        root = rows[0]
        assert "run" in root.split() and root.rstrip().endswith("█"), root  # the run spans the whole axis
        rule = next(index for index, line in enumerate(lines) if set(line) == {"─"})
        assert {"span", "agent", "duration"} <= set(lines[rule - 1].split()) and lines[rule + 1] == rows[0]
    assert "tokens in/out" in "\n".join(wide) and "generation" in "\n".join(narrow)
    handoff = next(row for row in narrow if "handoff" in row.split())
    assert "assistant" in handoff.split() and "→ specialist" in handoff
    assert max(map(len, wide)) > 120  # a wide terminal gets a longer time axis
    assert_no_broken_words(narrow, wide)


async def test_sessions_show_wraps_only_between_words(views: Views):
    wide, narrow = await asyncio.gather(view(views.target, 200, "sessions", "show", SESSION),
                                        view(views.target, 80, "sessions", "show", SESSION))
    for lines in (wide, narrow):
        assert f"sessions/{SESSION}" in "\n".join(lines).split()
    assert len(wide) == 3 + 6, "\n".join(wide)  # title, header, rule and six items, one line each
    assert len(narrow) > len(wide)  # the title and the long reply wrapped
    assert_no_broken_words(narrow, wide)
    assert any("twenty-one" in line.split() for line in narrow)


async def test_traces_show_takes_a_unique_prefix(views: Views):
    (code, out, err), ambiguous, unknown = await asyncio.gather(
        agentd("traces", "show", TRACE_A[:9], "--target", views.target),
        agentd("traces", "show", "feedc0de", "--target", views.target),
        agentd("traces", "show", "0badf00d", "--target", views.target),
    )
    assert code == 0, err
    assert f"trace {TRACE_A}" in out and "generation" in out
    code, out, err = ambiguous
    assert code == 1 and not out
    assert "'feedc0de' is ambiguous: 2 trace ids start with it" in err and TRACE_A in err and TRACE_B in err
    code, out, err = unknown
    assert code == 1 and not out and "no trace id starts with '0badf00d'" in err


async def test_traces_show_prints_a_failed_spans_message_whole(harness):
    harness.model.set_script("assistant", Script.of(*[calls(call("get_weather", city="Rome"))] * 3))
    async for _ in harness.client.run("assistant", "loop", max_turns=1, metadata=traceparent(TRACE_A)):
        pass
    spans = (await harness.client.get_trace(TRACE_A)).spans
    failed = [span for span in spans if span.error_message]
    assert failed
    lines = await view(harness.target, 80, "traces", "show", TRACE_A)
    rows = [line for line in lines if BLOCKS & set(line)]
    assert len(rows) == len(spans)  # the message is not squeezed into a cell
    assert sum("✘" in row.split() for row in rows) == len(failed)
    notes = " ".join(lines[lines.index(rows[-1]) + 1:])
    for span in failed:
        assert f"✘ {trace_service_pb2.SpanKind.Name(span.kind).removeprefix('SPAN_KIND_').lower()} {span.name}: " \
               f"{span.error_message}" in notes


def test_output_that_is_not_a_terminal_gets_columns_or_80():
    """rich would take the width of whichever of stdin/stdout/stderr is a terminal; piped output gets one width."""
    from agentd.cli.table import terminal_width

    assert terminal_width(io.StringIO(), {}) == 80
    assert terminal_width(io.StringIO(), {"COLUMNS": "123"}) == 123
    assert terminal_width(io.StringIO(), {"COLUMNS": "wide"}) == 80
