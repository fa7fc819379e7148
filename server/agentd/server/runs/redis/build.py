"""The Redis run store and control bus, from the settings."""

from __future__ import annotations

from typing import Any

from agentd.server.redis_common import connect_redis
from agentd.server.runs.base import ControlBus, RunStore
from agentd.server.runs.redis.bus import RedisControlBus
from agentd.server.runs.redis.store import RedisRunStore
from agentd.server.settings import Settings

__all__ = ["build_redis_runs"]


def build_redis_runs(settings: Settings) -> tuple[RunStore, ControlBus]:
    """The run store and control bus on the Redis deployment the AGENTD_REDIS_* settings name."""
    from agentd.server.sessions.factory import _redact, _redis_options, parse_nodes

    cluster = parse_nodes("AGENTD_REDIS_CLUSTER_NODES", settings.redis_cluster_nodes)
    sentinels = parse_nodes("AGENTD_REDIS_SENTINELS", settings.redis_sentinels)
    if sentinels and not settings.redis_sentinel_service:
        raise ValueError("AGENTD_REDIS_SENTINELS is set: also set AGENTD_REDIS_SENTINEL_SERVICE (the master's name)")
    deployment: dict[str, Any]
    if cluster:
        location = f"cluster {settings.redis_cluster_nodes}"
        deployment = {"cluster_nodes": cluster}
    elif sentinels:
        location = f"sentinel service {settings.redis_sentinel_service} via {settings.redis_sentinels}"
        deployment = {"sentinels": sentinels, "sentinel_service": settings.redis_sentinel_service}
    else:
        location = _redact(settings.redis_url)
        deployment = {"url": settings.redis_url}
    options: dict[str, Any] = dict(_redis_options(settings))
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
