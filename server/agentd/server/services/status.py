"""Error statuses as agentd sends them: a code, a message for people, details for programs.

Every error agentd answers carries a ``google.rpc.Status`` in the
``grpc-status-details-bin`` trailer (the standard rich error model, built with
grpcio-status): one ``ErrorInfo`` (domain ``agentd.dev``, a ``reason`` from the
``agentd.v1.ErrorReason`` catalogue, metadata), plus ``BadRequest`` field violations,
``ResourceInfo`` and ``RetryInfo`` where they apply (see protos/agentd/v1/errors.proto).

``Problem`` is what a service or the edge interceptor decides to answer; ``abort`` sends
it. A reason outside the catalogue fails when the ``Problem`` is made, so the catalogue
in the protos and what the server sends cannot drift apart.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NoReturn

import grpc
from google.protobuf import any_pb2, duration_pb2
from google.rpc import error_details_pb2, status_pb2
from grpc_status import rpc_status

from agentd.v1 import errors_pb2

DOMAIN = "agentd.dev"
RESOURCE_TYPES = {
    "agents": f"{DOMAIN}/Agent",
    "sessions": f"{DOMAIN}/Session",
    "runs": f"{DOMAIN}/Run",
    "traces": f"{DOMAIN}/Trace",
}
# ErrorInfo metadata values are quoted callers' values at most this long (a status travels in
# the reply's trailing metadata, which has a size limit).
MAX_METADATA_VALUE_CHARS = 256


@dataclass(frozen=True, slots=True)
class Problem:
    """One error answer. ``reason`` is an ``ErrorReason`` name without its prefix
    (``SESSION_BUSY``); ``resource`` a full resource name (``sessions/s1``), whose
    collection gives the ``ResourceInfo`` type; ``violations`` (field path, what to fix)
    pairs for ``BadRequest``; ``retry_after_s`` the ``RetryInfo`` delay."""

    code: grpc.StatusCode
    reason: str
    message: str
    metadata: dict[str, str] = field(default_factory=dict)
    resource: str | None = None
    violations: tuple[tuple[str, str], ...] = ()
    retry_after_s: float | None = None

    def __post_init__(self) -> None:
        if self.reason not in REASONS:
            raise ValueError(f"{self.reason!r} is not in the agentd.v1.ErrorReason catalogue")

    def to_status(self) -> status_pb2.Status:
        status = status_pb2.Status(code=self.code.value[0], message=self.message)
        metadata = {key: value[:MAX_METADATA_VALUE_CHARS] for key, value in self.metadata.items()}
        _pack(status, error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=metadata))
        if self.violations:
            _pack(status, error_details_pb2.BadRequest(field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=path, description=text)
                for path, text in self.violations
            ]))
        if self.resource is not None:
            collection = self.resource.split("/", 1)[0]
            _pack(status, error_details_pb2.ResourceInfo(
                resource_type=RESOURCE_TYPES.get(collection, f"{DOMAIN}/{collection}"),
                resource_name=self.resource[:MAX_METADATA_VALUE_CHARS],
            ))
        if self.retry_after_s is not None:
            delay = duration_pb2.Duration()
            delay.FromNanoseconds(max(0, round(self.retry_after_s * 1e9)))
            _pack(status, error_details_pb2.RetryInfo(retry_delay=delay))
        return status


REASONS = frozenset(
    name.removeprefix("ERROR_REASON_") for name in errors_pb2.ErrorReason.keys() if name != "ERROR_REASON_UNSPECIFIED"
)


def _pack(status: status_pb2.Status, message: object) -> None:
    detail = any_pb2.Any()
    detail.Pack(message)  # type: ignore[arg-type]
    status.details.append(detail)


def grpc_status(problem: Problem) -> grpc.Status:
    """The ``grpc.Status`` (code, message, details trailer) for ``problem``."""
    return rpc_status.to_status(problem.to_status())


async def abort(context: grpc.aio.ServicerContext, problem: Problem) -> NoReturn:
    """End the call with ``problem`` (raises, as ``context.abort`` does)."""
    status = grpc_status(problem)
    await context.abort(status.code, status.details, status.trailing_metadata)
    raise AssertionError("unreachable")  # context.abort always raises


def invalid_argument(field_path: str, problem: str, message: str | None = None) -> Problem:
    """INVALID_ARGUMENT naming one field; ``message`` defaults to ``"{field}: {problem}"``."""
    return Problem(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", message or f"{field_path}: {problem}",
        {"field": field_path}, violations=((field_path, problem),),
    )
