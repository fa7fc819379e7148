"""The authenticator interface: credentials in, a principal (or a caller-safe error) out."""

from __future__ import annotations

import abc
from dataclasses import dataclass

from agentd.server.auth.principal import Principal


class AuthenticationError(Exception):
    """Credentials are missing or not valid: UNAUTHENTICATED. The message is shown to the
    caller, so it names the problem and never repeats a secret."""


class AuthUnavailableError(Exception):
    """Credentials cannot be checked right now (the JWKS endpoint is down): UNAVAILABLE."""


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a call presented: a bearer token from ``authorization`` metadata, and the
    identities (CN, then SANs) of a client certificate that TLS verified."""

    bearer: str | None = None
    certificate_identities: tuple[str, ...] = ()


class Authenticator(abc.ABC):
    """One way of establishing a principal (API keys, JWT, mTLS)."""

    name: str = "abstract"

    @abc.abstractmethod
    def accepts(self, credentials: Credentials) -> bool:
        """Whether these credentials are of the kind this authenticator checks."""

    @abc.abstractmethod
    async def authenticate(self, credentials: Credentials) -> Principal:
        """The principal, or ``AuthenticationError`` / ``AuthUnavailableError``."""

    async def close(self) -> None:
        """Release what it holds (threads, caches)."""
