"""Server settings: ``AGENTD_*`` environment variables, overridable by ``agentd serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTD_", extra="ignore")

    # The example app ships in the package, so an installed agentd serves it from any directory.
    app: str = Field("agentd.examples.support:app", description="App to serve, as 'module:attribute'.")
    agents_dir: Path | None = Field(
        None,
        description=(
            "A directory of agent definition files (*.yaml, *.yml, *.json; format: agent.schema.json), served "
            "beside the app's agents; reloaded when a file changes (polled every second) and on SIGHUP. A file "
            "that does not validate is reported and the previous version of its agent keeps serving."
        ),
    )
    mcp_allowed_hosts: list[str] = Field(
        default_factory=list,
        description=(
            "Hosts (or host:port) that MCP servers of agents made through the API may be reached at. Empty (the "
            "default): API agents may not use MCP servers at all, so no caller can make the server open "
            "connections into its own network; agent files and the app module are the operator's and unlimited."
        ),
    )
    agents_poll_interval_s: float = Field(
        1.0, gt=0, description="How often the agents directory is checked for changed files."
    )
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port.")

    store: Literal["sqlite", "memory", "postgres", "redis"] = Field(
        "sqlite", description="Where sessions live: sqlite (embedded default), memory, postgres or redis."
    )
    sqlite_path: Path = Path("agentd.db")
    session_ttl_s: float | None = Field(
        None, ge=0, description="Idle TTL of sessions created without one (None or 0: never expire)."
    )
    session_sweep_interval_s: float = Field(60.0, gt=0, description="How often expired sessions are deleted.")
    store_health_interval_s: float = Field(2.0, gt=0, description="How often health checking pings the store.")
    auto_migrate: bool = Field(True, description="Apply pending schema migrations at start (else refuse to start).")

    postgres_url: str = "postgresql://postgres@127.0.0.1:5432/postgres"
    postgres_schema: str = Field("agentd", pattern=r"^[a-z_][a-z0-9_]*$")
    postgres_min_pool: int = Field(2, ge=0)
    postgres_max_pool: int = Field(10, ge=1)
    postgres_statement_cache: int = Field(256, ge=0)
    postgres_connect_timeout_s: float = Field(5.0, gt=0)
    postgres_command_timeout_s: float = Field(10.0, gt=0)

    redis_url: str = Field("redis://127.0.0.1:6379/0", description="redis://, rediss:// or unix:// URL.")
    redis_sentinels: str = Field("", description="Sentinel nodes 'host:port,host:port'; used instead of the URL.")
    redis_sentinel_service: str = Field("", description="The master's service name in Sentinel.")
    redis_cluster_nodes: str = Field("", description="Cluster startup nodes 'host:port,host:port'.")
    redis_prefix: str = Field("agentd", min_length=1)
    redis_max_connections: int = Field(50, ge=1)
    redis_timeout_s: float = Field(5.0, gt=0)

    # --- security (README, Security) -------------------------------------------------
    insecure: bool = Field(
        False, description="Serve a non-loopback address with no authentication (something in front authenticates)."
    )
    tls_cert_file: Path | None = Field(None, description="PEM certificate chain; with the key, the server speaks TLS.")
    tls_key_file: Path | None = Field(None, description="PEM private key (unencrypted) of the certificate.")
    tls_client_ca_file: Path | None = Field(
        None, description="PEM CA bundle: every client must present a certificate it signed (mutual TLS)."
    )
    api_keys_file: Path | None = Field(None, description="JSON file of API key hashes (agentd keys create).")
    jwt_jwks_url: str = Field("", description="JWKS URL whose keys verify JWT bearer tokens; empty: no JWTs.")
    jwt_issuer: str = Field("", description="The required 'iss' of JWTs.")
    jwt_audience: str = Field("", description="The required 'aud' of JWTs.")
    jwt_algorithms: str = Field("RS256,ES256,EdDSA,PS256", description="Accepted JWT algorithms (asymmetric only).")
    jwt_leeway_s: float = Field(30.0, ge=0, le=300, description="Clock skew allowed on exp/nbf/iat.")
    jwt_tenant_claim: str = Field("tenant", min_length=1, description="The claim naming the caller's tenant.")
    jwt_cache_s: float = Field(300.0, gt=0, description="How long fetched JWKS keys are trusted before a refetch.")
    jwt_refetch_cooldown_s: float = Field(
        30.0, ge=0, description="Least time between JWKS refetches caused by an unknown key id."
    )
    mtls_identities_file: Path | None = Field(
        None, description="JSON file mapping client-certificate names to tenants and scopes."
    )
    health_port: int = Field(
        0, ge=0, le=65535,
        description="Also serve grpc.health.v1 alone, in plaintext, on this port (probes that cannot speak TLS); 0: off.",
    )
    reflection: Literal["authenticated", "open"] = Field(
        "authenticated", description="Server reflection: for authenticated callers only, or open to all."
    )

    model_provider: Literal["auto", "openai", "scripted"] = Field(
        "auto", description="auto: OpenAI when OPENAI_API_KEY is set, else the app's offline script."
    )
    model_api: Literal["auto", "responses", "chat_completions"] = Field(
        "auto",
        description=(
            "The OpenAI API agents' models are called on, unless an agent sets model_api (an agent with hosted "
            "tools uses the Responses API): auto = the Responses API on OpenAI's own endpoint (no "
            "OPENAI_BASE_URL, or one on api.openai.com), Chat Completions on any other (vLLM, Ollama...)."
        ),
    )
    default_model: str | None = Field(None, description="Overrides the app's default model.")
    model_timeout_s: float = Field(60.0, gt=0)
    model_max_retries: int = Field(2, ge=0, le=10)
    model_max_connections: int = Field(
        1000,
        gt=0,
        description=(
            "HTTP connections to the model endpoint, at most (each streams one model call); calls beyond it wait "
            "for a free connection within model_timeout_s. Idle ones are kept for reuse."
        ),
    )
    tool_timeout_s: float = Field(60.0, gt=0)
    prices_file: Path | None = Field(
        None,
        description=(
            "The price table: a YAML (or .json) file of US dollars per 1M tokens per model name "
            "(deploy/prices.example.yaml; agentd.server.pricing). Unset: every model call is unpriced (its cost "
            "unknown, never 0). Read at start (a file that does not load stops the server) and again when it "
            "changes: new prices apply to the model calls after the change; a change that does not parse is "
            "logged and the last good prices stay."
        ),
    )
    prices_poll_interval_s: float = Field(
        5.0, gt=0, description="How often the price file is checked for a change, at most (on a model call)."
    )

    max_input_chars: int = Field(100_000, gt=0)
    history_max_items: int = Field(
        200,
        ge=0,
        description=(
            "The history window: a run sends at most this many of its session's newest items to the model "
            "(an agent's history_limit overrides it; 0: the whole session). Older items stay in the session; "
            "RunStarted.history_omitted says how many were left out."
        ),
    )
    max_message_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_concurrent_rpcs: int = Field(
        10_000, gt=0, description="Calls in progress (streams included) beyond which new calls get RESOURCE_EXHAUSTED."
    )
    max_active_runs: int = Field(
        1000, gt=0, description="Runs this replica executes at once; more are queued for any replica with capacity."
    )
    max_queued_runs: int = Field(10_000, gt=0, description="Queued runs (all replicas) beyond which new runs get RESOURCE_EXHAUSTED.")
    # Per tenant, across every replica sharing the run store (0: no limit); over a limit a new
    # run gets RESOURCE_EXHAUSTED naming it. A request_id retry returning its run is never refused.
    tenant_max_active_runs: int = Field(
        0, ge=0, description="Unfinished runs (queued, running or waiting for the caller) one tenant may have at once."
    )
    tenant_max_queued_runs: int = Field(
        0, ge=0, description="Runs one tenant may have waiting in the shared queue (its share of max_queued_runs)."
    )
    tenant_start_rate: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="Runs one tenant may start per second, on average (a token bucket)."
    )
    tenant_start_burst: int | None = Field(
        None, ge=1, description="Runs one tenant may start at once before tenant_start_rate applies; unset: max(1, ceil(rate))."
    )
    run_store: Literal["auto", "memory", "redis", "postgres"] = Field(
        "auto",
        description="Where runs, their event logs and the work queue live: auto follows the session store"
        " (redis -> redis, postgres -> postgres, else memory: one process).",
    )
    replica_id: str = Field("", description="This replica's name in run leases; unset: hostname-pid.")
    run_lease_s: float = Field(10.0, gt=0, description="A run whose replica stops renewing for this long is taken over.")
    run_retention_s: float = Field(86_400.0, gt=0, description="How long a run and its events are kept after it ends.")
    # The embedded (memory) run store only: ended runs are also bounded by count and by the
    # estimated size of their events; beyond either bound the oldest ended runs are forgotten
    # first, as if their retention had passed (GetRun/WatchRun answer NOT_FOUND).
    run_memory_max_ended_runs: int = Field(
        10_000, gt=0, description="Ended runs the memory run store keeps at most (oldest forgotten first)."
    )
    run_memory_max_ended_bytes: int = Field(
        64 * 1024 * 1024, gt=0,
        description="Bytes (estimated: ~256 per event plus its text) of ended runs' events the memory run store"
        " keeps at most (oldest runs forgotten first; the run that just ended is always kept).",
    )
    # Every run store: a stream (StreamRun, Run, WatchRun) whose client reads slower than the run
    # emits is ended with RESOURCE_EXHAUSTED once it is this many events behind; the client
    # re-attaches with WatchRun(after_sequence=<the last sequence it got>).
    max_stream_lag_events: int = Field(
        10_000, gt=0,
        description="Events a stream may fall behind its run before it is ended with RESOURCE_EXHAUSTED.",
    )
    # The result cache (agents opting in with Agent(cache=...) / `cache` in a definition; see
    # agentd.server.cache and runs/cached.py). It lives where the sessions live (AGENTD_STORE).
    result_cache: bool = Field(
        True, description="Serve agents' result caching; false: their cache options are ignored (no lookups, no stores)."
    )
    result_cache_max_entry_bytes: int = Field(
        256 * 1024, gt=0,
        description="The largest cache entry (its JSON: final output, usage...); a larger result is not stored.",
    )
    result_cache_memory_max_entries: int = Field(
        10_000, gt=0, description="Entries the memory result cache (AGENTD_STORE=memory) keeps at most (LRU evicted)."
    )
    result_cache_memory_max_bytes: int = Field(
        64 * 1024 * 1024, gt=0,
        description="Bytes of entries the memory result cache keeps at most (least recently used evicted first).",
    )
    result_cache_sweep_interval_s: float = Field(60.0, gt=0, description="How often expired cache entries are deleted.")
    result_cache_timeout_s: float = Field(
        1.0, gt=0,
        description="How long a run waits for a cache lookup (then it is a miss) or store (then it goes on without).",
    )
    shutdown_grace_s: float = Field(10.0, ge=0)
    trace_retention: int = Field(
        10_000, gt=0, description="Traces kept: the newest this many, in memory and in the trace archive."
    )
    trace_store: Literal["auto", "memory", "sqlite", "postgres"] = Field(
        "auto",
        description="Where ended traces are archived: auto follows the session store (postgres -> postgres,"
        " memory -> memory only, sqlite and redis -> sqlite).",
    )
    trace_sqlite_path: Path | None = Field(
        None, description="The SQLite trace archive; unset: agentd-traces.db next to the session database."
    )
    trace_retention_days: float | None = Field(
        30.0, gt=0, description="Archived traces older than this are deleted too (None: only the count limit)."
    )
    trace_sweep_interval_s: float = Field(300.0, gt=0, description="How often trace retention is applied.")
    trace_flush_interval_s: float = Field(0.15, gt=0, description="How often ended traces are written, in batches.")
    trace_batch_size: int = Field(200, gt=0, description="Ended traces written per batch (a full batch goes at once).")
    trace_queue_size: int = Field(
        10_000, gt=0, description="Ended traces waiting for the archive; beyond it the oldest is dropped."
    )
    otlp_export: bool | None = Field(
        None, description="Export traces over OTLP; unset: when OTEL_EXPORTER_OTLP_(TRACES_)ENDPOINT is set."
    )
    trace_content: bool = Field(False, description="Record tool arguments and results in traces (may hold personal data).")

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"
    asyncio_debug: bool = Field(False, description="Event-loop debug mode: logs callbacks slower than 10 ms.")
    event_loop: Literal["auto", "asyncio", "uvloop"] = Field(
        "auto",
        description=(
            "The event loop: uvloop (libuv; less CPU per socket read, write and callback) or the standard "
            "library's. auto: uvloop when it is installed (`pip install 'agentd[server,uvloop]'`), else asyncio."
        ),
    )

    def resolved_run_store(self) -> Literal["memory", "redis", "postgres"]:
        if self.run_store != "auto":
            return self.run_store
        if self.store in ("redis", "postgres"):
            return self.store
        return "memory"

    def resolved_trace_store(self) -> Literal["memory", "sqlite", "postgres"]:
        if self.trace_store != "auto":
            return self.trace_store
        if self.store == "postgres":
            return "postgres"
        if self.store == "memory":
            return "memory"
        return "sqlite"

    def resolved_trace_sqlite_path(self) -> Path:
        if self.trace_sqlite_path is not None:
            return self.trace_sqlite_path
        return self.sqlite_path.parent / "agentd-traces.db"
