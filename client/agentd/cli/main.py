"""The ``agentd`` command: serve agents, run them from a terminal, inspect sessions, traces and stats."""

from __future__ import annotations

import argparse
import collections
import os
import signal
import socket
import subprocess
import sys
import threading
import uuid
from pathlib import Path
from typing import IO, Sequence

import grpc

DEFAULT_TARGET = os.environ.get("AGENTD_TARGET", "127.0.0.1:50051")


def _console():  # rich is the [cli] extra; import it only when rendering
    try:
        from rich.console import Console
    except ImportError:
        sys.exit("agentd: terminal rendering needs rich: pip install 'agentd[cli]'")
    from agentd.cli.table import terminal_width

    # One width rule for every view: COLUMNS, else the terminal's, else 80 (piped output).
    return Console(highlight=False, soft_wrap=True, width=terminal_width())


STORE_FLAGS = ("store", "sqlite_path", "postgres_url", "postgres_schema", "redis_url", "session_ttl_s")


def _settings(args: argparse.Namespace, command: str, names: Sequence[str]):  # -> Settings
    try:
        from agentd.server.settings import Settings
    except ImportError as exc:
        sys.exit(f"agentd {command} needs the server extras ({exc.name} is missing): pip install 'agentd[server]'")
    overrides = {name: getattr(args, name, None) for name in names}
    return Settings(**{k: v for k, v in overrides.items() if v is not None})


def _client(args: argparse.Namespace):  # -> SyncAgentdClient
    """A client with the command's target, TLS settings and token (flags, else AGENTD_* variables)."""
    from agentd.client import SyncAgentdClient, TlsConfig

    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TlsConfig(ca_file=args.tls_ca or None, cert_file=args.tls_cert or None, key_file=args.tls_key or None)
    return SyncAgentdClient(args.target, tls=tls, token=args.token or None)


SECURITY_FLAGS = ("insecure", "tls_cert_file", "tls_key_file", "tls_client_ca_file", "api_keys_file")


