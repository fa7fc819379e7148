"""Who may call: TLS and mTLS, API keys, JWTs from a JWKS, scopes, and the secure default.

Everything is real: certificates made by a CA in the test, a JWKS endpoint on loopback,
key files on disk, a real server and real clients over the wire.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.client import AgentdClient, TlsConfig
from agentd.server.auth.api_keys import create_key, revoke_key
from agentd.server import Script, say
from agentd.server.auth.factory import is_loopback
from agentd.server.auth.jwt_bearer import JwtAuthenticator
from agentd.server.auth.methods import METHOD_SCOPES
from agentd.server.runtime.errors import AppConfigError
from agentd.server.serve import SERVICE_NAMES, start_server
from agentd.server.settings import Settings
from agentd.v1 import agent_service_pb2, agent_service_pb2_grpc, item_pb2
from agentd.v1 import session_service_pb2 as session_pb2
from tests.apps import app
from tests.conftest import start_harness
from tests.security_util import AUDIENCE, ISSUER, JwksServer, Pki, ec_key, rsa_key, token

ROOT = Path(__file__).resolve().parents[1]
ALL = "agents:read runs:read runs:write sessions:read sessions:write traces:read"


async def code_of(call) -> grpc.StatusCode:  # type: ignore[no-untyped-def]
    try:
        await call
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return grpc.StatusCode.OK


async def list_agents(client: AgentdClient) -> grpc.StatusCode:
    return await code_of(client.agents.ListAgents(agent_service_pb2.ListAgentsRequest(), timeout=10))


# --- the contract: every RPC has a scope --------------------------------------------


def test_every_rpc_needs_a_declared_scope() -> None:
    from agentd.v1 import session_service_pb2, stats_service_pb2, trace_service_pb2

    methods = set()
    for module in (agent_service_pb2, session_service_pb2, trace_service_pb2, stats_service_pb2):
        for service in module.DESCRIPTOR.services_by_name.values():
            if service.full_name in SERVICE_NAMES:
                methods |= {f"/{service.full_name}/{m.name}" for m in service.methods}
    assert methods == set(METHOD_SCOPES)


# --- secure by default ----------------------------------------------------------------


async def test_a_non_loopback_address_without_authentication_refuses_to_start(tmp_path: Path) -> None:
    settings = Settings(host="0.0.0.0", port=0, store="memory")
    with pytest.raises(AppConfigError, match="refusing to listen on 0.0.0.0:0 without authentication"):
        await start_server(settings, app)
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("::") and not is_loopback("agentd.internal")


async def test_loopback_needs_no_credentials(harness) -> None:  # type: ignore[no-untyped-def]
    assert await list_agents(harness.client) == grpc.StatusCode.OK


# --- API keys -------------------------------------------------------------------------


@pytest.fixture
async def keyed(model_server, tmp_path):  # type: ignore[no-untyped-def]
    keys = tmp_path / "keys.json"
    _, full = create_key(keys, tenant="acme", subject="billing", scopes=ALL.split())
    _, reader = create_key(keys, tenant="acme", subject="dashboards", scopes=["traces:read"])
    h = await start_harness(model_server, tmp_path, api_keys_file=keys)
    yield h, keys, full, reader
    await h.client.close()
    await h.server.stop(grace_s=0)


async def test_api_keys_authenticate_and_scopes_authorize(keyed) -> None:  # type: ignore[no-untyped-def]
    h, keys, full, reader = keyed
    assert full not in keys.read_text() and full.split("_", 2)[2] not in keys.read_text()  # only hashes on disk
    async with AgentdClient(h.target, token=full) as client:
        assert await list_agents(client) == grpc.StatusCode.OK
    async with AgentdClient(h.target, token=reader) as client:
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            await client.agents.ListAgents(agent_service_pb2.ListAgentsRequest(), timeout=10)
        assert denied.value.code() == grpc.StatusCode.PERMISSION_DENIED
        assert "needs the 'agents:read' scope" in denied.value.details()
    async with AgentdClient(h.target, token=full[:-3] + "xyz") as client:
        assert await list_agents(client) == grpc.StatusCode.UNAUTHENTICATED
    assert await list_agents(h.client) == grpc.StatusCode.UNAUTHENTICATED  # no credentials at all


async def test_api_keys_are_added_and_revoked_without_a_restart(keyed) -> None:  # type: ignore[no-untyped-def]
    h, keys, full, _ = keyed
    key_id, fresh = create_key(keys, tenant="acme", subject="new", scopes=["agents:read"])
    async with AgentdClient(h.target, token=fresh) as client:
        assert await list_agents(client) == grpc.StatusCode.OK
        assert revoke_key(keys, key_id)
        assert await list_agents(client) == grpc.StatusCode.UNAUTHENTICATED
    async with AgentdClient(h.target, token=full) as client:
        assert await list_agents(client) == grpc.StatusCode.OK  # the other keys keep working


async def test_raw_authorization_metadata_works_on_a_plaintext_channel(keyed) -> None:  # type: ignore[no-untyped-def]
    h, _, full, _ = keyed
    async with grpc.aio.insecure_channel(h.target) as channel:
        stub = agent_service_pb2_grpc.AgentServiceStub(channel)
        reply = await stub.ListAgents(
            agent_service_pb2.ListAgentsRequest(), metadata=[("authorization", f"Bearer {full}")], timeout=10
        )
        assert reply.agents
        with pytest.raises(grpc.aio.AioRpcError) as bad:
            await stub.ListAgents(agent_service_pb2.ListAgentsRequest(), metadata=[("authorization", full)], timeout=10)
        assert bad.value.code() == grpc.StatusCode.UNAUTHENTICATED and "Bearer <token>" in bad.value.details()
        assert full not in bad.value.details()


async def test_streaming_rpcs_are_authenticated_too(keyed) -> None:  # type: ignore[no-untyped-def]
    h, _, full, reader = keyed
    h.model.set_script("assistant", Script.of(say("hi")))
    async with AgentdClient(h.target, token=full) as client:
        assert (await client.run("assistant", "hello").final_output()) == "hi"
    for credentials, expected in ((None, grpc.StatusCode.UNAUTHENTICATED), (reader, grpc.StatusCode.PERMISSION_DENIED)):
        async with AgentdClient(h.target, token=credentials) as client:
            with pytest.raises(grpc.aio.AioRpcError) as failure:
                await client.run("assistant", "hello").final_output()
            assert failure.value.code() == expected


async def test_health_is_open_and_reflection_is_authenticated(keyed) -> None:  # type: ignore[no-untyped-def]
    h, _, full, _ = keyed
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    async with grpc.aio.insecure_channel(h.target) as channel:
        health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        assert health.status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        request = reflection_pb2.ServerReflectionRequest(list_services="")
        with pytest.raises(grpc.aio.AioRpcError) as denied:
            async for _ in stub.ServerReflectionInfo(iter([request]), timeout=10):
                pass
        assert denied.value.code() == grpc.StatusCode.UNAUTHENTICATED
        replies = [r async for r in stub.ServerReflectionInfo(
            iter([request]), metadata=[("authorization", f"Bearer {full}")], timeout=10)]
        assert any(s.name == "agentd.v1.AgentService" for s in replies[0].list_services_response.service)


# --- JWT ----------------------------------------------------------------------------


@pytest.fixture
async def jwt_server(model_server, tmp_path):  # type: ignore[no-untyped-def]
    async with JwksServer(keys=[rsa_key("k1")]) as jwks:
        h = await start_harness(
            model_server, tmp_path, jwt_jwks_url=jwks.url, jwt_issuer=ISSUER, jwt_audience=AUDIENCE,
            jwt_refetch_cooldown_s=0, jwt_leeway_s=5,
        )
        yield h, jwks
        await h.client.close()
        await h.server.stop(grace_s=0)


async def jwt_code(h, bearer: str) -> tuple[grpc.StatusCode, str]:  # type: ignore[no-untyped-def]
    async with AgentdClient(h.target, token=bearer) as client:
        try:
            await client.agents.ListAgents(agent_service_pb2.ListAgentsRequest(), timeout=10)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _b64(data: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(data).encode()).decode().rstrip("=")


async def test_jwt_verified_against_the_jwks(jwt_server) -> None:  # type: ignore[no-untyped-def]
    h, jwks = jwt_server
    key = jwks.keys[0]
    assert await jwt_code(h, token(key, scopes=ALL)) == (grpc.StatusCode.OK, "")
    unauthenticated = grpc.StatusCode.UNAUTHENTICATED
    cases = {
        "expired": token(key, scopes=ALL, lifetime_s=-60),
        "not valid yet": token(key, scopes=ALL, not_before_s=600),
        "audience": token(key, scopes=ALL, audience="someone-else"),
        "issuer": token(key, scopes=ALL, issuer="https://evil.test"),
        "tenant": token(key, scopes=ALL, tenant=None),
        "signing key is not known": token(rsa_key("k-unknown"), scopes=ALL),
        "signature": token(rsa_key("k1"), scopes=ALL),  # right kid, wrong key
        "1-64 characters": token(key, scopes=ALL, tenant="acme/../globex"),  # would break tenant qualification
    }
    for expected, bearer in cases.items():
        code, details = await jwt_code(h, bearer)
        assert code == unauthenticated and expected in details, (expected, code, details)
    code, details = await jwt_code(h, token(key, scopes="traces:read"))
    assert code == grpc.StatusCode.PERMISSION_DENIED


async def test_jwt_alg_none_and_hmac_with_the_public_key_are_refused(jwt_server) -> None:  # type: ignore[no-untyped-def]
    h, jwks = jwt_server
    key = jwks.keys[0]
    claims = json.loads(base64.urlsafe_b64decode(token(key, scopes=ALL).split(".")[1] + "=="))
    unsigned = f"{_b64({'alg': 'none', 'typ': 'JWT', 'kid': 'k1'})}.{_b64(claims)}."
    code, details = await jwt_code(h, unsigned)
    assert code == grpc.StatusCode.UNAUTHENTICATED and "algorithm is not accepted" in details
    public_pem = key.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    # HS256 "signed" with the public key: a verifier that let the token pick the algorithm would accept it.
    header = _b64({"alg": "HS256", "typ": "JWT", "kid": "k1"})
    body = _b64(claims)
    signature = base64.urlsafe_b64encode(
        hmac.new(public_pem, f"{header}.{body}".encode(), hashlib.sha256).digest()
    ).decode().rstrip("=")
    code, details = await jwt_code(h, f"{header}.{body}.{signature}")
    assert code == grpc.StatusCode.UNAUTHENTICATED and "algorithm is not accepted" in details
    with pytest.raises(ValueError, match="not allowed"):
        JwtAuthenticator(jwks_url=jwks.url, issuer=ISSUER, audience=AUDIENCE, algorithms=("HS256",))


async def test_jwt_key_rotation_by_kid(jwt_server) -> None:  # type: ignore[no-untyped-def]
    h, jwks = jwt_server
    old = jwks.keys[0]
    assert (await jwt_code(h, token(old, scopes=ALL)))[0] == grpc.StatusCode.OK
    new = ec_key("k2")
    jwks.keys.append(new)  # the identity provider publishes a new key and starts signing with it
    assert (await jwt_code(h, token(new, scopes=ALL)))[0] == grpc.StatusCode.OK
    fetches = jwks.fetches
    for _ in range(3):  # known keys come from the cache
        assert (await jwt_code(h, token(new, scopes=ALL)))[0] == grpc.StatusCode.OK
    assert jwks.fetches == fetches


# --- TLS and mutual TLS -----------------------------------------------------------------


async def test_tls_serves_only_tls_and_reloads_a_renewed_certificate(model_server, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    cert, key = pki.server_cert()
    h = await start_harness(model_server, tmp_path, tls_cert_file=cert, tls_key_file=key)
    try:
        async with AgentdClient(h.target, tls=TlsConfig(ca_file=pki.ca_file)) as client:
            assert await list_agents(client) == grpc.StatusCode.OK
        async with AgentdClient(h.target, retry=False) as plaintext:
            assert await list_agents(plaintext) == grpc.StatusCode.UNAVAILABLE
        # Renewal by another CA, written in place the way cert-manager swaps files.
        renewed = Pki(tmp_path / "pki2")
        new_cert, new_key = renewed.server_cert("renewed")
        new_key.replace(key)
        new_cert.replace(cert)
        async with AgentdClient(h.target, tls=TlsConfig(ca_file=renewed.ca_file)) as client:
            assert await list_agents(client) == grpc.StatusCode.OK
        async with AgentdClient(h.target, tls=TlsConfig(ca_file=pki.ca_file), retry=False) as stale:
            assert await list_agents(stale) == grpc.StatusCode.UNAVAILABLE
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_mutual_tls_maps_certificates_to_principals(model_server, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    cert, key = pki.server_cert()
    identities = tmp_path / "identities.json"
    identities.write_text(json.dumps({"identities": [
        {"match": "billing.svc.internal", "tenant": "acme", "scopes": ALL.split()},
    ]}))
    h = await start_harness(
        model_server, tmp_path, tls_cert_file=cert, tls_key_file=key,
        tls_client_ca_file=pki.ca_file, mtls_identities_file=identities,
    )
    try:
        good_cert, good_key = pki.client_cert("billing.svc.internal", "billing")
        tls = TlsConfig(ca_file=pki.ca_file, cert_file=good_cert, key_file=good_key)
        async with AgentdClient(h.target, tls=tls) as client:
            assert await list_agents(client) == grpc.StatusCode.OK
        unmapped_cert, unmapped_key = pki.client_cert("stranger.svc.internal", "stranger")
        tls = TlsConfig(ca_file=pki.ca_file, cert_file=unmapped_cert, key_file=unmapped_key)
        async with AgentdClient(h.target, tls=tls) as client:
            assert await list_agents(client) == grpc.StatusCode.UNAUTHENTICATED
        other = Pki(tmp_path / "other-ca")
        forged_cert, forged_key = other.client_cert("billing.svc.internal", "forged")
        tls = TlsConfig(ca_file=pki.ca_file, cert_file=forged_cert, key_file=forged_key)
        async with AgentdClient(h.target, tls=tls, retry=False) as client:
            assert await list_agents(client) == grpc.StatusCode.UNAVAILABLE  # the handshake fails
        async with AgentdClient(h.target, tls=TlsConfig(ca_file=pki.ca_file), retry=False) as client:
            assert await list_agents(client) == grpc.StatusCode.UNAVAILABLE  # no client certificate
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_a_certificate_that_does_not_match_its_key_is_refused_at_start(model_server, tmp_path: Path) -> None:
    pki = Pki(tmp_path / "pki")
    cert, _ = pki.server_cert("a")
    _, other_key = pki.server_cert("b")
    with pytest.raises(AppConfigError, match="does not match the certificate"):
        await start_harness(model_server, tmp_path, tls_cert_file=cert, tls_key_file=other_key)


async def test_the_deploy_secrets_serve_tls_api_keys_and_a_plaintext_health_port(model_server, tmp_path: Path) -> None:
    """deploy/make-secrets.sh makes what the compose replicas mount; a server configured as they are works."""
    secrets = tmp_path / "secrets"
    agentd = Path(sys.executable).parent / "agentd"
    made = subprocess.run(
        ["bash", str(ROOT / "deploy" / "make-secrets.sh"), str(secrets)], env={**os.environ, "AGENTD": str(agentd)},
        capture_output=True, text=True, timeout=60, check=True,
    )
    key = made.stdout.strip()
    assert key.startswith("agentd_") and key not in (secrets / "keys.json").read_text()
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        health_port = probe.getsockname()[1]
    h = await start_harness(
        model_server, tmp_path, tls_cert_file=secrets / "tls.crt", tls_key_file=secrets / "tls.key",
        api_keys_file=secrets / "keys.json", health_port=health_port,
    )
    try:
        async with AgentdClient(h.target, tls=TlsConfig(ca_file=secrets / "ca.pem"), token=key) as client:
            assert await list_agents(client) == grpc.StatusCode.OK
        async with grpc.aio.insecure_channel(f"127.0.0.1:{health_port}") as channel:
            health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
            assert health.status == health_pb2.HealthCheckResponse.SERVING
            stub = agent_service_pb2_grpc.AgentServiceStub(channel)
            with pytest.raises(grpc.aio.AioRpcError) as only_health:
                await stub.ListAgents(agent_service_pb2.ListAgentsRequest(), timeout=10)
            assert only_health.value.code() == grpc.StatusCode.UNIMPLEMENTED
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)


async def test_every_mutating_call_is_audited_without_content(keyed, caplog) -> None:  # type: ignore[no-untyped-def]
    h, _, full, reader = keyed
    caplog.set_level("INFO", logger="agentd.audit")
    async with AgentdClient(h.target, token=full) as client:
        await client.sessions.CreateSession(session_pb2.CreateSessionRequest(session_id="audited"))
        await client.sessions.AddSessionItems(session_pb2.AddSessionItemsRequest(
            parent="sessions/audited",
            items=[item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text="card 4111 1111"))]))
        await client.sessions.GetSession(session_pb2.GetSessionRequest(name="sessions/audited"))  # a read
        assert await code_of(client.sessions.DeleteSession(
            session_pb2.DeleteSessionRequest(name="sessions/missing"))) == grpc.StatusCode.NOT_FOUND
    lines = [r for r in caplog.records if r.name == "agentd.audit"]
    assert [(r.method.rsplit("/", 1)[-1], r.resource, r.outcome) for r in lines] == [
        ("CreateSession", "sessions/audited", "OK"),
        ("AddSessionItems", "sessions/audited", "OK"),
        ("DeleteSession", "sessions/missing", "NOT_FOUND"),
    ]
    assert {(r.subject, r.tenant, r.auth) for r in lines} == {("billing", "acme", "api_key")}
    text = " ".join(r.getMessage() + json.dumps(r.__dict__, default=str) for r in lines)
    assert "card 4111" not in text and full not in text


async def test_the_cli_sends_its_token(keyed) -> None:  # type: ignore[no-untyped-def]
    h, _, full, _ = keyed
    run = lambda *extra: subprocess.run(  # noqa: E731
        [sys.executable, "-m", "agentd.cli.main", "agents", "--target", h.target, *extra],
        capture_output=True, text=True, timeout=60, env={**os.environ, "COLUMNS": "200", "AGENTD_TOKEN": ""},
    )
    denied = await asyncio.to_thread(run)
    assert denied.returncode != 0 and "UNAUTHENTICATED" in denied.stderr
    allowed = await asyncio.to_thread(run, "--token", full)
    assert allowed.returncode == 0 and "assistant" in allowed.stdout, allowed.stderr
