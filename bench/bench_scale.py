"""agentd at scale against a model with real latency, beside a raw HTTP client doing the same calls.

A scripted OpenAI-compatible endpoint (``python -m agentd.testing``, its own process) answers
like a hosted model: ``--first-token-s`` before the first chunk, then ``--chunks`` text
chunks ``--chunk-interval-s`` apart. Each run is the bench agent's two model turns: a tool
call, the tool's output, a streamed answer.

* **at scale**: ``--runs`` runs at once on one agentd replica (memory store, the openai
  client over HTTP), driven over gRPC from this process; then a raw aiohttp client making the
  same two streamed calls per run, ``--runs`` at once. Wall time of each, agentd's
  ``run_started`` latency (p50/p99), and the server's memory per in-flight run (RSS growth
  under load / runs). ``--ramp-s`` starts the runs evenly over that many seconds instead
  (all of them still in flight together when it is shorter than a run).
* **one at a time**, against a zero-latency endpoint: a run's p50 against the raw client's two
  calls, and time to first event beside the same server with the in-process scripted model.

Phases alternate (raw, agentd, raw, agentd...) over ``--rounds`` so machine noise hits both.
Numbers and ratios, not pass/fail.

    python bench/bench_scale.py [--runs 1000] [--first-token-s 1] [--chunks 20] [--chunk-interval-s 0.02]
                                [--api chat_completions|responses] [--ramp-s 0] [--rounds 1] [--json]

``agentd`` is imported from wherever it resolves (``PYTHONPATH`` selects a revision, as
``bench/compare.py`` does); the scripted endpoint always runs from this tree.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Awaitable, Callable, TypeVar

import aiohttp

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.client import AgentdClient  # noqa: E402

from bench.bench_runs import free_port, pct, start_server, wait_ready  # noqa: E402

T = TypeVar("T")
# This tree's packages: the harness (scripted endpoint) always runs from here.
HARNESS_PATH = os.pathsep.join(str(ROOT / part) for part in ("server", "client", "generated", ""))
AGENTS = {"chat_completions": "bench", "responses": "bench_responses"}
TOOL = {
    "type": "function",
    "function": {"name": "echo_async", "description": "Return the text unchanged (async).",
                 "parameters": {"type": "object", "properties": {"text": {"type": "string"}}, "required": ["text"]}},
}


def start_endpoint(port: int, logs: Path, first_token_s: float, chunk_interval_s: float) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": HARNESS_PATH}
    process = subprocess.Popen(
        [sys.executable, "-m", "agentd.testing", "--app", "bench.app:scale_app", "--port", str(port),
         "--first-token-s", str(first_token_s), "--chunk-interval-s", str(chunk_interval_s)],
        cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=(logs / f"endpoint-{port}.log").open("w"),
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        with socket.socket() as sock:
            if sock.connect_ex(("127.0.0.1", port)) == 0:
                return process
        if process.poll() is not None:
            break
        time.sleep(0.05)
    raise RuntimeError(f"the scripted endpoint did not start; see {logs}")


# -- the raw client: the least any client must do for the same two calls ------------------


async def _stream_chat(session: aiohttp.ClientSession, url: str, messages: list[dict[str, Any]]) -> dict[str, Any]:
    """POST one streamed chat completion and assemble it: text, tool calls, usage."""
    body = {"model": "bench", "messages": messages, "stream": True, "stream_options": {"include_usage": True},
            "tools": [TOOL]}
    text: list[str] = []
    calls: dict[int, dict[str, Any]] = {}
    async with session.post(url, json=body, headers={"Authorization": "Bearer bench"}) as response:
        response.raise_for_status()
        async for line in response.content:
            if not line.startswith(b"data: "):
                continue
            data = line[6:].strip()
            if data == b"[DONE]":
                break
            chunk = json.loads(data)
            for choice in chunk.get("choices") or ():
                delta = choice.get("delta") or {}
                if delta.get("content"):
                    text.append(delta["content"])
                for piece in delta.get("tool_calls") or ():
                    call = calls.setdefault(piece["index"], {"id": "", "name": "", "arguments": []})
                    call["id"] = piece.get("id") or call["id"]
                    function = piece.get("function") or {}
                    call["name"] = function.get("name") or call["name"]
                    call["arguments"].append(function.get("arguments") or "")
    return {"text": "".join(text), "calls": [calls[i] for i in sorted(calls)]}


async def raw_run(session: aiohttp.ClientSession, url: str) -> None:
    """The bench agent's run, by hand: a tool-call turn, the tool's output, the answer."""
    messages: list[dict[str, Any]] = [{"role": "system", "content": "Benchmark agent."},
                                      {"role": "user", "content": "ping"}]
    first = await _stream_chat(session, url, messages)
    call = first["calls"][0]
    arguments = "".join(call["arguments"])
    messages.append({"role": "assistant", "content": None, "tool_calls": [
        {"id": call["id"], "type": "function", "function": {"name": call["name"], "arguments": arguments}}]})
    messages.append({"role": "tool", "tool_call_id": call["id"], "content": json.loads(arguments)["text"]})
    answer = await _stream_chat(session, url, messages)
    if not answer["text"]:
        raise RuntimeError("the raw client got no answer")


def _raw_session() -> aiohttp.ClientSession:
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0), timeout=aiohttp.ClientTimeout(total=300))


async def started_over(ramp_s: float, count: int, start: Callable[[int], Awaitable[T]]) -> list[T]:
    """``start(i)`` for i in 0..count-1, all at once (``ramp_s`` 0) or spread evenly over ``ramp_s`` seconds."""
    if ramp_s <= 0:
        return list(await asyncio.gather(*(start(i) for i in range(count))))

    async def later(i: int) -> T:
        await asyncio.sleep(ramp_s * i / count)
        return await start(i)

    return list(await asyncio.gather(*(later(i) for i in range(count))))


async def raw_at_scale(endpoint: str, endpoint_pid: int, runs: int, ramp_s: float) -> tuple[float, float, float]:
    """(wall seconds, the client's and the endpoint's CPU ms per run)."""
    async with _raw_session() as session:
        url = f"{endpoint}/chat/completions"
        cpu_before = cpu_s(os.getpid()), cpu_s(endpoint_pid)
        started = time.perf_counter()
        await started_over(ramp_s, runs, lambda _: raw_run(session, url))
        wall = time.perf_counter() - started
        cpu_after = cpu_s(os.getpid()), cpu_s(endpoint_pid)
        return wall, (cpu_after[0] - cpu_before[0]) / runs * 1e3, (cpu_after[1] - cpu_before[1]) / runs * 1e3


async def raw_one_at_a_time(endpoint: str, runs: int) -> list[float]:
    async with _raw_session() as session:
        url = f"{endpoint}/chat/completions"
        for _ in range(20):
            await raw_run(session, url)
        totals = []
        for _ in range(runs):
            started = time.perf_counter()
            await raw_run(session, url)
            totals.append(time.perf_counter() - started)
        return totals


# -- agentd ---------------------------------------------------------------------------------


async def agentd_run(client: AgentdClient, agent: str) -> tuple[float, float]:
    """(seconds to run_started, seconds to the end) of one run."""
    started = time.perf_counter()
    first = 0.0
    async for event in client.run(agent, "ping"):
        kind = event.WhichOneof("payload")
        if kind == "run_started":
            first = time.perf_counter() - started
        elif kind in ("run_failed", "run_cancelled"):
            raise RuntimeError(f"run did not complete: {event}")
    return first, time.perf_counter() - started


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


class RssSampler:
    """The server's largest RSS while a load runs (a thread reading /proc every 20 ms)."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak_kb = rss_kb(pid)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.wait(0.02):
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))

    def __enter__(self) -> "RssSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


