"""OTLP trace export requests, built with the generated OTLP protobuf classes, cheaply.

The SDK's exporter (``opentelemetry.exporter.otlp.proto.common``'s ``encode_spans``) builds
the ``ExportTraceServiceRequest`` (opentelemetry/proto/collector/trace/v1/trace_service.proto)
one message per span, attribute and value, through several Python calls each: ~25 µs per
agentd span, on the batch processor's thread but under the one GIL the event loop runs on,
so every exported span slowed the runs in flight. ``encode_request`` builds the same message
with the same ``opentelemetry.proto`` classes (upb: the work is in C) and less Python per
span: the Resource and InstrumentationScope messages are built once per process, the
attributes that repeat from span to span once per value, and each span is one
keyword-argument ``add`` straight into its ``ScopeSpans``. The result equals the SDK's for
the same spans (fields, values, grouping by resource and scope in first-appearance order,
span kind, flags and status); a span with events or links, which agentd does not make, or
with an attribute value protobuf refuses (which the SDK leaves out, with a log line) is
encoded by the SDK's own encoder.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import ExportTraceServiceRequest
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, ArrayValue, KeyValue, KeyValueList
from opentelemetry.proto.common.v1.common_pb2 import InstrumentationScope as PB2InstrumentationScope
from opentelemetry.proto.resource.v1.resource_pb2 import Resource as PB2Resource
from opentelemetry.proto.trace.v1.trace_pb2 import Span as PB2Span
from opentelemetry.proto.trace.v1.trace_pb2 import SpanFlags
from opentelemetry.proto.trace.v1.trace_pb2 import Status as PB2Status
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

__all__ = ["encode_request", "encode_spans"]

log = logging.getLogger("agentd.tracing")

_KIND = {
    SpanKind.INTERNAL: PB2Span.SPAN_KIND_INTERNAL,
    SpanKind.SERVER: PB2Span.SPAN_KIND_SERVER,
    SpanKind.CLIENT: PB2Span.SPAN_KIND_CLIENT,
    SpanKind.PRODUCER: PB2Span.SPAN_KIND_PRODUCER,
    SpanKind.CONSUMER: PB2Span.SPAN_KIND_CONSUMER,
}
# Span.flags: the SDK always says whether the parent is remote, and sets "is remote" when it is.
_FLAGS_LOCAL_PARENT = SpanFlags.SPAN_FLAGS_CONTEXT_HAS_IS_REMOTE_MASK
_FLAGS_REMOTE_PARENT = _FLAGS_LOCAL_PARENT | SpanFlags.SPAN_FLAGS_CONTEXT_IS_REMOTE_MASK
# The SDK always sets a Status, an empty one for an unset status without description.
_STATUS_UNSET = PB2Status()


def _any_value(value: Any) -> AnyValue:
    """An ``AnyValue`` (as the SDK's ``_encode_value``: same type tests, in the same order)."""
    if value is None:
        return AnyValue()
    if isinstance(value, bool):
        return AnyValue(bool_value=value)
    if isinstance(value, str):
        return AnyValue(string_value=value)
    if isinstance(value, int):
        return AnyValue(int_value=value)  # protobuf raises ValueError beyond int64
    if isinstance(value, float):
        return AnyValue(double_value=value)
    if isinstance(value, bytes):
        return AnyValue(bytes_value=value)
    if isinstance(value, Sequence):
        return AnyValue(array_value=ArrayValue(values=[_any_value(v) for v in value]))
    if isinstance(value, Mapping):
        return AnyValue(kvlist_value=KeyValueList(values=[_key_value(str(k), v) for k, v in value.items()]))
    raise TypeError(f"invalid attribute value type {type(value).__name__}")


def _key_value(key: str, value: Any) -> KeyValue:
    return KeyValue(key=key, value=_any_value(value))


def _attributes(attributes: Mapping[str, Any] | None) -> list[KeyValue]:
    """``attributes`` as KeyValue messages; one that cannot be encoded is left out with a
    warning and the others still go (as the SDK does)."""
    if not attributes:
        return []
    encoded = []
    for key, value in attributes.items():
        try:
            encoded.append(_key_value(key, value))
        except Exception as exc:  # noqa: BLE001 (what the SDK's _encode_attributes catches too)
            log.warning("attribute %s not exported: %s", key, exc)
    return encoded


# KeyValue messages of span attributes by (key, value): most of a span's attributes repeat from
# span to span (operation, span kind, agent, model, tool, tenant, finish reasons), and adding a
# cached message costs less than building one. Only strings, bools and tuples of strings are
# cached, so no two cached values of different types are equal (True == 1 == 1.0, (1,) == (True,)).
# Bounded: values that never repeat (run and call ids) only cost a periodic clear. Values that
# rarely repeat (token counts, floats, long strings) go as plain dicts, which protobuf converts in C.
_SPAN_ATTRIBUTES: dict[tuple[str, Any], KeyValue] = {}
_MAX_CACHED = 8192
_MAX_CACHED_LENGTH = 128


def _span_attributes(attributes: Mapping[str, Any]) -> list[KeyValue | dict[str, Any]]:
    """The span's attributes, for ``Span(attributes=...)``. A value protobuf refuses raises (the
    caller has the SDK encode that span, which leaves the attribute out as it does everywhere)."""
    cache = _SPAN_ATTRIBUTES
    encoded: list[KeyValue | dict[str, Any]] = []
    append = encoded.append
    for key, value in attributes.items():
        kind = type(value)
        if kind is str:
            if len(value) > _MAX_CACHED_LENGTH:
                append({"key": key, "value": {"string_value": value}})
                continue
        elif kind is int:
            append({"key": key, "value": {"int_value": value}})
            continue
        elif kind is float:
            append({"key": key, "value": {"double_value": value}})
            continue
        elif kind is not bool and not (
            kind is tuple and len(value) <= 4 and all(type(v) is str and len(v) <= _MAX_CACHED_LENGTH for v in value)
        ):
            append(_key_value(key, value))
            continue
        cache_key = (key, value)
        key_value = cache.get(cache_key)
        if key_value is None:
            key_value = _key_value(key, value)
            if len(cache) >= _MAX_CACHED:
                cache.clear()
            cache[cache_key] = key_value
        append(key_value)
    return encoded


def _status(status: Any) -> PB2Status | None:
    if status is None:
        return None
    if status.status_code is StatusCode.UNSET and not status.description:
        return _STATUS_UNSET
    return PB2Status(code=status.status_code.value, message=status.description)


# Resource / InstrumentationScope messages, by the (immutable) object: a process has one or two.
_RESOURCES: dict[int, tuple[Any, PB2Resource]] = {}
_SCOPES: dict[int, tuple[Any, PB2InstrumentationScope]] = {}
_MAX_OBJECTS = 64


def _resource(resource: Any) -> PB2Resource:
    cached = _RESOURCES.get(id(resource))
    if cached is None or cached[0] is not resource:
        cached = (resource, PB2Resource(attributes=_attributes(resource.attributes)))
        if len(_RESOURCES) >= _MAX_OBJECTS:
            _RESOURCES.clear()
        _RESOURCES[id(resource)] = cached
    return cached[1]


def _scope(scope: Any) -> PB2InstrumentationScope:
    cached = _SCOPES.get(id(scope))
    if cached is None or cached[0] is not scope:
        if scope is None:
            message = PB2InstrumentationScope()
        else:
            message = PB2InstrumentationScope(
                name=scope.name, version=scope.version, attributes=_attributes(getattr(scope, "attributes", None))
            )
        cached = (scope, message)
        if len(_SCOPES) >= _MAX_OBJECTS:
            _SCOPES.clear()
        _SCOPES[id(scope)] = cached
    return cached[1]


def _sdk_span(span: ReadableSpan) -> PB2Span:
    from opentelemetry.exporter.otlp.proto.common._internal.trace_encoder import _encode_span

    return _encode_span(span)


def encode_request(spans: Sequence[ReadableSpan]) -> ExportTraceServiceRequest:
    """The ``ExportTraceServiceRequest`` of ``spans``, equal to the SDK's ``encode_spans``: spans
    grouped by (equal) resource, then by (equal) instrumentation scope, in first-appearance order."""
    # Grouped by equality, as the SDK's dicts do, but each resource and scope object is hashed
    # once per batch, not once per span (a Resource hashes its attributes as JSON).
    groups: dict[Any, dict[Any, list[ReadableSpan]]] = {}
    by_id: dict[tuple[int, int], list[ReadableSpan]] = {}  # the spans keep these objects alive
    for span in spans:
        resource = span.resource
        scope = span.instrumentation_scope or None
        ids = (id(resource), id(scope))
        members = by_id.get(ids)
        if members is None:
            members = by_id[ids] = groups.setdefault(resource, {}).setdefault(scope, [])
        members.append(span)

    request = ExportTraceServiceRequest()
    for resource, scopes in groups.items():
        resource_spans = request.resource_spans.add(resource=_resource(resource), schema_url=resource.schema_url)
        for scope, members in scopes.items():
            scope_spans = resource_spans.scope_spans.add(
                scope=_scope(scope), schema_url=scope.schema_url if scope else None
            )
            encoded = scope_spans.spans
            add = encoded.add
            for span in members:
                if span.events or span.links:
                    encoded.append(_sdk_span(span))
                    continue
                context = span.context
                parent = span.parent
                trace_state = context.trace_state
                attributes = span.attributes
                try:
                    add(
                        trace_id=context.trace_id.to_bytes(16, "big"),
                        span_id=context.span_id.to_bytes(8, "big"),
                        trace_state=",".join([f"{k}={v}" for k, v in trace_state.items()]) if trace_state else None,
                        parent_span_id=parent.span_id.to_bytes(8, "big") if parent else None,
                        name=span.name,
                        kind=_KIND[span.kind],
                        start_time_unix_nano=span.start_time,
                        end_time_unix_nano=span.end_time,
                        attributes=_span_attributes(attributes) if attributes else None,
                        status=_status(span.status),
                        dropped_attributes_count=span.dropped_attributes,
                        dropped_events_count=span.dropped_events,
                        dropped_links_count=span.dropped_links,
                        flags=_FLAGS_REMOTE_PARENT if parent and parent.is_remote else _FLAGS_LOCAL_PARENT,
                    )
                except Exception:  # noqa: BLE001 (a value protobuf refuses: nothing was added)
                    # The SDK's encoder leaves out the attribute it cannot encode, with a log line.
                    encoded.append(_sdk_span(span))
    return request


def encode_spans(spans: Sequence[ReadableSpan]) -> bytes:
    """The serialized ``ExportTraceServiceRequest`` of ``spans`` (``encode_request``)."""
    return encode_request(spans).SerializeToString()
