"""Shared fixtures: a scripted OpenAI-compatible endpoint and a real agentd server on loopback."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator

import pytest

from agentd.client import AgentdClient
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.serve import RunningServer, start_server
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from tests import servers
from tests.apps import app, tool_log

_servers: servers.Servers | None = None


def pytest_configure(config: pytest.Config) -> None:
    """Find or start Postgres and Redis before any test module reads their URLs (tests/servers.py)."""
    global _servers
    try:
        _servers = servers.provision()
    except servers.NoServerError as exc:
        raise pytest.UsageError(str(exc)) from None


def pytest_unconfigure(config: pytest.Config) -> None:
    if _servers is not None:
        _servers.stop()


def pytest_report_header(config: pytest.Config) -> list[str]:
    if _servers is None:
        return []
    started = {server.name for server in _servers.started}
    where = lambda name, url: f"{name}: {url}" + (" (throwaway, started for this session)" if name in started else "")
    return [where("postgres", _servers.postgres_url), where("redis", _servers.redis_url)]


@dataclass
class Harness:
    server: RunningServer
    client: AgentdClient
    model: ScriptedOpenAIServer

    @property
    def target(self) -> str:
        return self.server.target


@pytest.fixture
async def model_server() -> AsyncIterator[ScriptedOpenAIServer]:
    async with ScriptedOpenAIServer() as server:
        yield server


async def start_harness(model_server: ScriptedOpenAIServer, tmp_path: Path, **settings: object) -> Harness:
    defaults: dict[str, object] = dict(
        port=0, store="sqlite", sqlite_path=tmp_path / "agentd.db", tool_timeout_s=5, shutdown_grace_s=1
    )
    config = Settings(**{**defaults, **settings})  # type: ignore[arg-type]
    provider = OpenAIProvider(api_key="test-key", base_url=model_server.base_url, timeout_s=10, max_retries=2)
    server = await start_server(config, app, models=provider)
    return Harness(server, AgentdClient(server.target), model_server)


@pytest.fixture
async def harness(model_server: ScriptedOpenAIServer, tmp_path: Path) -> AsyncIterator[Harness]:
    tool_log.clear()
    h = await start_harness(model_server, tmp_path)
    try:
        yield h
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
