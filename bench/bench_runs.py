"""agentd benchmark: a real server process with the zero-latency scripted model, driven over gRPC.

Reports time to first event, latency of a 3-step run (tool call → tool output → final
text: two model turns), orchestration overhead per model turn, the same run with a
session on SQLite, Postgres and Redis (the local servers; URLs from AGENTD_TEST_*_URL),
runs/s with 1 and 64 concurrent clients, peak server RSS, and slow event-loop callbacks
(>10 ms) seen by a second server in asyncio debug mode under the same load. Then the same
run over HTTP through the openai client against the zero-latency scripted endpoint
(``python -m agentd.testing``, its own process), per model API: Chat Completions vs the
Responses API (interleaved; per turn = run p50 / 2). Numbers, not pass/fail.

    python bench/bench_runs.py [--runs 500] [--seconds 5]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.client import AgentdClient  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(
    port: int,
    *,
    debug: bool,
    stderr_path: Path,
    store: str = "memory",
    extra_env: dict[str, str] | None = None,
    app: str = "bench.app:app",
    model_provider: str = "scripted",
) -> subprocess.Popen:
    env = {**os.environ, "AGENTD_ASYNCIO_DEBUG": "true" if debug else "false",
           "AGENTD_SQLITE_PATH": str(stderr_path.with_suffix(".db")), **(extra_env or {})}
    if model_provider == "scripted":
        env.pop("OPENAI_API_KEY", None)
    return subprocess.Popen(
        [sys.executable, "-m", "agentd.cli.main", "serve", "--app", app, "--port", str(port),
         "--store", store, "--model-provider", model_provider, "--log-level", "WARNING"],
        cwd=ROOT, env=env, stderr=stderr_path.open("w"), stdout=subprocess.DEVNULL,
    )


def wait_ready(port: int) -> None:
    channel = grpc.insecure_channel(f"127.0.0.1:{port}")
    grpc.channel_ready_future(channel).result(timeout=30)
    channel.close()


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def one_run(
    client: AgentdClient, session_id: str | None = None, agent: str = "bench"
) -> tuple[float, float, int]:
    """(time to first event, total latency, event count) in seconds."""
    started = time.perf_counter()
    first = 0.0
    count = 0
    async for event in client.run(agent, "ping", session_id=session_id):
        if count == 0:
            first = time.perf_counter() - started
        count += 1
        if event.WhichOneof("payload") != "run_completed" and event.WhichOneof("payload") in ("run_failed", "run_cancelled"):
            raise RuntimeError(f"run did not complete: {event}")
    return first, time.perf_counter() - started, count


async def sequential(target: str, runs: int, session: bool) -> dict:
    async with AgentdClient(target) as client:
        for i in range(50):  # warm-up
            await one_run(client, f"warm-{i}" if session else None)
        firsts, totals = [], []
        events = 0
        started = time.perf_counter()
        for i in range(runs):
            first, total, count = await one_run(client, f"s-{i % 50}-{time.time_ns()}" if session else None)
            firsts.append(first)
            totals.append(total)
            events += count
        wall = time.perf_counter() - started
    return {
        "ttfe_p50_ms": pct(firsts, 0.5) * 1e3,
        "ttfe_p99_ms": pct(firsts, 0.99) * 1e3,
        "run_p50_ms": pct(totals, 0.5) * 1e3,
        "run_p99_ms": pct(totals, 0.99) * 1e3,
        "per_turn_p50_ms": pct(totals, 0.5) * 1e3 / 2,
        "runs_per_s": runs / wall,
        "events_per_run": events / runs,
    }


async def interleaved(
    targets: dict[str, str], rounds: int, runs_per_round: int, agents: dict[str, str] | None = None
) -> dict[str, float]:
    """Run p50 per target, alternating between them round by round so that machine noise
    hits every target alike (for overhead comparisons on a shared machine). ``agents``: the
    agent each target runs (default "bench")."""
    totals: dict[str, list[float]] = {name: [] for name in targets}
    clients = {name: AgentdClient(target) for name, target in targets.items()}
    agent = (agents or {}).get
    try:
        for name, client in clients.items():
            for _ in range(50):  # warm-up
                await one_run(client, agent=agent(name, "bench"))
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(runs_per_round):
                    totals[name].append((await one_run(client, agent=agent(name, "bench")))[1])
    finally:
        for client in clients.values():
            await client.close()
    return {name: pct(values, 0.5) * 1e3 for name, values in totals.items()}


async def tracing_overhead(logs: Path, rounds: int) -> dict[str, float]:
    """The same 3-step run on two servers: traces exported over OTLP/gRPC to a loopback
    receiver (in this process), and not exported."""
    receiver_server, receiver, spans = await start_otlp_receiver()
    ports = {"off": free_port(), "otlp": free_port()}
    otlp_env = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    servers = {
        name: start_server(port, debug=False, stderr_path=logs / f"tracing-{name}.log",
                           extra_env=otlp_env if name == "otlp" else {"AGENTD_OTLP_EXPORT": "false"})
        for name, port in ports.items()
    }
    try:
        for port in ports.values():
            wait_ready(port)
        p50 = await interleaved({name: f"127.0.0.1:{port}" for name, port in ports.items()}, rounds, 50)
    finally:
        for server in servers.values():
            server.terminate()
            await asyncio.to_thread(server.wait, 20)  # the receiver lives on this event loop
    await receiver_server.stop(0)
    return {"run_p50_ms_off": p50["off"], "run_p50_ms_otlp": p50["otlp"], "spans_received": float(spans())}


async def start_otlp_receiver() -> tuple[grpc.aio.Server, int, Callable[[], int]]:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    count = 0

    class Receiver(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):  # noqa: N802
            nonlocal count
            count += sum(len(ss.spans) for rs in request.resource_spans for ss in rs.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Receiver(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    return server, port, lambda: count


async def concurrent(target: str, clients: int, seconds: float) -> dict:
    channels = [AgentdClient(target) for _ in range(min(clients, 4))]
    done = 0
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds

    async def worker(index: int) -> None:
        nonlocal done
        client = channels[index % len(channels)]
        while time.perf_counter() < deadline:
            _, total, _ = await one_run(client)
            latencies.append(total)
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(i) for i in range(clients)))
    wall = time.perf_counter() - started
    for client in channels:
        await client.close()
    return {"runs_per_s": done / wall, "run_p50_ms": pct(latencies, 0.5) * 1e3, "run_p99_ms": pct(latencies, 0.99) * 1e3}


def _http_app():  # type: ignore[no-untyped-def]
    """The bench agent on each OpenAI API, for a server whose model is the scripted endpoint."""
    from agentd.server import Agent, App

    from bench.app import echo, echo_async

    tools = [echo_async, echo]
    return App(agents=[
        Agent(name="bench", instructions="Benchmark agent.", tools=tools, model_api="chat_completions"),
        Agent(name="bench_responses", instructions="Benchmark agent.", tools=tools, model_api="responses"),
    ])


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    if name == "http_app":  # built on demand: only the server process that serves it needs agentd.server
        return _http_app()
    raise AttributeError(name)


async def api_comparison(logs: Path, rounds: int) -> dict[str, float]:
    """The 3-step run over HTTP (openai client → scripted endpoint, 0 ms) per model API, on one
    server, interleaved: Chat Completions vs the Responses API."""
    endpoint_port = free_port()
    endpoint = subprocess.Popen(
        [sys.executable, "-m", "agentd.testing", "--app", "bench.app:app", "--port", str(endpoint_port)],
        cwd=ROOT, stdout=subprocess.DEVNULL, stderr=(logs / "endpoint.log").open("w"),
    )
    port = free_port()
    server = None
    try:
        for _ in range(300):  # the endpoint is up when it accepts connections
            with socket.socket() as sock:
                if sock.connect_ex(("127.0.0.1", endpoint_port)) == 0:
                    break
            time.sleep(0.05)
        env = {"OPENAI_API_KEY": "bench", "OPENAI_BASE_URL": f"http://127.0.0.1:{endpoint_port}/v1"}
        server = start_server(port, debug=False, stderr_path=logs / "http-server.log",
                              extra_env=env, app="bench.bench_runs:http_app", model_provider="openai")
        wait_ready(port)
        target = f"127.0.0.1:{port}"
        p50 = await interleaved({"chat_completions": target, "responses": target}, rounds, 50,
                                agents={"chat_completions": "bench", "responses": "bench_responses"})
    finally:
        for process in (server, endpoint):
            if process is not None:
                process.terminate()
                process.wait(timeout=20)
    return {
        "run_p50_ms_chat_completions": p50["chat_completions"],
        "run_p50_ms_responses": p50["responses"],
        "per_turn_p50_ms_chat_completions": p50["chat_completions"] / 2,
        "per_turn_p50_ms_responses": p50["responses"] / 2,
    }


POSTGRES_URL = os.environ.get("AGENTD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGENTD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")


async def drop_namespace(namespace: str) -> None:
    """Remove what the Postgres and Redis passes stored."""
    import asyncpg
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(POSTGRES_URL)
    await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")
    await conn.close()
    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


SLOW = re.compile(r"Executing .* took (\d+\.\d+) seconds")


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=500)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true", help="print one flat JSON object of the figures last")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-"))

    port = free_port()
    server = start_server(port, debug=False, stderr_path=logs / "server.log")
    try:
        wait_ready(port)
        target = f"127.0.0.1:{port}"
        results = {
            "sequential": await sequential(target, args.runs, session=False),
            "sequential_with_session": await sequential(target, args.runs // 2, session=True),
            "concurrency_1": await concurrent(target, 1, args.seconds),
            "concurrency_64": await concurrent(target, 64, args.seconds),
        }
        results["peak_rss_mb"] = peak_rss_mb(server.pid)
    finally:
        server.terminate()
        server.wait(timeout=20)

    namespace = f"bench_runs_{os.getpid()}"
    store_env = {
        "sqlite": {},
        "postgres": {"AGENTD_POSTGRES_URL": POSTGRES_URL, "AGENTD_POSTGRES_SCHEMA": namespace},
        "redis": {"AGENTD_REDIS_URL": REDIS_URL, "AGENTD_REDIS_PREFIX": namespace},
    }
    for store, extra_env in store_env.items():
        port = free_port()
        store_server = start_server(
            port, debug=False, stderr_path=logs / f"{store}-server.log", store=store, extra_env=extra_env
        )
        try:
            wait_ready(port)
            results[f"{store}_with_session"] = await sequential(f"127.0.0.1:{port}", args.runs // 2, session=True)
        finally:
            store_server.terminate()
            store_server.wait(timeout=20)
    await drop_namespace(namespace)

    results["tracing"] = await tracing_overhead(logs, rounds=max(4, args.runs // 50))
    results["model_api_over_http"] = await api_comparison(logs, rounds=max(4, args.runs // 50))

    port = free_port()
    debug_server = start_server(port, debug=True, stderr_path=logs / "debug-server.log")
    try:
        wait_ready(port)
        await concurrent(f"127.0.0.1:{port}", 4, 0.5)  # warm-up: first-call costs are not the steady state
        warm_log_size = (logs / "debug-server.log").stat().st_size
        await concurrent(f"127.0.0.1:{port}", 64, min(args.seconds, 3))
    finally:
        debug_server.terminate()
        debug_server.wait(timeout=20)
    debug_log = (logs / "debug-server.log").read_text()
    results["slow_callbacks_during_warmup"] = len(SLOW.findall(debug_log[:warm_log_size]))
    slow = [float(m.group(1)) for m in SLOW.finditer(debug_log[warm_log_size:])]
    results["slow_callbacks_over_10ms"] = len([s for s in slow if s > 0.010])
    results["slowest_callback_ms"] = max(slow, default=0.0) * 1e3

    seq, ses = results["sequential"], results["sequential_with_session"]
    print(f"agentd bench · {os.cpu_count()} cpu · python {sys.version.split()[0]} · memory store, scripted model (0 ms)")
    print(f"  time to first event      p50 {seq['ttfe_p50_ms']:.2f} ms   p99 {seq['ttfe_p99_ms']:.2f} ms")
    print(f"  3-step run (2 turns)     p50 {seq['run_p50_ms']:.2f} ms   p99 {seq['run_p99_ms']:.2f} ms"
          f"   ({seq['events_per_run']:.0f} events/run)")
    print(f"  overhead per model turn  p50 {seq['per_turn_p50_ms']:.2f} ms (over gRPC, client included)")
    print(f"  same run with a session  p50 {ses['run_p50_ms']:.2f} ms   ttfe p50 {ses['ttfe_p50_ms']:.2f} ms")
    for store in ("sqlite", "postgres", "redis"):
        res = results[f"{store}_with_session"]
        print(f"  …with the {store + ' store':15} p50 {res['run_p50_ms']:.2f} ms   ttfe p50 {res['ttfe_p50_ms']:.2f} ms"
              f"   (history read + 2 step appends{'; runs and events on it too' if store != 'sqlite' else ''})")
    tr = results["tracing"]
    overhead = tr["run_p50_ms_otlp"] / tr["run_p50_ms_off"] - 1
    print(f"  tracing over OTLP        run p50 {tr['run_p50_ms_otlp']:.2f} ms vs {tr['run_p50_ms_off']:.2f} ms off"
          f" ({overhead:+.0%}; interleaved; {tr['spans_received']:.0f} spans received)")
    api = results["model_api_over_http"]
    print(f"  over HTTP, per turn      p50 {api['per_turn_p50_ms_chat_completions']:.2f} ms Chat Completions vs"
          f" {api['per_turn_p50_ms_responses']:.2f} ms Responses API (openai client → scripted endpoint, 0 ms;"
          " interleaved)")
    print(f"  runs/s, 1 client         {results['concurrency_1']['runs_per_s']:.0f}")
    c64 = results["concurrency_64"]
    print(f"  runs/s, 64 clients       {c64['runs_per_s']:.0f}   (run p50 {c64['run_p50_ms']:.1f} ms, p99 {c64['run_p99_ms']:.1f} ms)")
    print(f"  peak server RSS          {results['peak_rss_mb']:.0f} MB")
    print(f"  slow callbacks >10 ms    {results['slow_callbacks_over_10ms']} (slowest {results['slowest_callback_ms']:.1f} ms, asyncio debug, 64 clients, after warm-up;"
          f" {results['slow_callbacks_during_warmup']} during warm-up)")
    out = ROOT / "bench" / "results"
    out.mkdir(exist_ok=True)
    (out / "latest.json").write_text(json.dumps(results, indent=2))
    if args.json:
        print(json.dumps(flatten(results)))


def flatten(results: dict, prefix: str = "") -> dict[str, float]:
    """``{"sequential": {"run_p50_ms": 2.1}}`` as ``{"sequential_run_p50_ms": 2.1}`` (bench/compare.py)."""
    flat: dict[str, float] = {}
    for name, value in results.items():
        if isinstance(value, dict):
            flat.update(flatten(value, f"{prefix}{name}_"))
        elif isinstance(value, (int, float)):
            flat[f"{prefix}{name}"] = value
    return flat


if __name__ == "__main__":
    asyncio.run(main())
