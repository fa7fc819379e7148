"""Several real ``agentd serve`` processes sharing Postgres (sessions) and Redis (runs), for scale-out tests.

Each replica is its own OS process on its own loopback port, so a SIGKILL is a real
crash and a SIGTERM a real drain. The model is the scripted OpenAI-compatible server in
the test process, reached over HTTP. Everything the cluster writes lives under a fresh
Postgres schema and Redis key prefix, removed afterwards.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import AsyncIterator

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from agentd.client import AgentdClient
from agentd.testing import ScriptedOpenAIServer
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Replica:
    name: str
    port: int
    process: asyncio.subprocess.Process
    log_path: Path

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def kill(self) -> None:
        """A crash: no drain, no lease release, no goodbye."""
        self.process.send_signal(signal.SIGKILL)

    def terminate(self) -> None:
        self.process.send_signal(signal.SIGTERM)

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@dataclass
class Cluster:
    model: ScriptedOpenAIServer
    replicas: list[Replica] = field(default_factory=list)

    @property
    def targets(self) -> list[str]:
        return [r.target for r in self.replicas]

    def client(self, *replicas: Replica) -> AgentdClient:
        """A client balancing over ``replicas`` (default: all of them)."""
        return AgentdClient([r.target for r in (replicas or self.replicas)])

    def logs(self) -> str:
        return "\n".join(f"--- {r.name} ---\n{r.log()[-4000:]}" for r in self.replicas)


async def _wait_serving(replica: Replica, timeout_s: float = 30.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with grpc.aio.insecure_channel(replica.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while True:
            if replica.process.returncode is not None:
                raise RuntimeError(f"{replica.name} exited with {replica.process.returncode}:\n{replica.log()}")
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            if asyncio.get_running_loop().time() > deadline:
                raise RuntimeError(f"{replica.name} did not become SERVING in {timeout_s}s:\n{replica.log()}")
            await asyncio.sleep(0.1)


@asynccontextmanager
async def cluster(
    model: ScriptedOpenAIServer, tmp_path: Path, *, replicas: int = 3, **settings: object
) -> AsyncIterator[Cluster]:
    """``replicas`` processes serving ``tests.apps:app``; ``settings`` become AGENTD_* variables."""
    schema, prefix = new_schema(), new_prefix()
    env = {
        **os.environ,
        "AGENTD_STORE": "postgres",
        "AGENTD_POSTGRES_URL": POSTGRES_URL,
        "AGENTD_POSTGRES_SCHEMA": schema,
        "AGENTD_RUN_STORE": "redis",
        "AGENTD_REDIS_URL": REDIS_URL,
        "AGENTD_REDIS_PREFIX": prefix,
        "AGENTD_TRACE_STORE": "memory",
        "AGENTD_MODEL_PROVIDER": "openai",
        "OPENAI_API_KEY": "test-key",
        "OPENAI_BASE_URL": model.base_url,
        "AGENTD_LOG_LEVEL": "INFO",
        "AGENTD_TOOL_TIMEOUT_S": "10",
        "PYTHONUNBUFFERED": "1",
    }
    env.pop("OTEL_EXPORTER_OTLP_ENDPOINT", None)
    env.update({f"AGENTD_{key.upper()}": str(value) for key, value in settings.items()})
    result = Cluster(model)
    async with dropped_afterwards(schema):
        try:
            # Migrate once up front, as a deployment's migration job does, so replicas start in parallel.
            migrate = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "agentd.cli.main", "db", "migrate", cwd=ROOT, env=env,
                stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.PIPE,
            )
            _, err = await migrate.communicate()
            assert migrate.returncode == 0, err.decode()
            for index in range(1, replicas + 1):
                name, port = f"replica-{index}", free_port()
                log_path = tmp_path / f"{name}.log"
                process = await asyncio.create_subprocess_exec(
                    sys.executable, "-m", "agentd.cli.main", "serve", "--app", "tests.apps:app",
                    cwd=ROOT, env={**env, "AGENTD_REPLICA_ID": name, "AGENTD_PORT": str(port)},
                    stdout=asyncio.subprocess.DEVNULL, stderr=log_path.open("w"),
                )
                result.replicas.append(Replica(name, port, process, log_path))
            await asyncio.gather(*(_wait_serving(r) for r in result.replicas))
            yield result
        finally:
            for replica in result.replicas:
                if replica.process.returncode is None:
                    replica.kill()
            await asyncio.gather(*(r.process.wait() for r in result.replicas))
            await delete_prefix(prefix)
