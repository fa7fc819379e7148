"""The agentd command as a person uses it, against a real server."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path

from agentd.server import Script, call, calls, say

ROOT = Path(__file__).resolve().parents[1]


async def agentd(*args: str, cwd: Path = ROOT, env: dict | None = None, timeout: float = 60) -> tuple[int, str, str]:
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentd.cli.main", *args, cwd=cwd, env={**os.environ, "COLUMNS": "200", **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), timeout)
    return process.returncode or 0, out.decode(), err.decode()


async def test_run_streams_steps_and_a_summary(harness):
    conversation = Script.of(
        calls(call("get_weather", city="Paris")),
        calls(call("transfer_to_specialist")),
        say("Paris is sunny today."),
    )
    harness.model.set_script("assistant", conversation)
    harness.model.set_script("specialist", conversation)
    code, out, err = await agentd("run", "assistant", "Weather in Paris?", "--session", "cli-1",
                                  "--target", harness.target)
    assert code == 0, err
    lines = out.splitlines()
    assert any(line.startswith("▶ run run_") and "sessions/cli-1" in line for line in lines)
    assert any('→ get_weather(city="Paris")' in line for line in lines)
    assert any("← get_weather:" in line and '"temperature_c": 21' in line for line in lines)
    assert any("⇢ handoff assistant → specialist" in line for line in lines)
    assert "specialist: Paris is sunny today." in lines
    assert any(line.startswith("✔ completed by specialist") and "3 turn(s)" in line and "tokens" in line
               for line in lines)

    code, out, _ = await agentd("sessions", "show", "cli-1", "--target", harness.target)
    assert code == 0 and "sessions/cli-1 · 6 item(s)" in out and "Paris is sunny today." in out
    code, out, _ = await agentd("sessions", "list", "--target", harness.target)
    assert code == 0 and "sessions/cli-1" in out
    code, out, _ = await agentd("traces", "list", "--target", harness.target)
    assert code == 0 and "agentd run" in out
    trace = (await harness.client.list_traces()).traces[0]
    code, out, _ = await agentd("traces", "list", "--agent", "specialist", "--status", "ok", "--target", harness.target)
    assert code == 0 and trace.trace_id in out and "assistant → specialist" in out
    assert f"{trace.input_tokens}/{trace.output_tokens}" in out
    code, out, _ = await agentd("traces", "list", "--status", "error", "--target", harness.target)
    assert code == 0 and trace.trace_id not in out
    code, out, _ = await agentd("traces", "show", trace.trace_id, "--target", harness.target)
    assert code == 0 and "get_weather" in out and "generation" in out and "tokens in/out" in out
    assert any("handoff" in line and "assistant" in line for line in out.splitlines())
    code, out, _ = await agentd("sessions", "clear", "cli-1", "--target", harness.target)
    assert code == 0 and "removed 6 item(s)" in out


async def test_run_reports_failures_with_a_nonzero_exit(harness):
    harness.model.set_script("assistant", Script.of(*[calls(call("get_weather", city="Rome"))] * 3))
    code, out, _ = await agentd("run", "assistant", "loop", "--max-turns", "1", "--target", harness.target)
    assert code == 1 and "✘ failed (MAX_TURNS_EXCEEDED)" in out
    code, _, err = await agentd("run", "ghost", "hi", "--target", harness.target)
    assert code == 1 and "NOT_FOUND" in err and "ghost" in err


async def test_demo_runs_offline_end_to_end(tmp_path):
    env = {"AGENTD_SQLITE_PATH": str(tmp_path / "demo.db")}
    env_without_key = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentd.cli.main", "demo", cwd=ROOT, env={**env_without_key, **env},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out_b, err_b = await asyncio.wait_for(process.communicate(), 60)
    out = out_b.decode()
    assert process.returncode == 0, err_b.decode()
    assert "→ lookup_order(order_id=\"A-1001\")" in out
    assert "⇢ handoff triage → billing" in out
    assert "← issue_refund: refund of 49.00 EUR" in out
    assert "✔ completed by billing" in out
    assert (tmp_path / "demo.db").exists()


async def test_serve_uses_an_openai_compatible_endpoint_and_drains_on_sigterm(model_server, tmp_path):
    """`agentd serve` with OPENAI_API_KEY/OPENAI_BASE_URL set: same app, real openai client, graceful SIGTERM."""
    import signal
    import socket

    from agentd.client import AgentdClient
    from tests.runs_util import kinds

    conversation = Script.of(calls(call("wait", seconds=1.0, label="drain")), say("finished during drain"))
    model_server.set_script("assistant", conversation)
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OPENAI_API_KEY": "test-key", "OPENAI_BASE_URL": model_server.base_url,
           "AGENTD_SQLITE_PATH": str(tmp_path / "serve.db"), "AGENTD_LOG_FORMAT": "json"}
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "agentd.cli.main", "serve", "--app", "tests.apps:app", "--port", str(port),
        cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with AgentdClient(f"127.0.0.1:{port}") as client:
            for _ in range(200):
                try:
                    await client.list_agents()
                    break
                except Exception:
                    await asyncio.sleep(0.05)
            events = []
            async for event in client.run("assistant", "work while I stop", session_id="drain-1"):
                events.append(event)
                if event.WhichOneof("payload") == "tool_called":
                    process.send_signal(signal.SIGTERM)
        assert kinds(events)[-1] == "run_completed"
        assert events[-1].run_completed.final_output.string_value == "finished during drain"
        assert model_server.requests and model_server.requests[0]["model"] == "assistant"
        code = await asyncio.wait_for(process.wait(), 20)
        assert code == 0
        logs = (await process.stderr.read()).decode().splitlines()
        records = [json.loads(line) for line in logs if line.startswith("{")]
        assert any("shutdown requested" in r["msg"] for r in records)
        assert all({"ts", "level", "logger", "msg"} <= set(r) for r in records)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()


async def test_db_status_and_migrate_against_postgres():
    from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema, raw_connection

    schema = new_schema()
    flags = ("--store", "postgres", "--postgres-url", POSTGRES_URL, "--postgres-schema", schema)
    async with dropped_afterwards(schema):
        code, out, err = await agentd("db", "status", *flags)
        assert code == 0, err
        assert f"schema {schema}" in out and "schema version 0 of" in out and "pending: run `agentd db migrate`" in out

        code, out, err = await agentd("db", "migrate", *flags)
        assert code == 0, err
        assert "(up to date)" in out and "trace archive (postgres): schema up to date" in out
        assert "agent store (postgres): schema version" in out
        code, again, err = await agentd("db", "migrate", *flags)  # idempotent
        assert code == 0 and again == out, err

        raw = await raw_connection()
        try:
            versions = await raw.fetch(f"SELECT version FROM {schema}.schema_version ORDER BY version")
            trace_tables = await raw.fetchval(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = $1 AND table_name LIKE 'trace%'",
                schema,
            )
        finally:
            await raw.close()
        assert [row["version"] for row in versions] == list(range(1, len(versions) + 1)) and versions
        assert trace_tables >= 3  # traces, trace_spans, trace_agents (and their version table)
        # The password never reaches the terminal.
        code, out, err = await agentd("db", "status", "--store", "postgres", "--postgres-schema", schema,
                                      "--postgres-url", "postgresql://agentd:s3cret@127.0.0.1:1/test")
        assert code == 1 and "s3cret" not in out + err and "127.0.0.1:1" in err


async def test_serve_refuses_to_start_without_its_database(tmp_path):
    code, out, err = await agentd("serve", "--port", "0", "--store", "redis", "--redis-url", "redis://127.0.0.1:1/0",
                                  "--model-provider", "scripted", timeout=30)
    assert code == 2
    assert "redis store at redis://127.0.0.1:1/0" in err and "Traceback" not in err


async def test_runs_commands_show_watch_and_approve(harness):
    harness.model.set_script("operator", Script.of(
        calls(call("issue_refund", order_id="A-9", amount_eur=3)),
        say("Refunded."),
    ))
    run = await harness.client.create_run("operator", "refund A-9", session_id="cli-runs")
    run_id = run.name.removeprefix("runs/")
    for _ in range(200):
        info = await harness.client.get_run(run_id)
        if info.required_actions:
            break
        await asyncio.sleep(0.02)
    call_id = info.required_actions[0].item.tool_call.call_id
    code, out, err = await agentd("runs", "list", "cli-runs", "--target", harness.target)
    assert code == 0, err
    assert run.name in out and "requires_action" in out and f"approve issue_refund ({call_id})" in out
    code, out, err = await agentd("runs", "approve", run_id, call_id, "--target", harness.target)
    assert code == 0, err
    code, out, err = await agentd("runs", "watch", run_id, "--target", harness.target)
    assert code == 0, err
    lines = out.splitlines()
    assert any("⏸ waiting for the caller to approve issue_refund" in line and call_id in line for line in lines)
    assert any("← issue_refund: refunded 3.00 EUR for A-9" in line for line in lines)
    assert any(line.startswith("✔ completed by operator") for line in lines)
    code, out, err = await agentd("runs", "show", run_id, "--target", harness.target)
    assert code == 0 and "completed" in out and "Refunded." in out
    code, out, err = await agentd("runs", "cancel", "run_nope", "--target", harness.target)
    assert code == 1 and "NOT_FOUND" in err and "run_nope" in err
