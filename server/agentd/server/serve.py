"""Server assembly and lifecycle: build the parts, serve, shut down gracefully.

``start_server`` is what both ``agentd serve`` and the tests use, so tests exercise
exactly the server users run.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import signal
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, NoReturn

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import descriptor_pb2, descriptor_pool
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection, reflection_pb2

from agentd.server.agents.catalog import AgentCatalog
from agentd.server.agents.files import AgentFiles, FilesSnapshot
from agentd.server.agents.store.base import AgentStore
from agentd.server.agents.store.factory import build_agent_store
from agentd.server.app import App
from agentd.server.tenancy import DEFAULT_TENANT
from agentd.server.auth.factory import (
    build_authentication,
    build_interceptor,
    build_server_credentials,
    check_exposure,
)
from agentd.server.auth.interceptor import Authentication
from agentd.server.models.base import ModelProvider
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.pricing import PriceFile
from agentd.server.runs.cached import CachedRuns, open_cached_runs
from agentd.server.runs.factory import build_run_store
from agentd.server.runs.manager import RunManager
from agentd.server.runtime.errors import AppConfigError
from agentd.server.runtime.run_loop import AgentRunner
from agentd.server.services.agent_service import AgentService
from agentd.server.services.session_service import SessionService
from agentd.server.services.stats_service import StatsService
from agentd.server.services.trace_service import TraceService
from agentd.server.sessions.base import SessionStore
from agentd.server.sessions.factory import build_store
from agentd.server.settings import Settings
from agentd.server.store_upkeep import StoreUpkeep
from agentd.server.tracing.capacity import CapacityMetrics, QueueDepth
from agentd.server.tracing.factory import build_trace_store, build_tracer
from agentd.server.tracing.store import TraceStore
from agentd.v1 import agent_service_pb2, agent_service_pb2_grpc, session_service_pb2, session_service_pb2_grpc
from agentd.v1 import stats_service_pb2, stats_service_pb2_grpc, trace_service_pb2, trace_service_pb2_grpc

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider

log = logging.getLogger("agentd.server")

SERVICE_NAMES = (
    agent_service_pb2.DESCRIPTOR.services_by_name["AgentService"].full_name,
    session_service_pb2.DESCRIPTOR.services_by_name["SessionService"].full_name,
    trace_service_pb2.DESCRIPTOR.services_by_name["TraceService"].full_name,
    stats_service_pb2.DESCRIPTOR.services_by_name["StatsService"].full_name,
)


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The event loop ``serve`` runs on: uvloop's for "uvloop" (and for "auto" when it is
    installed), else the standard library's (None). The run loop, event fan-out and model
    client are all socket reads, writes and callbacks, which uvloop does in C."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "uvloop":
            raise AppConfigError("AGENTD_EVENT_LOOP=uvloop but uvloop is not installed: pip install uvloop") from None
        return None
    return uvloop.new_event_loop


def run(settings: Settings, app: App) -> None:
    """Serve until SIGTERM/SIGINT, on the event loop ``settings.event_loop`` picks."""
    with asyncio.Runner(loop_factory=loop_factory(settings.event_loop)) as runner:
        runner.run(serve(settings, app))


def build_models(settings: Settings, app: App) -> ModelProvider:
    provider = settings.model_provider
    if provider == "auto":
        provider = "openai" if os.environ.get("OPENAI_API_KEY") else "scripted"
    if provider == "openai":
        return OpenAIProvider(
            timeout_s=settings.model_timeout_s, max_retries=settings.model_max_retries, api=settings.model_api,
            max_connections=settings.model_max_connections,
        )
    if app.offline_script is None:
        raise AppConfigError(
            "no model to call: set OPENAI_API_KEY (and OPENAI_BASE_URL for a compatible server), "
            "or give the app an offline_script for the built-in scripted model"
        )
    return ScriptedProvider(default=app.offline_script)


# gRPC server reflection: v1 (what current tools ask first: grpcurl, buf curl, Postman) and
# v1alpha (older tools). grpcio-reflection ships only v1alpha; v1 is the same protocol under
# another package (grpc/reflection/v1/reflection.proto: the same messages, field numbers and
# types; only the package differs, and a package never appears on the wire). So v1 is served
# by the v1alpha servicer: v1 requests decode as v1alpha ones and v1alpha answers encode as
# v1 ones, byte for byte. v1's descriptor is registered too, so reflection describes it.
REFLECTION_V1_SERVICE = "grpc.reflection.v1.ServerReflection"
_REFLECTION_V1_FILE = "grpc/reflection/v1/reflection.proto"


def reflection_v1_descriptor() -> _descriptor.FileDescriptor:
    """grpc/reflection/v1/reflection.proto, in the default pool: the v1alpha file renamed."""
    pool = descriptor_pool.Default()
    try:
        return pool.FindFileByName(_REFLECTION_V1_FILE)  # registered already (this or another library)
    except KeyError:
        pass
    old, new = ".grpc.reflection.v1alpha.", ".grpc.reflection.v1."
    proto = descriptor_pb2.FileDescriptorProto()
    reflection_pb2.DESCRIPTOR.CopyToProto(proto)
    proto.name = _REFLECTION_V1_FILE
    proto.package = "grpc.reflection.v1"
    for message in proto.message_type:
        for field in message.field:
            if field.type_name.startswith(old):
                field.type_name = new + field.type_name[len(old):]
    for service in proto.service:
        for method in service.method:
            method.input_type = new + method.input_type[len(old):]
            method.output_type = new + method.output_type[len(old):]
    proto.options.java_package = "io.grpc.reflection.v1"
    proto.options.go_package = "google.golang.org/grpc/reflection/grpc_reflection_v1"
    proto.options.ClearField("deprecated")  # v1alpha is deprecated in favour of v1
    return pool.AddSerializedFile(proto.SerializeToString())


def enable_reflection(service_names: tuple[str, ...], server: grpc.aio.Server) -> None:
    """Serve reflection v1 and v1alpha, each listing ``service_names`` and both reflection services."""
    reflection_v1_descriptor()  # so that reflection can describe its own v1 service
    servicer = reflection.aio.ReflectionServicer((*service_names, REFLECTION_V1_SERVICE, reflection.SERVICE_NAME))
    handlers = {
        "ServerReflectionInfo": grpc.stream_stream_rpc_method_handler(
            servicer.ServerReflectionInfo,
            request_deserializer=reflection_pb2.ServerReflectionRequest.FromString,
            response_serializer=reflection_pb2.ServerReflectionResponse.SerializeToString,
        )
    }
    for service in (REFLECTION_V1_SERVICE, reflection.SERVICE_NAME):
        server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(service, handlers),))
        server.add_registered_method_handlers(service, handlers)


# Calls gRPC core holds for the event loop to pick up (each a few hundred bytes).
MAX_PENDING_REQUESTS = 10_000


def server_options(settings: Settings) -> list[tuple[str, int]]:
    """gRPC core's limits, set on purpose (README, Configuration: server limits).

    - Pending requests: calls that arrived but that the event loop has not picked up yet.
      gRPC core's default (1,000) *cancels* the excess, so a burst of starts got CANCELLED
      (which clients do not retry) with no run created. With room for 10,000 (20,000 hard),
      overload is answered by the edge interceptor's call limit (AGENTD_MAX_CONCURRENT_RPCS)
      instead: RESOURCE_EXHAUSTED, which says to retry later.
    - Concurrent streams per connection are not capped below ``maximum_concurrent_rpcs``:
      a lower HTTP/2 limit makes a client's burst fail with REFUSED_STREAM (UNAVAILABLE)
      for streams it opened before it saw the limit, instead of waiting.
    - Keepalive: the server pings a silent connection every 60 s and drops it if no answer
      comes within 20 s (dead peers free their streams); clients may ping every 10 s at
      most, idle or not, else the connection is closed (GOAWAY too_many_pings).
    - Metadata: 16 KiB of headers (room for a large JWT); messages: AGENTD_MAX_MESSAGE_BYTES.
    """
    pending = max(MAX_PENDING_REQUESTS, settings.max_concurrent_rpcs)
    return [
        ("grpc.max_receive_message_length", settings.max_message_bytes),
        ("grpc.max_send_message_length", settings.max_message_bytes),
        ("grpc.max_metadata_size", 16 * 1024),
        ("grpc.so_reuseport", 0),
        ("grpc.server.max_pending_requests", pending),
        ("grpc.server.max_pending_requests_hard_limit", pending * 2),
        ("grpc.keepalive_time_ms", 60_000),
        ("grpc.keepalive_timeout_ms", 20_000),
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
        ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_ping_strikes", 2),
    ]


@dataclass(eq=False)
class RunningServer:
    settings: Settings
    server: grpc.aio.Server
    port: int
    runs: RunManager
    store: SessionStore
    models: ModelProvider
    traces: TraceStore
    health: health.aio.HealthServicer
    upkeep: StoreUpkeep
    authentication: Authentication
    # The OpenTelemetry provider when traces are exported over OTLP.
    trace_provider: "TracerProvider | None" = None
    # The plaintext health-only listener (AGENTD_HEALTH_PORT), for probes that cannot speak TLS.
    health_server: grpc.aio.Server | None = None
    health_port: int = 0
    # Every agent the server runs (code, files, API) and what keeps it current.
    catalog: AgentCatalog | None = None
    agent_store: AgentStore | None = None
    agent_files: AgentFiles | None = None
    file_watch: asyncio.Task[None] | None = None
    # The result cache's hooks into runs (None: off, or its store could not open).
    result_cache: CachedRuns | None = None

    @property
    def target(self) -> str:
        return f"{self.settings.host}:{self.port}"

    async def stop(self, grace_s: float | None = None) -> None:
        """Stop taking calls, let runs finish within the grace period, cancel the rest, close the store."""
        grace = self.settings.shutdown_grace_s if grace_s is None else grace_s
        await self.upkeep.stop()
        await self.health.enter_graceful_shutdown()
        stopping = asyncio.create_task(self.server.stop(grace + 5))
        if self.health_server is not None:
            await self.health_server.stop(0)
        await self.runs.drain(grace)
        await stopping
        await self.runs.close()
        await self.runs.close_stores()
        if self.result_cache is not None:
            await self.result_cache.close()
        if self.file_watch is not None:
            self.file_watch.cancel()
            await asyncio.gather(self.file_watch, return_exceptions=True)
        if self.catalog is not None:
            await self.catalog.stop(mcp_grace_s=grace)  # closes the MCP sessions, each by its own task
        if self.agent_store is not None:
            await self.agent_store.close()
        await self.models.aclose()
        # Runs are drained: every trace has ended; write them out before closing.
        await self.traces.close()
        await self.store.close()
        await self.authentication.close()
        if self.trace_provider is not None:
            from agentd.server.tracing.export import shutdown_provider

            await shutdown_provider(self.trace_provider, timeout_s=2.0)
        log.info("server stopped")


async def start_server(
    settings: Settings,
    app: App,
    *,
    models: ModelProvider | None = None,
    store: SessionStore | None = None,
) -> RunningServer:
    if settings.default_model:
        app = App(app.agents, settings.default_model, app.offline_script)
    # Security first: a server that would be exposed unsafely never opens its stores.
    authentication = build_authentication(settings)
    check_exposure(settings, authentication)
    credentials = build_server_credentials(settings)
    # The price table (AGENTD_PRICES_FILE): a file that does not load stops the server here.
    prices = (
        PriceFile(settings.prices_file, recheck_s=settings.prices_poll_interval_s)
        if settings.prices_file is not None else None
    )
    if prices is not None:
        log.info("prices: %d model(s) from %s", len(prices.table.models), prices.path)
    models = models or build_models(settings, app)
    store = store or build_store(settings)
    await store.open()
    # Agents made through the API live beside the sessions (opened after them: one SQLite file).
    agent_store = build_agent_store(settings)
    try:
        await agent_store.open()
    except BaseException:
        await store.close()
        raise
    catalog, agent_files = load_catalog(settings, app, agent_store)
    await catalog.start()
    traces = build_trace_store(settings)
    await traces.open()  # an archive that cannot be reached is logged and retried, never fatal
    tracer, trace_provider = build_tracer(settings, traces.memory)
    runner = AgentRunner(
        catalog, models, store, tracer, tool_timeout_s=settings.tool_timeout_s,
        history_max_items=settings.history_max_items, prices=prices,
    )
    run_store, control_bus = build_run_store(settings)
    try:
        await run_store.open()
        await control_bus.open()
    except BaseException:
        await control_bus.close()
        await run_store.close()
        await traces.close()
        await store.close()
        raise
    # Opted-in agents' results, beside the sessions (runs/cached.py); hooked into the run loop.
    cached_runs = runner.result_cache = await open_cached_runs(settings, catalog, trace_provider)
    runs = RunManager(
        runner,
        run_store,
        control_bus,
        replica_id=settings.replica_id,
        max_active_runs=settings.max_active_runs,
        max_queued_runs=settings.max_queued_runs,
        tenant_max_active_runs=settings.tenant_max_active_runs,
        tenant_max_queued_runs=settings.tenant_max_queued_runs,
        tenant_start_rate=settings.tenant_start_rate,
        tenant_start_burst=settings.tenant_start_burst,
        lease_s=settings.run_lease_s,
        retention_s=settings.run_retention_s,
        max_stream_lag=settings.max_stream_lag_events,
    )
    # The shared queue's depth (GetLiveStats, the capacity metrics) and, with metrics exported, the
    # capacity metrics on the same meter provider as the span-derived ones.
    queue_depth = QueueDepth(run_store)
    queue_depth.bind(asyncio.get_running_loop())
    meter_provider = getattr(trace_provider, "meter_provider", None)
    if meter_provider is not None:
        CapacityMetrics(meter_provider, runs, queue_depth)

    server = grpc.aio.server(
        interceptors=[build_interceptor(settings, authentication)],
        options=server_options(settings),
    )
    agent_service_pb2_grpc.add_AgentServiceServicer_to_server(
        AgentService(
            catalog, runs, max_input_chars=settings.max_input_chars, agent_store=agent_store,
            mcp_allowed_hosts=settings.mcp_allowed_hosts,
        ),
        server,
    )
    session_service_pb2_grpc.add_SessionServiceServicer_to_server(SessionService(store, runs), server)
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(TraceService(traces), server)
    stats_service_pb2_grpc.add_StatsServiceServicer_to_server(StatsService(traces, runs=runs, queue=queue_depth), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    enable_reflection((*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name), server)
    async def give_up(what: str) -> NoReturn:
        """Could not listen: close what is open, say where."""
        await server.stop(0)
        if cached_runs is not None:
            await cached_runs.close()
        await control_bus.close()
        await run_store.close()
        await traces.close()
        await store.close()
        raise OSError(f"cannot listen on {what} (address in use?)")

    address = f"{settings.host}:{settings.port}"
    port = server.add_secure_port(address, credentials) if credentials else server.add_insecure_port(address)
    if port == 0:
        await give_up(address)
    await server.start()
    health_server, health_port = None, 0
    if settings.health_port:
        # Kubernetes' native gRPC probes cannot speak TLS: health alone, in plaintext, on its own port.
        health_server = grpc.aio.server()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, health_server)
        health_port = health_server.add_insecure_port(f"{settings.host}:{settings.health_port}")
        if health_port == 0:
            await give_up(f"{settings.host}:{settings.health_port} for health")
        await health_server.start()
    runs.start()
    if cached_runs is not None:
        cached_runs.start()

    async def set_health(service: str, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        await health_servicer.set(service, status)

    # Health follows the store: a replica whose database is down is NOT_SERVING until it is back.
    upkeep = StoreUpkeep(
        store,
        set_health,
        ("", *SERVICE_NAMES),
        ping_interval_s=settings.store_health_interval_s,
        sweep_interval_s=settings.session_sweep_interval_s,
        also_ping=run_store.ping,
    )
    for name in ("", *SERVICE_NAMES):
        await set_health(name, True)
    upkeep.start()
    log.info(
        "agentd listening on %s:%d (%s, auth=%s, replica=%s, store=%s, runs=%s, models=%s, agents=%s)",
        settings.host, port, "mTLS" if settings.tls_client_ca_file else "TLS" if credentials else "plaintext",
        ",".join(a.name for a in authentication.authenticators) or "none", runs.replica_id, settings.store, run_store.location, type(models).__name__,
        ",".join(e.name for e in catalog.list(DEFAULT_TENANT)),
    )
    file_watch = None
    if agent_files is not None:
        file_watch = asyncio.create_task(agent_files.watch(
            lambda snapshot: apply_agent_files(catalog, snapshot), poll_interval_s=settings.agents_poll_interval_s
        ))
    return RunningServer(
        settings, server, port, runs, store, models, traces, health_servicer, upkeep, authentication, trace_provider,
        health_server, health_port, catalog, agent_store, agent_files, file_watch, result_cache=cached_runs,
    )


def load_catalog(settings: Settings, app: App, agent_store: AgentStore) -> tuple[AgentCatalog, AgentFiles | None]:
    """The catalog of the app's agents, the agent files' (when configured) and the API's."""
    catalog = AgentCatalog(app, store=agent_store)
    if settings.agents_dir is None:
        return catalog, None
    files = AgentFiles(
        settings.agents_dir, app_tools=catalog.app_tools, app_guardrails=catalog.app_guardrails,
        known_agents=lambda: catalog.static_names,
    )
    apply_agent_files(catalog, files.load())
    return catalog, files


