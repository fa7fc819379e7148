"""What a change costs: the same benchmarks on a base revision and on the working tree, alternating.

    python bench/compare.py --base <git rev> [--bench runs --bench scale ...] [--rounds 3] [-- bench args]
    make bench-compare BASE=<git rev> [BENCH="runs scale"] [ROUNDS=3] [ARGS="--runs 200"]

The base revision is checked out into a temporary git worktree. Each round runs every
chosen benchmark script of THIS tree twice, once per side, in alternating order (base then
working tree, then the other way round), each as its own process whose ``PYTHONPATH`` puts
that side's ``server/``, ``client/`` and ``generated/`` first: the ``agentd`` it imports,
and the servers it starts, are that side's code, while the harness (the benchmark itself,
the scripted model endpoint, the bench app) is this tree's, so both sides are measured
alike. Machine noise then hits both sides alike; the table gives each metric's median per
side and the ratio working tree / base.

A benchmark takes part when it accepts ``--json`` and then prints one flat JSON object of
figures as its last line; a figure's name ends with its unit, which says which way is
better (``_ms``, ``_s``, ``_kb``, ``_mb``: lower; ``_per_s``: higher).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCHES = {
    "runs": "bench_runs.py",
    "scale": "bench_scale.py",
    "stores": "bench_stores.py",
    "run_stores": "bench_run_stores.py",
    "tracing": "bench_tracing.py",
    "stream": "bench_stream.py",
    "run_layer": "bench_run_layer.py",
}
LOWER_IS_BETTER = ("_ms", "_s", "_kb", "_mb", "_pct")
HIGHER_IS_BETTER = ("_per_s",)


def tree_path(tree: Path) -> str:
    """PYTHONPATH that makes ``agentd`` (server, client, generated code) resolve to ``tree``."""
    return os.pathsep.join(str(tree / part) for part in ("server", "client", "generated"))


def run_bench(script: str, tree: Path, args: list[str]) -> dict[str, float]:
    env = {**os.environ, "PYTHONPATH": tree_path(tree)}
    process = subprocess.run(
        [sys.executable, str(ROOT / "bench" / script), "--json", *args],
        cwd=ROOT, env=env, capture_output=True, text=True,
    )
    lines = process.stdout.strip().splitlines()
    if process.returncode != 0 or not lines:
        raise SystemExit(f"{script} failed on {tree} (exit {process.returncode}):\n{process.stderr[-3000:]}")
    try:
        figures = json.loads(lines[-1])
    except json.JSONDecodeError:
        raise SystemExit(f"{script} printed no JSON object last; does it take --json?\n{lines[-1][:500]}") from None
    return {name: float(value) for name, value in figures.items() if isinstance(value, (int, float))}


def verdict(name: str, ratio: float) -> str:
    """Whether a ratio (working tree / base) is better or worse, by the figure's unit."""
    if name.endswith(HIGHER_IS_BETTER):
        better = ratio > 1
    elif name.endswith(LOWER_IS_BETTER):
        better = ratio < 1
    else:
        return ""
    if abs(ratio - 1) < 0.03:
        return "same"
    return "better" if better else "worse"


def report(bench: str, base: list[dict[str, float]], work: list[dict[str, float]], rev: str) -> None:
    print(f"\n{bench}: median of {len(base)} alternating run(s) per side · base {rev} vs working tree")
    names = [name for name in work[0] if all(name in figures for figures in base + work)]
    width = max(len(name) for name in names) if names else 10
    print(f"  {'figure':{width}}  {'base':>12}  {'working':>12}  {'ratio':>7}")
    for name in names:
        before = statistics.median(figures[name] for figures in base)
        after = statistics.median(figures[name] for figures in work)
        ratio = after / before if before else float("nan")
        print(f"  {name:{width}}  {before:12.3f}  {after:12.3f}  {ratio:7.2f}  {verdict(name, ratio)}")
    missing = sorted(set(work[0]) - set(names))
    if missing:
        print(f"  (only on one side: {', '.join(missing)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the git revision to compare against (a commit, tag, branch)")
    parser.add_argument("--bench", action="append", choices=sorted(BENCHES),
                        help="a benchmark to run (repeatable; default: runs)")
    parser.add_argument("--rounds", type=int, default=3, help="alternations per benchmark (default 3)")
    parser.add_argument("bench_args", nargs=argparse.REMAINDER, help="after --: arguments for every benchmark")
    args = parser.parse_args()
    benches = args.bench or ["runs"]
    extra = [arg for arg in args.bench_args if arg != "--"]
    rev = subprocess.run(["git", "rev-parse", "--short", args.base], cwd=ROOT, capture_output=True, text=True,
                         check=True).stdout.strip()
    with tempfile.TemporaryDirectory(prefix="agentd-bench-base-") as scratch:
        base_tree = Path(scratch) / "tree"
        subprocess.run(["git", "worktree", "add", "--quiet", "--detach", str(base_tree), rev], cwd=ROOT, check=True)
        try:
            for bench in benches:
                script = BENCHES[bench]
                results: dict[str, list[dict[str, float]]] = {"base": [], "work": []}
                for round_index in range(args.rounds):
                    order = ("base", "work") if round_index % 2 == 0 else ("work", "base")
                    for side in order:
                        tree = base_tree if side == "base" else ROOT
                        print(f"  {bench} round {round_index + 1}/{args.rounds}: {side}", file=sys.stderr, flush=True)
                        results[side].append(run_bench(script, tree, extra))
                report(bench, results["base"], results["work"], rev)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(base_tree)], cwd=ROOT, check=False)


if __name__ == "__main__":
    main()
