"""Real credentials for security tests: a CA and certificates (trustme), a JWKS endpoint on
loopback serving RSA/EC keys made in the test, tokens signed with them, API key files."""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import jwt
import trustme
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jwt.algorithms import ECAlgorithm, RSAAlgorithm

ISSUER = "https://idp.test"
AUDIENCE = "agentd"


@dataclass
class SigningKey:
    kid: str
    private: Any
    algorithm: str

    def jwk(self) -> dict[str, Any]:
        converter = RSAAlgorithm if self.algorithm.startswith(("RS", "PS")) else ECAlgorithm
        data = json.loads(converter.to_jwk(self.private.public_key()))
        data.update(kid=self.kid, use="sig", alg=self.algorithm)
        return data


def rsa_key(kid: str) -> SigningKey:
    return SigningKey(kid, rsa.generate_private_key(public_exponent=65537, key_size=2048), "RS256")


def ec_key(kid: str) -> SigningKey:
    return SigningKey(kid, ec.generate_private_key(ec.SECP256R1()), "ES256")


def token(key: SigningKey, *, tenant: str | None = "acme", subject: str = "alice", scopes: str = "",
          lifetime_s: float = 300, not_before_s: float = 0, issuer: str = ISSUER, audience: str = AUDIENCE,
          **claims: Any) -> str:
    now = time.time()
    body: dict[str, Any] = {"iss": issuer, "aud": audience, "sub": subject, "iat": int(now),
                            "exp": int(now + lifetime_s), "scope": scopes, **claims}
    if tenant is not None:
        body["tenant"] = tenant
    if not_before_s:
        body["nbf"] = int(now + not_before_s)
    return jwt.encode(body, key.private, algorithm=key.algorithm, headers={"kid": key.kid})


@dataclass
class JwksServer:
    """An HTTP JWKS endpoint on loopback; ``keys`` is what it serves right now, ``fetches`` counts requests."""

    keys: list[SigningKey] = field(default_factory=list)
    fetches: int = 0
    _runner: web.AppRunner | None = None
    url: str = ""

    async def __aenter__(self) -> "JwksServer":
        app = web.Application()
        app.router.add_get("/.well-known/jwks.json", self._serve)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}/.well-known/jwks.json"
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._runner is not None
        await self._runner.cleanup()

    async def _serve(self, request: web.Request) -> web.Response:
        self.fetches += 1
        return web.json_response({"keys": [key.jwk() for key in self.keys]})


@dataclass
class Pki:
    """A CA with a server certificate for 127.0.0.1/localhost and client certificates, as files."""

    directory: Path
    ca: trustme.CA = field(default_factory=trustme.CA)

    def __post_init__(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        self.ca_file = self.directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))

    def server_cert(self, name: str = "server") -> tuple[Path, Path]:
        issued = self.ca.issue_cert("127.0.0.1", "localhost")
        return self._write(issued, name)

    def client_cert(self, identity: str, name: str = "client") -> tuple[Path, Path]:
        issued = self.ca.issue_cert(identity)
        return self._write(issued, name)

    def _write(self, issued: trustme.LeafCert, name: str) -> tuple[Path, Path]:
        cert, key = self.directory / f"{name}.pem", self.directory / f"{name}.key"
        cert.write_bytes(b"".join(blob.bytes() for blob in issued.cert_chain_pems))
        key.write_bytes(issued.private_key_pem.bytes())
        return cert, key
