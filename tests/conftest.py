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
from tests.apps import app, tool_log


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
