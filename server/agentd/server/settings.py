"""Server settings: ``AGENTD_*`` environment variables, overridable by ``agentd serve`` flags."""

from __future__ import annotations

from pathlib import Path
from typing import Literal

from pydantic import Field
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="AGENTD_", extra="ignore")

    app: str = Field("examples.support:app", description="App to serve, as 'module:attribute'.")
    host: str = "127.0.0.1"
    port: int = Field(50051, ge=0, le=65535, description="0 picks a free port.")

    store: Literal["sqlite", "memory"] = "sqlite"
    sqlite_path: Path = Path("agentd.db")

    model_provider: Literal["auto", "openai", "scripted"] = Field(
        "auto", description="auto: OpenAI when OPENAI_API_KEY is set, else the app's offline script."
    )
    default_model: str | None = Field(None, description="Overrides the app's default model.")
    model_timeout_s: float = Field(60.0, gt=0)
    model_max_retries: int = Field(2, ge=0, le=10)
    tool_timeout_s: float = Field(60.0, gt=0)

    max_input_chars: int = Field(100_000, gt=0)
    max_message_bytes: int = Field(8 * 1024 * 1024, gt=0)
    max_active_runs: int = Field(1000, gt=0, description="Runs this server executes at once; more get RESOURCE_EXHAUSTED.")
    shutdown_grace_s: float = Field(10.0, ge=0)
    trace_retention: int = Field(10_000, gt=0, description="Traces kept in memory.")

    log_level: str = "INFO"
    log_format: Literal["json", "text"] = "text"
    asyncio_debug: bool = Field(False, description="Event-loop debug mode: logs callbacks slower than 10 ms.")
