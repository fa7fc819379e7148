"""agentd benchmark: runs over a session of 100,000 items. Numbers, not pass/fail.

The issue: a run over a 100,000-item session loaded the whole history (0.6-0.8 s to the
first event, 50 MB more server RSS, other callers' p99 at 450 ms meanwhile). The fix: the
history window (AGENTD_HISTORY_MAX_ITEMS, 200 by default); the store reads only the newest
items. This shows the numbers on a real server process (``agentd serve`` defaults: the
SQLite session store, the memory run store; the offline scripted model, one model turn per
run) driven by the Python client over gRPC:

1. One session is filled with --items (100,000) message items through AddSessionItems
   (1,000 per call, the most one call takes), besides 16 small sessions of 10 items.
2. --runs (20) one-turn runs on the long session and as many on empty sessions, alternating:
   time to the first event (run_started) and to the end of the run, p50; what run_started
   says was read (history_items, history_omitted).
3. The server's own RSS (/proc/<pid>/status VmRSS) just before and after the long-session
   runs, and its peak (VmHWM).
4. Other callers: 8 clients (a channel each) calling GetSession on a small session and
   ListSessions (page of 20) in turn, 10 ms apart, for --seconds (4) each while the server is
   otherwise idle, while one client starts runs on fresh (empty) sessions back to back, and
   while it starts runs on the long session back to back: their p50/p99 latency.

--stores sqlite,postgres,redis adds the Postgres (AGENTD_TEST_POSTGRES_URL, else
postgresql://postgres@127.0.0.1:5432/test; a fresh schema, dropped afterwards) and Redis
(AGENTD_TEST_REDIS_URL, else redis://127.0.0.1:6379/0; a fresh key prefix, its keys deleted
afterwards) stores; their runs live there too (the run store follows the session store).

--compare <git-ref> also serves a baseline tree (``git worktree add`` of the ref, served with
PYTHONPATH=<tree>/server:<tree>/client:<tree>/generated:<tree>; removed afterwards) beside
the current one: same store, same data, runs and caller phases interleaved between the two
servers, ratios current/baseline. The client is always this tree's (the wire protocol is
the same). A baseline that cannot serve what this bench uses fails its side with the reason.

    python bench/bench_long_session.py [--items 100000] [--runs 20] [--seconds 4]
        [--stores sqlite[,postgres,redis]] [--compare <git-ref>]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.client import AgentdClient  # noqa: E402
from agentd.v1 import item_pb2  # noqa: E402
from bench.bench_runs import free_port, pct  # noqa: E402

POSTGRES_URL = os.environ.get("AGENTD_TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/test")
REDIS_URL = os.environ.get("AGENTD_TEST_REDIS_URL", "redis://127.0.0.1:6379/0")
PER_CALL = 1000  # AddSessionItems takes at most this many items
CALLERS = 8
SMALL_SESSIONS = 16
CALLER_PAUSE_S = 0.010
LONG = "long-session"

# The served app, written next to the logs and put on the server's PYTHONPATH, so that a
# baseline tree (whose bench/ lacks this file) serves the very same agent.
APP_MODULE = "agentd_bench_long_session_app"
APP_SOURCE = '''"""bench/bench_long_session.py's app: one agent, one model turn per run."""
from agentd.server import Agent, App, Script, say

