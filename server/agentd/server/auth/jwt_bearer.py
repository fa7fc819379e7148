"""JWT bearer tokens verified against a JWKS URL (PyJWT).

What is checked: the signature with the key named by the token's ``kid`` from the JWKS,
the algorithm against an allow-list (asymmetric ones only by default, so ``alg=none``
and HS/RS confusion — an HMAC "signed" with the public key — are refused before any
key is looked at), ``iss``, ``aud``, ``exp`` and ``nbf`` with a small leeway for clock
skew, and the presence of ``sub`` and the tenant claim.

Keys are fetched by PyJWT's ``PyJWKClient`` on a worker thread, never on the event
loop. Verified keys are kept for ``cache_s``; a token naming an unknown ``kid`` makes
one JWKS refetch (key rotation), at most once per ``refetch_cooldown_s``, and an id
that is still unknown is remembered as unknown for that long, so a flood of made-up
ids cannot turn into a flood of fetches.

A token that verified is remembered (by its exact text, up to ``VERIFIED_CACHE_SIZE``
tokens) until it expires or ``cache_s`` passes, whichever is first: a service sends the
same token on every call until it renews it, and a signature check costs about a tenth
of a short run. Changing a token by one byte makes it a different, unverified text.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import OrderedDict
from typing import Any

import jwt

from agentd.server.auth.base import AuthenticationError, AuthUnavailableError, Authenticator, Credentials
from agentd.server.auth.principal import Principal, parse_scopes
from agentd.server.tenancy import valid_tenant

log = logging.getLogger("agentd.auth")

VERIFIED_CACHE_SIZE = 4096
ASYMMETRIC_ALGORITHMS = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512", "ES256", "ES384", "ES512", "EdDSA")


def looks_like_jwt(token: str) -> bool:
    return token.count(".") == 2 and token.startswith("eyJ")


class JwtAuthenticator(Authenticator):
    name = "jwt"

    def __init__(
        self,
        *,
        jwks_url: str,
        issuer: str,
        audience: str,
        algorithms: tuple[str, ...] = ASYMMETRIC_ALGORITHMS,
        leeway_s: float = 30.0,
        tenant_claim: str = "tenant",
        cache_s: float = 300.0,
        refetch_cooldown_s: float = 30.0,
        fetch_timeout_s: float = 5.0,
    ) -> None:
        unsafe = [alg for alg in algorithms if alg not in ASYMMETRIC_ALGORITHMS]
        if unsafe:
            raise ValueError(
                f"JWT algorithms {unsafe} are not allowed: only asymmetric ones ({', '.join(ASYMMETRIC_ALGORITHMS)})"
                " can be verified with keys from a JWKS"
            )
        if not issuer or not audience:
            raise ValueError("JWT verification needs both an issuer and an audience")
        self._issuer, self._audience = issuer, audience
        self._algorithms = tuple(algorithms)
        self._leeway_s = leeway_s
        self._tenant_claim = tenant_claim
        self._cache_s = cache_s
        self._cooldown_s = refetch_cooldown_s
        self._client = jwt.PyJWKClient(
            jwks_url, cache_jwk_set=True, lifespan=cache_s, cooldown_duration=refetch_cooldown_s,
            timeout=fetch_timeout_s,
        )
        self._keys: dict[str, tuple[jwt.PyJWK, float]] = {}  # kid -> (key, fetched at)
        self._unknown: dict[str, float] = {}  # kid -> when it was found missing
        self._fetch = asyncio.Lock()
        self._verified: OrderedDict[str, tuple[Principal, float]] = OrderedDict()  # token -> (principal, until)

    def accepts(self, credentials: Credentials) -> bool:
        return bool(credentials.bearer and looks_like_jwt(credentials.bearer))

    async def authenticate(self, credentials: Credentials) -> Principal:
        token = credentials.bearer or ""
        cached = self._verified.get(token)
        if cached is not None:
            if time.time() < cached[1]:
                return cached[0]
            del self._verified[token]
        principal, expires = await self._verify_token(token)
        self._verified[token] = (principal, min(expires, time.time() + self._cache_s))
        if len(self._verified) > VERIFIED_CACHE_SIZE:
            self._verified.popitem(last=False)
        return principal

    async def _verify_token(self, token: str) -> tuple[Principal, float]:
        """The principal and the token's expiry (unix seconds), or AuthenticationError."""
        try:
            header = jwt.get_unverified_header(token)
        except jwt.InvalidTokenError:
            raise AuthenticationError("the bearer token is not a well-formed JWT") from None
        algorithm = header.get("alg")
        if algorithm not in self._algorithms:
            raise AuthenticationError(f"the token's algorithm is not accepted; use one of {', '.join(self._algorithms)}")
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthenticationError("the token has no 'kid' header naming its signing key")
        key = await self._key(kid)
        if key.algorithm_name and key.algorithm_name != algorithm and "alg" in key._jwk_data:  # noqa: SLF001
            raise AuthenticationError("the token's algorithm does not match its signing key")
        claims = self._verify(token, key, algorithm)
        subject, tenant = claims.get("sub"), claims.get(self._tenant_claim)
        if not isinstance(subject, str) or not subject:
            raise AuthenticationError("the token has no 'sub' claim")
        if not isinstance(tenant, str) or not tenant:
            raise AuthenticationError(f"the token has no '{self._tenant_claim}' claim naming the caller's tenant")
        if not valid_tenant(tenant):
            raise AuthenticationError(
                f"the token's '{self._tenant_claim}' claim must be 1-64 characters of A-Z a-z 0-9 . _ -"
            )
        scopes = claims.get("scope", claims.get("scp", []))
        principal = Principal(
            subject, tenant, parse_scopes(scopes if isinstance(scopes, (str, list)) else []),
            method=self.name, key_id=kid[:64],
        )
        return principal, float(claims["exp"])

    def _verify(self, token: str, key: jwt.PyJWK, algorithm: str) -> dict[str, Any]:
        try:
            return jwt.decode(
                token, key.key, algorithms=[algorithm], audience=self._audience, issuer=self._issuer,
                leeway=self._leeway_s, options={"require": ["exp", "iss", "aud", "sub"]},
            )
        except jwt.ExpiredSignatureError:
            raise AuthenticationError("the token has expired") from None
        except jwt.ImmatureSignatureError:
            raise AuthenticationError("the token is not valid yet (nbf/iat in the future)") from None
        except jwt.InvalidAudienceError:
            raise AuthenticationError("the token's audience is not this service") from None
        except jwt.InvalidIssuerError:
            raise AuthenticationError("the token's issuer is not trusted") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthenticationError(f"the token has no '{exc.claim}' claim") from None
        except jwt.InvalidSignatureError:
            raise AuthenticationError("the token's signature does not verify") from None
        except (jwt.InvalidTokenError, TypeError, ValueError):
            raise AuthenticationError("the token is not valid") from None

    async def _key(self, kid: str) -> jwt.PyJWK:
        now = time.monotonic()
        cached = self._keys.get(kid)
        if cached is not None and now - cached[1] < self._cache_s:
            return cached[0]
        missing_since = self._unknown.get(kid)
        if missing_since is not None and now - missing_since < self._cooldown_s:
            raise AuthenticationError("the token's signing key is not known")
        async with self._fetch:
            cached = self._keys.get(kid)
            if cached is not None and time.monotonic() - cached[1] < self._cache_s:
                return cached[0]
            try:
                key = await asyncio.to_thread(self._client.get_signing_key, kid)
            except jwt.PyJWKClientConnectionError as exc:
                log.warning("JWKS fetch failed: %s", exc)
                raise AuthUnavailableError("cannot verify the token now: the key server is unreachable") from None
            except (jwt.PyJWKClientError, jwt.PyJWKSetError, jwt.InvalidKeyError):
                if len(self._unknown) > 10_000:
                    self._unknown.clear()
                self._unknown[kid] = time.monotonic()
                raise AuthenticationError("the token's signing key is not known") from None
            self._unknown.pop(kid, None)
            if len(self._keys) > 1_000:
                self._keys.clear()
            self._keys[kid] = (key, time.monotonic())
            return key
