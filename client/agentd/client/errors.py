"""Errors the client raises: a run that ended without a final output, a stream it could not
follow, and agentd's error statuses with their details as typed attributes."""

from __future__ import annotations

import functools
import inspect
from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf.message import DecodeError
from google.rpc import error_details_pb2, status_pb2

from agentd.v1 import run_event_pb2


class RunError(Exception):
    """A run ended without a final output."""

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunFailedError(RunError):
    def __init__(self, run_id: str, failed: run_event_pb2.RunFailed) -> None:
        code = run_event_pb2.RunErrorCode.Name(failed.code)
        super().__init__(run_id, f"run {run_id} failed ({code}): {failed.message}")
        self.code = failed.code
        self.code_name = code
        self.detail = failed.message


class RunCancelledError(RunError):
    def __init__(self, run_id: str, cancelled: run_event_pb2.RunCancelled) -> None:
        super().__init__(run_id, f"run {run_id} was cancelled: {cancelled.reason}")
        self.reason = cancelled.reason


class RunStreamError(Exception):
    """The client could not follow a run's event stream to its end.

    Raised when a broken stream could not be re-attached within the resume budget
    after it ended without a terminal event, when the server sent another run's
    events, or (as ``RunStreamGapError``) when events went missing. The run itself
    may still be going: ``run_id`` and ``last_sequence`` say where the caller was.
    """

    def __init__(self, run_id: str, last_sequence: int, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.last_sequence = last_sequence


class RunStreamGapError(RunStreamError):
    """An event arrived whose sequence is beyond the next one expected: events were lost.

    Sequences grow by one with no gaps (see run_event.proto), so this is a server bug
    or a mismatched replica, never a normal outage; it is raised, not retried.
    """

    def __init__(self, run_id: str, last_sequence: int, got: int) -> None:
        super().__init__(
            run_id, last_sequence,
            f"run {run_id}: expected event {last_sequence + 1} after {last_sequence}, got {got}: events were lost",
        )
        self.got = got


# --- error statuses with agentd's details ---------------------------------------------------

DETAILS_KEY = "grpc-status-details-bin"


@dataclass(frozen=True, slots=True)
class FieldViolation:
    """One invalid request field (``google.rpc.BadRequest``): its path and what to fix."""

    field: str
    description: str


class _ErrorDetails:
    """The ``google.rpc.Status`` details agentd puts on every error (see protos/agentd/v1/errors.proto).

    ``reason``: the ``ErrorReason`` name without its prefix (``"SESSION_BUSY"``), or ``""``
    when the status carried no details (it came from a proxy or the gRPC library itself);
    ``reason_metadata``: the reason's metadata (``{"session": ..., "active_run": ...}``);
    ``field_violations``; ``resource_type``/``resource_name`` (``"agentd.dev/Session"``,
    ``"sessions/s1"``) on NOT_FOUND/ALREADY_EXISTS; ``retry_after``: seconds to wait before
    retrying, when retrying later can succeed.
    """

    reason: str
    domain: str
    reason_metadata: dict[str, str]
    field_violations: tuple[FieldViolation, ...]
    resource_type: str
    resource_name: str
    retry_after: float | None

    def _read_details(self, trailing_metadata: Any) -> None:
        self.reason, self.domain, self.reason_metadata = "", "", {}
        self.field_violations, self.resource_type, self.resource_name, self.retry_after = (), "", "", None
        raw = next((value for key, value in trailing_metadata or () if key == DETAILS_KEY), None)
        if not isinstance(raw, bytes):
            return
        try:
            status = status_pb2.Status.FromString(raw)
        except DecodeError:
            return
        for detail in status.details:
            if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
                info = error_details_pb2.ErrorInfo()
                detail.Unpack(info)
                self.reason, self.domain, self.reason_metadata = info.reason, info.domain, dict(info.metadata)
            elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
                bad = error_details_pb2.BadRequest()
                detail.Unpack(bad)
                self.field_violations = tuple(FieldViolation(v.field, v.description) for v in bad.field_violations)
            elif detail.Is(error_details_pb2.ResourceInfo.DESCRIPTOR):
                resource = error_details_pb2.ResourceInfo()
                detail.Unpack(resource)
                self.resource_type, self.resource_name = resource.resource_type, resource.resource_name
            elif detail.Is(error_details_pb2.RetryInfo.DESCRIPTOR):
                retry = error_details_pb2.RetryInfo()
                detail.Unpack(retry)
                self.retry_after = retry.retry_delay.ToNanoseconds() / 1e9


class AgentdRpcError(grpc.aio.AioRpcError, _ErrorDetails):
    """An error status from agentd (async client), with its details as attributes.

    Still the ``grpc.aio.AioRpcError`` it was: ``code()``, ``details()`` and
    ``trailing_metadata()`` answer as before.
    """

    def __init__(
        self,
        code: grpc.StatusCode,
        initial_metadata: Any,
        trailing_metadata: Any,
        details: str | None = None,
        debug_error_string: str | None = None,
    ) -> None:
        super().__init__(code, initial_metadata, trailing_metadata, details, debug_error_string)
        self._read_details(trailing_metadata)

    @classmethod
    def of(cls, error: grpc.aio.AioRpcError) -> "AgentdRpcError":
        if isinstance(error, cls):
            return error
        converted = cls(error.code(), error.initial_metadata(), error.trailing_metadata(), error.details(),
                        error.debug_error_string())
        converted.__traceback__ = error.__traceback__
        return converted


class SyncAgentdRpcError(grpc.RpcError, _ErrorDetails):
    """An error status from agentd (sync client), with its details as attributes; answers
    ``code()``, ``details()``, ``initial_metadata()`` and ``trailing_metadata()`` like the
    ``grpc.RpcError`` it replaces."""

    def __init__(self, error: grpc.RpcError) -> None:
        self._code = error.code()  # type: ignore[attr-defined]
        self._details = error.details()  # type: ignore[attr-defined]
        self._initial = error.initial_metadata() if hasattr(error, "initial_metadata") else ()  # type: ignore[attr-defined]
        self._trailing = error.trailing_metadata() if hasattr(error, "trailing_metadata") else ()  # type: ignore[attr-defined]
        super().__init__(f"{self._code}: {self._details}")
        self._read_details(self._trailing)

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def initial_metadata(self) -> Any:
        return self._initial

    def trailing_metadata(self) -> Any:
        return self._trailing


def error_reason(error: BaseException) -> str:
    """The agentd ``ErrorReason`` of an RPC error ('' when it carries none)."""
    if isinstance(error, _ErrorDetails):
        return error.reason
    trailing = getattr(error, "trailing_metadata", None)
    if not callable(trailing):
        return ""
    probe = _ErrorDetails()
    probe._read_details(trailing())
    return probe.reason


def converted(error: grpc.RpcError) -> grpc.RpcError:
    """``error`` as the agentd error class that carries its details (itself if it already does)."""
    if isinstance(error, _ErrorDetails) or not callable(getattr(error, "code", None)):
        return error
    if isinstance(error, grpc.aio.AioRpcError):
        return AgentdRpcError.of(error)
    return SyncAgentdRpcError(error)


def raises_agentd_errors(cls: type) -> type:
    """Wrap ``cls``'s public methods so the RPC errors they raise carry agentd's details."""
    for name, method in list(vars(cls).items()):
        if name.startswith("_") or not inspect.isfunction(method):
            continue
        if inspect.iscoroutinefunction(method):
            setattr(cls, name, _async_converting(method))
        elif not inspect.isgeneratorfunction(method) and not inspect.isasyncgenfunction(method):
            setattr(cls, name, _converting(method))
    return cls


def _async_converting(method: Any) -> Any:
    @functools.wraps(method)
    async def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return await method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise converted(exc) from None

    return wrapper


def _converting(method: Any) -> Any:
    @functools.wraps(method)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return method(*args, **kwargs)
        except grpc.RpcError as exc:
            raise converted(exc) from None

    return wrapper
