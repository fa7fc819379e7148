"""What authentication costs: the same 3-step run against three servers, interleaved.

- ``none``: no authentication (loopback default);
- ``api_key``: an API key checked against the key file (hash, one stat per call);
- ``jwt``: an RS256 JWT verified with a key from a JWKS endpoint served by this process.

Each run is one StreamRun-or-Run stream carrying the token in ``authorization`` metadata
(the client's token interceptor). Rounds alternate between the servers so machine noise
hits all alike. Numbers, not pass/fail.

    python bench/bench_auth.py [--rounds 20] [--runs-per-round 50]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import time
from pathlib import Path

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agentd.client import AgentdClient  # noqa: E402
from agentd.server.auth.api_keys import create_key  # noqa: E402
from bench.bench_runs import free_port, one_run, pct, start_server, wait_ready  # noqa: E402

SCOPES = ["agents:read", "runs:read", "runs:write", "sessions:read", "sessions:write", "traces:read"]


async def serve_jwks(key: rsa.RSAPrivateKey) -> tuple[web.AppRunner, str]:
    jwk = json.loads(RSAAlgorithm.to_jwk(key.public_key()))
    jwk.update(kid="bench", alg="RS256", use="sig")

    async def jwks(_: web.Request) -> web.Response:
        return web.json_response({"keys": [jwk]})

    app = web.Application()
    app.router.add_get("/jwks.json", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/jwks.json"


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--runs-per-round", type=int, default=50)
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="agentd-bench-auth-"))

    keys = logs / "keys.json"
    _, api_key = create_key(keys, tenant="bench", subject="bench", scopes=SCOPES)
    signing = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    runner, jwks_url = await serve_jwks(signing)
    now = int(time.time())
    token = jwt.encode(
        {"iss": "https://idp.bench", "aud": "agentd", "sub": "bench", "tenant": "bench", "scope": " ".join(SCOPES),
         "iat": now, "exp": now + 3600},
        signing, algorithm="RS256", headers={"kid": "bench"},
    )
    setups = {
        "none": ({}, None),
        "api_key": ({"AGENTD_API_KEYS_FILE": str(keys)}, api_key),
        "jwt": ({"AGENTD_JWT_JWKS_URL": jwks_url, "AGENTD_JWT_ISSUER": "https://idp.bench",
                 "AGENTD_JWT_AUDIENCE": "agentd"}, token),
    }
    ports = {name: free_port() for name in setups}
    servers = {
        name: start_server(ports[name], debug=False, stderr_path=logs / f"{name}.log", extra_env=env)
        for name, (env, _) in setups.items()
    }
    totals: dict[str, list[float]] = {name: [] for name in setups}
    clients = {name: AgentdClient(f"127.0.0.1:{ports[name]}", token=setups[name][1]) for name in setups}
    try:
        for port in ports.values():
            await asyncio.to_thread(wait_ready, port)
        for client in clients.values():
            for _ in range(50):  # warm-up (and the JWKS fetch)
                await one_run(client)
        for _ in range(args.rounds):
            for name, client in clients.items():
                for _ in range(args.runs_per_round):
                    totals[name].append((await one_run(client))[1])
    finally:
        for client in clients.values():
            await client.close()
        for server in servers.values():
            server.terminate()
            await asyncio.to_thread(server.wait, 20)
        await runner.cleanup()

    base = pct(totals["none"], 0.5)
    print(f"agentd auth bench · 3-step run p50 over gRPC, interleaved, {args.rounds}×{args.runs_per_round} runs each")
    for name, values in totals.items():
        p50 = pct(values, 0.5)
        print(f"  {name:8} p50 {p50 * 1e3:.3f} ms   p99 {pct(values, 0.99) * 1e3:.3f} ms   ({p50 / base - 1:+.1%} vs none)")


if __name__ == "__main__":
    asyncio.run(main())
