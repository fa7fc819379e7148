"""Build the run store the settings select (``AGENTD_RUN_STORE``, default: follow the session store).

Engine modules are imported only when chosen, so the embedded default never loads
redis or asyncpg.
"""

from __future__ import annotations

from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.settings import Settings


def build_run_store(settings: Settings) -> tuple[RunStore, ControlBus]:
    engine = settings.resolved_run_store()
    if engine == "redis":
        from agentd.server.runs.redis import build_redis_runs

        return build_redis_runs(settings)
    if engine == "postgres":
        from agentd.server.runs.postgres import build_postgres_runs

        return build_postgres_runs(settings)
    from agentd.server.runs.memory import MemoryControlBus, MemoryRunStore

    return (
        MemoryRunStore(max_ended_runs=settings.run_memory_max_ended_runs,
                       max_ended_bytes=settings.run_memory_max_ended_bytes),
        MemoryControlBus(),
    )
