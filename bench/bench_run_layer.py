"""The run layer's cost on the embedded default: this tree against other revisions, interleaved.

Every tree gets its own server process (memory store, zero-latency scripted model, the
``bench`` agent of ``bench/app.py``: tool call → tool output → final text, two model turns)
*and its own client process* (``PYTHONPATH=<tree>/server:<tree>/client:<tree>/generated:<tree>``),
so "client included" means that tree's client. The coordinator (this process) drives the
client processes in turn, round by round in a fresh random order, so machine noise hits
every tree alike:

- sequential: ``--runs`` runs per tree per round; run p50 and per model turn (p50 / 2);
- 64 clients: ``--seconds`` of 64 concurrent clients per tree per round (4 channels, as
  ``bench_runs.concurrent``); runs/s per round, its median over the rounds.

Ratios are this tree's figure over each other tree's (``<name>_per_turn_p50_ratio`` < 1:
faster here; ``<name>_c64_runs_per_s_ratio`` > 1: more throughput here), also per repetition.

    python bench/bench_run_layer.py [--tree base=/tmp/rl-base] [--tree v0=/tmp/rl-v0]
                                    [--rounds 10] [--runs 50] [--seconds 2] [--repeats 3] [--json]

``--json``: the last line of stdout is one flat JSON object, metric name -> number.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

THIS = "this"


def tree_pythonpath(tree: Path) -> str:
    return os.pathsep.join(str(tree / part) for part in ("server", "client", "generated", "")).rstrip(os.pathsep)


def tree_env(tree: Path | None, *extra: Path) -> dict[str, str]:
    """The environment of a process running ``tree``'s code (None: whatever resolves here);
    ``extra`` folders go first on its path."""
    paths = [str(p) for p in extra] + ([tree_pythonpath(tree)] if tree is not None else [])
    if not paths:
        return {}
    if tree is None and os.environ.get("PYTHONPATH"):
        paths.append(os.environ["PYTHONPATH"])
    return {"PYTHONPATH": os.pathsep.join(paths)}


def tree_app(tree: Path | None, relative: str, attr: str, shims: Path) -> tuple[str, Path | None]:
    """The ``--app`` for a server of ``tree``: that tree's own ``relative`` file (``bench/app.py``)
    when it has one, else this tree's, loaded by path under a module name of its own (the server
    runs in this tree's folder, where ``bench`` is this tree's package). Returns the app
    reference and the folder to put first on the server's path (None: ``bench`` as is)."""
    source = (tree / relative) if tree is not None and (tree / relative).is_file() else ROOT / relative
    if tree is None and source == ROOT / relative:
        return f"{relative[:-3].replace('/', '.')}:{attr}", None
    shims.mkdir(parents=True, exist_ok=True)
    module = f"_bench_app_{abs(hash((str(source), attr))):x}"
    (shims / f"{module}.py").write_text(
        "import importlib.util\n"
        f"_spec = importlib.util.spec_from_file_location({module + '_source'!r}, {str(source)!r})\n"
        "_module = importlib.util.module_from_spec(_spec)\n"
        "_spec.loader.exec_module(_module)\n"
        f"app = _module.{attr}\n"
    )
    return f"{module}:app", shims


# -- the client process ------------------------------------------------------------------


async def _worker_main(target: str) -> None:
    """Read one JSON command per line on stdin, answer one JSON line on stdout."""
    from agentd.client import AgentdClient

    from bench.bench_runs import concurrent, one_run

    client = AgentdClient(target)
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    out = sys.stdout
    while line := await reader.readline():
        command = json.loads(line)
        kind = command["cmd"]
        result: Any
        if kind == "seq":
            result = []  # [time to first event, run latency] per run
            for _ in range(command["runs"]):
                first, total, _ = await one_run(client)
                result.append([first, total])
        elif kind == "conc":
            result = await concurrent(target, command["clients"], command["seconds"])
        elif kind == "quit":
            break
        else:
            result = await _extra_command(client, target, command)
        out.write(json.dumps(result) + "\n")
        out.flush()
    await client.close()


