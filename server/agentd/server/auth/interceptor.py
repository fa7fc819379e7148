"""The server interceptor that establishes the caller of every RPC, streaming ones included.

For each call it gathers the credentials (``authorization`` metadata; the verified
client certificate of an mTLS connection), asks the authenticators for a principal,
checks the scope the method needs (``methods.METHOD_SCOPES``) and makes the principal
the RPC's ``current_principal()``. Missing or bad credentials are UNAUTHENTICATED; a
valid caller without the scope is PERMISSION_DENIED. Health checking is always open;
reflection is open or authenticated by setting. Mutating calls get an audit line.

An admin may act in another tenant by sending ``x-agentd-tenant`` metadata; anyone else
sending it is PERMISSION_DENIED.

The handler is wrapped, not replaced: gRPC's aio server has the peer's auth context
only inside the handler, so authentication happens there, before the service's code.

The same wrapper guards decoding: a request whose bytes are not a valid message (corrupt
wire format, invalid UTF-8 in a string, nesting past protobuf's depth limit) would make
gRPC answer UNKNOWN with the decoder's text. The deserializer is wrapped to hand such a
request over as ``Undecodable``, and the call answers INVALID_ARGUMENT saying so.
"""

from __future__ import annotations

import logging
from typing import Any, AsyncIterator, Awaitable, Callable, Sequence

import grpc

from agentd.server.auth.audit import audit, resource_of
from agentd.server.auth.base import AuthenticationError, Authenticator, AuthUnavailableError, Credentials
from agentd.server.auth.methods import HEALTH_PREFIX, METHOD_SCOPES, MUTATING, REFLECTION_PREFIXES
from agentd.server.auth.principal import ANONYMOUS, Principal, set_current_principal
from agentd.server.services.status import Problem, abort, invalid_argument
from agentd.server.tenancy import valid_tenant

log = logging.getLogger("agentd.auth")

TENANT_HEADER = "x-agentd-tenant"


# RetryInfo delays: an overloaded replica frees call slots within moments; a JWKS endpoint
# that did not answer is asked again after this long.
OVERLOADED_RETRY_S = 0.05
AUTH_UNAVAILABLE_RETRY_S = 1.0


class Undecodable:
    """A request message that failed to decode; the handler wrapper answers INVALID_ARGUMENT."""

    __slots__ = ("problem",)

    def __init__(self, problem: str) -> None:
        self.problem = problem


def guarded(deserializer: Callable[[bytes], Any] | None) -> Callable[[bytes], Any] | None:
    if deserializer is None:
        return None

    def decode(data: bytes) -> Any:
        try:
            return deserializer(data)
        except Exception as exc:  # DecodeError, RecursionError on deep nesting, ...
            return Undecodable(str(exc)[:200] or type(exc).__name__)

    return decode


async def reject_undecodable(request: Any, context: grpc.aio.ServicerContext) -> None:
    if isinstance(request, Undecodable):
        await abort(context, invalid_argument(
            "request",
            f"not a valid protobuf message of this method's request type ({request.problem});"
            " strings must be UTF-8 and Struct/ListValue nesting must stay under 50 levels",
        ))
_MAX_TOKEN_CHARS = 16_384


def credentials_of(metadata: Sequence[tuple[str, Any]] | None, context: grpc.aio.ServicerContext) -> Credentials:
    bearer = None
    for key, value in metadata or ():
        if key == "authorization" and isinstance(value, str):
            scheme, _, token = value.strip().partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise AuthenticationError("the authorization metadata must be 'Bearer <token>'")
            bearer = token.strip()
            break
    if bearer is not None and len(bearer) > _MAX_TOKEN_CHARS:
        raise AuthenticationError(f"the bearer token is longer than {_MAX_TOKEN_CHARS} characters")
    identities: tuple[str, ...] = ()
    auth_context = context.auth_context()
    if auth_context.get("transport_security_type") == [b"ssl"]:
        names = auth_context.get("x509_common_name", []) + auth_context.get("x509_subject_alternative_name", [])
        identities = tuple(name.decode("utf-8", "replace") for name in names)
    return Credentials(bearer=bearer, certificate_identities=identities)


async def decoded(
    requests: AsyncIterator[Any], context: grpc.aio.ServicerContext, first: list[Any] | None = None
) -> AsyncIterator[Any]:
    """A request stream that aborts on a message that did not decode; keeps the first in ``first``."""
    async for message in requests:
        await reject_undecodable(message, context)
        if first is not None and not first:
            first.append(message)
        yield message


class Authentication:
    """The configured authenticators, tried in order; none configured means everyone is ANONYMOUS."""

    def __init__(self, authenticators: Sequence[Authenticator]) -> None:
        self.authenticators = tuple(authenticators)

    @property
    def enabled(self) -> bool:
        return bool(self.authenticators)

    async def principal(self, credentials: Credentials) -> Principal:
        if not self.authenticators:
            return ANONYMOUS
        for authenticator in self.authenticators:
            if authenticator.accepts(credentials):
                return await authenticator.authenticate(credentials)
        if credentials.bearer:
            raise AuthenticationError("this kind of bearer token is not accepted by this server")
        raise AuthenticationError(
            "this server requires authentication: send 'authorization: Bearer <token>' metadata"
            " (an API key or a JWT), or a client certificate it maps to a tenant"
        )

    async def close(self) -> None:
        for authenticator in self.authenticators:
            await authenticator.close()


