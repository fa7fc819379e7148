#!/usr/bin/env python3
"""Start N local ``agentd serve`` replicas sharing Postgres and Redis, as plain processes.

    .venv/bin/python scripts/replicas.py --count 3 --base-port 50051 [--app M:A]
        [--store postgres] [--run-store redis] [--log-dir DIR] [-- extra `agentd serve` args]

Each replica gets ``AGENTD_REPLICA_ID=replica-<i>`` and port ``base-port + i - 1`` (with
``--base-port 0``, free ports). Its output is printed prefixed with ``[replica-<i>]``, or
written to ``DIR/replica-<i>.log`` with ``--log-dir``. Once every replica answers the gRPC
health check with SERVING, the script prints the client target, e.g.

    target: ipv4:127.0.0.1:50051,127.0.0.1:50052,127.0.0.1:50053

Ctrl-C or SIGTERM forwards SIGTERM to every replica (a graceful drain) and waits for them;
a second Ctrl-C kills them. Stop one replica yourself (``kill <pid>``) to watch the
others take over its runs; the script keeps going until all have exited, and exits 0 when
every replica exited 0.

``AGENTD_POSTGRES_URL`` (default postgresql://postgres@127.0.0.1:5432/postgres),
``AGENTD_REDIS_URL`` (default redis://127.0.0.1:6379/0) and every other ``AGENTD_*`` /
``OTEL_*`` variable pass through to the replicas. ``--store`` / ``--run-store`` default
to ``$AGENTD_STORE`` / ``$AGENTD_RUN_STORE``, else postgres / redis.

Standard library only, plus grpc and grpc_health for the health checks: run it with the
project's virtualenv (``.venv/bin/python``).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Sequence

ROOT = Path(__file__).resolve().parent.parent
DEFAULT_POSTGRES_URL = "postgresql://postgres@127.0.0.1:5432/postgres"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"
SHARED_STORES = ("postgres", "redis")

try:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc
except ImportError as exc:  # pragma: no cover - depends on the interpreter used
    sys.exit(f"replicas.py: {exc.name} is missing: run it with the project's venv (.venv/bin/python scripts/replicas.py)")

_print_lock = threading.Lock()


def say(line: str, stream: IO[str] | None = None) -> None:
    """One whole line at a time, so replica output and ours never interleave mid-line."""
    out = stream or sys.stdout
    with _print_lock:
        out.write(line if line.endswith("\n") else line + "\n")
        out.flush()


@dataclass
class Replica:
    index: int
    name: str
    host: str
    port: int
    process: subprocess.Popen | None = None
    log_path: Path | None = None
    reader: threading.Thread | None = None
    reported_exit: bool = False
    channel: "grpc.Channel | None" = field(default=None, repr=False)

    @property
    def address(self) -> str:
        """host:port a client on this machine dials ([::1]:port for IPv6)."""
        host = _connect_host(self.host)
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None


def _connect_host(host: str) -> str:
    """Where a client on this machine reaches a server listening on ``host``."""
    if host in ("", "0.0.0.0", "localhost"):
        return "127.0.0.1"
    if host in ("::", "[::]"):
        return "::1"
    return host.strip("[]")


def client_target(replicas: Sequence[Replica]) -> str:
    """A gRPC target naming every replica: ``ipv4:a:p1,b:p2`` (``ipv6:[::1]:p,…`` for IPv6)."""
    scheme = "ipv6" if any(":" in _connect_host(r.host) for r in replicas) else "ipv4"
    return f"{scheme}:" + ",".join(r.address for r in replicas)


def _bind_host(host: str) -> str:
    host = host.strip("[]")
    return "127.0.0.1" if host == "localhost" else (host or "0.0.0.0")


def _try_bind(host: str, port: int) -> int | None:
    """The port bound on ``host`` (0: any free one), or None when it is taken."""
    bind_host = _bind_host(host)
    family = socket.AF_INET6 if ":" in bind_host else socket.AF_INET
    with socket.socket(family, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((bind_host, port))
        except OSError:
            return None
        return sock.getsockname()[1]


def _free_ports(host: str, count: int) -> list[int]:
    ports: list[int] = []
    while len(ports) < count:
        port = _try_bind(host, 0)
        if port is not None and port not in ports:
            ports.append(port)
    return ports


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    argv = list(argv)
    extra: list[str] = []
    if "--" in argv:
        split = argv.index("--")
        argv, extra = argv[:split], argv[split + 1:]
    parser = argparse.ArgumentParser(
        prog="replicas.py",
        description="Start N local `agentd serve` replicas sharing Postgres and Redis; Ctrl-C drains them.",
        epilog="Arguments after `--` are passed to every `agentd serve`.",
    )
    parser.add_argument("--count", type=int, default=3, help="number of replicas (default: %(default)s)")
    parser.add_argument("--base-port", type=int, default=50051,
                        help="port of replica-1; replica-i listens on base+i-1 (0: free ports; default: %(default)s)")
    parser.add_argument("--host", default="127.0.0.1", help="listen address of every replica (default: %(default)s)")
    parser.add_argument("--app", default=os.environ.get("AGENTD_APP", "agentd.examples.support:app"),
                        help="module:attribute of the App (default: $AGENTD_APP or %(default)s)")
    parser.add_argument("--store", choices=["postgres", "redis", "memory", "sqlite"],
                        default=os.environ.get("AGENTD_STORE", "postgres"),
                        help="session store (default: $AGENTD_STORE or postgres)")
    parser.add_argument("--run-store", choices=["auto", "redis", "postgres", "memory"],
                        default=os.environ.get("AGENTD_RUN_STORE", "redis"),
                        help="run store (default: $AGENTD_RUN_STORE or redis)")
    parser.add_argument("--log-dir", type=Path, help="write replica-<i>.log files here instead of prefixed output")
    parser.add_argument("--ready-timeout", type=float, default=60.0,
                        help="seconds to wait for every replica to be SERVING (default: %(default)s)")
    parser.add_argument("--stop-timeout", type=float, default=None,
                        help="seconds to wait for replicas after SIGTERM before killing them "
                             "(default: AGENTD_SHUTDOWN_GRACE_S + 15)")
    args = parser.parse_args(argv)
    if args.count < 1:
        parser.error("--count must be at least 1")
    if not 0 <= args.base_port <= 65535 - args.count + 1:
        parser.error("--base-port out of range")
    if args.stop_timeout is None:
        try:
            grace = float(os.environ.get("AGENTD_SHUTDOWN_GRACE_S", "10"))
        except ValueError:
            grace = 10.0
        args.stop_timeout = grace + 15.0
    return args, extra


def replica_env(args: argparse.Namespace, replica: Replica) -> dict[str, str]:
    env = dict(os.environ)
    env.setdefault("AGENTD_POSTGRES_URL", DEFAULT_POSTGRES_URL)
    env.setdefault("AGENTD_REDIS_URL", DEFAULT_REDIS_URL)
    env.update(
        AGENTD_REPLICA_ID=replica.name,
        AGENTD_HOST=replica.host,
        AGENTD_PORT=str(replica.port),
        AGENTD_APP=args.app,
        AGENTD_STORE=args.store,
        AGENTD_RUN_STORE=args.run_store,
        PYTHONUNBUFFERED="1",
    )
    # The default app ships in the package; apps kept in the repository (--app tests.apps:app)
    # stay importable from any working directory.
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return env


def _die_with_parent() -> None:  # runs in the child between fork and exec (Linux only)
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:  # noqa: BLE001 (best effort: without it a killed script leaves replicas running)
        pass


def start(args: argparse.Namespace, replica: Replica, extra: Sequence[str]) -> None:
    command = [sys.executable, "-m", "agentd.cli.main", "serve", *extra]
    if args.log_dir is not None:
        args.log_dir.mkdir(parents=True, exist_ok=True)
        replica.log_path = args.log_dir / f"{replica.name}.log"
        with open(replica.log_path, "ab") as log:
            replica.process = subprocess.Popen(
                command, env=replica_env(args, replica), stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                preexec_fn=_die_with_parent if sys.platform == "linux" else None,
            )
    else:
        replica.process = subprocess.Popen(
            command, env=replica_env(args, replica), stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
            preexec_fn=_die_with_parent if sys.platform == "linux" else None,
        )


def forward_output(replica: Replica) -> None:
    assert replica.process is not None and replica.process.stdout is not None
    prefix = f"[{replica.name}] "
    for raw in iter(replica.process.stdout.readline, b""):
        say(prefix + raw.decode(errors="replace").rstrip("\n"))
    replica.process.stdout.close()


def health_status(replica: Replica) -> str:
    """The replica's grpc.health.v1 status of service "" (or the RPC error's code)."""
    if replica.channel is None:
        # Short reconnect backoff: the first attempts fail while the replica is starting.
        replica.channel = grpc.insecure_channel(replica.address, options=[
            ("grpc.initial_reconnect_backoff_ms", 100),
            ("grpc.min_reconnect_backoff_ms", 100),
            ("grpc.max_reconnect_backoff_ms", 500),
        ])
    try:
        response = health_pb2_grpc.HealthStub(replica.channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=1)
    except grpc.RpcError as exc:
        return exc.code().name  # type: ignore[attr-defined]
    return health_pb2.HealthCheckResponse.ServingStatus.Name(response.status)


class Supervisor:
    def __init__(self, args: argparse.Namespace, extra: list[str]) -> None:
        self.args = args
        self.extra = extra
        self.replicas: list[Replica] = []
        self.stop_requested = threading.Event()
        self.signals = 0
        # Why the replicas could not all start (the replica that stopped, or the timeout); None while they could.
        self.start_failure: str | None = None

    def on_signal(self, signum: int, _frame: object) -> None:
        self.signals += 1
        if self.signals == 1:
            say(f"replicas: {signal.Signals(signum).name}: draining every replica (again to kill them)")
            self.stop_requested.set()
        else:
            say("replicas: killing every replica")
            for replica in self.replicas:
                if replica.running():
                    replica.process.kill()  # type: ignore[union-attr]

    def report_exits(self) -> None:
        for replica in self.replicas:
            if replica.process is not None and not replica.running() and not replica.reported_exit:
                replica.reported_exit = True
                code = replica.process.returncode
                how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
                say(f"replicas: {replica.name} (pid {replica.process.pid}) exited with {how}")

    def run(self) -> int:
        args = self.args
        ports = (
            _free_ports(args.host, args.count) if args.base_port == 0
            else [args.base_port + i for i in range(args.count)]
        )
        taken = [p for p in ports if _try_bind(args.host, p) is None]
        if taken:
            say(f"replicas: port(s) {', '.join(map(str, taken))} on {args.host} already in use: "
                "choose another --base-port", sys.stderr)
            return 2
        self.replicas = [Replica(i, f"replica-{i}", args.host, port) for i, port in enumerate(ports, start=1)]
        for signum in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(signum, self.on_signal)

        shared = args.store in SHARED_STORES and args.run_store in (*SHARED_STORES, "auto")
        say(f"replicas: starting {args.count} x agentd serve (app {args.app}, store {args.store}, "
            f"run store {args.run_store})")
        if args.count > 1 and not shared:
            say("replicas: note: with a memory/sqlite store the replicas share neither sessions nor runs")
        # Start every process before any thread or gRPC channel exists (fork safety).
        for replica in self.replicas:
            start(args, replica, self.extra)
        if args.log_dir is None:
            for replica in self.replicas:
                replica.reader = threading.Thread(target=forward_output, args=(replica,), daemon=True)
                replica.reader.start()

        try:
            ready = self.wait_ready()
            failed_to_start = not ready and not self.stop_requested.is_set()
            if ready:
                self.announce()
                while not self.stop_requested.is_set() and any(r.running() for r in self.replicas):
                    self.report_exits()
                    self.stop_requested.wait(0.2)
            return self.shutdown(failed_to_start)
        finally:
            for replica in self.replicas:
                if replica.channel is not None:
                    replica.channel.close()

    def wait_ready(self) -> bool:
        deadline = time.monotonic() + self.args.ready_timeout
        pending = list(self.replicas)
        last: dict[str, str] = {}
        while pending:
            if self.stop_requested.is_set():
                return False
            for replica in list(pending):
                if not replica.running():
                    self.report_exits()
                    say(f"replicas: {replica.name} stopped before it was ready"
                        + (f" (see {replica.log_path})" if replica.log_path else ""), sys.stderr)
                    self.start_failure = f"{replica.name} could not start" + (
                        f" (see {replica.log_path.name})" if replica.log_path else "")
                    return False
                last[replica.name] = health_status(replica)
                if last[replica.name] == "SERVING":
                    pending.remove(replica)
            if not pending:
                break
            if time.monotonic() > deadline:
                states = ", ".join(f"{r.name}: {last.get(r.name, '?')}" for r in pending)
                say(f"replicas: not SERVING within {self.args.ready_timeout:.0f}s ({states})", sys.stderr)
                self.start_failure = f"the replicas were not all SERVING within {self.args.ready_timeout:.0f}s"
                return False
            self.stop_requested.wait(0.2)
        return True

    def announce(self) -> None:
        lines = [f"replicas: {len(self.replicas)} replica(s) SERVING"]
        for replica in self.replicas:
            where = f"  logs {replica.log_path}" if replica.log_path else ""
            lines.append(f"  {replica.name}  pid {replica.process.pid}  {replica.address}{where}")  # type: ignore[union-attr]
        target = client_target(self.replicas)
        lines.append(f"target: {target}")
        lines.append(f"  e.g. {ROOT / '.venv/bin/agentd'} agents --target {target}")
        lines.append("  (balance with the round_robin policy: see deploy/README.md)  Ctrl-C drains and stops them.")
        say("\n".join(lines))

    def shutdown(self, failed_to_start: bool) -> int:
        """SIGTERM every running replica (a drain), wait, kill stragglers; 0 when all exited 0.

        When the replicas could not all start (fail fast: one that stops before it is ready
        stops them all), each replica stopped here may not have got as far as its own error
        (or may have had none): its log says it was stopped, and why, so that no log is left
        empty and unexplained. The log of the replica that could not start shows its error.
        """
        running = [r for r in self.replicas if r.running()]
        for replica in running:
            try:
                replica.process.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
            except ProcessLookupError:
                pass
        deadline = time.monotonic() + self.args.stop_timeout
        killed = False
        for replica in self.replicas:
            assert replica.process is not None
            try:
                replica.process.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"replicas: {replica.name} still running after {self.args.stop_timeout:.0f}s: killing it")
                replica.process.kill()
                replica.process.wait()
                killed = True
        for replica in self.replicas:
            if replica.reader is not None:
                replica.reader.join(timeout=5)
        self.report_exits()
        if failed_to_start and self.start_failure:
            for replica in running:  # every one has exited by now: nothing else writes to its log
                if replica.process.returncode > 0:  # type: ignore[union-attr]
                    continue  # it failed on its own, just before it was stopped: its log says why
                note = f"replicas: stopped {replica.name} before it was ready, because {self.start_failure}"
                say(note)
                if replica.log_path is not None:
                    with open(replica.log_path, "a", encoding="utf-8") as log:
                        log.write(note + "\n")
        if failed_to_start or killed:
            return 1
        failed = [r.name for r in self.replicas if r.process is not None and r.process.returncode != 0]
        if failed:
            say(f"replicas: {', '.join(failed)} did not exit cleanly", sys.stderr)
            return 1
        say("replicas: all replicas stopped")
        return 0


def main(argv: Sequence[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    return Supervisor(args, extra).run()


if __name__ == "__main__":
    sys.exit(main())