async def _extra_command(client: Any, target: str, command: dict[str, Any]) -> Any:
    """Commands other benchmarks add (``bench_stream``): ``module:function`` called with the command."""
    import importlib

    module, _, name = command["cmd"].partition(":")
    return await getattr(importlib.import_module(module), name)(client, target, command)


class ClientProcess:
    """A client process for one server, running one tree's client code."""

    def __init__(self, target: str, env: dict[str, str], log: Path) -> None:
        self.process = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker", target],
            cwd=ROOT, env={**os.environ, **env}, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
            stderr=log.open("w"), text=True,
        )

    def ask(self, **command: Any) -> Any:
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write(json.dumps(command) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"client process ended (exit {self.process.wait()}); see its log")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.ask(cmd="quit") if self.process.poll() is None else None
        except (RuntimeError, BrokenPipeError, ValueError):
            pass
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()


class Fleet:
    """One server and one client process per tree."""

    def __init__(self, trees: dict[str, Path | None], logs: Path, *, app: tuple[str, str] = ("bench/app.py", "app"),
                 clients: bool = True) -> None:
        from bench.bench_runs import free_port, start_server, wait_ready

        self.servers: dict[str, subprocess.Popen] = {}
        self.clients: dict[str, ClientProcess] = {}
        self.targets: dict[str, str] = {}
        try:
            for name, tree in trees.items():
                port = free_port()
                reference, shim = tree_app(tree, app[0], app[1], logs / "apps")
                self.servers[name] = start_server(port, debug=False, stderr_path=logs / f"server-{name}.log",
                                                  extra_env=tree_env(tree, *([shim] if shim else [])),
                                                  app=reference)
                self.targets[name] = f"127.0.0.1:{port}"
            for name, target in self.targets.items():
                wait_ready(int(target.rpartition(":")[2]))
                if clients:
                    self.clients[name] = ClientProcess(target, tree_env(trees[name]), logs / f"client-{name}.log")
        except BaseException:
            self.close()
            raise

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        for server in self.servers.values():
            server.terminate()
        for server in self.servers.values():
            try:
                server.wait(timeout=20)
            except subprocess.TimeoutExpired:
                server.kill()


# -- the coordinator ---------------------------------------------------------------------


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def measure(fleet: Fleet, rounds: int, runs: int, seconds: float, clients: int) -> dict[str, dict[str, float]]:
    names = list(fleet.clients)
    for name in names:  # warm-up: first-call costs are not the steady state
        fleet.clients[name].ask(cmd="seq", runs=50)
        if seconds > 0:
            fleet.clients[name].ask(cmd="conc", clients=clients, seconds=0.5)
    firsts: dict[str, list[float]] = {name: [] for name in names}
    totals: dict[str, list[float]] = {name: [] for name in names}
    rates: dict[str, list[float]] = {name: [] for name in names}
    for _ in range(rounds):
        random.shuffle(names)
        for name in names:
            for first, total in fleet.clients[name].ask(cmd="seq", runs=runs):
                firsts[name].append(first)
                totals[name].append(total)
        if seconds > 0:
            random.shuffle(names)
            for name in names:
                rates[name].append(fleet.clients[name].ask(cmd="conc", clients=clients, seconds=seconds)["runs_per_s"])
    return {
        name: {
            "ttfe_p50_ms": pct(firsts[name], 0.5) * 1e3,
            "run_p50_ms": pct(totals[name], 0.5) * 1e3,
            "run_p99_ms": pct(totals[name], 0.99) * 1e3,
            "per_turn_p50_ms": pct(totals[name], 0.5) * 1e3 / 2,
            **({"c64_runs_per_s": statistics.median(rates[name])} if rates[name] else {}),
        }
        for name in totals
    }


