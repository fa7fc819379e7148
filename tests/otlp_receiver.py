"""OTLP/gRPC trace and metrics receivers on loopback: what a Collector or Jaeger would receive."""

from __future__ import annotations

import asyncio
import time

import grpc
from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2, metrics_service_pb2_grpc
from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc
from opentelemetry.proto.common.v1.common_pb2 import AnyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span


def value_of(any_value: AnyValue) -> object:
    kind = any_value.WhichOneof("value")
    if kind == "array_value":
        return [value_of(v) for v in any_value.array_value.values]
    return getattr(any_value, kind) if kind else None


class OtlpReceiver(trace_service_pb2_grpc.TraceServiceServicer):
    def __init__(self) -> None:
        self.spans: list[Span] = []
        self.resources: list[dict[str, object]] = []
        self._server = grpc.aio.server()
        trace_service_pb2_grpc.add_TraceServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    async def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for resource_spans in request.resource_spans:
            self.resources.append({a.key: value_of(a.value) for a in resource_spans.resource.attributes})
            for scope_spans in resource_spans.scope_spans:
                self.spans.extend(scope_spans.spans)
        return trace_service_pb2.ExportTraceServiceResponse()

    async def __aenter__(self) -> "OtlpReceiver":
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(0)

    async def wait_for(self, trace_id_hex: str, count: int, timeout_s: float = 10.0) -> list[Span]:
        deadline = time.monotonic() + timeout_s
        while True:
            spans = [s for s in self.spans if s.trace_id.hex() == trace_id_hex]
            if len(spans) >= count:
                return spans
            assert time.monotonic() < deadline, f"only {len(spans)} of {count} spans arrived"
            await asyncio.sleep(0.05)


def attributes(span: Span) -> dict[str, object]:
    return {a.key: value_of(a.value) for a in span.attributes}


class OtlpMetricsReceiver(metrics_service_pb2_grpc.MetricsServiceServicer):
    """Keeps the latest export of each metric: with cumulative temporality, that is its current state."""

    def __init__(self) -> None:
        self.metrics: dict[str, Metric] = {}
        self.exports = 0
        self.resources: list[dict[str, object]] = []
        self._server = grpc.aio.server()
        metrics_service_pb2_grpc.add_MetricsServiceServicer_to_server(self, self._server)
        self.port = self._server.add_insecure_port("127.0.0.1:0")

    async def Export(self, request, context):  # noqa: N802 (gRPC method name)
        for resource_metrics in request.resource_metrics:
            self.resources.append({a.key: value_of(a.value) for a in resource_metrics.resource.attributes})
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    self.metrics[metric.name] = metric
        self.exports += 1
        return metrics_service_pb2.ExportMetricsServiceResponse()

    async def __aenter__(self) -> "OtlpMetricsReceiver":
        await self._server.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(0)

    async def wait_until(self, check, timeout_s: float = 10.0) -> None:
        """Wait until ``check(self.metrics)`` holds (an export arrives every export interval)."""
        deadline = time.monotonic() + timeout_s
        while not check(self.metrics):
            assert time.monotonic() < deadline, f"metrics never matched; got {sorted(self.metrics)}"
            await asyncio.sleep(0.05)


def data_points(metric: Metric) -> list:
    """A sum's or a histogram's data points."""
    kind = metric.WhichOneof("data")
    return list(getattr(metric, kind).data_points) if kind else []


def point_attributes(point) -> dict[str, object]:
    return {a.key: value_of(a.value) for a in point.attributes}
