"""One stream's event rate: an agentd run streaming 10,000 text deltas vs raw grpc.aio.

- ``agentd``: a server process (memory store) whose agent's zero-latency scripted model
  answers with 10,000 word-sized text deltas (``bench/stream_app.py``) as fast as it gives
  them; a client process starts the run with ``AgentdClient.run`` and reads every event to
  the terminal one (10,003 events: run_started, the deltas, usage, message, run_completed).
- ``agentd_stub``: the same server read through the generated stub (``StreamRun``, no
  client library), to tell the server's share from the client's.
- ``raw``: a trivial grpc.aio server process streaming 10,000 messages of the same type and
  size (a ``StreamRunResponse`` holding a text delta, built before the call, so only gRPC's
  own cost is measured) to a client process reading them with a plain stub.

Events/s = messages / (last message received - call started), per stream, measured in the
client process. Every target gets ``--streams`` streams per round, rounds interleaved in a
fresh random order; the figures are medians, and ``agentd_vs_raw_ratio`` the median of the
per-round ratios (agentd / raw). Beside the rates, the CPU each side spends per event (server
process from /proc, client process from getrusage): on a machine shared with other work the
rates swing from round to round, the CPU per event much less
(``agentd_vs_raw_server_cpu_ratio``: raw's server CPU per event over agentd's). With ``--tree NAME=PATH`` another revision's server and
client run beside this tree's (``<name>_agentd_events_per_s``, ``<name>_vs_raw_ratio``).

    python bench/bench_stream.py [--rounds 12] [--streams 2] [--deltas 10000] [--tree base=/tmp/rl-base] [--json]

``--json``: the last line of stdout is one flat JSON object, metric name -> number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_run_layer import THIS, ClientProcess, Fleet, parse_trees, tree_env  # noqa: E402

RAW_METHOD = "/bench.Raw/Stream"


# -- the raw grpc.aio server -------------------------------------------------------------


async def _raw_server(port: int, count: int) -> None:
    import grpc

    from agentd.v1 import agent_service_pb2 as pb
    from agentd.v1 import run_event_pb2

    run_id = "run_" + "0" * 32
    trace_id = "0" * 32
    seconds, nanos = divmod(time.time_ns(), 1_000_000_000)
    # Built once: the stream measures what grpc.aio itself delivers, nothing else.
    messages = [
        pb.StreamRunResponse(event=run_event_pb2.RunEvent(
            run_id=run_id, sequence=sequence, trace_id=trace_id, create_time={"seconds": seconds, "nanos": nanos},
            text_delta=run_event_pb2.TextDelta(agent="stream", text=f"w{sequence % 10_000:04d} "),
        ))
        for sequence in range(1, count + 1)
    ]

    async def stream(request: bytes, context: grpc.aio.ServicerContext):  # type: ignore[no-untyped-def]
        for message in messages:
            yield message

    handler = grpc.method_handlers_generic_handler("bench.Raw", {
        "Stream": grpc.unary_stream_rpc_method_handler(
            stream, request_deserializer=lambda b: b, response_serializer=pb.StreamRunResponse.SerializeToString
        ),
    })
    server = grpc.aio.server()
    server.add_generic_rpc_handlers((handler,))
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    await server.wait_for_termination()


# -- client-process commands (run by bench_run_layer's worker) ---------------------------


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


async def agentd_stream(client: Any, target: str, command: dict[str, Any]) -> list[list[float]]:
    """``command["streams"]`` runs of the stream agent through the client library: [events, seconds,
    CPU seconds of this process] each."""
    out = []
    for _ in range(command["streams"]):
        cpu = _cpu()
        started = time.perf_counter()
        count = 0
        async for event in client.run("stream", "go"):
            count += 1
        elapsed = time.perf_counter() - started
        if event.WhichOneof("payload") != "run_completed":
            raise RuntimeError(f"the stream run did not complete: {event}")
        out.append([count, elapsed, _cpu() - cpu])
    return out


async def stub_stream(client: Any, target: str, command: dict[str, Any]) -> list[list[float]]:
    """The same run through the generated stub's StreamRun (no client library)."""
    from agentd.v1 import agent_service_pb2 as pb

    out = []
    for _ in range(command["streams"]):
        cpu = _cpu()
        started = time.perf_counter()
        count = 0
        async for response in client.agents.StreamRun(pb.StreamRunRequest(start=pb.StartRun(agent="stream",
                                                                                            input="go"))):
            count += 1
        elapsed = time.perf_counter() - started
        if response.event.WhichOneof("payload") != "run_completed":
            raise RuntimeError(f"the stream run did not complete: {response}")
        out.append([count, elapsed, _cpu() - cpu])
    return out


_raw_channel: Any = None


async def raw_stream(client: Any, target: str, command: dict[str, Any]) -> list[list[float]]:
    """``command["streams"]`` calls of the raw server's stream: [messages, seconds] each."""
    global _raw_channel
    import grpc

    from agentd.v1 import agent_service_pb2 as pb

    if _raw_channel is None:
        _raw_channel = grpc.aio.insecure_channel(target)
    method = _raw_channel.unary_stream(RAW_METHOD, request_serializer=lambda b: b,
                                       response_deserializer=pb.StreamRunResponse.FromString)
    out = []
    for _ in range(command["streams"]):
        cpu = _cpu()
        started = time.perf_counter()
        count = 0
        async for _response in method(b""):
            count += 1
        out.append([count, time.perf_counter() - started, _cpu() - cpu])
    return out


