"""TLS and bearer tokens for client channels.

``TlsConfig`` builds channel credentials (server CA, and a client certificate for
mutual TLS). A token goes into ``authorization: Bearer …`` metadata through client
interceptors, on TLS and plaintext channels alike: services behind a mesh (which
encrypts for them) send tokens on plaintext channels, where gRPC's call credentials
are refused. A token may be a callable, called per call, so a caller can hand in a
function that refreshes a short-lived JWT.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Union

import grpc

Token = Union[str, Callable[[], str]]


@dataclass(frozen=True)
class TlsConfig:
    """How to speak TLS to agentd.

    ``ca_file``: PEM bundle that signed the server's certificate (None: the system roots).
    ``cert_file``/``key_file``: this client's certificate and key, for mutual TLS.
    ``server_name``: the name to verify the server's certificate against, when it differs
    from the target's host (e.g. connecting by IP to a certificate issued for a name).
    """

    ca_file: str | Path | None = None
    cert_file: str | Path | None = None
    key_file: str | Path | None = None
    server_name: str | None = None

    def credentials(self) -> grpc.ChannelCredentials:
        if (self.cert_file is None) != (self.key_file is None):
            raise ValueError("mutual TLS needs both cert_file and key_file")
        read = lambda path: Path(path).read_bytes() if path is not None else None  # noqa: E731
        return grpc.ssl_channel_credentials(read(self.ca_file), read(self.key_file), read(self.cert_file))

    def options(self) -> list[tuple[str, Any]]:
        return [("grpc.ssl_target_name_override", self.server_name)] if self.server_name else []


def resolve_tls(tls: "TlsConfig | bool | None") -> TlsConfig | None:
    if tls is True:
        return TlsConfig()
    return tls or None


def _with_token(details: Any, token: Token) -> Any:
    value = token() if callable(token) else token
    metadata = [(k, v) for k, v in (details.metadata or ()) if k != "authorization"]
    metadata.append(("authorization", f"Bearer {value}"))
    return details._replace(metadata=metadata) if hasattr(details, "_replace") else _Details(details, metadata)


class _Details(grpc.ClientCallDetails):  # type: ignore[misc]
    """A copy of call details with other metadata (the sync API's details are not namedtuples)."""

    def __init__(self, base: Any, metadata: list[tuple[str, str]]) -> None:
        self.method = base.method
        self.timeout = base.timeout
        self.metadata = metadata
        self.credentials = base.credentials
        self.wait_for_ready = getattr(base, "wait_for_ready", None)
        self.compression = getattr(base, "compression", None)


class _AsyncToken:
    def __init__(self, token: Token) -> None:
        self._token = token


# grpc.aio files an interceptor under the first of the four kinds it is, so one class each.
class _AsyncUnaryUnary(_AsyncToken, grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_token(details, self._token), request)


class _AsyncUnaryStream(_AsyncToken, grpc.aio.UnaryStreamClientInterceptor):
    async def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return await continuation(_with_token(details, self._token), request)


class _AsyncStreamUnary(_AsyncToken, grpc.aio.StreamUnaryClientInterceptor):
    async def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_with_token(details, self._token), request_iterator)


class _AsyncStreamStream(_AsyncToken, grpc.aio.StreamStreamClientInterceptor):
    async def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return await continuation(_with_token(details, self._token), request_iterator)


def async_token_interceptors(token: Token) -> list[Any]:
    return [kind(token) for kind in (_AsyncUnaryUnary, _AsyncUnaryStream, _AsyncStreamUnary, _AsyncStreamStream)]


class SyncTokenInterceptor(
    grpc.UnaryUnaryClientInterceptor,
    grpc.UnaryStreamClientInterceptor,
    grpc.StreamUnaryClientInterceptor,
    grpc.StreamStreamClientInterceptor,
):
    def __init__(self, token: Token) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(_with_token(details, self._token), request)

    def intercept_unary_stream(self, continuation, details, request):  # type: ignore[no-untyped-def]
        return continuation(_with_token(details, self._token), request)

    def intercept_stream_unary(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(_with_token(details, self._token), request_iterator)

    def intercept_stream_stream(self, continuation, details, request_iterator):  # type: ignore[no-untyped-def]
        return continuation(_with_token(details, self._token), request_iterator)


def async_channel(target: str, options: list[tuple[str, Any]], tls: TlsConfig | None, token: Token | None) -> grpc.aio.Channel:
    interceptors = async_token_interceptors(token) if token else None
    if tls is None:
        return grpc.aio.insecure_channel(target, options=options, interceptors=interceptors)
    return grpc.aio.secure_channel(target, tls.credentials(), options=options + tls.options(), interceptors=interceptors)


def sync_channel(target: str, options: list[tuple[str, Any]], tls: TlsConfig | None, token: Token | None) -> grpc.Channel:
    if tls is None:
        channel = grpc.insecure_channel(target, options=options)
    else:
        channel = grpc.secure_channel(target, tls.credentials(), options=options + tls.options())
    return grpc.intercept_channel(channel, SyncTokenInterceptor(token)) if token else channel