def cmd_serve(args: argparse.Namespace) -> int:
    names = ("app", "agents_dir", "host", "port", "model_provider", "log_format", "log_level", *STORE_FLAGS,
             *SECURITY_FLAGS)
    settings = _settings(args, "serve", names)

    from agentd.server.app import load_app
    from agentd.server.logs import configure_logging
    from agentd.server.runtime.errors import AppConfigError, StoreUnavailableError
    from agentd.server.serve import run

    configure_logging(settings.log_level, settings.log_format)
    try:
        app = load_app(settings.app)
        run(settings, app)
    except (AppConfigError, StoreUnavailableError, ValueError) as exc:
        print(f"agentd serve: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    """Manage the API key file: the key is printed once at creation, only its hash is stored."""
    try:
        from agentd.server.auth.api_keys import create_key, list_keys, revoke_key
    except ImportError as exc:
        sys.exit(f"agentd keys needs the server extras ({exc.name} is missing): pip install 'agentd[server]'")
    if not args.file:
        sys.exit("agentd keys: name the key file with --file or AGENTD_API_KEYS_FILE")
    path = Path(args.file)
    try:
        if args.action == "create":
            scopes = [scope.strip() for scope in args.scopes.split(",") if scope.strip()]
            key_id, key = create_key(path, tenant=args.tenant, subject=args.subject, scopes=scopes)
            print(f"created key {key_id} for tenant {args.tenant!r} in {path}; it is shown only now:", file=sys.stderr)
            print(key)
        elif args.action == "list":
            for entry in list_keys(path):
                print(f"{entry['id']}  tenant={entry['tenant']}  subject={entry['subject']}  "
                      f"scopes={','.join(entry.get('scopes', []))}  created={entry.get('created', '')}")
        else:
            if not args.key_id:
                sys.exit("agentd keys revoke: name the key id")
            if not revoke_key(path, args.key_id):
                print(f"agentd keys: no key {args.key_id!r} in {path}", file=sys.stderr)
                return 1
            print(f"revoked {args.key_id}; servers stop accepting it with their next call")
    except (OSError, ValueError) as exc:
        print(f"agentd keys: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_db(args: argparse.Namespace) -> int:
    """Show or apply schema migrations of the configured store (same settings as serve)."""
    settings = _settings(args, "db", STORE_FLAGS)
    import asyncio

    from agentd.server.runtime.errors import StoreUnavailableError
    from agentd.server.sessions.factory import build_store

    async def act():  # -> SchemaStatus | None
        store = build_store(settings)
        try:
            status = await (store.migrate() if args.action == "migrate" else store.schema_status())
        finally:
            await store.close()
        if args.action == "migrate":
            await migrate_agent_store()
            await migrate_trace_archive()
            await migrate_run_store()
            await migrate_result_cache()
        return status

    async def migrate_result_cache() -> None:
        """The result cache's tables, beside the sessions."""
        from agentd.server.cache.factory import build_result_cache

        cache = build_result_cache(settings)
        try:
            status = await cache.migrate()
        finally:
            await cache.close()
        if status is not None:
            print(f"result cache ({status.backend}): schema version {status.current} of {status.latest}")

    async def migrate_agent_store() -> None:
        """The tables of agents made through the API, beside the sessions."""
        from agentd.server.agents.store.factory import build_agent_store

        agents = build_agent_store(settings)
        try:
            status = await agents.migrate()
        finally:
            await agents.close()
        if status is not None:
            print(f"agent store ({status.backend}): schema version {status.current} of {status.latest}")

    async def migrate_run_store() -> None:
        """The run store's tables (Postgres) migrate when it opens with auto-migration on."""
        from agentd.server.runs.factory import build_run_store

        engine = settings.resolved_run_store()
        if engine == "memory":
            return
        run_store, bus = build_run_store(settings.model_copy(update={"auto_migrate": True}))
        await run_store.open()
        await run_store.close()
        await bus.close()
        print(f"run store ({engine}): ready")

    async def migrate_trace_archive() -> None:
        """The trace archive's tables migrate when it opens with auto-migration on."""
        from agentd.server.tracing.factory import build_trace_archive

        archive = build_trace_archive(settings.model_copy(update={"auto_migrate": True}))
        if archive is not None:
            await archive.open()
            await archive.close()
            print(f"trace archive ({settings.resolved_trace_store()}): schema up to date")

    try:
        status = asyncio.run(act())
    except (StoreUnavailableError, ValueError) as exc:
        print(f"agentd db {args.action}: {exc}", file=sys.stderr)
        return 1
    if status is None:
        print(f"{settings.store}: no versioned schema to migrate")
        return 0
    state = "up to date" if not status.pending else f"{status.pending} migration(s) pending: run `agentd db migrate`"
    print(f"{status.backend} {status.location}: schema version {status.current} of {status.latest} ({state})")
    return 0


def _rpc_error(exc: grpc.RpcError) -> int:
    print(f"agentd: {exc.code().name}: {exc.details()}", file=sys.stderr)  # type: ignore[attr-defined]
    return 1


def cmd_run(args: argparse.Namespace) -> int:
    from agentd.cli.render import RunRenderer

    renderer = RunRenderer(_console())
    with _client(args) as client:
        stream = client.run(args.agent, args.input, session_id=args.session, max_turns=args.max_turns)
        try:
            for event in stream:
                renderer.event(event)
        except KeyboardInterrupt:
            stream.cancel()
            renderer.line("✘ interrupted: run cancelled")
            return 130
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    return renderer.exit_code


def cmd_agents(args: argparse.Namespace) -> int:
    from rich.table import Table


    with _client(args) as client:
        try:
            agents = client.list_agents()
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    table = Table(title="agents")
    for column in ("agent", "model", "tools", "handoffs", "description"):
        table.add_column(column, overflow="fold")
    for agent in agents:
        table.add_row(agent.name, agent.model, ", ".join(t.name for t in agent.tools),
                      ", ".join(agent.handoffs), agent.description)
    _console().print(table)
    return 0


def cmd_sessions(args: argparse.Namespace) -> int:
    from agentd.cli.render import items_table, sessions_table

    console = _console()
    with _client(args) as client:
        try:
            if args.action == "list":
                console.print(sessions_table(client.list_sessions(page_size=args.limit).sessions))
            elif args.action == "show":
                session = client.get_session(args.session_id)
                items = client.list_items(args.session_id, page_size=args.limit, newest_first=args.newest_first).items
                console.print(items_table(session, items))
            elif args.action == "clear":
                console.print(f"removed {client.clear_items(args.session_id)} item(s) from sessions/{args.session_id}")
            elif args.action == "delete":
                client.delete_session(args.session_id)
                console.print(f"deleted sessions/{args.session_id}")
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    return 0


def cmd_runs(args: argparse.Namespace) -> int:
    """Runs as resources, from any replica: list a session's, show one, follow one, cancel or approve."""
    from agentd.cli.render import RunRenderer, runs_table

    console = _console()
    with _client(args) as client:
        try:
            if args.action == "list":
                console.print(runs_table(client.list_runs(args.session_id, page_size=args.limit).runs))
            elif args.action == "show":
                console.print(runs_table([client.get_run(args.run_id)]))
            elif args.action == "watch":
                renderer = RunRenderer(console)
                for event in client.watch_run(args.run_id, after_sequence=args.after):
                    renderer.event(event)
                return renderer.exit_code
            elif args.action == "cancel":
                console.print(runs_table([client.cancel_run(args.run_id, args.reason)]))
            elif args.action in ("approve", "deny"):
                run = client.approve_tool_call(args.run_id, args.call_id, args.action == "approve", args.reason)
                console.print(runs_table([run]))
        except KeyboardInterrupt:
            return 130  # watching only: the run goes on
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    return 0


def _get_trace_by_prefix(client, wanted: str):  # (SyncAgentdClient, str) -> GetTraceResponse
    """The trace whose id is ``wanted`` or, since ids are long to type, the one whose id starts with it.

    A whole id costs one call. Otherwise ListTraces is paged through (newest first) until it ends
    or more than ten ids match. Raises LookupError saying what matched when not exactly one does.
    """
    from agentd.v1 import trace_service_pb2

    wanted = wanted.removeprefix("traces/")
    try:
        return client.get_trace(wanted)
    except grpc.RpcError as exc:
        if exc.code() != grpc.StatusCode.NOT_FOUND:  # type: ignore[attr-defined]
            raise
    matches: list[trace_service_pb2.Trace] = []
    token = ""
    while len(matches) <= 10:
        page = client.traces.ListTraces(trace_service_pb2.ListTracesRequest(page_size=1000, page_token=token))
        matches += [trace for trace in page.traces if trace.trace_id.startswith(wanted)]
        token = page.next_page_token
        if not token:
            break
    if len(matches) == 1:
        return client.get_trace(matches[0].trace_id)
    if not matches:
        raise LookupError(f"no trace id starts with {wanted!r} (or the trace has aged out of the trace store)")
    count = "more than 10" if len(matches) > 10 else str(len(matches))
    listed = "".join(f"\n  {t.trace_id}  {t.start_time.ToDatetime():%Y-%m-%d %H:%M:%S}  {t.workflow_name}"
                     for t in matches[:10])
    raise LookupError(f"{wanted!r} is ambiguous: {count} trace ids start with it; give more of one:{listed}")


def cmd_traces(args: argparse.Namespace) -> int:
    from agentd.cli.render import trace_timeline, traces_table
    from agentd.cli.table import make_console

    console = make_console()
    with _client(args) as client:
        try:
            if args.action == "list":
                from agentd.v1 import trace_service_pb2

                status = trace_service_pb2.SpanStatus.Value(f"SPAN_STATUS_{args.status.upper()}") if args.status else 0
                response = client.list_traces(
                    workflow_name=args.workflow, group_id=args.group, agent=args.agent, status=status,
                    page_size=args.limit, agent_version=args.agent_version,
                )
                console.print(traces_table(response.traces), crop=False)
            else:
                console.print(trace_timeline(_get_trace_by_prefix(client, args.trace_id)), crop=False)
        except LookupError as exc:
            print(f"agentd: {exc}", file=sys.stderr)
            return 1
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    return 0


_SINCE_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_since(text: str) -> float:
    """Seconds in ``30m``, ``24h``, ``7d``, ``2w``, ``90s`` (a number and a unit)."""
    import re

    found = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw])\s*", text)
    if found is None or float(found.group(1)) <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 30m, 24h or 7d")
    return float(found.group(1)) * _SINCE_UNITS[found.group(2)]