async def agentd_at_scale(
    target: str, pid: int, endpoint_pid: int, runs: int, agent: str, ramp_s: float
) -> dict[str, float]:
    clients = [AgentdClient(target) for _ in range(8)]
    try:
        await asyncio.gather(*(agentd_run(client, agent) for client in clients))  # channels up
        before_kb = rss_kb(pid)
        cpu_before = cpu_s(pid), cpu_s(endpoint_pid), cpu_s(os.getpid())
        with RssSampler(pid) as sampler:
            started = time.perf_counter()
            results = await started_over(ramp_s, runs, lambda i: agentd_run(clients[i % len(clients)], agent))
            wall = time.perf_counter() - started
        cpu_after = cpu_s(pid), cpu_s(endpoint_pid), cpu_s(os.getpid())
    finally:
        for client in clients:
            await client.close()
    firsts = [first for first, _ in results]
    return {
        "wall_s": wall,
        "run_started_p50_ms": pct(firsts, 0.5) * 1e3,
        "run_started_p99_ms": pct(firsts, 0.99) * 1e3,
        "kb_per_run": (sampler.peak_kb - before_kb) / runs,
        "server_cpu_ms_per_run": (cpu_after[0] - cpu_before[0]) / runs * 1e3,
        "endpoint_cpu_ms_per_run": (cpu_after[1] - cpu_before[1]) / runs * 1e3,
        "client_cpu_ms_per_run": (cpu_after[2] - cpu_before[2]) / runs * 1e3,
    }


