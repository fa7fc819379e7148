"""agentd benchmark: server memory under hostile load (issue 11). Numbers, not pass/fail.

Starts a real server process on the embedded default (memory run store, memory session
store) with the offline scripted model and measures its RSS (/proc/<pid>/status):

1. Ended runs: after a warm-up that fills the memory run store's bounds
   (AGENTD_RUN_MEMORY_MAX_ENDED_RUNS / _BYTES), RSS every 1,000 of --runs (10,000) more runs,
   each streaming --deltas text deltas. Flat (within 10%) means ended runs are bounded.
2. Stalled readers: --stalled (300) StreamRuns of --stalled-deltas (2,000) deltas each whose
   client reads the first event and then nothing (its HTTP/2 window kept small: no BDP
   probing, as a client that stopped reading its socket). RSS while they are held after
   every run ended, and after they are closed. A stream is ended by the server when gRPC stops
   taking its messages and the run gets AGENTD_MAX_STREAM_LAG_EVENTS ahead of it: how many
   were (RESOURCE_EXHAUSTED) is printed, read after the measurement (gRPC takes a few MB per
   stream before it blocks, so runs of 2,000 deltas rarely reach it). Runs past the memory
   run store's bounds are forgotten (their streams then end NOT_FOUND). --compare-lag runs this
   part again with another limit.

    python bench/bench_memory.py [--runs 10000] [--stalled 300]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.server import Agent, App, Script, say  # noqa: E402
from agentd.v1 import agent_service_pb2 as apb  # noqa: E402
from agentd.v1 import agent_service_pb2_grpc as apb_grpc  # noqa: E402
from bench.bench_runs import free_port, wait_ready  # noqa: E402

DELTAS = int(os.environ.get("BENCH_MEMORY_DELTAS", "50"))
STALLED_DELTAS = int(os.environ.get("BENCH_MEMORY_STALLED_DELTAS", "2000"))


def _words(n: int) -> str:
    return " ".join(f"word{i}" for i in range(n))


# The apps the server process loads (--app bench.bench_memory:chatty_app / long_app).
chatty = Agent(name="chatty", instructions="Talks.")
chatty_app = App(agents=[chatty], offline_script=Script.of(say(_words(DELTAS))))
long_app = App(agents=[chatty], offline_script=Script.of(say(_words(STALLED_DELTAS))))


def rss_mb(pid: int, field: str = "VmRSS:") -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field):
            return int(line.split()[1]) / 1024
    return float("nan")


def start(port: int, app: str, logs: Path, env: dict[str, str]) -> subprocess.Popen:
    environment = {**os.environ, **env, "AGENTD_SQLITE_PATH": str(logs.with_suffix(".db"))}
    environment.pop("OPENAI_API_KEY", None)
    process = subprocess.Popen(
        [sys.executable, "-m", "agentd.cli.main", "serve", "--app", app, "--port", str(port),
         "--store", "memory", "--model-provider", "scripted", "--log-level", "WARNING"],
        cwd=ROOT, env=environment, stderr=logs.open("w"), stdout=subprocess.DEVNULL,
    )
    wait_ready(port)
    return process


async def one_run(stub: apb_grpc.AgentServiceStub, i: int) -> None:
    last = None
    async for response in stub.StreamRun(apb.StreamRunRequest(start=apb.StartRun(agent="agents/chatty",
                                                                                input=f"run {i}"))):
        last = response.event
    if last is None or last.WhichOneof("payload") != "run_completed":
        raise RuntimeError(f"run {i} did not complete: {last}")


async def many_runs(stub: apb_grpc.AgentServiceStub, count: int, concurrency: int) -> None:
    todo = iter(range(count))

    async def worker() -> None:
        for i in todo:
            await one_run(stub, i)

    await asyncio.gather(*(worker() for _ in range(concurrency)))


async def ended_runs(args: argparse.Namespace, logs: Path) -> None:
    port = free_port()
    server = start(port, "bench.bench_memory:chatty_app", logs / "ended.log", {})
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            stub = apb_grpc.AgentServiceStub(channel)
            started = time.perf_counter()
            await many_runs(stub, args.warmup, args.concurrency)
            print(f"ended runs ({DELTAS} deltas each, memory run store, default bounds):")
            print(f"  warm-up: {args.warmup} runs in {time.perf_counter() - started:.1f} s,"
                  f" RSS {rss_mb(server.pid):.1f} MB")
            samples = [rss_mb(server.pid)]
            step = max(args.runs // 10, 1)
            done = 0
            started = time.perf_counter()
            while done < args.runs:
                n = min(step, args.runs - done)
                await many_runs(stub, n, args.concurrency)
                done += n
                samples.append(rss_mb(server.pid))
                print(f"  after {done:>6} more runs: RSS {samples[-1]:.1f} MB")
            wall = time.perf_counter() - started
            growth = (samples[-1] - samples[0]) / samples[0] * 100
            spread = (max(samples) - min(samples)) / min(samples) * 100
            print(f"  {args.runs} runs in {wall:.1f} s ({args.runs / wall:.0f} runs/s); RSS first {samples[0]:.1f} MB,"
                  f" last {samples[-1]:.1f} MB ({growth:+.1f}%), max-min spread {spread:.1f}%,"
                  f" peak {rss_mb(server.pid, 'VmHWM:'):.1f} MB")
    finally:
        server.terminate()
        server.wait(timeout=30)


async def stalled_readers(args: argparse.Namespace, logs: Path, lag: str | None) -> None:
    port = free_port()
    env = {"AGENTD_MAX_ACTIVE_RUNS": str(max(args.stalled, 1000))}
    if lag is not None:
        env["AGENTD_MAX_STREAM_LAG_EVENTS"] = lag
    server = start(port, "bench.bench_memory:long_app", logs / f"stalled-{lag}.log", env)
    label = f"AGENTD_MAX_STREAM_LAG_EVENTS={lag}" if lag is not None else "default stream lag limit"
    try:
        base = rss_mb(server.pid)
        # One channel per 50 streams; no BDP probing: the window stays at 64 KB, as for a
        # client that stopped reading its socket.
        channels = [grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.http2.bdp_probe", 0),
                                                                             ("grpc.use_local_subchannel_pool", 1)])
                    for _ in range((args.stalled + 49) // 50)]
        watcher = grpc.aio.insecure_channel(f"127.0.0.1:{port}")
        try:
            stubs = [apb_grpc.AgentServiceStub(c) for c in channels]
            calls = [stubs[i % len(stubs)].StreamRun(apb.StreamRunRequest(start=apb.StartRun(
                agent="agents/chatty", input=f"stall {i}"))) for i in range(args.stalled)]
            firsts = await asyncio.gather(*(c.read() for c in calls), return_exceptions=True)  # then never again
            run_ids = [f.event.run_id for f in firsts if not isinstance(f, BaseException)]
            if len(run_ids) < len(calls):
                failed = next(f for f in firsts if isinstance(f, BaseException))
                print(f"  ({len(calls) - len(run_ids)} streams ended before their first event: {failed!r:.160})")
            stub = apb_grpc.AgentServiceStub(watcher)
            started = time.perf_counter()
            ended_statuses = (apb.RUN_STATUS_COMPLETED, apb.RUN_STATUS_FAILED, apb.RUN_STATUS_CANCELLED)

            async def status(run_id: str) -> int:
                try:
                    return (await stub.GetRun(apb.GetRunRequest(name=f"runs/{run_id}"))).run.status
                except grpc.aio.AioRpcError as exc:
                    if exc.code() is grpc.StatusCode.NOT_FOUND:
                        return -1  # ended and already forgotten (the memory run store's bounds)
                    raise

            while True:  # every run ends (a bench may poll)
                statuses = [await status(r) for r in run_ids]
                if all(s in ended_statuses or s == -1 for s in statuses):
                    break
                await asyncio.sleep(0.5)
            completed = sum(s == apb.RUN_STATUS_COMPLETED for s in statuses)
            forgotten = statuses.count(-1)
            held = rss_mb(server.pid)

            async def drain(call: grpc.aio.UnaryStreamCall) -> grpc.StatusCode:
                try:
                    while await call.read() is not grpc.aio.EOF:
                        pass
                except grpc.aio.AioRpcError as exc:
                    return exc.code()
                return grpc.StatusCode.OK

            # Read now (after the measurement) to learn how each stream ended.
            codes = await asyncio.gather(*(drain(c) for c in calls if not isinstance(c, BaseException)))
            exhausted = codes.count(grpc.StatusCode.RESOURCE_EXHAUSTED)
            print(f"{args.stalled} stalled readers ({STALLED_DELTAS} deltas per run, {label}):")
            print(f"  runs ended in {time.perf_counter() - started:.1f} s: {completed} completed and kept,"
                  f" {forgotten} already forgotten (ended beyond the memory run store's bounds)")
            print(f"  streams the server ended for falling behind (RESOURCE_EXHAUSTED, seen on reading them"
                  f" afterwards): {exhausted}; completed: {codes.count(grpc.StatusCode.OK)}; NOT_FOUND (run"
                  f" forgotten before the stream got to its end): {codes.count(grpc.StatusCode.NOT_FOUND)}")
            print(f"  RSS idle {base:.1f} MB, with the stalled readers held after every run ended {held:.1f} MB"
                  f" (+{held - base:.1f} MB, {(held - base) / args.stalled * 1024:.0f} KB per reader),"
                  f" peak {rss_mb(server.pid, 'VmHWM:'):.1f} MB")
        finally:
            for c in channels:
                await c.close()
            await watcher.close()
        settle = time.perf_counter()
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:  # let the server notice
            await apb_grpc.AgentServiceStub(channel).ListAgents(apb.ListAgentsRequest())
        print(f"  after the readers went away: RSS {rss_mb(server.pid):.1f} MB"
              f" ({time.perf_counter() - settle:.2f} s later)")
    finally:
        server.terminate()
        server.wait(timeout=30)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=10_000, help="measured ended runs")
    parser.add_argument("--warmup", type=int, default=11_000,
                        help="runs before measuring: fills the default bounds (10,000 traces in memory, ended runs)")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--stalled", type=int, default=300)
    parser.add_argument("--compare-lag", default=None,
                        help="also run the stalled readers with this AGENTD_MAX_STREAM_LAG_EVENTS (e.g. 1000000)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        logs = Path(tmp)
        await ended_runs(args, logs)
        await stalled_readers(args, logs, None)
        if args.compare_lag:
            await stalled_readers(args, logs, args.compare_lag)


if __name__ == "__main__":
    asyncio.run(main())
