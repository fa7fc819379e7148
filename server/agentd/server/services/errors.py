"""Domain exceptions → error answers (status code, reason, details), in one table.

The domain layers (runs, sessions, runtime) raise plain exceptions with typed attributes;
``problem_for`` turns each into the ``Problem`` a caller gets (``services/status.py``):
the status code, the ``ErrorReason`` and the metadata, resource and retry advice that go
with it. A new domain exception a caller can trigger needs a row here, or it would reach
the caller as UNKNOWN.
"""

from __future__ import annotations

import functools
from typing import Any, Awaitable, Callable, NoReturn, TypeVar

import grpc

from agentd.server.runs.records import (
    DuplicateRunError,
    QueueFullError,
    RunNotFoundError,
    RunNotWaitingError,
    ServerDrainingError,
    SessionBusyError,
    TenantLimitError,
)
from agentd.server.runtime.errors import SessionExistsError, SessionNotFoundError, StoreUnavailableError
from agentd.server.services import status
from agentd.server.services.status import Problem
from agentd.server.services.validation import InvalidArgument
from agentd.server.tenancy import local

# RetryInfo on answers where a later retry can succeed: how long to wait first.
RETRY_STORE_S = 1.0  # a store outage: reconnects take about this long
RETRY_QUEUE_S = 1.0  # a full queue drains as runs start
RETRY_DRAINING_S = 0.0  # another replica can take the call at once


class NotFound(Exception):
    """A resource the caller named does not exist (for the caller). ``resource`` is its full name."""

    def __init__(self, message: str, *, reason: str, resource: str, metadata: dict[str, str]) -> None:
        super().__init__(message)
        self.reason = reason
        self.resource = resource
        self.metadata = metadata


class Answered(Exception):
    """An error whose answer the service decided itself (``Problem``: code, reason, details)."""

    def __init__(self, problem: Problem) -> None:
        super().__init__(problem.message)
        self.problem = problem


class FailedPrecondition(Exception):
    """The request is valid but the resource's state refuses it now."""

    def __init__(self, message: str, *, reason: str, metadata: dict[str, str]) -> None:
        super().__init__(message)
        self.reason = reason
        self.metadata = metadata


def _run(run_id: str) -> str:
    return f"runs/{local(run_id)}"


def _session(session_id: str) -> str:
    return f"sessions/{local(session_id)}"


def _invalid(exc: InvalidArgument) -> Problem:
    return status.invalid_argument(exc.field, exc.problem, str(exc))


def _not_found(exc: NotFound) -> Problem:
    return Problem(grpc.StatusCode.NOT_FOUND, exc.reason, str(exc), exc.metadata, exc.resource)


def _failed_precondition(exc: FailedPrecondition) -> Problem:
    return Problem(grpc.StatusCode.FAILED_PRECONDITION, exc.reason, str(exc), exc.metadata)


def _session_not_found(exc: SessionNotFoundError) -> Problem:
    name = _session(exc.session_id)
    return Problem(grpc.StatusCode.NOT_FOUND, "SESSION_NOT_FOUND", str(exc), {"session": name}, name)


def _session_exists(exc: SessionExistsError) -> Problem:
    name = _session(exc.session_id)
    return Problem(grpc.StatusCode.ALREADY_EXISTS, "SESSION_EXISTS", str(exc), {"session": name}, name)


def _duplicate_run(exc: DuplicateRunError) -> Problem:
    name = _run(exc.run_id)
    return Problem(
        grpc.StatusCode.ALREADY_EXISTS, "DUPLICATE_REQUEST", str(exc),
        {"request_id": local(exc.request_id), "run": name}, name,
    )


def _session_busy(exc: SessionBusyError) -> Problem:
    return Problem(
        grpc.StatusCode.FAILED_PRECONDITION, "SESSION_BUSY", str(exc),
        {"session": _session(exc.session_id), "active_run": _run(exc.run_id)},
    )


def _store_unavailable(exc: Exception) -> Problem:
    return Problem(grpc.StatusCode.UNAVAILABLE, "STORE_UNAVAILABLE", str(exc), retry_after_s=RETRY_STORE_S)


def _draining(exc: ServerDrainingError) -> Problem:
    return Problem(grpc.StatusCode.UNAVAILABLE, "DRAINING", str(exc), retry_after_s=RETRY_DRAINING_S)


def _queue_full(exc: QueueFullError) -> Problem:
    return Problem(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "QUEUE_FULL", str(exc), {"limit": str(exc.limit)},
        retry_after_s=RETRY_QUEUE_S,
    )


def _tenant_limit(exc: TenantLimitError) -> Problem:
    return Problem(
        grpc.StatusCode.RESOURCE_EXHAUSTED, "TENANT_LIMIT", str(exc),
        {"limit_name": exc.limit_name, "limit": f"{exc.limit:g}"}, retry_after_s=exc.retry_after_s,
    )


def _run_not_found(exc: RunNotFoundError) -> Problem:
    name = _run(exc.run_id)
    return Problem(grpc.StatusCode.NOT_FOUND, "RUN_NOT_FOUND", str(exc), {"run": name}, name)


def _run_not_waiting(exc: RunNotWaitingError) -> Problem:
    metadata = {"run": _run(exc.run_id), "call_id": exc.call_id, "waiting_for": ",".join(exc.waiting_for)}
    return Problem(grpc.StatusCode.FAILED_PRECONDITION, exc.reason, str(exc), metadata)


PROBLEM_FOR: dict[type[Exception], Callable[[Any], Problem]] = {
    Answered: lambda exc: exc.problem,
    InvalidArgument: _invalid,
    NotFound: _not_found,
    FailedPrecondition: _failed_precondition,
    SessionNotFoundError: _session_not_found,
    SessionExistsError: _session_exists,
    DuplicateRunError: _duplicate_run,
    SessionBusyError: _session_busy,
    StoreUnavailableError: _store_unavailable,
    ServerDrainingError: _draining,
    QueueFullError: _queue_full,
    TenantLimitError: _tenant_limit,
    RunNotFoundError: _run_not_found,
    RunNotWaitingError: _run_not_waiting,
}
HANDLED = tuple(PROBLEM_FOR)


def problem_for(exc: Exception) -> Problem:
    return PROBLEM_FOR[type(exc)](exc)


async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    await status.abort(context, problem_for(exc))


T = TypeVar("T")


def unary_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Answer a unary RPC's domain errors with their status, reason and details."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except HANDLED as exc:
            await abort(context, exc)

    return wrapper