def auto_bucket(seconds: float) -> str:
    """Buckets for a window when --by is not given: minutes up to 3 hours, hours up to 7 days, then days."""
    return "minute" if seconds <= 3 * 3600 else "hour" if seconds <= 7 * 86400 else "day"


def cmd_stats(args: argparse.Namespace) -> int:
    """Aggregates over the ended runs of the window: a table per agent with its trend, then its tools.

    StatsService is called through its generated stub on the client's channel, so the target, TLS,
    token and the client's channel options are those of every other command."""
    import time

    from google.protobuf import timestamp_pb2

    from agentd.cli.render import stats_table, tool_stats_table
    from agentd.cli.table import make_console
    from agentd.v1 import stats_service_pb2, stats_service_pb2_grpc

    bucket = stats_service_pb2.TimeBucket.Value(f"TIME_BUCKET_{(args.by or auto_bucket(args.since)).upper()}")
    end_ns = time.time_ns()
    start, end = timestamp_pb2.Timestamp(), timestamp_pb2.Timestamp()
    start.FromNanoseconds(max(end_ns - int(args.since * 1e9), 0))
    end.FromNanoseconds(end_ns)
    request = stats_service_pb2.GetStatsRequest(
        start_time=start, end_time=end, agent=args.agent, bucket=bucket, page_size=100,
        group_by_agent_version=args.by_version,
    )
    if args.agent_version is not None:
        request.agent_version = args.agent_version
    console = make_console()
    with _client(args) as client:
        stub = stats_service_pb2_grpc.StatsServiceStub(client._channel)
        try:
            response = stub.GetStats(request, timeout=30)
            while response.next_page_token:  # every group, a page at a time
                request.page_token = response.next_page_token
                page = stub.GetStats(request, timeout=30)
                response.groups.extend(page.groups)
                response.next_page_token = page.next_page_token
        except grpc.RpcError as exc:
            return _rpc_error(exc)
    if not response.groups:
        start_at, end_at = response.start_time.ToDatetime(), response.end_time.ToDatetime()
        console.print(f"no ended runs from {start_at:%Y-%m-%d %H:%M} to {end_at:%Y-%m-%d %H:%M} UTC"
                      + (f" for agent {args.agent}" if args.agent else ""))
        return 0
    console.print(stats_table(response), crop=False)
    if any(group.tools for group in response.groups):
        console.print()
        console.print(tool_stats_table(response), crop=False)
    return 0


