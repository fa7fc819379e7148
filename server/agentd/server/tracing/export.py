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
import threading

from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

log = logging.getLogger("agentd.tracing")

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
    # shutdown_on_exit=False: the server flushes with a time limit when it stops; the SDK's
    # own exit hook would block the process for as long as a dead collector keeps it retrying.
    provider = TracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    log.info("exporting traces over OTLP (%s)", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "default endpoint")
    return provider


async def shutdown_provider(provider: TracerProvider, timeout_s: float) -> None:
    """Flush what is queued, within ``timeout_s``; a stuck collector cannot hold up shutdown.

    The flush runs on a daemon thread: if the collector never answers, the process still
    exits when the server is done, and the unsent spans are dropped with a log line.
    """
    loop = asyncio.get_running_loop()
    done = loop.create_future()

    def flush_and_close() -> None:
        try:
            provider.force_flush(timeout_millis=int(timeout_s * 1000))
            provider.shutdown()
        finally:
            loop.call_soon_threadsafe(lambda: done.done() or done.set_result(None))

    threading.Thread(target=flush_and_close, name="agentd-trace-flush", daemon=True).start()
    try:
        await asyncio.wait_for(done, timeout_s + 1)
    except asyncio.TimeoutError:
        log.warning("trace export did not finish within %.1fs at shutdown; remaining spans dropped", timeout_s)