def apply_agent_files(catalog: AgentCatalog, snapshot: FilesSnapshot) -> None:
    """Serve what the agent files define now; log every problem (a bad file keeps its last good agents)."""
    for error in snapshot.errors:
        log.error("agent file problem: %s", error)
    for name, path in snapshot.kept.items():
        log.warning("agent %r: %s has problems; its last good version keeps serving", name, path)
    for name, problem in catalog.set_file_definitions(snapshot.definitions):
        log.error("agent %r from the agent files cannot be served: %s", name, problem)
    log.info("agent files: %d agent(s) from %s", len(snapshot.definitions), ", ".join(
        sorted({str(p) for p in snapshot.paths.values()})) or "no files")


async def serve(settings: Settings, app: App) -> None:
    """Run until SIGTERM/SIGINT, then shut down gracefully."""
    loop = asyncio.get_running_loop()
    if settings.asyncio_debug:
        loop.set_debug(True)
        loop.slow_callback_duration = 0.01
    # SIGHUP re-reads the agent files; one that arrives while the server starts is not lost
    # (nor does it kill the process, the signal's default).
    reload_files: list[Callable[[], None]] = []
    hangups = 0

    def on_hangup() -> None:
        nonlocal hangups
        hangups += 1
        for reload in reload_files:
            reload()

    loop.add_signal_handler(signal.SIGHUP, on_hangup)
    running = await start_server(settings, app)
    # Startup objects (modules, app, descriptors) live forever: keep them out of the
    # collector's generations so full collections during runs stay short.
    gc.freeze()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if running.agent_files is not None:
        reload_files.append(running.agent_files.request_reload)
        if hangups:
            running.agent_files.request_reload()
    await stop.wait()
    log.info("shutdown requested; draining (grace %.1fs)", settings.shutdown_grace_s)
    await running.stop()
