"""The Redis run store and control bus, from the settings."""

from __future__ import annotations

from agentd.server.redis_common import connect_redis, redis_deployment
from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.redis.bus import RedisControlBus
from agentd.server.runs.redis.store import RedisRunStore
from agentd.server.settings import Settings

__all__ = ["build_redis_runs"]


def build_redis_runs(settings: Settings) -> tuple[RunStore, ControlBus]:
    """The run store and control bus on the Redis deployment the AGENTD_REDIS_* settings name."""
    location, deployment, options = redis_deployment(settings)
    client = connect_redis(**deployment, **options, client_name="agentd-runs")
    blocking = connect_redis(
        **deployment,
        **{**options, "socket_timeout_s": None, "max_connections": max(1000, settings.redis_max_connections)},
        client_name="agentd-runs-wait",
    )
    bus_client = connect_redis(**deployment, **{**options, "max_connections": 4}, client_name="agentd-runs-control")
    prefix, timeout = settings.redis_prefix, settings.redis_timeout_s
    store = RedisRunStore(client, blocking, prefix=prefix, location=location, timeout_s=timeout)
    bus = RedisControlBus(bus_client, prefix=prefix, location=location, timeout_s=timeout)
    return store, bus
