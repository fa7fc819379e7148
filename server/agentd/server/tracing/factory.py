"""Build the tracing parts the settings select: the trace store (memory plus an archive)
and the tracer runs record through (plus OpenTelemetry export when configured).

OpenTelemetry and the archive backends are imported only when chosen.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

from agentd.server.settings import Settings
from agentd.server.tracing.archive import Retention, TraceArchive
from agentd.server.tracing.base import Tracer
from agentd.server.tracing.memory import InMemoryTraceStore
from agentd.server.tracing.store import TraceStore

if TYPE_CHECKING:
    from opentelemetry.sdk.trace import TracerProvider


def otlp_wanted(setting: bool | None) -> bool:
    """Export when the setting says so; unset, when an OTLP endpoint is configured."""
    if setting is not None:
        return setting
    return any(os.environ.get(name) for name in ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))


def build_tracer(settings: Settings, traces: InMemoryTraceStore) -> tuple[Tracer, "TracerProvider | None"]:
    """The in-process trace store, plus OpenTelemetry export when configured (imported only then)."""
    if not otlp_wanted(settings.otlp_export):
        return traces, None
    from agentd.server.tracing.export import build_tracer_provider
    from agentd.server.tracing.otel import OtelTracer

    provider = build_tracer_provider()
    return OtelTracer(traces, provider, capture_content=settings.trace_content), provider


def build_trace_archive(settings: Settings) -> TraceArchive | None:
    """Where ended traces are kept (None: memory only), per ``AGENTD_TRACE_STORE``."""
    backend = settings.resolved_trace_store()
    if backend == "sqlite":
        from agentd.server.tracing.sqlite import SqliteTraceArchive

        return SqliteTraceArchive(settings.resolved_trace_sqlite_path(), auto_migrate=settings.auto_migrate)
    if backend == "postgres":
        from agentd.server.tracing.postgres import PostgresTraceArchive

        return PostgresTraceArchive(
            url=settings.postgres_url,
            schema=settings.postgres_schema,
            connect_timeout_s=settings.postgres_connect_timeout_s,
            command_timeout_s=settings.postgres_command_timeout_s,
            auto_migrate=settings.auto_migrate,
        )
    return None


def build_trace_store(settings: Settings) -> TraceStore:
    memory = InMemoryTraceStore(settings.trace_retention, capture_content=settings.trace_content)
    days = settings.trace_retention_days
    return TraceStore(
        memory,
        build_trace_archive(settings),
        retention=Retention(settings.trace_retention, days * 86400 if days else None),
        flush_interval_s=settings.trace_flush_interval_s,
        batch_size=settings.trace_batch_size,
        max_queued=settings.trace_queue_size,
        sweep_interval_s=settings.trace_sweep_interval_s,
    )
