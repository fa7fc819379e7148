"""agentd as a Node caller sees it: tests/node/conformance.mjs (@grpc/grpc-js + @grpc/proto-loader)
against a real server on loopback, one pytest case per check of the Node program.

Needs Node >= 20 and npm on PATH (the test fails, never skips, without them). The Node
dependencies are installed with ``npm ci`` from tests/node/package-lock.json the first time,
and again only when the lockfile changes.
"""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import google.rpc.status_pb2
import pytest

from agentd.server import Script, call, calls, say
from tests.conftest import Harness

REPO = Path(__file__).resolve().parent.parent
NODE_DIR = REPO / "tests" / "node"
PROGRAM = NODE_DIR / "conformance.mjs"
STAMP = NODE_DIR / "node_modules" / ".agentd-lock-sha256"
# The directory holding google/rpc/status.proto and google/rpc/error_details.proto.
RPC_PROTO_INCLUDE = Path(google.rpc.status_pb2.__file__).resolve().parent.parent.parent
MIN_NODE_MAJOR = 20
NODE_TIMEOUT_S = 60

TOOL_OUTPUT = '{"customer": "c-7", "tier": "gold", "via": "node"}'
USER = "Ada from Node"
# agent-api: the customers of the runs of version 1 and 2 of the agent the Node program creates
# (its instructions are "You quote prices for {customer} (v1)." / "(v2)."), its model, and what
# that model answers (the agent's output schema is {sku: string, price_eur: number}).
CUSTOMER_V1 = "Ada Lovelace via Node"
CUSTOMER_V2 = "Grace Hopper via Node"
PRICING_MODEL = "pricing"
PRICING_ANSWER = '{"sku": "A-1", "price_eur": 12.5}'

OPERATOR_SCRIPT = Script.of(
    calls(call("lookup_customer", customer_id="c-7"), call("issue_refund", order_id="A-1", amount_eur=5)),
    say("Refund handled."),
)

# What the scripted model answers for each check (by agent), so every run is deterministic.
SCRIPTS: dict[str, dict[str, Script]] = {
    "stream-run": {"assistant": Script.of(calls(call("get_weather", city="Paris")), say("Sunny in Paris."))},
    "bidi-tool-and-approval": {"operator": OPERATOR_SCRIPT},
    # The wait keeps the run going while the first WatchRun breaks, so the resume reads the live tail.
    "watch-resume": {"assistant": Script.of(calls(call("wait", seconds=0.3, label="node")), say("Done waiting."))},
    "error-agent-not-found-stream": {},
    "error-agent-not-found-unary": {},
    # The first run stays active (its tool waits) until the check cancels it.
    "error-session-busy-stream": {"assistant": Script.of(calls(call("wait", seconds=10, label="busy")), say("late"))},
    "error-session-busy-unary": {"assistant": Script.of(calls(call("wait", seconds=10, label="busy")), say("late"))},
    # Keyed by model: the agent is defined by the Node program, with `"model": "pricing"`.
    "agent-api": {PRICING_MODEL: Script.of(calls(call("price_lookup", sku="A-1")), say(PRICING_ANSWER))},
}


def _node_major(node: str) -> int:
    version = subprocess.run([node, "--version"], capture_output=True, text=True, check=True).stdout.strip()
    return int(version.lstrip("v").split(".")[0])


def _lock_digest() -> str:
    digest = hashlib.sha256()
    for name in ("package.json", "package-lock.json"):
        digest.update((NODE_DIR / name).read_bytes())
    return digest.hexdigest()


