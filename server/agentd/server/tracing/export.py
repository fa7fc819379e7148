"""OTLP export, configured the OpenTelemetry way.

The exporter, its endpoint, headers, timeout and the batch processor's queue and delay
all come from the standard ``OTEL_EXPORTER_OTLP_*``, ``OTEL_BSP_*``, ``OTEL_SERVICE_NAME``
and ``OTEL_RESOURCE_ATTRIBUTES`` variables, read by the SDK itself; agentd only decides
whether to export and over which protocol. Export happens on the batch processor's
thread: a slow or unreachable collector costs dropped spans and a log line from the
exporter, never a slower or failed run.

Metrics (``agentd.server.tracing.metrics``) are derived from the same spans and exported the same
way: a ``PeriodicExportingMetricReader`` thread pushes them every
``OTEL_METRIC_EXPORT_INTERVAL`` ms (60 s by default) to the ``OTEL_EXPORTER_OTLP_(METRICS_)*``
endpoint; ``OTEL_METRICS_EXPORTER=none`` turns them off while traces are still exported.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
from typing import Callable

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import MetricExporter, PeriodicExportingMetricReader
from opentelemetry.sdk.resources import SERVICE_NAME, Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor, SpanExporter

from agentd.server.tracing.metrics import MetricsSpanProcessor

log = logging.getLogger("agentd.tracing")

def _exporter() -> SpanExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        return _grpc_exporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use 'grpc' or 'http/protobuf'")


def _grpc_exporter() -> SpanExporter:
    """The SDK's OTLP/gRPC span exporter (endpoint, TLS, headers, compression, retries and
    timeout from the environment, as ever), building its request messages with
    ``otlp_encoding``: the SDK's encoder costs ~3x as much, on the batch processor's thread but
    under the GIL the runs share."""
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter as GrpcExporter

    from agentd.server.tracing.otlp_encoding import encode_request

    class Exporter(GrpcExporter):
        _fast = True

        def _translate_data(self, data):  # type: ignore[no-untyped-def]
            if self._fast:
                try:
                    return encode_request(data)
                except Exception:  # noqa: BLE001 (a span it cannot encode: the SDK's encoder from now on)
                    log.exception("encoding spans for OTLP failed; using the OpenTelemetry SDK's encoder")
                    self._fast = False
            return super()._translate_data(data)

    return Exporter()


def _metric_exporter() -> MetricExporter:
    protocol = (
        os.environ.get("OTEL_EXPORTER_OTLP_METRICS_PROTOCOL") or os.environ.get("OTEL_EXPORTER_OTLP_PROTOCOL") or "grpc"
    )
    if protocol == "grpc":
        from opentelemetry.exporter.otlp.proto.grpc.metric_exporter import OTLPMetricExporter as GrpcExporter

        return GrpcExporter()
    if protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter as HttpExporter

        return HttpExporter()
    raise ValueError(f"OTEL_EXPORTER_OTLP_PROTOCOL={protocol!r} is not supported: use 'grpc' or 'http/protobuf'")


class ExportingTracerProvider(TracerProvider):
    """A ``TracerProvider`` that also owns the ``MeterProvider`` its spans feed.

    Carrying the meter provider on the tracer provider keeps ``build_tracer_provider()``
    and ``shutdown_provider(provider, timeout_s)`` as they were for their callers while
    one shutdown covers both signals.
    """

    meter_provider: MeterProvider | None = None


def build_tracer_provider() -> TracerProvider:
    """A provider exporting over OTLP in batches (service name ``agentd`` unless set), and metrics from its spans."""
    resource = Resource.create({SERVICE_NAME: "agentd"}) if not os.environ.get("OTEL_SERVICE_NAME") else Resource.create()
    # shutdown_on_exit=False: the server flushes with a time limit when it stops; the SDK's
    # own exit hook would block the process for as long as a dead collector keeps it retrying.
    provider = ExportingTracerProvider(resource=resource, shutdown_on_exit=False)
    provider.add_span_processor(BatchSpanProcessor(_exporter()))
    log.info("exporting traces over OTLP (%s)", os.environ.get("OTEL_EXPORTER_OTLP_ENDPOINT") or "default endpoint")
    if (os.environ.get("OTEL_METRICS_EXPORTER") or "otlp").strip().lower() != "none":
        # The reader reads OTEL_METRIC_EXPORT_INTERVAL/_TIMEOUT, the exporter its endpoint,
        # headers, timeout and temporality preference; both export on the reader's thread.
        meter_provider = MeterProvider(
            resource=resource,
            metric_readers=[PeriodicExportingMetricReader(_metric_exporter())],
            shutdown_on_exit=False,
        )
        provider.meter_provider = meter_provider
        provider.add_span_processor(MetricsSpanProcessor(meter_provider))
        log.info("exporting metrics over OTLP")
    return provider


def _in_daemon_thread(name: str, work: Callable[[], object]) -> asyncio.Future[None]:
    """Run ``work`` on a daemon thread; the future resolves when it returns or fails (logged)."""
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()

    def resolve() -> None:
        if not done.done():
            done.set_result(None)

    def run() -> None:
        try:
            work()
        except Exception:  # noqa: BLE001 (an exporter failure only costs the unsent data)
            log.warning("%s failed at shutdown", name, exc_info=True)
        finally:
            try:
                loop.call_soon_threadsafe(resolve)
            except RuntimeError:  # the loop is closed: nobody is waiting any more
                pass

    threading.Thread(target=run, name=f"agentd-{name.replace(' ', '-')}", daemon=True).start()
    return done


async def shutdown_provider(provider: TracerProvider, timeout_s: float) -> None:
    """Flush what is queued, within ``timeout_s``; a stuck collector cannot hold up shutdown.

    Spans and metrics flush concurrently, each on a daemon thread with the whole time
    limit (they may go to different collectors: one dead endpoint does not starve the
    other). If a collector never answers, the process still exits when the server is
    done, and the unsent data is dropped with a log line.
    """
    timeout_ms = int(timeout_s * 1000)

    def flush_and_close_traces() -> None:
        provider.force_flush(timeout_millis=timeout_ms)
        provider.shutdown()

    pending = {_in_daemon_thread("trace flush", flush_and_close_traces): ("trace", "spans")}
    meter_provider = provider.meter_provider if isinstance(provider, ExportingTracerProvider) else None
    if meter_provider is not None:
        # The reader's shutdown collects and exports one last time, within the limit.
        close_metrics = lambda: meter_provider.shutdown(timeout_millis=timeout_ms)  # noqa: E731
        pending[_in_daemon_thread("metric flush", close_metrics)] = ("metric", "measurements")
    _, unfinished = await asyncio.wait(pending, timeout=timeout_s + 1)
    for future in unfinished:
        future.cancel()
        signal, items = pending[future]
        log.warning("%s export did not finish within %.1fs at shutdown; remaining %s dropped", signal, timeout_s, items)
