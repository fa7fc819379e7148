"""How the client talks to several agentd replicas: one channel, round-robin, safe retries.

Every channel the client makes carries a gRPC *service config* (channel option
``grpc.service_config``, JSON), so balancing and retries are done by gRPC itself,
per call, with no proxy in between:

``loadBalancingConfig: round_robin``
    gRPC's default policy, ``pick_first``, sends every call of a channel to one
    address until it fails. ``round_robin`` keeps a connection to every address
    the target resolves to and spreads calls over the ready ones, so unary calls
    and new run streams share the replicas, a dead replica simply drops out of
    the rotation (and comes back when it reconnects), and a re-attached run
    stream (``WatchRun`` after a break) goes to another replica than the one that
    just failed. With a single address it behaves like ``pick_first``.

``retryPolicy`` on idempotent unary methods only
    A call that fails with ``UNAVAILABLE`` never reached a working server (the
    connection was refused or reset, the replica is draining), so repeating it
    on another replica is safe *if* doing it twice has the effect of doing it
    once. That holds for reads (ListAgents, GetAgent, GetRun, ListRuns,
    GetSession, ListSessions, ListSessionItems, ListTraces, GetTrace, GetStats,
    GetLiveStats), for
    ``CancelRun`` (cancelling a cancelled or ended run returns it unchanged), for
    ``SubmitToolOutputs`` and ``ApproveToolCall`` (repeating the answer a call already
    has returns the run and changes nothing), for ``SetAgentAlias`` (setting the same
    routes again changes nothing) and
    for ``CreateRun`` because this client always sends a ``request_id`` (a
    uuid4 when the caller gives none): a repeat returns the run the first
    attempt created. Writes that are not idempotent are left alone: CreateAgent (a repeat
    is AGENT_EXISTS), UpdateAgent (a repeat makes another version), DeleteAgent and
    DeleteAgentAlias (a repeat is NOT_FOUND), CreateSession
    (with a caller-chosen id a repeat is ALREADY_EXISTS), AddSessionItems (a
    repeat without request_id appends twice), PopSessionItem (pops twice),
    ClearSessionItems, DeleteSession, UpdateSession. The client retries the
    writes that carry an idempotency key in its own code (see
    ``AgentdClient.add_items``), since a service config cannot look at a
    request's fields. Streams (Run, StreamRun, WatchRun) are not retried by gRPC
    either: a stream is "committed" once its first message arrives, after which
    gRPC never retries it; the run stream's own resume logic handles them.

    Only ``UNAVAILABLE`` is retryable. DEADLINE_EXCEEDED means the caller's time
    is up; INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION, ALREADY_EXISTS and
    RESOURCE_EXHAUSTED are the server's answer and would be the same on any
    replica (RESOURCE_EXHAUSTED is a full queue: retrying it would only add load).

``timeout 30s`` on every unary method
    A unary call that gets no answer in 30 s fails with DEADLINE_EXCEEDED instead of
    waiting forever (a caller's own shorter deadline wins). Streams have none: a run
    streams as long as it runs.

``maxAttempts 5, initialBackoff 0.05 s, maxBackoff 1 s, multiplier 2``
    gRPC waits a random time up to 0.05, 0.1, 0.2, 0.4 s between attempts: about
    0.75 s at most in all, enough to ride over one replica dying (its connection
    is reset at once and ``round_robin`` stops picking it) without making a caller
    wait long when every replica is down. gRPC caps maxAttempts at 5 anyway.

``retryThrottling maxTokens 100, tokenRatio 0.1``
    When most calls fail (every replica down), gRPC stops retrying until calls
    succeed again instead of multiplying the load by five on a cluster that is
    coming back up. 100 tokens means it takes some 50 failures more than
    successes before that kicks in, so one dead replica out of several never
    triggers it.

Reconnect backoff (channel options, not service config): 0.1 s initial, 5 s max
    After a connection fails gRPC waits before dialling that address again: 1 s
    at first, growing to 120 s by default. A replica that restarts (or a network
    path that heals) is used again only at the next dial, and while *every*
    address is waiting calls fail at once. Client-side resumes only have
    ``resume_timeout_s`` (30 s) to find a replica, so the client dials sooner and
    never waits more than 5 s between dials; dialling a dead address is cheap.
"""

from __future__ import annotations

import copy
import ipaddress
import json
from importlib import resources
from typing import Any, Sequence

SERVICE_CONFIG_FILE = "service_config.json"
"""The service config, shipped beside this module: load the same file in Go, Java or Node
(``grpc.service_config`` channel option / ``WithDefaultServiceConfig`` /
``defaultServiceConfig``) to get the same balancing, retries and timeouts."""


def _load_service_config() -> dict[str, Any]:
    return json.loads(resources.files("agentd.client").joinpath(SERVICE_CONFIG_FILE).read_text("utf-8"))


