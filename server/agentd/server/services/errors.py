"""Domain exceptions → gRPC status codes, in one table."""

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
from agentd.server.services.validation import InvalidArgument


class NotFound(Exception):
    pass


class FailedPrecondition(Exception):
    pass


STATUS_FOR: dict[type[Exception], grpc.StatusCode] = {
    InvalidArgument: grpc.StatusCode.INVALID_ARGUMENT,
    NotFound: grpc.StatusCode.NOT_FOUND,
    SessionNotFoundError: grpc.StatusCode.NOT_FOUND,
    SessionExistsError: grpc.StatusCode.ALREADY_EXISTS,
    DuplicateRunError: grpc.StatusCode.ALREADY_EXISTS,
    SessionBusyError: grpc.StatusCode.FAILED_PRECONDITION,
    FailedPrecondition: grpc.StatusCode.FAILED_PRECONDITION,
    StoreUnavailableError: grpc.StatusCode.UNAVAILABLE,
    ServerDrainingError: grpc.StatusCode.UNAVAILABLE,
    QueueFullError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    TenantLimitError: grpc.StatusCode.RESOURCE_EXHAUSTED,
    RunNotFoundError: grpc.StatusCode.NOT_FOUND,
    RunNotWaitingError: grpc.StatusCode.FAILED_PRECONDITION,
}
HANDLED = tuple(STATUS_FOR)


async def abort(context: grpc.aio.ServicerContext, exc: Exception) -> NoReturn:
    await context.abort(STATUS_FOR[type(exc)], str(exc))
    raise AssertionError("unreachable")  # context.abort always raises


T = TypeVar("T")


def unary_errors(method: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """Answer a unary RPC's domain errors with their status and message."""

    @functools.wraps(method)
    async def wrapper(self: Any, request: Any, context: grpc.aio.ServicerContext) -> T:
        try:
            return await method(self, request, context)
        except HANDLED as exc:
            await abort(context, exc)

    return wrapper