@pytest.fixture(scope="module")
def node() -> str:
    """The node binary, with tests/node's dependencies installed from the lockfile."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            f"{'node' if node is None else 'npm'} is not on PATH: tests/test_node_conformance.py runs "
            f"tests/node/conformance.mjs and needs Node >= {MIN_NODE_MAJOR} with npm (https://nodejs.org)"
        )
    major = _node_major(node)
    if major < MIN_NODE_MAJOR:
        pytest.fail(f"Node {major} found at {node}; tests/node needs Node >= {MIN_NODE_MAJOR}")
    # npm ci replaces node_modules: one installer at a time, even across pytest processes.
    lock_path = Path(tempfile.gettempdir()) / f"agentd-node-ci-{hashlib.sha256(str(NODE_DIR).encode()).hexdigest()[:12]}.lock"
    with open(lock_path, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        digest = _lock_digest()
        if not (STAMP.exists() and STAMP.read_text().strip() == digest):
            done = subprocess.run(
                [npm, "ci", "--prefer-offline", "--no-audit", "--no-fund"],
                cwd=NODE_DIR, capture_output=True, text=True, timeout=300,
            )
            if done.returncode != 0:
                pytest.fail(f"npm ci in {NODE_DIR} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}")
            STAMP.write_text(digest + "\n")
    return node


async def run_node(node: str, target: str, *checks: str) -> tuple[int, str]:
    """Runs the Node program against ``target``; its exit code and its stdout + stderr."""
    env = {
        **os.environ,
        "AGENTD_TARGET": target,
        "AGENTD_PROTO_DIR": str(REPO / "protos"),
        "AGENTD_PROTO_INCLUDE": str(RPC_PROTO_INCLUDE),
        "CONFORMANCE_TOOL_OUTPUT": TOOL_OUTPUT,
        "CONFORMANCE_USER": USER,
        "CONFORMANCE_CUSTOMER_V1": CUSTOMER_V1,
        "CONFORMANCE_CUSTOMER_V2": CUSTOMER_V2,
        "CONFORMANCE_AGENT_ANSWER": PRICING_ANSWER,
    }
    proc = await asyncio.create_subprocess_exec(
        node, str(PROGRAM), *checks, cwd=NODE_DIR, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    except asyncio.TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        return -1, out.decode(errors="replace") + f"\n# killed after {NODE_TIMEOUT_S}s"
    return proc.returncode or 0, out.decode(errors="replace")


def _messages(model_requests: list[dict[str, Any]], model: str) -> list[dict[str, Any]]:
    return [m for r in model_requests if r.get("model") == model for m in r.get("messages") or []]


def _text(message: dict[str, Any]) -> str:
    content = message.get("content")
    return content if isinstance(content, str) else json.dumps(content)


def _system_prompt(request: dict[str, Any]) -> str:
    return "\n".join(_text(m) for m in request.get("messages") or [] if m.get("role") in ("system", "developer"))


@pytest.mark.parametrize("check", list(SCRIPTS))
async def test_node_client(check: str, node: str, harness: Harness) -> None:
    for agent, script in SCRIPTS[check].items():
        harness.model.set_script(agent, script)
    code, output = await run_node(node, harness.target, check)
    assert code == 0 and f"ok - {check}" in output.splitlines(), (
        f"node conformance.mjs {check} exited {code}:\n{output}"
    )
    # What the model saw, from the scripted model's side of the wire.
    if check == "stream-run":
        system = [_text(m) for m in _messages(harness.model.requests, "assistant") if m.get("role") in ("system", "developer")]
        assert any(f"You help {USER}." in text for text in system), (
            f"the run context sent with toStruct() did not reach the instructions: {system}"
        )
    elif check == "bidi-tool-and-approval":
        tool_results = [m for m in _messages(harness.model.requests, "operator") if m.get("role") == "tool"]
        assert TOOL_OUTPUT in [_text(m) for m in tool_results], (
            f"the model never saw the caller's tool output: {tool_results}"
        )
    elif check == "agent-api":
        requests = [r for r in harness.model.requests if r.get("model") == PRICING_MODEL]
        prompts = [_system_prompt(r) for r in requests]
        v1, v2 = f"You quote prices for {CUSTOMER_V1} (v1).", f"You quote prices for {CUSTOMER_V2} (v2)."
        assert v1 in prompts and v2 in prompts, f"the two versions' instructions were not both used: {prompts}"
        # Each run's turn after the tool answer (for the first run: after the update) kept its version.
        answered = {_system_prompt(r) for r in requests if any(m.get("role") == "tool" for m in r.get("messages") or [])}
        assert answered == {v1, v2}, f"the turns after the tool outputs used: {answered}"