# -- the coordinator ---------------------------------------------------------------------


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=12)
    parser.add_argument("--streams", type=int, default=2, help="streams per target per round")
    parser.add_argument("--deltas", type=int, default=10_000)
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of another revision's tree")
    parser.add_argument("--no-stub", action="store_true", help="skip the agentd_stub figure")
    parser.add_argument("--json", action="store_true", help="end with one flat JSON object of the metrics")
    parser.add_argument("--raw-server", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.raw_server:
        asyncio.run(_raw_server(args.raw_server, args.deltas))
        return

    from bench.bench_runs import free_port, wait_ready

    trees = parse_trees(args.tree)
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-stream-"))
    os.environ["BENCH_STREAM_DELTAS"] = str(args.deltas)  # the servers' stream_app reads it
    fleet = Fleet(trees, logs, app=("bench/stream_app.py", "app"))
    raw_port = free_port()
    raw = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--raw-server", str(raw_port),
                            "--deltas", str(args.deltas)], cwd=ROOT, stderr=(logs / "raw-server.log").open("w"))
    extra_clients: list[ClientProcess] = []
    # Per label: events/s of each stream, the median of each round, and events, server and client CPU.
    rates: dict[str, list[float]] = {}
    per_round: dict[str, list[float]] = {}
    totals: dict[str, list[float]] = {}
    expected: dict[str, int] = {"raw": args.deltas}
    try:
        wait_ready(raw_port)
        raw_client = ClientProcess(f"127.0.0.1:{raw_port}", {}, logs / "client-raw.log")
        extra_clients.append(raw_client)
        # label -> (client process, its command, the server process it reads from)
        jobs: dict[str, tuple[ClientProcess, str, int]] = {
            "raw": (raw_client, "bench.bench_stream:raw_stream", raw.pid),
        }
        for name, client in fleet.clients.items():
            label = "agentd" if name == THIS else f"{name}_agentd"
            jobs[label] = (client, "bench.bench_stream:agentd_stream", fleet.servers[name].pid)
        if not args.no_stub:
            stub = ClientProcess(fleet.targets[THIS], tree_env(None), logs / "client-stub.log")
            extra_clients.append(stub)
            jobs["agentd_stub"] = (stub, "bench.bench_stream:stub_stream", fleet.servers[THIS].pid)
        for label, (client, cmd, _) in jobs.items():  # warm-up
            got = client.ask(cmd=cmd, streams=2)
            if label == "raw" and got[0][0] != args.deltas:
                raise RuntimeError(f"the raw stream sent {got[0][0]} messages, not {args.deltas}")
            expected.setdefault(label, int(got[0][0]))
        rates = {label: [] for label in jobs}
        per_round = {label: [] for label in jobs}
        totals = {label: [0.0, 0.0, 0.0] for label in jobs}
        order = list(jobs)
        for _ in range(args.rounds):
            random.shuffle(order)
            for label in order:
                client, cmd, server_pid = jobs[label]
                server_cpu = process_cpu_s(server_pid)
                got = client.ask(cmd=cmd, streams=args.streams)
                totals[label][1] += process_cpu_s(server_pid) - server_cpu
                round_rates = [count / seconds for count, seconds, _ in got]
                rates[label].extend(round_rates)
                per_round[label].append(statistics.median(round_rates))
                totals[label][0] += sum(count for count, _, _ in got)
                totals[label][2] += sum(cpu for _, _, cpu in got)
    finally:
        for client in extra_clients:
            client.close()
        fleet.close()
        raw.terminate()
        raw.wait(timeout=20)

    metrics: dict[str, float] = {}
    for label in rates:
        events, server_cpu, client_cpu = totals[label]
        metrics[f"{label}_events_per_s"] = statistics.median(rates[label])
        metrics[f"{label}_events_per_stream"] = float(expected[label])
        metrics[f"{label}_server_cpu_us_per_event"] = server_cpu / events * 1e6
        metrics[f"{label}_client_cpu_us_per_event"] = client_cpu / events * 1e6
    for label in rates:
        if label == "raw":
            continue
        key = {"agentd": "agentd_vs_raw", "agentd_stub": "agentd_stub_vs_raw"}.get(
            label, f"{label.removesuffix('_agentd')}_vs_raw")
        ratios = [a / r for a, r in zip(per_round[label], per_round["raw"])]
        metrics[f"{key}_ratio"] = statistics.median(ratios)
        metrics[f"{key}_min_ratio"] = min(ratios)
        metrics[f"{key}_max_ratio"] = max(ratios)
        # CPU per event, raw's over this one's (1: as cheap as raw grpc.aio; noise-robust, unlike rates).
        for side in ("server", "client"):
            metrics[f"{key}_{side}_cpu_ratio"] = (metrics[f"raw_{side}_cpu_us_per_event"]
                                                  / metrics[f"{label}_{side}_cpu_us_per_event"])

    print(f"agentd one-stream event rate · {os.cpu_count()} cpu · python {sys.version.split()[0]} · {args.deltas} "
          f"text deltas per run · {args.rounds} interleaved rounds of {args.streams} stream(s) · logs in {logs}")
    for label in rates:
        print(f"  {label:14} {metrics[f'{label}_events_per_s']:9.0f} events/s"
              f"   CPU per event: server {metrics[f'{label}_server_cpu_us_per_event']:5.1f} us,"
              f" client {metrics[f'{label}_client_cpu_us_per_event']:5.1f} us"
              f"   ({metrics[f'{label}_events_per_stream']:.0f} events per stream)")
    for key in [k for k in metrics if k.endswith("_vs_raw_ratio")]:
        base = key.removesuffix("_ratio")
        print(f"  {key:26} {metrics[key]:.3f}   (per-round min {metrics[base + '_min_ratio']:.3f},"
              f" max {metrics[base + '_max_ratio']:.3f}; CPU per event vs raw: server"
              f" {metrics[base + '_server_cpu_ratio']:.3f}, client {metrics[base + '_client_cpu_ratio']:.3f})")
    if args.json:
        print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
