"""Authentication and TLS from ``Settings``, with the secure-by-default start-up check."""

from __future__ import annotations

import ipaddress
import logging

import grpc

from agentd.server.auth.api_keys import ApiKeyAuthenticator
from agentd.server.auth.base import Authenticator
from agentd.server.auth.interceptor import Authentication, AuthInterceptor
from agentd.server.auth.jwt_bearer import JwtAuthenticator
from agentd.server.auth.mtls import MtlsAuthenticator, load_identities
from agentd.server.auth.tls import server_credentials
from agentd.server.runtime.errors import AppConfigError
from agentd.server.settings import Settings

log = logging.getLogger("agentd.auth")


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name other than localhost may resolve to anything


def build_authentication(settings: Settings) -> Authentication:
    authenticators: list[Authenticator] = []
    try:
        if settings.api_keys_file is not None:
            authenticators.append(ApiKeyAuthenticator(settings.api_keys_file))
        if settings.jwt_jwks_url:
            authenticators.append(
                JwtAuthenticator(
                    jwks_url=settings.jwt_jwks_url, issuer=settings.jwt_issuer, audience=settings.jwt_audience,
                    algorithms=tuple(a.strip() for a in settings.jwt_algorithms.split(",") if a.strip()),
                    leeway_s=settings.jwt_leeway_s, tenant_claim=settings.jwt_tenant_claim,
                    cache_s=settings.jwt_cache_s, refetch_cooldown_s=settings.jwt_refetch_cooldown_s,
                )
            )
        if settings.mtls_identities_file is not None:
            if settings.tls_client_ca_file is None:
                raise ValueError("AGENTD_MTLS_IDENTITIES_FILE needs AGENTD_TLS_CLIENT_CA_FILE (client certificates)")
            authenticators.append(MtlsAuthenticator(load_identities(settings.mtls_identities_file)))
    except (OSError, ValueError) as exc:
        raise AppConfigError(f"authentication: {exc}") from None
    return Authentication(authenticators)


def check_exposure(settings: Settings, authentication: Authentication) -> None:
    """Refuse to serve a non-loopback address to anyone who can reach it, unless told to."""
    if is_loopback(settings.host):
        return
    if not authentication.enabled and not settings.insecure:
        raise AppConfigError(
            f"refusing to listen on {settings.host}:{settings.port} without authentication: anyone who can reach"
            " the port could read and delete every session. Configure AGENTD_API_KEYS_FILE, AGENTD_JWT_JWKS_URL"
            " or AGENTD_MTLS_IDENTITIES_FILE (README, Security), listen on 127.0.0.1, or set AGENTD_INSECURE=true"
            " if something in front of agentd authenticates callers"
        )
    if not authentication.enabled:
        log.warning("serving %s without authentication (AGENTD_INSECURE=true)", settings.host)
    elif settings.tls_cert_file is None:
        log.warning("credentials cross the network in clear text: no TLS on %s (fine behind a mesh that encrypts)",
                    settings.host)


def build_interceptor(settings: Settings, authentication: Authentication) -> AuthInterceptor:
    return AuthInterceptor(
        authentication, open_reflection=settings.reflection == "open", max_in_flight=settings.max_concurrent_rpcs
    )


def build_server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert_file is None and settings.tls_key_file is None:
        if settings.tls_client_ca_file is not None:
            raise AppConfigError("AGENTD_TLS_CLIENT_CA_FILE needs AGENTD_TLS_CERT_FILE and AGENTD_TLS_KEY_FILE")
        return None
    if settings.tls_cert_file is None or settings.tls_key_file is None:
        raise AppConfigError("TLS needs both AGENTD_TLS_CERT_FILE and AGENTD_TLS_KEY_FILE")
    try:
        return server_credentials(settings.tls_cert_file, settings.tls_key_file, settings.tls_client_ca_file)
    except (OSError, ValueError) as exc:
        raise AppConfigError(f"TLS: {exc}") from None
