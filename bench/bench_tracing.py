"""agentd tracing overhead: the same 3-step run with tracing as cheap as the server allows,
on the embedded defaults, and with OTLP export on.

Three server processes (``bench.bench_runs.start_server``; the app ``bench.app``: tool call,
tool output, final text, zero-latency scripted model), all on the embedded session store
(SQLite; the runs have no session, so it is not touched), driven alternately round by round
(``bench.bench_runs.interleaved``) so that machine noise hits every mode alike:

- ``off``: tracing as cheap as it gets: traces kept in memory only (``AGENTD_TRACE_STORE=memory``:
  no archive) and no OTLP export (``AGENTD_OTLP_EXPORT=false``). agentd has no switch that
  turns its in-process trace store off (``TraceService`` reads it).
- ``default``: the embedded defaults: ended traces archived to SQLite in batches, no export.
- ``otlp``: the defaults plus OTLP/gRPC export (spans and metrics) to a loopback receiver
  (``bench.bench_runs.start_otlp_receiver``; in this process by default, like ``make bench``,
  or in its own process with ``--receiver process``).

Prints the run p50 per mode and the overhead of ``default`` and ``otlp`` against ``off``.
With ``--json`` the last line of stdout is one flat JSON object (metric -> number).

``agentd`` is imported from wherever it resolves, and the servers inherit the environment:
``PYTHONPATH=<tree>/server:<tree>/client:<tree>/generated:<tree>`` benchmarks another tree.
``--baseline-tree DIR`` also starts the three servers from another checkout (a ``git worktree``
of the revision to compare with) and interleaves all six, so that a before/after comparison
shares every round's machine noise; its figures are prefixed ``base_``.

    python bench/bench_tracing.py [--rounds 60] [--runs-per-round 10] [--receiver inproc|process]
                                  [--baseline-tree DIR] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench.bench_runs import free_port, interleaved, start_otlp_receiver, start_server, wait_ready  # noqa: E402

MODES = ("off", "default", "otlp")
WARMUP_RUNS = 50  # per server, in bench_runs.interleaved


def _receiver_process(port_out, stop) -> None:  # type: ignore[no-untyped-def]
    """A loopback OTLP receiver in its own process: sends its port, then the span count when told to stop."""

    async def main() -> None:
        server, port, spans = await start_otlp_receiver()
        port_out.send(port)
        await asyncio.get_running_loop().run_in_executor(None, stop.wait)
        port_out.send(spans())
        await server.stop(0)

    asyncio.run(main())


def tree_path(tree: Path) -> str:
    """The PYTHONPATH that imports agentd from checkout ``tree``."""
    return os.pathsep.join(str(tree / part) for part in ("server", "client", "generated", ""))


async def measure(
    rounds: int, runs_per_round: int, receiver_mode: str, baseline: Path | None = None
) -> dict[str, float]:
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-tracing-"))
    proc = None
    if receiver_mode == "process":
        ctx = multiprocessing.get_context("spawn")
        parent_end, child_end = ctx.Pipe()
        stop = ctx.Event()
        proc = ctx.Process(target=_receiver_process, args=(child_end, stop), daemon=True)
        proc.start()
        receiver_port = await asyncio.to_thread(parent_end.recv)
        receiver = None
    else:
        receiver, receiver_port, spans = await start_otlp_receiver()
    otlp = {"OTEL_EXPORTER_OTLP_ENDPOINT": f"http://127.0.0.1:{receiver_port}", "OTEL_EXPORTER_OTLP_INSECURE": "true"}
    env = {
        "off": {"AGENTD_OTLP_EXPORT": "false", "AGENTD_TRACE_STORE": "memory"},
        "default": {"AGENTD_OTLP_EXPORT": "false"},
        "otlp": otlp,
    }
    names = {mode: mode for mode in MODES}
    if baseline is not None:
        base_path = {"PYTHONPATH": tree_path(baseline)}
        for mode in MODES:
            names[f"base_{mode}"] = mode
            env[f"base_{mode}"] = {**env[mode], **base_path}
    ports = {name: free_port() for name in names}
    servers = {}
    try:
        for name in names:
            (logs / name).mkdir()  # each its own session DB and trace archive (agentd-traces.db beside it)
            servers[name] = start_server(
                ports[name], debug=False, stderr_path=logs / name / "server.log", store="sqlite", extra_env=env[name]
            )
        for port in ports.values():
            wait_ready(port)
        cpu_before = {name: _cpu_s(server.pid) for name, server in servers.items()}
        p50 = await interleaved({name: f"127.0.0.1:{port}" for name, port in ports.items()}, rounds, runs_per_round)
        runs = WARMUP_RUNS + rounds * runs_per_round
        # Every thread of the server (the loop, OTLP export, the archive writer): idle servers use
        # next to none, and what a server's exporter does while another is driven is its own work.
        cpu = {name: (_cpu_s(server.pid) - cpu_before[name]) / runs * 1e3 for name, server in servers.items()}
    finally:
        for server in servers.values():
            server.terminate()
        for server in servers.values():
            await asyncio.to_thread(server.wait, 20)  # an in-process receiver lives on this event loop
        if proc is not None:
            stop.set()
            received = float(await asyncio.to_thread(parent_end.recv))
            proc.join(10)
        else:
            received = float(spans())
            await receiver.stop(0)
    results: dict[str, float] = {}
    for prefix in ("", "base_") if baseline is not None else ("",):
        off, default, otlp_ = (p50[f"{prefix}{mode}"] for mode in MODES)
        cpu_off, cpu_default, cpu_otlp = (cpu[f"{prefix}{mode}"] for mode in MODES)
        results.update({
            f"{prefix}server_cpu_per_run_off_ms": cpu_off,
            f"{prefix}server_cpu_per_run_default_ms": cpu_default,
            f"{prefix}server_cpu_per_run_otlp_ms": cpu_otlp,
            f"{prefix}default_cpu_overhead_pct": (cpu_default / cpu_off - 1) * 100,
            f"{prefix}otlp_cpu_overhead_pct": (cpu_otlp / cpu_off - 1) * 100,
            f"{prefix}run_p50_off_ms": off,
            f"{prefix}run_p50_default_ms": default,
            f"{prefix}run_p50_otlp_ms": otlp_,
            f"{prefix}default_overhead_pct": (default / off - 1) * 100,
            f"{prefix}otlp_overhead_pct": (otlp_ / off - 1) * 100,
            f"{prefix}otlp_vs_default_pct": (otlp_ / default - 1) * 100,
            f"{prefix}default_traces_archived_count": _archived_traces(logs / f"{prefix}default" / "agentd-traces.db"),
        })
    if baseline is not None:
        for mode in MODES:
            results[f"{mode}_vs_base_ratio"] = p50[mode] / p50[f"base_{mode}"]
    results["otlp_spans_received_count"] = received  # by the one receiver, from every otlp server
    shutil.rmtree(logs, ignore_errors=True)
    return results


def _cpu_s(pid: int) -> float:
    """CPU time (user + system, every thread) of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _archived_traces(path: Path) -> float:
    import sqlite3

    try:
        with sqlite3.connect(path) as conn:
            return float(conn.execute("SELECT count(*) FROM traces").fetchone()[0])
    except sqlite3.Error:
        return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--runs-per-round", type=int, default=10)
    parser.add_argument("--receiver", choices=("inproc", "process"), default="inproc")
    parser.add_argument("--baseline-tree", type=Path, help="also run the servers of this checkout, interleaved")
    parser.add_argument("--json", action="store_true", help="end with one flat JSON object of the figures")
    args = parser.parse_args()
    results = asyncio.run(measure(args.rounds, args.runs_per_round, args.receiver, args.baseline_tree))
    import agentd.server

    tree = Path(agentd.server.__file__).resolve().parents[3]
    print(f"agentd tracing bench · {os.cpu_count()} cpu · tree {tree} · {args.rounds} rounds x"
          f" {args.runs_per_round} runs per mode, interleaved · receiver {args.receiver}")
    for prefix, label in (("", "this tree"), ("base_", f"baseline {args.baseline_tree}")):
        if f"{prefix}run_p50_off_ms" not in results:
            continue
        print(f"  {label}")
        for mode in MODES:
            print(f"    {mode:8} run p50 {results[f'{prefix}run_p50_{mode}_ms']:.3f} ms"
                  f"   server CPU per run {results[f'{prefix}server_cpu_per_run_{mode}_ms']:.3f} ms")
        print(f"    default vs off  run p50 {results[f'{prefix}default_overhead_pct']:+.1f}%"
              f"   CPU {results[f'{prefix}default_cpu_overhead_pct']:+.1f}%   (SQLite trace archive;"
              f" {results[f'{prefix}default_traces_archived_count']:.0f} traces archived)")
        print(f"    otlp vs off     run p50 {results[f'{prefix}otlp_overhead_pct']:+.1f}%"
              f"   CPU {results[f'{prefix}otlp_cpu_overhead_pct']:+.1f}%   (archive + OTLP export)")
    if args.baseline_tree is not None:
        print("  this tree / baseline: " + ", ".join(f"{m} {results[f'{m}_vs_base_ratio']:.3f}" for m in MODES))
    print(f"  {results['otlp_spans_received_count']:.0f} spans received over OTLP")
    if args.json:
        print(json.dumps(results))


if __name__ == "__main__":
    main()