async def agentd_one_at_a_time(target: str, pid: int, runs: int, agent: str) -> tuple[list[float], list[float], float]:
    """(seconds to run_started, seconds per run, the server's CPU ms per run)."""
    async with AgentdClient(target) as client:
        for _ in range(20):
            await agentd_run(client, agent)
        firsts, totals = [], []
        cpu_before = cpu_s(pid)
        for _ in range(runs):
            first, total = await agentd_run(client, agent)
            firsts.append(first)
            totals.append(total)
        return firsts, totals, (cpu_s(pid) - cpu_before) / runs * 1e3


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="concurrent runs at scale")
    parser.add_argument("--first-token-s", type=float, default=1.0)
    parser.add_argument("--chunks", type=int, default=20, help="text chunks of the answer (the app's script has 20)")
    parser.add_argument("--chunk-interval-s", type=float, default=0.02)
    parser.add_argument("--api", choices=sorted(AGENTS), default="chat_completions")
    parser.add_argument("--ramp-s", type=float, default=0.0,
                        help="start the runs evenly over this many seconds instead of all at once")
    parser.add_argument("--rounds", type=int, default=1, help="alternations of raw and agentd at scale")
    parser.add_argument("--single-runs", type=int, default=200, help="runs per one-at-a-time measure per round")
    parser.add_argument("--json", action="store_true", help="print one JSON object of the figures last")
    args = parser.parse_args()
    if args.chunks != 20:
        parser.error("the bench app's answer streams as 20 chunks; --chunks is fixed at 20 for now")
    agent = AGENTS[args.api]
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-scale-"))

    paced_port, instant_port = free_port(), free_port()
    processes = [start_endpoint(paced_port, logs, args.first_token_s, args.chunk_interval_s),
                 start_endpoint(instant_port, logs, 0.0, 0.0)]
    paced, instant = (f"http://127.0.0.1:{port}/v1" for port in (paced_port, instant_port))
    ports = {"paced": free_port(), "instant": free_port(), "scripted": free_port()}
    try:
        for name, endpoint in (("paced", paced), ("instant", instant)):
            env = {"OPENAI_API_KEY": "bench", "OPENAI_BASE_URL": endpoint, "AGENTD_OTLP_EXPORT": "false"}
            processes.append(start_server(ports[name], debug=False, stderr_path=logs / f"server-{name}.log",
                                          extra_env=env, app="bench.app:scale_app", model_provider="openai"))
        processes.append(start_server(ports["scripted"], debug=False, stderr_path=logs / "server-scripted.log",
                                      extra_env={"AGENTD_OTLP_EXPORT": "false"}, app="bench.app:scale_app"))
        for port in ports.values():
            wait_ready(port)
        server_pid = {name: process.pid for name, process in zip(("paced", "instant", "scripted"), processes[2:])}

        raw_walls: list[float] = []
        raw_cpu: list[tuple[float, float]] = []
        scale: list[dict[str, float]] = []
        raw_single: list[float] = []
        single_firsts: list[float] = []
        single_totals: list[float] = []
        scripted_firsts: list[float] = []
        single_cpu: list[float] = []
        for _ in range(args.rounds):
            wall, client_ms, endpoint_ms = await raw_at_scale(paced, processes[0].pid, args.runs, args.ramp_s)
            raw_walls.append(wall)
            raw_cpu.append((client_ms, endpoint_ms))
            scale.append(await agentd_at_scale(
                f"127.0.0.1:{ports['paced']}", server_pid["paced"], processes[0].pid, args.runs, agent, args.ramp_s))
            raw_single += await raw_one_at_a_time(instant, args.single_runs)
            firsts, totals, cpu_ms = await agentd_one_at_a_time(
                f"127.0.0.1:{ports['instant']}", server_pid["instant"], args.single_runs, agent)
            single_firsts += firsts
            single_totals += totals
            single_cpu.append(cpu_ms)
            scripted_firsts += (await agentd_one_at_a_time(
                f"127.0.0.1:{ports['scripted']}", server_pid["scripted"], args.single_runs, agent))[0]
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.wait(timeout=30)

    def median(values: list[float]) -> float:
        return pct(values, 0.5)

    results = {
        "scale_agentd_wall_s": median([s["wall_s"] for s in scale]),
        "scale_raw_wall_s": median(raw_walls),
        "scale_run_started_p50_ms": median([s["run_started_p50_ms"] for s in scale]),
        "scale_run_started_p99_ms": median([s["run_started_p99_ms"] for s in scale]),
        "scale_server_memory_per_run_kb": median([s["kb_per_run"] for s in scale]),
        "scale_server_cpu_per_run_ms": median([s["server_cpu_ms_per_run"] for s in scale]),
        "scale_agentd_client_cpu_per_run_ms": median([s["client_cpu_ms_per_run"] for s in scale]),
        "scale_agentd_endpoint_cpu_per_run_ms": median([s["endpoint_cpu_ms_per_run"] for s in scale]),
        "scale_raw_client_cpu_per_run_ms": median([c for c, _ in raw_cpu]),
        "scale_raw_endpoint_cpu_per_run_ms": median([e for _, e in raw_cpu]),
        "single_agentd_run_p50_ms": median(single_totals) * 1e3,
        "single_raw_run_p50_ms": median(raw_single) * 1e3,
        "single_server_cpu_per_run_ms": median(single_cpu),
        "single_agentd_ttfe_p50_ms": median(single_firsts) * 1e3,
        "single_scripted_ttfe_p50_ms": median(scripted_firsts) * 1e3,
    }
    results["scale_wall_ratio"] = results["scale_agentd_wall_s"] / results["scale_raw_wall_s"]
    results["single_run_ratio"] = results["single_agentd_run_p50_ms"] / results["single_raw_run_p50_ms"]
    results["single_ttfe_ratio"] = results["single_agentd_ttfe_p50_ms"] / results["single_scripted_ttfe_p50_ms"]

    print(f"agentd at scale · {os.cpu_count()} cpu · python {sys.version.split()[0]} · {args.api} · "
          f"{args.runs} runs {'at once' if args.ramp_s <= 0 else f'started over {args.ramp_s:g} s'} · first token {args.first_token_s:g} s, {args.chunks} chunks "
          f"{args.chunk_interval_s * 1e3:g} ms apart · {args.rounds} round(s)")
    print(f"  wall, {args.runs} runs           agentd {results['scale_agentd_wall_s']:.2f} s   raw client "
          f"{results['scale_raw_wall_s']:.2f} s   (×{results['scale_wall_ratio']:.2f})")
    print(f"  run_started at that load   p50 {results['scale_run_started_p50_ms']:.1f} ms   "
          f"p99 {results['scale_run_started_p99_ms']:.1f} ms")
    print(f"  server memory per run      {results['scale_server_memory_per_run_kb']:.1f} KB (RSS growth under load / runs)")
    print(f"  CPU per run                agentd server {results['scale_server_cpu_per_run_ms']:.2f} ms, its gRPC client "
          f"{results['scale_agentd_client_cpu_per_run_ms']:.2f} ms, endpoint "
          f"{results['scale_agentd_endpoint_cpu_per_run_ms']:.2f} ms   raw client "
          f"{results['scale_raw_client_cpu_per_run_ms']:.2f} ms, endpoint {results['scale_raw_endpoint_cpu_per_run_ms']:.2f} ms")
    print(f"  one at a time, 0 ms model  run p50 {results['single_agentd_run_p50_ms']:.2f} ms   raw client "
          f"{results['single_raw_run_p50_ms']:.2f} ms   (×{results['single_run_ratio']:.2f}; server CPU "
          f"{results['single_server_cpu_per_run_ms']:.2f} ms per run)")
    print(f"  time to first event        p50 {results['single_agentd_ttfe_p50_ms']:.2f} ms over HTTP   "
          f"{results['single_scripted_ttfe_p50_ms']:.2f} ms scripted in-process   (×{results['single_ttfe_ratio']:.2f})")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    asyncio.run(main())