_SERVICE_CONFIG = _load_service_config()
_RETRY_CONFIG = next(c for c in _SERVICE_CONFIG["methodConfig"] if "retryPolicy" in c)

RETRYABLE_METHODS: dict[str, tuple[str, ...]] = {}
for _name in _RETRY_CONFIG["name"]:
    RETRYABLE_METHODS.setdefault(_name["service"], ())
    RETRYABLE_METHODS[_name["service"]] += (_name["method"],)
"""Unary methods safe to repeat after UNAVAILABLE (see the module docstring for why each)."""

RETRY_POLICY: dict[str, Any] = _RETRY_CONFIG["retryPolicy"]
MAX_ATTEMPTS: int = RETRY_POLICY["maxAttempts"]
INITIAL_BACKOFF_S = float(RETRY_POLICY["initialBackoff"].removesuffix("s"))
MAX_BACKOFF_S = float(RETRY_POLICY["maxBackoff"].removesuffix("s"))
BACKOFF_MULTIPLIER: float = RETRY_POLICY["backoffMultiplier"]

_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:", "xds:")


def service_config(retry: bool = True) -> dict[str, Any]:
    """The service config every client channel gets (``service_config.json``): round_robin and
    30 s deadlines on unary calls, plus retries unless ``retry`` is False."""
    config = copy.deepcopy(_SERVICE_CONFIG)
    if not retry:
        for method_config in config["methodConfig"]:
            method_config.pop("retryPolicy", None)
        config.pop("retryThrottling", None)
    return config


INITIAL_RECONNECT_BACKOFF_MS = 100
MAX_RECONNECT_BACKOFF_MS = 5000


def channel_options(retry: bool = True) -> list[tuple[str, Any]]:
    """Channel options carrying the service config and the reconnect backoff; ``grpc.enable_retries`` follows ``retry``."""
    return [
        ("grpc.service_config", json.dumps(service_config(retry), separators=(",", ":"))),
        ("grpc.enable_retries", 1 if retry else 0),
        ("grpc.initial_reconnect_backoff_ms", INITIAL_RECONNECT_BACKOFF_MS),
        ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ]


def channel_target(target: str | Sequence[str]) -> str:
    """One gRPC target for one address or several replicas.

    - A single string is used as it is ("127.0.0.1:50051", "dns:///agentd.internal:50051",
      "ipv4:10.0.0.1:50051,10.0.0.2:50051", ...), except that a scheme-less string with
      commas ("10.0.0.1:50051,10.0.0.2:50051") is read as a list, which is handy on a
      command line.
    - A list of ``host:port`` IP literals becomes ``ipv4:a:p,b:p`` (or
      ``ipv6:[a]:p,[b]:p``): gRPC's static address list, which ``round_robin`` balances.
    - Several *host names* cannot be expressed as one gRPC target: give one DNS name
      that resolves to every replica (several A/AAAA records, e.g. a Kubernetes
      headless Service) as ``dns:///agentd.internal:50051``; gRPC re-resolves it when
      connections fail, so replicas can come and go.
    """
    if isinstance(target, str):
        if "," in target and not target.startswith(_SCHEMES):
            targets = [t.strip() for t in target.split(",") if t.strip()]
        else:
            return target
    else:
        targets = [t.strip() for t in target]
    if not targets:
        raise ValueError("no target: give 'host:port' or a list of them")
    if len(targets) == 1:
        return targets[0]
    versions: set[int] = set()
    addresses: list[str] = []
    for item in targets:
        host, port = _split_host_port(item)
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            raise ValueError(
                f"{item!r}: a list of targets must be IP literals ('10.0.0.1:50051', '[::1]:50051'); for host"
                " names use one DNS name that resolves to every replica, e.g. 'dns:///agentd.internal:50051'"
            ) from None
        versions.add(ip.version)
        addresses.append(f"{ip}:{port}" if ip.version == 4 else f"[{ip}]:{port}")
    if len(versions) > 1:
        raise ValueError(f"{list(targets)!r}: gRPC cannot mix IPv4 and IPv6 literals in one target; use a DNS name")
    scheme = "ipv4" if versions == {4} else "ipv6"
    return f"{scheme}:{','.join(addresses)}"


def _split_host_port(item: str) -> tuple[str, int]:
    if item.startswith(_SCHEMES):
        raise ValueError(f"{item!r}: a list of targets takes plain 'host:port' entries, not gRPC target URIs")
    if item.startswith("["):
        host, sep, rest = item[1:].partition("]")
        port_text = rest[1:] if rest.startswith(":") else ""
    else:
        host, sep, port_text = item.rpartition(":")
    if not sep or not host or not port_text.isdigit() or not 0 < int(port_text) < 65536:
        raise ValueError(f"{item!r}: expected 'host:port' (IPv6 as '[::1]:50051')")
    return host, int(port_text)
