"""Run store benchmark: time to first event and run latency per run store, over gRPC.

One server process per store (``memory``; ``postgres``: sessions, runs and events in
Postgres; ``redis``: the same in Redis), each with the zero-latency scripted model and the
3-step bench run (tool call, tool output, final text). The servers run side by side and
are driven alternately, a short round each, many rounds, so that machine noise hits every
store alike. Every run has a new session (as ``bench_runs``' store passes do), so a run
reads (creates) its session, writes its run and events, and appends two steps.

With ``--baseline TREE`` every store also gets a server running another revision's code
(``PYTHONPATH=TREE/server:TREE/client:TREE/generated:TREE``), driven in the same rounds:
``base_<store>_*`` against ``<store>_*``, and their ratio (``<store>_ttfe_p50_ratio`` =
this tree's / the baseline's).

    python bench/bench_run_stores.py [--rounds 20] [--runs 25] [--stores memory,postgres,redis]
                                     [--baseline /tmp/base-tree] [--json]

``--json``: the last line of stdout is one flat JSON object, metric name -> number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.client import AgentdClient  # noqa: E402

from bench.bench_runs import (  # noqa: E402
    POSTGRES_URL,
    REDIS_URL,
    drop_namespace,
    free_port,
    one_run,
    pct,
    start_server,
    wait_ready,
)

STORES = ("memory", "postgres", "redis")
WARMUP_RUNS = 50


def store_env(store: str, namespace: str) -> dict[str, str]:
    if store == "postgres":
        return {"AGENTD_POSTGRES_URL": POSTGRES_URL, "AGENTD_POSTGRES_SCHEMA": namespace}
    if store == "redis":
        return {"AGENTD_REDIS_URL": REDIS_URL, "AGENTD_REDIS_PREFIX": namespace}
    return {}


def tree_pythonpath(tree: Path) -> str:
    """The PYTHONPATH that runs ``tree``'s agentd (its server, client and generated code)."""
    return os.pathsep.join([*(str(tree / part) for part in ("server", "client", "generated")), str(tree)])


async def drive(targets: dict[str, str], rounds: int, runs: int, session: bool) -> dict[str, dict[str, list[float]]]:
    """TTFE and run latency samples per target, alternating targets round by round (in a
    fresh random order each round, so no target always follows another)."""
    samples: dict[str, dict[str, list[float]]] = {name: {"ttfe": [], "run": []} for name in targets}
    clients = {name: AgentdClient(target) for name, target in targets.items()}
    counter = 0

    def session_id() -> str | None:
        nonlocal counter
        counter += 1
        return f"brs-{counter}-{time.time_ns()}" if session else None

    try:
        for client in clients.values():
            for _ in range(WARMUP_RUNS):
                await one_run(client, session_id())
        order = list(clients)
        for _ in range(rounds):
            random.shuffle(order)
            for name in order:
                for _ in range(runs):
                    first, total, _ = await one_run(clients[name], session_id())
                    samples[name]["ttfe"].append(first * 1e3)
                    samples[name]["run"].append(total * 1e3)
    finally:
        for client in clients.values():
            await client.close()
    return samples


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="rounds; each drives every server in turn")
    parser.add_argument("--runs", type=int, default=25, help="sequential runs per server per round")
    parser.add_argument("--stores", default=",".join(STORES), help="comma-separated: " + ", ".join(STORES))
    parser.add_argument("--no-session", action="store_true", help="runs without a session")
    parser.add_argument("--baseline", type=Path, help="another tree whose code to run beside this one")
    parser.add_argument("--json", action="store_true", help="end with one flat JSON object of the metrics")
    args = parser.parse_args()
    stores = [s for s in args.stores.split(",") if s]
    for store in stores:
        if store not in STORES:
            parser.error(f"unknown store {store!r}")

    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-run-stores-"))
    revisions: dict[str, dict[str, str]] = {"": {}}
    if args.baseline is not None:
        revisions["base_"] = {"PYTHONPATH": tree_pythonpath(args.baseline.resolve())}
    namespaces = {label: f"bench_run_stores_{label}{os.getpid()}" for label in revisions}
    servers = {}
    targets: dict[str, str] = {}
    try:
        for label, env in revisions.items():
            for store in stores:
                name = f"{label}{store}"
                port = free_port()
                servers[name] = start_server(
                    port, debug=False, stderr_path=logs / f"{name}.log", store=store,
                    extra_env={**env, **store_env(store, namespaces[label])},
                )
                targets[name] = f"127.0.0.1:{port}"
        for name, target in targets.items():
            wait_ready(int(target.rpartition(":")[2]))
        samples = await drive(targets, args.rounds, args.runs, session=not args.no_session)
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            server.wait(timeout=20)
        for namespace in namespaces.values():
            await drop_namespace(namespace)

    metrics: dict[str, float] = {}
    for name, got in samples.items():
        metrics[f"{name}_ttfe_p50_ms"] = pct(got["ttfe"], 0.5)
        metrics[f"{name}_ttfe_p99_ms"] = pct(got["ttfe"], 0.99)
        metrics[f"{name}_run_p50_ms"] = pct(got["run"], 0.5)
        metrics[f"{name}_run_p99_ms"] = pct(got["run"], 0.99)
    if args.baseline is not None:
        for store in stores:
            for key in ("ttfe_p50", "ttfe_p99", "run_p50"):
                metrics[f"{store}_{key}_ratio"] = metrics[f"{store}_{key}_ms"] / metrics[f"base_{store}_{key}_ms"]

    runs = args.rounds * args.runs
    print(f"run stores · {os.cpu_count()} cpu · {runs} runs per server in {args.rounds} alternating rounds"
          f" · {'no session' if args.no_session else 'a new session per run'} · scripted model (0 ms)")
    print(f"  {'server':18} {'ttfe p50':>10} {'ttfe p99':>10} {'run p50':>10} {'run p99':>10}   (ms)")
    for name in samples:
        print(f"  {name:18} {metrics[f'{name}_ttfe_p50_ms']:10.2f} {metrics[f'{name}_ttfe_p99_ms']:10.2f}"
              f" {metrics[f'{name}_run_p50_ms']:10.2f} {metrics[f'{name}_run_p99_ms']:10.2f}")
    if args.baseline is not None:
        print(f"  this tree / baseline ({args.baseline}):")
        for store in stores:
            print(f"  {store:18} ttfe p50 {metrics[f'{store}_ttfe_p50_ratio']:.2f}"
                  f"  ttfe p99 {metrics[f'{store}_ttfe_p99_ratio']:.2f}  run p50 {metrics[f'{store}_run_p50_ratio']:.2f}")
    if args.json:
        print(json.dumps(metrics))


if __name__ == "__main__":
    asyncio.run(main())