def cmd_top(args: argparse.Namespace) -> int:
    """A live view of every replica (StatsService.GetLiveStats), refreshed in place (see agentd.cli.top)."""
    from agentd.cli.top import parse_targets, run_top
    from agentd.client import TlsConfig

    try:
        targets = parse_targets(args.target)
        if args.iterations < 0:
            raise ValueError(f"--iterations must be 0 (until Ctrl-C) or more, got {args.iterations}")
    except ValueError as exc:
        print(f"agentd top: {exc}", file=sys.stderr)
        return 2
    tls = None
    if args.tls or args.tls_ca or args.tls_cert:
        tls = TlsConfig(ca_file=args.tls_ca or None, cert_file=args.tls_cert or None, key_file=args.tls_key or None)
    return run_top(targets, interval_s=args.interval, iterations=args.iterations, minutes=args.minutes, tls=tls,
                   token=args.token or None)


def _positive_seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = 0.0
    if not value > 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive number of seconds")
    return value


# Ships inside the package (agentd/examples/support.py): demo and serve work from any directory.
EXAMPLE_APP = "agentd.examples.support:app"


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class _ServerStderr:
    """The demo server's stderr: held back until the server is ready, then passed through.

    A server that dies while starting (an app that does not import, a bad setting) says why
    on stderr; holding it back lets the demo print it once, under its own message.
    """

    def __init__(self, stream: IO[bytes]) -> None:
        self._lock = threading.Lock()
        self._held: collections.deque[str] = collections.deque(maxlen=200)
        self._live = False
        self._reader = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._reader.start()

    def _pump(self, stream: IO[bytes]) -> None:
        with stream:
            for raw in iter(stream.readline, b""):
                line = raw.decode(errors="replace")
                with self._lock:
                    if self._live:
                        sys.stderr.write(line)
                        sys.stderr.flush()
                    else:
                        self._held.append(line)

    def pass_through(self) -> None:
        """From now on the server's warnings reach the terminal as they come, as if it were inherited."""
        with self._lock:
            sys.stderr.writelines(self._held)
            sys.stderr.flush()
            self._held.clear()
            self._live = True

    def tail(self, lines: int = 20, wait_s: float = 0.0) -> str:
        """The last lines held back; ``wait_s`` for the rest to arrive when the server has exited."""
        self._reader.join(timeout=wait_s)
        with self._lock:
            return "".join(f"  {line}" for line in list(self._held)[-lines:])