class AuthInterceptor(grpc.aio.ServerInterceptor):
    def __init__(
        self, authentication: Authentication, *, open_reflection: bool, max_in_flight: int = 10_000
    ) -> None:
        self._auth = authentication
        self._open_reflection = open_reflection
        # Calls in progress (health excepted). gRPC's own maximum_concurrent_rpcs only stops
        # taking calls from the core, where they pile up until the core cancels them (CANCELLED,
        # which clients do not retry); counting here answers the excess RESOURCE_EXHAUSTED.
        self._max_in_flight = max_in_flight
        self._in_flight = 0

    @property
    def in_flight(self) -> int:
        return self._in_flight

    def _release(self) -> None:
        self._in_flight -= 1

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[grpc.RpcMethodHandler]],
        details: grpc.HandlerCallDetails,
    ) -> grpc.RpcMethodHandler:
        handler = await continuation(details)
        method = details.method
        if handler is None or method.startswith(HEALTH_PREFIX):
            return handler
        if method.startswith(REFLECTION_PREFIXES):
            return handler if self._open_reflection or not self._auth.enabled else self._wrap(handler, details, None)
        return self._wrap(handler, details, method)

    async def _admit(
        self, details: grpc.HandlerCallDetails, context: grpc.aio.ServicerContext, method: str | None
    ) -> Principal:
        """Take a call slot, authenticate and authorize, or abort the call with the status that says why.

        The caller releases the slot (``_release``) when the call ends, however it ends.
        """
        if self._in_flight >= self._max_in_flight:
            await abort(context, Problem(
                grpc.StatusCode.RESOURCE_EXHAUSTED, "SERVER_OVERLOADED",
                f"the server is serving its limit of {self._max_in_flight} calls at once (AGENTD_MAX_CONCURRENT_RPCS);"
                " retry with backoff, or on another replica",
                {"limit": str(self._max_in_flight)}, retry_after_s=OVERLOADED_RETRY_S,
            ))
        try:
            principal = await self._auth.principal(credentials_of(details.invocation_metadata, context))
        except AuthenticationError as exc:
            await abort(context, Problem(grpc.StatusCode.UNAUTHENTICATED, "UNAUTHENTICATED", str(exc)))
        except AuthUnavailableError as exc:
            await abort(context, Problem(
                grpc.StatusCode.UNAVAILABLE, "AUTH_UNAVAILABLE", str(exc), retry_after_s=AUTH_UNAVAILABLE_RETRY_S
            ))
        if method is not None:
            scope = METHOD_SCOPES.get(method)
            if scope is None:
                await abort(context, Problem(
                    grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED", f"{method} is not open to callers",
                    {"method": method},
                ))
            if not principal.allows(scope):
                await abort(context, Problem(
                    grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                    f"{method.rsplit('/', 1)[-1]} needs the '{scope.value}' scope, which this caller does not have",
                    {"method": method, "required_scope": scope.value},
                ))
        tenant = next((v for k, v in details.invocation_metadata or () if k == TENANT_HEADER), None)
        if tenant is not None and tenant != principal.tenant:
            if not principal.is_admin:
                await abort(context, Problem(
                    grpc.StatusCode.PERMISSION_DENIED, "PERMISSION_DENIED",
                    f"only 'admin' callers may send {TENANT_HEADER}", {"method": details.method},
                ))
            if not isinstance(tenant, str) or not valid_tenant(tenant):
                await abort(context, invalid_argument(TENANT_HEADER, "1-64 characters of A-Z a-z 0-9 . _ -"))
            principal = principal.acting_in(tenant)
        set_current_principal(principal)
        self._in_flight += 1
        return principal

    def _wrap(
        self, handler: grpc.RpcMethodHandler, details: grpc.HandlerCallDetails, method: str | None
    ) -> grpc.RpcMethodHandler:
        admit, release = self._admit, self._release
        audited = method in MUTATING
        name = details.method

        def outcome(context: grpc.aio.ServicerContext, error: BaseException | None) -> str:
            code = context.code()
            if code is not None:
                return code.name if isinstance(code, grpc.StatusCode) else str(code)
            return "OK" if error is None else ("CANCELLED" if isinstance(error, BaseException) else "UNKNOWN")

        decode_in = guarded(handler.request_deserializer)

        if handler.unary_unary:
            inner_uu = handler.unary_unary

            async def unary_unary(request: Any, context: grpc.aio.ServicerContext) -> Any:
                principal = await admit(details, context, method)
                error: BaseException | None = None
                try:
                    await reject_undecodable(request, context)
                    return await inner_uu(request, context)
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    release()
                    if audited:
                        audit(principal, name, resource_of(request), outcome(context, error))

            return grpc.unary_unary_rpc_method_handler(unary_unary, decode_in, handler.response_serializer)

        if handler.unary_stream:
            inner_us = handler.unary_stream

            async def unary_stream(request: Any, context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                principal = await admit(details, context, method)
                error: BaseException | None = None
                try:
                    await reject_undecodable(request, context)
                    async for response in inner_us(request, context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    release()
                    if audited:
                        audit(principal, name, resource_of(request), outcome(context, error))

            return grpc.unary_stream_rpc_method_handler(unary_stream, decode_in, handler.response_serializer)

        if handler.stream_stream:
            inner_ss = handler.stream_stream

            async def stream_stream(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> AsyncIterator[Any]:
                principal = await admit(details, context, method)
                first: list[Any] = []
                error: BaseException | None = None
                try:
                    async for response in inner_ss(decoded(requests, context, first), context):
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    release()
                    if audited:
                        audit(principal, name, resource_of(first[0] if first else None), outcome(context, error))

            return grpc.stream_stream_rpc_method_handler(stream_stream, decode_in, handler.response_serializer)

        inner_su = handler.stream_unary

        async def stream_unary(requests: AsyncIterator[Any], context: grpc.aio.ServicerContext) -> Any:
            await admit(details, context, method)
            try:
                return await inner_su(decoded(requests, context), context)
            finally:
                release()

        return grpc.stream_unary_rpc_method_handler(stream_unary, decode_in, handler.response_serializer)
