"""Agents from files over the real server: a directory of YAML agents with a handoff between
them serves runs; editing a file changes the next run; a broken file is reported and the old
version keeps serving; SIGHUP reloads at once."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
from pathlib import Path
from typing import AsyncIterator, Callable

import pytest

from agentd.client import AgentdClient
from agentd.server import Script, call, calls, say
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as apb
from tests.conftest import Harness, start_harness
from tests.runs_util import assert_well_formed, collect

ROUTER = """\
name: router
description: Routes questions.
instructions: You route questions from {user}. ({label})
model: router
handoffs: [refunds]
"""

REFUNDS = """\
# One agent per file; this one answers with structured output.
name: refunds
description: Handles refunds.
instructions: You handle refunds.
model: refunds
output_schema:
  type: object
  properties:
    refund_eur: {type: number}
  required: [refund_eur]
  additionalProperties: false
"""


def write(directory: Path, name: str, text: str) -> None:
    """Replace a file atomically (what editors and config management do)."""
    tmp = directory / f".{name}.tmp"
    tmp.write_text(text)
    os.replace(tmp, directory / name)


async def eventually(probe: Callable[[], "asyncio.Future[bool] | object"], timeout_s: float = 10.0) -> bool:
    """Poll an eventually-consistent condition (the files are polled by the server)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        if await probe():  # type: ignore[misc]
            return True
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.02)


@pytest.fixture
async def served(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[tuple[Harness, Path]]:
    directory = tmp_path / "agents"
    directory.mkdir()
    write(directory, "router.yaml", ROUTER.replace("{label}", "first"))
    write(directory, "refunds.yaml", REFUNDS)
    h = await start_harness(model_server, tmp_path, agents_dir=directory, agents_poll_interval_s=0.02)
    model_server.set_script("router", Script.of(calls(call("transfer_to_refunds"))))
    # The conversation refunds gets already holds router's turn (the handoff): its answer is turn 2.
    model_server.set_script("refunds", Script.of(say("(router's turn)"), say('{"refund_eur": 49}')))
    try:
        yield h, directory
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


def system_prompts(model: ScriptedOpenAIServer, name: str) -> list[str]:
    return [m["content"] for r in model.requests if r["model"] == name for m in r["messages"] if m["role"] == "system"]


async def test_yaml_agents_with_a_handoff_serve_runs(served: tuple[Harness, Path]) -> None:
    h, _ = served
    agents = {a.name: a for a in await h.client.list_agents()}
    assert agents["agents/router"].source == apb.AGENT_SOURCE_FILE
    assert agents["agents/router"].handoffs == ["agents/refunds"] and agents["agents/router"].version == 0
    events = await collect(h.client.run("router", "refund please", context={"user": "Ada"}))
    assert_well_formed(events)
    assert [e.handoff.to_agent for e in events if e.WhichOneof("payload") == "handoff"] == ["refunds"]
    done = events[-1].run_completed
    assert done.last_agent == "refunds" and done.final_output.struct_value["refund_eur"] == 49
    assert "You route questions from Ada. (first)" in system_prompts(h.model, "router")


async def test_an_edit_changes_the_next_run_and_a_broken_file_keeps_the_old_version(
    served: tuple[Harness, Path], caplog: pytest.LogCaptureFixture
) -> None:
    h, directory = served
    caplog.set_level(logging.ERROR, logger="agentd.server")

    async def label_is(label: str) -> bool:
        agent = await h.client.get_agent("router")
        return agent.definition.fields["instructions"].string_value.endswith(f"({label})")

    write(directory, "router.yaml", ROUTER.replace("{label}", "second"))
    assert await eventually(lambda: label_is("second"))
    await collect(h.client.run("router", "refund please", context={"user": "Bob"}))
    assert "You route questions from Bob. (second)" in system_prompts(h.model, "router")

    # A broken edit: reported with file, line and field; the last good version keeps serving.
    write(directory, "router.yaml", ROUTER.replace("{label}", "third").replace("handoffs: [refunds]",
                                                                             "handoffs: [nobody]\nmax_turns: 0"))
    assert await eventually(lambda: asyncio.sleep(0, any("router.yaml:" in r.getMessage() for r in caplog.records)))
    messages = "\n".join(r.getMessage() for r in caplog.records)
    assert "router.yaml:5: handoffs[0]" in messages and "max_turns" in messages, messages
    assert await label_is("second")
    events = await collect(h.client.run("router", "refund please", context={"user": "Cy"}))
    assert events[-1].WhichOneof("payload") == "run_completed"

    # A template key the run's context lacks fails the run, saying which.
    events = await collect(h.client.run("router", "refund please"))
    assert events[-1].WhichOneof("payload") == "run_failed" and "user" in events[-1].run_failed.message


async def test_sighup_reloads_the_agent_files_at_once(model_server: ScriptedOpenAIServer, tmp_path: Path) -> None:
    directory = tmp_path / "agents"
    directory.mkdir()
    write(directory, "router.yaml", ROUTER.replace("{label}", "first"))
    write(directory, "refunds.yaml", REFUNDS)
    env = {**os.environ, "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": model_server.base_url,
           "AGENTD_AGENTS_POLL_INTERVAL_S": "3600", "AGENTD_STORE": "memory"}
    ready = tmp_path / "port"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentd.cli.main", "serve", "--port", "0", "--agents-dir", str(directory),
        "--log-format", "text", env=env, stderr=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stderr is not None
        port = None
        while port is None:
            line = (await asyncio.wait_for(proc.stderr.readline(), 30)).decode()
            assert line, "the server exited"
            if "listening on" in line:
                port = int(line.split("listening on ")[1].split(" ")[0].rsplit(":", 1)[1])
        ready.write_text(str(port))
        async with AgentdClient(f"127.0.0.1:{port}") as client:
            write(directory, "router.yaml", ROUTER.replace("{label}", "after the signal"))
            # Polled once an hour: only the signal can make the server read the edit now.
            proc.send_signal(signal.SIGHUP)

            async def reloaded() -> bool:
                agent = await client.get_agent("router")
                return agent.definition.fields["instructions"].string_value.endswith("(after the signal)")

            assert await eventually(reloaded)
    finally:
        proc.terminate()
        await asyncio.wait_for(proc.wait(), 30)