def _wait_ready(target: str, server: subprocess.Popen[bytes], stderr: _ServerStderr, timeout_s: float = 30.0) -> None:
    """Return once the server accepts connections; exit with its own error as soon as it dies.

    Readiness and the process's exit are awaited together, whichever comes first, so a
    server that cannot start fails the demo at once rather than after the whole timeout.
    """
    settled = threading.Event()

    def wait_exit() -> None:
        server.wait()
        settled.set()

    threading.Thread(target=wait_exit, daemon=True).start()
    # Short reconnect backoff: the first attempts fail while the server starts, and the
    # default (1 s, growing) would delay a server that is up a moment later.
    channel = grpc.insecure_channel(target, options=[
        ("grpc.initial_reconnect_backoff_ms", 100),
        ("grpc.min_reconnect_backoff_ms", 100),
        ("grpc.max_reconnect_backoff_ms", 500),
    ])
    ready = grpc.channel_ready_future(channel)
    ready.add_done_callback(lambda _: settled.set())
    try:
        settled.wait(timeout_s)
        code = server.poll()
        if code is not None:
            how = f"exit code {code}" if code >= 0 else f"signal {signal.Signals(-code).name}"
            sys.exit(f"agentd demo: the server stopped ({how}) before it was ready:\n"
                     f"{stderr.tail(wait_s=2.0)}".rstrip())
        if not ready.done():
            sys.exit(f"agentd demo: the server did not come up on {target} within {timeout_s:.0f}s\n"
                     f"{stderr.tail()}".rstrip())
        stderr.pass_through()
    finally:
        ready.cancel()
        channel.close()


def cmd_demo(args: argparse.Namespace) -> int:
    """Start a server on embedded defaults, stream one multi-step run, stop the server."""
    port = _free_port()
    target = f"127.0.0.1:{port}"
    env = dict(os.environ)
    env.setdefault("AGENTD_SQLITE_PATH", ".agentd/demo.db")
    server = subprocess.Popen(
        [sys.executable, "-m", "agentd.cli.main", "serve", "--app", args.app, "--port", str(port), "--log-level", "WARNING"],
        env=env, stderr=subprocess.PIPE,
    )
    assert server.stderr is not None
    try:
        _wait_ready(target, server, _ServerStderr(server.stderr))
        session = args.session or f"demo-{uuid.uuid4().hex[:8]}"
        console = _console()
        console.print(f"[bold]agentd demo[/bold] · server {target} · session {session}")
        console.print(f"[bold]you:[/bold] {args.input}")
        code = cmd_run(argparse.Namespace(target=target, agent=args.agent, input=args.input, session=session,
                                          max_turns=0, token="", tls=False, tls_ca="", tls_cert="", tls_key=""))
        return code
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()