def parse_trees(specs: list[str]) -> dict[str, Path | None]:
    trees: dict[str, Path | None] = {THIS: None}
    for spec in specs:
        name, _, path = spec.partition("=")
        if not name or not path or name == THIS or not name.isidentifier():
            raise SystemExit(f"--tree wants NAME=PATH (NAME an identifier other than {THIS!r}), got {spec!r}")
        tree = Path(path).resolve()
        if not (tree / "server" / "agentd").is_dir():
            raise SystemExit(f"--tree {spec}: {tree} does not look like an agentd tree")
        trees[name] = tree
    return trees


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", action="append", default=[], help="NAME=PATH of another revision's tree")
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--runs", type=int, default=50, help="sequential runs per tree per round")
    parser.add_argument("--seconds", type=float, default=2.0, help="seconds of 64 clients per tree per round (0: skip)")
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=3, help="independent repetitions (fresh processes)")
    parser.add_argument("--json", action="store_true", help="end with one flat JSON object of the metrics")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        asyncio.run(_worker_main(args.worker))
        return
    trees = parse_trees(args.tree)
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-run-layer-"))
    reps: list[dict[str, dict[str, float]]] = []
    for rep in range(args.repeats):
        fleet = Fleet(trees, logs)
        try:
            reps.append(measure(fleet, args.rounds, args.runs, args.seconds, args.clients))
        finally:
            fleet.close()
        line = "  ".join(
            f"{name}: turn {m['per_turn_p50_ms']:.3f} ms"
            + (f", {m['c64_runs_per_s']:.0f} runs/s" if "c64_runs_per_s" in m else "")
            for name, m in reps[-1].items()
        )
        print(f"repetition {rep + 1}: {line}", flush=True)

    metrics: dict[str, float] = {}
    for name in trees:
        prefix = "" if name == THIS else f"{name}_"
        for key in reps[0][name]:
            metrics[f"{prefix}{key}"] = statistics.median(r[name][key] for r in reps)
    for name in trees:
        if name == THIS:
            continue
        turn = [r[THIS]["per_turn_p50_ms"] / r[name]["per_turn_p50_ms"] for r in reps]
        metrics[f"{name}_per_turn_p50_ratio"] = statistics.median(turn)
        for i, value in enumerate(turn, 1):
            metrics[f"{name}_per_turn_p50_ratio_rep{i}"] = value
        if "c64_runs_per_s" in reps[0][name]:
            rate = [r[THIS]["c64_runs_per_s"] / r[name]["c64_runs_per_s"] for r in reps]
            metrics[f"{name}_c64_runs_per_s_ratio"] = statistics.median(rate)
            for i, value in enumerate(rate, 1):
                metrics[f"{name}_c64_runs_per_s_ratio_rep{i}"] = value

    print(f"agentd run layer · {os.cpu_count()} cpu · python {sys.version.split()[0]} · memory store, scripted model"
          f" (0 ms) · {args.repeats} repetition(s) of {args.rounds} interleaved rounds · logs in {logs}")
    for name, tree in trees.items():
        prefix = "" if name == THIS else f"{name}_"
        where = "this tree" if tree is None else str(tree)
        line = (f"  {name:6} per turn p50 {metrics[prefix + 'per_turn_p50_ms']:.3f} ms"
                f"   run p50 {metrics[prefix + 'run_p50_ms']:.2f} ms  p99 {metrics[prefix + 'run_p99_ms']:.2f} ms"
                f"   ttfe p50 {metrics[prefix + 'ttfe_p50_ms']:.2f} ms")
        if prefix + "c64_runs_per_s" in metrics:
            line += f"   {args.clients} clients {metrics[prefix + 'c64_runs_per_s']:.0f} runs/s"
        print(f"{line}   ({where})")
    for name in trees:
        if name != THIS:
            line = f"  this / {name}: per turn {metrics[f'{name}_per_turn_p50_ratio']:.3f}"
            if f"{name}_c64_runs_per_s_ratio" in metrics:
                line += f", {args.clients}-client runs/s {metrics[f'{name}_c64_runs_per_s_ratio']:.3f}"
            print(line + " (median over repetitions)")
    if args.json:
        print(json.dumps({k: round(v, 6) for k, v in metrics.items()}))


if __name__ == "__main__":
    main()