agent = Agent(name="long", instructions="Answers in one turn.")
app = App(agents=[agent], offline_script=Script.of(say("Noted: the order ships tomorrow.")))
'''
AGENT = "long"

USER_TEXT = "Where is my order A-1001? I paid on Monday and the tracking page still says it is being prepared."
ASSISTANT_TEXT = "The order A-1001 ships tomorrow from the Lyon warehouse; the tracking number follows by e-mail."


class SideFailed(Exception):
    """One side (the baseline, usually) cannot do what the bench needs; the message says why."""


def rss_mb(pid: int, field_name: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field_name):
            return int(line.split()[1]) / 1024
    return float("nan")


def message(i: int) -> item_pb2.Item:
    if i % 2 == 0:
        return item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=f"{USER_TEXT} ({i})"))
    text = f"{ASSISTANT_TEXT} ({i})"
    return item_pb2.Item(agent=AGENT, message=item_pb2.Message(role=item_pb2.ROLE_ASSISTANT, text=text))


@dataclass
class Side:
    """One tree being served: this one ("current") or a baseline worktree."""

    name: str
    key: str  # in file names, the Postgres schema and the Redis prefix
    tree: Path
    process: subprocess.Popen | None = None
    port: int = 0
    log: Path | None = None
    namespace: str = ""
    failure: str = ""
    metrics: dict[str, float] = field(default_factory=dict)
    fresh: int = 0  # counter for fresh session ids

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def fail(self, why: str) -> None:
        if not self.failure:
            self.failure = why
            print(f"  [{self.name}] FAILED: {why}", flush=True)


def server_env(side: Side, store: str, workdir: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("AGENTD_") and k != "OPENAI_API_KEY"}
    tree = side.tree
    env["PYTHONPATH"] = os.pathsep.join(
        [str(tree / "server"), str(tree / "client"), str(tree / "generated"), str(tree), str(workdir)])
    env["AGENTD_SQLITE_PATH"] = str(workdir / f"{side.key}-{store}.db")
    if store == "postgres":
        env["AGENTD_POSTGRES_URL"] = POSTGRES_URL
        env["AGENTD_POSTGRES_SCHEMA"] = side.namespace
    elif store == "redis":
        env["AGENTD_REDIS_URL"] = REDIS_URL
        env["AGENTD_REDIS_PREFIX"] = side.namespace
    return env


async def start_server(side: Side, store: str, workdir: Path) -> None:
    side.port = free_port()
    side.log = workdir / f"{side.key}-{store}.log"
    side.namespace = f"bench_long_{os.getpid()}_{side.key}"
    side.process = subprocess.Popen(
        [sys.executable, "-m", "agentd.cli.main", "serve", "--app", f"{APP_MODULE}:app", "--port", str(side.port),
         "--store", store, "--model-provider", "scripted", "--log-level", "WARNING"],
        cwd=side.tree, env=server_env(side, store, workdir), stderr=side.log.open("w"), stdout=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 60
    async with grpc.aio.insecure_channel(side.target) as channel:
        while True:
            if side.process.poll() is not None:
                tail = side.log.read_text()[-1500:].strip()
                raise SideFailed(f"the server exited with {side.process.returncode} at start: {tail}")
            try:
                await asyncio.wait_for(channel.channel_ready(), 0.5)
                return
            except asyncio.TimeoutError:
                if time.monotonic() > deadline:
                    raise SideFailed("the server did not answer within 60 s") from None


def stop_server(side: Side) -> None:
    if side.process is not None and side.process.poll() is None:
        side.process.terminate()
        try:
            side.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            side.process.kill()
            side.process.wait()
    side.process = None


async def fill(side: Side, items: int) -> None:
    """The long session (items messages), SMALL_SESSIONS small ones, through the session API."""
    async with AgentdClient(side.target, resume=False) as client:
        agents = [a.name for a in await client.list_agents()]
        if f"agents/{AGENT}" not in agents:
            raise SideFailed(f"the server does not serve agents/{AGENT} (it serves {agents})")
        for i in range(SMALL_SESSIONS):
            await client.create_session(f"small-{i}", metadata={"bench": "small"})
            await client.add_items(f"small-{i}", [message(j) for j in range(10)])
        await client.create_session(LONG, metadata={"bench": "long"})
        started = time.perf_counter()
        for first in range(0, items, PER_CALL):
            await client.add_items(LONG, [message(i) for i in range(first, min(items, first + PER_CALL))])
        side.metrics["fill_s"] = time.perf_counter() - started
        newest = (await client.list_items(LONG, newest_first=True, page_size=1)).items
        if not newest or newest[0].sequence != items:
            raise SideFailed(f"the long session ends at sequence {newest[0].sequence if newest else 0}, not {items}")


async def one_run(client: AgentdClient, session_id: str) -> tuple[float, float, int, int]:
    """(time to run_started, total, history_items, history_omitted) of a one-turn run."""
    started = time.perf_counter()
    first = 0.0
    history = omitted = -1
    last = ""
    async for event in client.run(AGENT, "Any news on my order?", session_id=session_id):
        kind = event.WhichOneof("payload")
        if kind == "run_started":
            first = time.perf_counter() - started
            history, omitted = event.run_started.history_items, event.run_started.history_omitted
        last = kind
    if last != "run_completed" or history < 0:
        raise SideFailed(f"a run on {session_id} ended with {last!r} (run_started seen: {history >= 0})")
    return first, time.perf_counter() - started, history, omitted


async def measure_runs(sides: list[Side], runs: int) -> None:
    """Long-session and empty-session runs, alternating (and alternating between the sides)."""
    clients = {s.name: AgentdClient(s.target) for s in sides}
    samples: dict[str, dict[str, list[float]]] = {s.name: {"long_first": [], "long_total": [], "empty_first": [],
                                                            "empty_total": []} for s in sides}
    try:
        for side in sides:  # warm-up: first-call costs are not the steady state
            for _ in range(3):
                side.fresh += 1
                await one_run(clients[side.name], f"warm-{side.fresh}")
            side.metrics["rss_before_mb"] = rss_mb(side.process.pid)
            side.metrics["hwm_before_mb"] = rss_mb(side.process.pid, "VmHWM:")
        for i in range(runs):
            for side in sides if i % 2 == 0 else sides[::-1]:
                if side.failure:
                    continue
                client = clients[side.name]
                try:
                    first, total, history, omitted = await one_run(client, LONG)
                    samples[side.name]["long_first"].append(first)
                    samples[side.name]["long_total"].append(total)
                    side.metrics["history_items"], side.metrics["history_omitted"] = history, omitted
                    side.fresh += 1
                    session = f"empty-{side.fresh}"
                    await client.create_session(session)
                    first, total, _, _ = await one_run(client, session)
                    samples[side.name]["empty_first"].append(first)
                    samples[side.name]["empty_total"].append(total)
                except (SideFailed, grpc.aio.AioRpcError) as exc:
                    side.fail(f"runs: {exc}")
        for side in sides:
            if side.failure:
                continue
            side.metrics["rss_after_mb"] = rss_mb(side.process.pid)
            side.metrics["hwm_after_mb"] = rss_mb(side.process.pid, "VmHWM:")
            for key, values in samples[side.name].items():
                side.metrics[f"{key}_p50_ms"] = pct(values, 0.5) * 1e3
    finally:
        for client in clients.values():
            await client.close()


@dataclass
class PhaseSamples:
    latencies: list[float] = field(default_factory=list)
    run_totals: list[float] = field(default_factory=list)
    wall: float = 0.0


async def callers_phase(side: Side, runs_on: str | None, seconds: float, samples: PhaseSamples) -> None:
    """CALLERS clients doing GetSession/ListSessions for ``seconds``; meanwhile one client runs
    back to back on the long session (runs_on="long"), on fresh sessions ("empty"), or nothing."""
    latencies = samples.latencies
    run_totals = samples.run_totals
    stop = asyncio.Event()
    clients = [AgentdClient(side.target) for _ in range(CALLERS)]
    runner = AgentdClient(side.target)

    async def caller(index: int) -> None:
        client = clients[index]
        n = index
        while not stop.is_set():
            started = time.perf_counter()
            if n % 2 == 0:
                await client.get_session(f"small-{n % SMALL_SESSIONS}")
            else:
                await client.list_sessions(page_size=20)
            latencies.append(time.perf_counter() - started)
            n += 1
            await asyncio.sleep(CALLER_PAUSE_S)

    async def run_loop() -> None:
        while not stop.is_set():
            if runs_on == "long":
                session = LONG
            else:
                side.fresh += 1
                session = f"fresh-{side.fresh}"
            run_totals.append((await one_run(runner, session))[1])

    try:
        for client in clients:  # connect first: a channel's first call is not the steady state
            await client.get_session("small-0")
        tasks = [asyncio.create_task(caller(i)) for i in range(CALLERS)]
        if runs_on:
            tasks.append(asyncio.create_task(run_loop()))
        started = time.perf_counter()
        await asyncio.sleep(seconds)
        stop.set()
        await asyncio.gather(*tasks)
        samples.wall += time.perf_counter() - started
    finally:
        for client in [*clients, runner]:
            await client.close()


def phase_metrics(side: Side, phase: str, samples: PhaseSamples) -> None:
    side.metrics[f"{phase}_p50_ms"] = pct(samples.latencies, 0.5) * 1e3
    side.metrics[f"{phase}_p99_ms"] = pct(samples.latencies, 0.99) * 1e3
    side.metrics[f"{phase}_calls_per_s"] = len(samples.latencies) / samples.wall
    if phase != "idle":
        side.metrics[f"{phase}_runs"] = len(samples.run_totals)
        side.metrics[f"{phase}_run_p50_ms"] = pct(samples.run_totals, 0.5) * 1e3


async def cleanup_namespace(store: str, namespace: str) -> None:
    if store == "postgres":
        import asyncpg

        conn = await asyncpg.connect(POSTGRES_URL)
        try:
            await conn.execute(f"DROP SCHEMA IF EXISTS {namespace} CASCADE")
        finally:
            await conn.close()
    elif store == "redis":
        import redis.asyncio as aioredis

        client = aioredis.from_url(REDIS_URL)
        try:
            keys = [k async for k in client.scan_iter(match=f"{namespace}:*", count=1000)]
            for i in range(0, len(keys), 1000):
                await client.delete(*keys[i:i + 1000])
        finally:
            await client.aclose()


async def bench_store(store: str, sides: list[Side], args: argparse.Namespace, workdir: Path) -> None:
    for side in sides:
        side.metrics, side.failure, side.fresh = {}, "", 0
    try:
        for side in sides:
            try:
                await start_server(side, store, workdir)
                await fill(side, args.items)
            except (SideFailed, grpc.aio.AioRpcError) as exc:
                side.fail(f"setup: {exc}")
        live = [s for s in sides if not s.failure]
        if live:
            await measure_runs(live, args.runs)
        # With a baseline each phase is two halves per side, in the order A B B A, so that
        # machine noise (other work on the host) hits both sides alike.
        halves = 2 if len(sides) > 1 else 1
        for phase in (None, "empty", "long"):
            name = phase or "idle"
            collected = {s.name: PhaseSamples() for s in sides}
            for half in range(halves):
                order = [s for s in sides if not s.failure]
                for side in order if half % 2 == 0 else order[::-1]:
                    try:
                        await callers_phase(side, phase, args.seconds / halves, collected[side.name])
                    except (SideFailed, grpc.aio.AioRpcError) as exc:
                        side.fail(f"callers ({name}): {exc}")
            for side in sides:
                if not side.failure:
                    phase_metrics(side, name, collected[side.name])
    finally:
        for side in sides:
            if side.process is not None and side.process.poll() is not None and not side.failure:
                side.fail(f"the server exited with {side.process.returncode}")
            stop_server(side)
            try:
                await cleanup_namespace(store, side.namespace)
            except Exception as exc:  # noqa: BLE001 - report, go on with the other side
                print(f"  [{side.name}] cleanup of {store} namespace {side.namespace} failed: {exc!r}")
    report(store, sides, args)


def report(store: str, sides: list[Side], args: argparse.Namespace) -> None:
    def ms(key: str) -> tuple[str, str]:
        return key, "{:.1f} ms"

    rows: list[tuple[str, str, str]] = [
        ("fill: 100 AddSessionItems x 1,000" if args.items == 100_000 else f"fill: {args.items:,} items",
         "fill_s", "{:.1f} s"),
        ("run_started history_items (long)", "history_items", "{:,.0f}"),
        ("run_started history_omitted (long)", "history_omitted", "{:,.0f}"),
        ("first event p50, long session", *ms("long_first_p50_ms")),
        ("first event p50, empty session", *ms("empty_first_p50_ms")),
        ("run total p50, long session", *ms("long_total_p50_ms")),
        ("run total p50, empty session", *ms("empty_total_p50_ms")),
        ("server RSS before long runs", "rss_before_mb", "{:.1f} MB"),
        ("server RSS after long runs", "rss_after_mb", "{:.1f} MB"),
        ("  RSS growth", "rss_growth_mb", "{:+.1f} MB"),
        ("server peak RSS (VmHWM) after", "hwm_after_mb", "{:.1f} MB"),
        ("  peak growth over the runs", "hwm_growth_mb", "{:+.1f} MB"),
        ("callers p50, idle server", *ms("idle_p50_ms")),
        ("callers p99, idle server", *ms("idle_p99_ms")),
        ("callers p50, empty-session runs", *ms("empty_p50_ms")),
        ("callers p99, empty-session runs", *ms("empty_p99_ms")),
        ("callers p50, long-session runs", *ms("long_p50_ms")),
        ("callers p99, long-session runs", *ms("long_p99_ms")),
        ("  calls/s idle / empty / long", "calls", ""),
        ("  runs done: empty / long phase", "runs", ""),
    ]
    for side in sides:
        m = side.metrics
        if "rss_after_mb" in m:
            m["rss_growth_mb"] = m["rss_after_mb"] - m["rss_before_mb"]
            m["hwm_growth_mb"] = m["hwm_after_mb"] - m["hwm_before_mb"]
    names = [s.name for s in sides]
    compare = len(sides) > 1
    width = 36
    header = f"  {'':{width}}" + "".join(f"{n:>16}" for n in names) + (f"{'current/base':>14}" if compare else "")
    print(f"\nstore {store} · session of {args.items:,} items · {args.runs} runs each · {CALLERS} callers"
          f" · {os.cpu_count()} cpu · python {sys.version.split()[0]}")
    print(header)
    for label, key, fmt in rows:
        cells = []
        values = []
        for side in sides:
            m = side.metrics
            if key == "calls":
                text = "/".join(f"{m[k]:.0f}" for k in ("idle_calls_per_s", "empty_calls_per_s", "long_calls_per_s")
                                if k in m) or "-"
                value = None
            elif key == "runs":
                text = "/".join(f"{m[k]:.0f}" for k in ("empty_runs", "long_runs") if k in m) or "-"
                value = None
            elif key in m:
                value = m[key]
                text = fmt.format(value)
            else:
                value, text = None, "-"
            cells.append(f"{text:>16}")
            values.append(value)
        ratio = ""
        if compare and key.endswith(("_ms", "_s", "_mb")) and "growth" not in key and None not in values and values[1]:
            ratio = f"{values[0] / values[1]:.3f}x"
        print(f"  {label:{width}}" + "".join(cells) + (f"{ratio:>14}" if compare else ""))
    for side in sides:
        if side.failure:
            print(f"  {side.name}: FAILED: {side.failure}")


def add_worktree(ref: str) -> tuple[Path, str]:
    commit = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--verify", f"{ref}^{{commit}}"],
                            capture_output=True, text=True)
    if commit.returncode != 0:
        sys.exit(f"--compare: {ref!r} is not a commit: {commit.stderr.strip()}")
    path = Path(tempfile.mkdtemp(prefix="agentd-bench-baseline-"))
    path.rmdir()  # git worktree add wants to create it
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(path), commit.stdout.strip()],
                          capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"--compare: git worktree add failed: {done.stderr.strip()}")
    return path, commit.stdout.strip()[:10]


def remove_worktree(path: Path) -> None:
    done = subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(path)],
                          capture_output=True, text=True)
    if done.returncode != 0:
        print(f"git worktree remove {path} failed: {done.stderr.strip()}", file=sys.stderr)
        shutil.rmtree(path, ignore_errors=True)
        subprocess.run(["git", "-C", str(ROOT), "worktree", "prune"], capture_output=True)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--items", type=int, default=100_000, help="items of the long session")
    parser.add_argument("--runs", type=int, default=20, help="runs on the long session (and as many on empty ones)")
    parser.add_argument("--seconds", type=float, default=4.0, help="length of each other-callers phase")
    parser.add_argument("--stores", default="sqlite", help="comma-separated: sqlite, postgres, redis")
    parser.add_argument("--compare", metavar="GIT_REF", help="also serve this commit's tree, interleaved; print ratios")
    args = parser.parse_args()
    stores = [s.strip() for s in args.stores.split(",") if s.strip()]
    unknown = set(stores) - {"sqlite", "postgres", "redis"}
    if unknown:
        parser.error(f"unknown stores {sorted(unknown)}")

    sides = [Side("current", "cur", ROOT)]
    worktree = None
    if args.compare:
        worktree, commit = add_worktree(args.compare)
        sides.append(Side(f"base {commit[:7]}", "base", worktree))
    started = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="agentd-bench-long-") as tmp:
            workdir = Path(tmp)
            (workdir / f"{APP_MODULE}.py").write_text(APP_SOURCE)
            for store in stores:
                await bench_store(store, sides, args, workdir)
    finally:
        if worktree is not None:
            remove_worktree(worktree)
    print(f"\n({time.perf_counter() - started:.0f} s in all; the callers pause {CALLER_PAUSE_S * 1e3:.0f} ms"
          f" between calls; the long session grows by 2 items per run)")


if __name__ == "__main__":
    asyncio.run(main())