def add_store_flags(p: argparse.ArgumentParser) -> None:
    """Flags override the AGENTD_* settings of the same name."""
    p.add_argument("--store", choices=["sqlite", "memory", "postgres", "redis"])
    p.add_argument("--sqlite-path")
    p.add_argument("--postgres-url")
    p.add_argument("--postgres-schema")
    p.add_argument("--redis-url")
    p.add_argument("--session-ttl-s", type=float, help="idle TTL of new sessions (0: never expire)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="agentd", description="An agent runtime served over gRPC.")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the agents of an app module")
    serve.add_argument("--app", help=f"module:attribute of the App (default: $AGENTD_APP or {EXAMPLE_APP})")
    serve.add_argument("--agents-dir", help="a directory of agent definition files (YAML/JSON) to serve too")
    serve.add_argument("--host")
    serve.add_argument("--port", type=int)
    add_store_flags(serve)
    serve.add_argument("--model-provider", choices=["auto", "openai", "scripted"])
    serve.add_argument("--log-format", choices=["json", "text"])
    serve.add_argument("--log-level")
    serve.add_argument("--tls-cert", dest="tls_cert_file", help="PEM certificate chain: serve TLS")
    serve.add_argument("--tls-key", dest="tls_key_file", help="PEM private key of the certificate")
    serve.add_argument("--tls-client-ca", dest="tls_client_ca_file", help="require client certificates (mTLS)")
    serve.add_argument("--api-keys-file", help="JSON file of API key hashes (see 'agentd keys')")
    serve.add_argument("--insecure", action="store_true", default=None,
                       help="allow a non-loopback address without authentication")
    serve.set_defaults(func=cmd_serve)

    keys = sub.add_parser("keys", help="create, list or revoke API keys (hashes in a JSON file)")
    keys.add_argument("action", choices=["create", "list", "revoke"])
    keys.add_argument("key_id", nargs="?", help="revoke: the id of the key")
    keys.add_argument("--file", default=os.environ.get("AGENTD_API_KEYS_FILE", ""),
                      help="the key file (default: $AGENTD_API_KEYS_FILE)")
    keys.add_argument("--tenant", default="default")
    keys.add_argument("--subject", default="", help="who uses the key, for audit lines (default: key:<id>)")
    keys.add_argument("--scopes", default="agents:read,runs:read,runs:write,sessions:read,sessions:write,traces:read",
                      help="comma-separated scopes (default: %(default)s)")
    keys.set_defaults(func=cmd_keys)

    db = sub.add_parser("db", help="schema migrations of the configured session store")
    db.add_argument("action", choices=["status", "migrate"])
    add_store_flags(db)
    db.set_defaults(func=cmd_db)

    def with_target(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
        p.add_argument("--target", default=DEFAULT_TARGET, help="server address (default: $AGENTD_TARGET or %(default)s)")
        env = os.environ.get
        p.add_argument("--token", default=env("AGENTD_TOKEN", ""),
                       help="API key or JWT, sent as 'authorization: Bearer' (default: $AGENTD_TOKEN)")
        p.add_argument("--tls", action="store_true", default=bool(env("AGENTD_TLS")),
                       help="speak TLS, trusting the system CAs (default: $AGENTD_TLS)")
        p.add_argument("--tls-ca", default=env("AGENTD_TLS_CA", ""),
                       help="PEM CA bundle of the server's certificate; implies --tls (default: $AGENTD_TLS_CA)")
        p.add_argument("--tls-cert", default=env("AGENTD_TLS_CERT", ""),
                       help="client certificate for mutual TLS (default: $AGENTD_TLS_CERT)")
        p.add_argument("--tls-key", default=env("AGENTD_TLS_KEY", ""),
                       help="client certificate's key (default: $AGENTD_TLS_KEY)")
        return p

    run = with_target(sub.add_parser("run", help="run an agent and stream what it does"))
    run.add_argument("agent")
    run.add_argument("input")
    run.add_argument("--session", help="session id: continue (or start) that conversation")
    run.add_argument("--max-turns", type=int, default=0)
    run.set_defaults(func=cmd_run)

    agents = with_target(sub.add_parser("agents", help="list the server's agents"))
    agents.set_defaults(func=cmd_agents)

    sessions = sub.add_parser("sessions", help="list, show, clear or delete sessions")
    sessions_sub = sessions.add_subparsers(dest="action", required=True)
    listing = with_target(sessions_sub.add_parser("list"))
    listing.add_argument("--limit", type=int, default=50)
    for action in ("show", "clear", "delete"):
        p = with_target(sessions_sub.add_parser(action))
        p.add_argument("session_id")
        p.add_argument("--limit", type=int, default=100)
        p.add_argument("--newest-first", action="store_true")
    sessions.set_defaults(func=cmd_sessions)

    runs = sub.add_parser("runs", help="list a session's runs; show, watch, cancel, approve or deny one")
    runs_sub = runs.add_subparsers(dest="action", required=True)
    rlist = with_target(runs_sub.add_parser("list"))
    rlist.add_argument("session_id")
    rlist.add_argument("--limit", type=int, default=50)
    for action in ("show", "watch", "cancel"):
        p = with_target(runs_sub.add_parser(action))
        p.add_argument("run_id")
        p.add_argument("--after", type=int, default=0, help="watch: stream the events after this sequence")
        p.add_argument("--reason", default="cancelled from the agentd CLI")
    for action in ("approve", "deny"):
        p = with_target(runs_sub.add_parser(action, help=f"{action} a tool call the run waits on"))
        p.add_argument("run_id")
        p.add_argument("call_id")
        p.add_argument("--reason", default="")
    runs.set_defaults(func=cmd_runs)

    traces = sub.add_parser("traces", help="list traces or show one as a timeline")
    traces_sub = traces.add_subparsers(dest="action", required=True)
    tlist = with_target(traces_sub.add_parser("list"))
    tlist.add_argument("--workflow", default="")
    tlist.add_argument("--group", default="")
    tlist.add_argument("--agent", default="", help="traces in which this agent ran")
    tlist.add_argument("--agent-version", type=int, default=None, metavar="N",
                       help="traces of runs that started with version N of their agent (0: app-module and file"
                            " agents); combine with --agent to compare an agent's versions")
    tlist.add_argument("--status", choices=["ok", "error", "in_progress"])
    tlist.add_argument("--limit", type=int, default=20)
    tshow = with_target(traces_sub.add_parser("show"))
    tshow.add_argument("trace_id", help="a trace id, or any prefix of one that no other trace id starts with")
    traces.set_defaults(func=cmd_traces)

    stats = with_target(sub.add_parser("stats", help="runs, success rate, latency, tokens, cost and tools per agent"))
    stats.add_argument("--agent", default="", help="only the runs that started with this agent")
    stats.add_argument("--since", type=parse_since, default=parse_since("24h"), metavar="DURATION",
                       help="the window: runs that started this long ago until now, e.g. 30m, 24h, 7d (default: 24h)")
    stats.add_argument("--by", choices=["minute", "hour", "day"],
                       help="the trend's buckets (default: minutes up to 3h, hours up to 7d, else days)")
    stats.add_argument("--by-version", action="store_true", help="a row per version of each agent")
    stats.add_argument("--agent-version", type=int, default=None, metavar="N",
                       help="only the runs that started with version N of their agent")
    stats.set_defaults(func=cmd_stats)

    top = with_target(sub.add_parser(
        "top", help="a live view of every replica: active, queued, leases, capacity; runs/min, success, cost"))
    for action in top._actions:  # --target takes a list here: every replica to show
        if action.dest == "target":
            action.help = ("the replicas, comma-separated host:port (default: $AGENTD_TARGET or %(default)s);"
                           " each is asked on its own connection")
    top.add_argument("--interval", type=_positive_seconds, default=2.0, metavar="SECONDS",
                     help="seconds between refreshes (default: %(default)s)")
    top.add_argument("--iterations", type=int, default=0, metavar="N",
                     help="stop after N refreshes (default: until Ctrl-C)")
    top.add_argument("--minutes", type=int, default=5, choices=range(1, 61), metavar="M",
                     help="the recent window of runs/min, success rate and errors, 1-60 (default: %(default)s)")
    top.set_defaults(func=cmd_top)

    demo = sub.add_parser("demo", help="start a local server, stream one multi-step run, stop")
    demo.add_argument("--app", default=EXAMPLE_APP, help="module:attribute of the App (default: %(default)s)")
    demo.add_argument("--agent", default="triage")
    demo.add_argument("--input", default="My espresso machine from order A-1001 arrived damaged. Can I get 49 EUR back?")
    demo.add_argument("--session")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
