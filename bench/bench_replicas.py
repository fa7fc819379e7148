"""agentd scale-out benchmark: 1, 2 and 3 replicas sharing a Redis run store, and the cost of the shared event log.

- Shared log: the same 3-step run (bench.app, zero-latency scripted model) on a replica
  whose runs stay in process (AGENTD_RUN_STORE=memory) and on one whose events and
  checkpoints go through Redis (AGENTD_RUN_STORE=redis), alternated round by round:
  time to first event (TTFE) and run latency, p50.
- Scaling, CPU-bound: N replicas (separate processes) behind one balancing client; load
  comes from separate client processes at a fixed total concurrency, for a fixed time:
  runs/s and TTFE p50/p99. The model answers at once, so the figure says how far
  replicas scale on this machine's cores; the report prints the core count.
- Scaling, capacity-bound: the same with a model taking 20 ms per turn and each replica
  limited to AGENTD_MAX_ACTIVE_RUNS=8. Runs beyond a replica's 8 are queued in Redis and
  claimed by whichever replica has room, so runs/s should grow with replicas until the
  CPU is the limit.

    python bench/bench_replicas.py [--seconds 5] [--concurrency 48] [--clients 2]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from agentd.client import AgentdClient  # noqa: E402
from bench_runs import REDIS_URL, free_port, pct, start_server, wait_ready  # noqa: E402


async def timed_run(client: AgentdClient) -> tuple[float, float]:
    """(time to first event, run latency) in seconds."""
    started = time.perf_counter()
    first = 0.0
    async for event in client.run("bench", "ping"):
        if not first:
            first = time.perf_counter() - started
        kind = event.WhichOneof("payload")
        if kind in ("run_failed", "run_cancelled"):
            raise RuntimeError(f"run did not complete: {event}")
    return first, time.perf_counter() - started


async def shared_log_overhead(logs: Path, prefix: str, rounds: int, per_round: int) -> dict[str, float]:
    ports = {"memory": free_port(), "redis": free_port()}
    env = {
        "memory": {"AGENTD_RUN_STORE": "memory"},
        "redis": {"AGENTD_RUN_STORE": "redis", "AGENTD_REDIS_URL": REDIS_URL, "AGENTD_REDIS_PREFIX": prefix},
    }
    servers = {name: start_server(port, debug=False, stderr_path=logs / f"log-{name}.log", extra_env=env[name])
               for name, port in ports.items()}
    firsts: dict[str, list[float]] = {name: [] for name in ports}
    totals: dict[str, list[float]] = {name: [] for name in ports}
    try:
        for port in ports.values():
            wait_ready(port)
        clients = {name: AgentdClient(f"127.0.0.1:{port}") for name, port in ports.items()}
        for client in clients.values():
            for _ in range(50):
                await timed_run(client)
        for _ in range(rounds):
            for name, client in clients.items():
                for _ in range(per_round):
                    first, total = await timed_run(client)
                    firsts[name].append(first)
                    totals[name].append(total)
        for client in clients.values():
            await client.close()
    finally:
        for server in servers.values():
            server.terminate()
            server.wait(20)
    out = {}
    for name in ports:
        out[f"{name}_ttfe_p50_ms"] = pct(firsts[name], 0.5) * 1e3
        out[f"{name}_run_p50_ms"] = pct(totals[name], 0.5) * 1e3
    out["ttfe_added_p50_ms"] = out["redis_ttfe_p50_ms"] - out["memory_ttfe_p50_ms"]
    out["run_added_p50_ms"] = out["redis_run_p50_ms"] - out["memory_run_p50_ms"]
    return out


def load_process(targets: list[str], concurrency: int, seconds: float, start_at: float, out: "multiprocessing.Queue") -> None:
    async def main() -> None:
        clients = [AgentdClient(targets) for _ in range(min(concurrency, 4))]
        for client in clients:  # connect to every replica before the clock starts
            for _ in range(len(targets) * 2):
                await client.list_agents()
        await asyncio.sleep(max(0.0, start_at - time.time()))
        deadline = time.perf_counter() + seconds
        firsts: list[float] = []

        async def worker(i: int) -> None:
            client = clients[i % len(clients)]
            while time.perf_counter() < deadline:
                firsts.append((await timed_run(client))[0])

        started = time.perf_counter()
        await asyncio.gather(*(worker(i) for i in range(concurrency)))
        out.put((len(firsts), time.perf_counter() - started, firsts))
        for client in clients:
            await client.close()

    asyncio.run(main())


def scaling(
    logs: Path, replicas: int, prefix: str, args: argparse.Namespace, *, app: str = "bench.app:app",
    capacity: int | None = None,
) -> dict[str, float]:
    ports = [free_port() for _ in range(replicas)]
    env = {"AGENTD_RUN_STORE": "redis", "AGENTD_REDIS_URL": REDIS_URL, "AGENTD_REDIS_PREFIX": prefix,
           "AGENTD_APP": app}
    if capacity is not None:
        env["AGENTD_MAX_ACTIVE_RUNS"] = str(capacity)
    servers = [start_server(port, debug=False, stderr_path=logs / f"scale{replicas}-{i}.log",
                            extra_env={**env, "AGENTD_REPLICA_ID": f"replica-{i}"}, app=app)
               for i, port in enumerate(ports)]
    try:
        for port in ports:
            wait_ready(port)
        targets = [f"127.0.0.1:{port}" for port in ports]
        out: multiprocessing.Queue = multiprocessing.Queue()
        start_at = time.time() + 3.0
        per_process = args.concurrency // args.clients
        procs = [multiprocessing.Process(target=load_process, args=(targets, per_process, args.seconds, start_at, out))
                 for _ in range(args.clients)]
        for proc in procs:
            proc.start()
        results = [out.get(timeout=args.seconds + 60) for _ in procs]
        for proc in procs:
            proc.join(30)
    finally:
        for server in servers:
            server.terminate()
            server.wait(20)
    runs = sum(r[0] for r in results)
    wall = max(r[1] for r in results)
    firsts = [f for r in results for f in r[2]]
    return {"runs_per_s": runs / wall, "ttfe_p50_ms": pct(firsts, 0.5) * 1e3, "ttfe_p99_ms": pct(firsts, 0.99) * 1e3}


async def drop_prefix(prefix: str) -> None:
    import redis.asyncio as aioredis

    client = aioredis.from_url(REDIS_URL)
    keys = [k async for k in client.scan_iter(match=f"{prefix}:*", count=1000)]
    if keys:
        await client.delete(*keys)
    await client.aclose()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--concurrency", type=int, default=48, help="concurrent runs in flight, all clients together")
    parser.add_argument("--clients", type=int, default=2, help="load-generating processes")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-replicas-"))
    prefix = f"agentd-bench-{uuid.uuid4().hex[:8]}"
    try:
        print(f"cores: {os.cpu_count()}; load: {args.clients} client processes, {args.concurrency} runs in flight, "
              f"{args.seconds:.0f}s per point; logs in {logs}")
        log = asyncio.run(shared_log_overhead(logs, prefix + "-log", args.rounds, 50))
        print("shared event log (1 replica, sequential 3-step runs, p50):")
        print(f"  in-process runs: TTFE {log['memory_ttfe_p50_ms']:.2f} ms, run {log['memory_run_p50_ms']:.2f} ms")
        print(f"  Redis run store: TTFE {log['redis_ttfe_p50_ms']:.2f} ms, run {log['redis_run_p50_ms']:.2f} ms")
        print(f"  added by the shared log: TTFE +{log['ttfe_added_p50_ms']:.2f} ms, run +{log['run_added_p50_ms']:.2f} ms")
        for label, options in (
            ("CPU-bound (zero-latency model)", {}),
            ("capacity-bound (20 ms per model turn, 8 runs per replica)", {"app": "bench.app:slow_app", "capacity": 8}),
        ):
            print(f"{label}:")
            base = None
            for replicas in (1, 2, 3):
                point = scaling(logs, replicas, f"{prefix}-{replicas}", args, **options)  # type: ignore[arg-type]
                base = base or point["runs_per_s"]
                print(f"  {replicas} replica(s): {point['runs_per_s']:.0f} runs/s ({point['runs_per_s'] / base:.2f}x), "
                      f"TTFE p50 {point['ttfe_p50_ms']:.2f} ms, p99 {point['ttfe_p99_ms']:.2f} ms")
                asyncio.run(drop_prefix(f"{prefix}-{replicas}"))
    finally:
        for suffix in ("-log", "-1", "-2", "-3"):
            asyncio.run(drop_prefix(prefix + suffix))


if __name__ == "__main__":
    main()
