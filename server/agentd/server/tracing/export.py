"""OTLP export, configured the OpenTelemetry way.

The exporter, its endpoint, headers, timeout and the batch processor's queue and delay
all come from the standard ``OTEL_EXPORTER_OTLP_*``, ``OTEL_BSP_*``, ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES`` variables, read by the SDK itself; agentd only decides
whether to export and over which protocol. Export happens on the batch processor's
thread: a slow or unreachable collector costs dropped spans and a log line from the
exporter, never a slower or failed run.
"""

from __future__ import annotations

import asyncio
import logging
import os

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

log = logging.getLogger("agentd.tracing")

_ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def otlp_wanted(setting: bool | None) -> bool:
    """Export when the setting says so; unset, when an OTLP endpoint is configured."""
    if setting is not None:
        return setting
    return any(os.environ.get(name) for name in _ENDPOINT_VARIABLES)


def _exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use 'grpc' or 'http/protobuf'")


def build_tracer_provider() -> TracerProvider:
    """A provider exporting over OTLP in batches (service name ``agentd`` unless set)."""
    resource = Resource.create({SERVICE_NAME: "agentd"}) if not os.environ.get("OTEL_SERVICE_NAME") else Resource.create()
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    log.info("exporting traces over OTLP (%s)", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "default endpoint")
    return provider


async def shutdown_provider(provider: TracerProvider, timeout_s: float) -> None:
    """Flush what is queued, within ``timeout_s``; an unreachable collector cannot hold up shutdown."""

    def flush_and_close() -> None:
        provider.force_flush(timeout_millis=int(timeout_s * 1000))
        provider.shutdown()

    try:
        await asyncio.wait_for(asyncio.to_thread(flush_and_close), timeout_s + 1)
    except asyncio.TimeoutError:
        log.warning("trace export did not finish within %.1fs at shutdown; remaining spans dropped", timeout_s)
