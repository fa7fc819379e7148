"""The one interface every result cache engine implements.

A result cache keeps the end of completed runs (``CachedResult``: final output, last agent,
usage, turns, and which run and trace produced it) under a request key
(``agentd.server.cache.key.request_key``: the SHA-256 of everything that makes two requests
the same), per tenant, for a TTL. ``runs/cached.py`` decides which runs are looked up and
stored (``runtime.agent.ResultCaching``'s rules); the engines only keep entries.

Contract (``tests/test_result_cache_stores.py`` runs it on every engine):

- ``put(tenant, key, result, ttl_s=, now=)`` stores (or replaces) the entry until
  ``now + ttl_s``; ``get(tenant, key, now=)`` returns it while ``now`` is before that, None
  afterwards (an expired entry is never returned, whether or not it was swept yet). Times are
  unix seconds passed in by the caller, as the session and run stores take them, so every
  engine decides expiry by the same clock (Redis also drops the key by its own clock, at the
  same moment give or take the clocks' difference: keep replicas in sync with NTP).
- Tenants never meet: a key put for one tenant is a miss for every other.
- Entries are bounded. An entry whose encoded form (ASCII JSON) is longer than
  ``max_entry_bytes`` is not stored: ``put`` returns False, counts it in ``counts.too_large``
  and leaves the cache as it was. The memory engine also bounds the number of entries and
  their total size, evicting the least recently used first (``counts.evicted``). The shared
  engines keep what the TTLs allow: every entry expires, ``sweep`` deletes expired rows (SQL);
  Redis expires keys itself (and its ``maxmemory`` policy applies).
- ``sweep(now=)`` deletes expired entries and returns how many (0 on engines that expire
  entries themselves). Safe to call from every replica at once.
- ``counts`` (per store object, so per process) counts hits, misses, stores, entries too large
  to store and evictions: what metrics and tests read.
- Engine failures raise ``StoreUnavailableError``; callers treat a failed lookup as a miss and
  a failed store as nothing stored (a cache outage never fails a run).

Engines: ``memory.py`` (the reference; one process), ``sqlite/`` (the session store's file),
``postgres/`` (its schema, an UNLOGGED table) and ``redis/`` (its key prefix, plain GET/SET
with an expiry). ``factory.py`` builds the one the settings select.
"""

from __future__ import annotations

import abc
import json
import math
import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, Callable

from agentd.server.runtime.usage import Usage
from agentd.server.sessions.base import SchemaStatus
from agentd.server.tenancy import valid_tenant

__all__ = [
    "DEFAULT_MAX_ENTRY_BYTES",
    "CacheCounts",
    "CachedResult",
    "ResultCache",
    "check_key",
    "check_tenant",
    "decode_entry",
    "encode_entry",
]

# The largest entry (its ASCII JSON) an engine stores by default: AGENTD_RESULT_CACHE_MAX_ENTRY_BYTES.
DEFAULT_MAX_ENTRY_BYTES = 256 * 1024

_KEY_RE = re.compile(r"^[0-9a-f]{64}$")


@dataclass(slots=True, frozen=True)
class CachedResult:
    """What a hit replays: the end of the run that produced the entry."""

    final_output: Any  # str, or the JSON-able structured output
    last_agent: str
    usage: Usage
    turns: int
    run_id: str = ""  # the run that produced it
    trace_id: str = ""  # and its trace
    created_at: float = 0.0  # unix seconds, when it was stored


@dataclass(slots=True)
class CacheCounts:
    """What a store object did since it was made (this process only)."""

    hits: int = 0
    misses: int = 0
    stores: int = 0
    too_large: int = 0  # entries not stored: longer than max_entry_bytes
    evicted: int = 0  # entries dropped before their expiry to stay within bounds (memory)


# ASCII JSON: every engine stores and returns it byte for byte (lone surrogates included);
# NaN and Infinity are not JSON (final outputs never hold them) and fail as ValueError.
_dumps: Callable[[Any], str] = json.JSONEncoder(ensure_ascii=True, separators=(",", ":"), allow_nan=False).encode


def _usage(usage: Usage) -> dict[str, Any]:
    """The usage's fields by name, tolerant of fields this Usage may not have (older code)."""
    cost = getattr(usage, "cost_usd", None)
    return {
        "input": usage.input_tokens,
        "output": usage.output_tokens,
        "requests": usage.requests,
        "reasoning": getattr(usage, "reasoning_tokens", 0),
        "cached_input": getattr(usage, "cached_input_tokens", 0),
        "unpriced": getattr(usage, "unpriced_calls", 0),
        "cost": None if cost is None else str(cost),
    }


def _usage_from(data: dict[str, Any]) -> Usage:
    usage = Usage(int(data["input"]), int(data["output"]), int(data["requests"]))
    # Each field only when this Usage has it (entries outlive code versions both ways).
    for attribute, name in (("reasoning_tokens", "reasoning"), ("cached_input_tokens", "cached_input"),
                            ("unpriced_calls", "unpriced")):
        if hasattr(usage, attribute):
            setattr(usage, attribute, int(data.get(name) or 0))
    if hasattr(usage, "cost_usd") and data.get("cost") is not None:
        try:
            usage.cost_usd = Decimal(str(data["cost"]))
        except InvalidOperation as exc:
            raise ValueError(f"bad cost {data['cost']!r}") from exc
    return usage


def encode_entry(result: CachedResult) -> str:
    """The entry as the ASCII JSON text every engine keeps; ``ValueError`` for what JSON cannot hold."""
    return _dumps({
        "v": 1,
        "output": result.final_output,
        "agent": result.last_agent,
        "usage": _usage(result.usage),
        "turns": result.turns,
        "run": result.run_id,
        "trace": result.trace_id,
        "at": result.created_at,
    })


def decode_entry(text: str | bytes) -> CachedResult:
    """Inverse of ``encode_entry``; ``ValueError`` for anything it did not produce."""
    try:
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("v") != 1:
            raise ValueError("not a result cache entry (version 1)")
        return CachedResult(
            data["output"], str(data["agent"]), _usage_from(data["usage"]), int(data["turns"]),
            str(data.get("run", "")), str(data.get("trace", "")), float(data.get("at", 0.0)),
        )
    except (KeyError, TypeError, AttributeError) as exc:
        raise ValueError(f"malformed result cache entry: {exc!r}") from exc


def check_tenant(tenant: str) -> None:
    if not isinstance(tenant, str) or not valid_tenant(tenant):
        raise ValueError(f"invalid tenant {tenant!r}")


def check_key(key: str) -> None:
    """Keys are SHA-256 digests in lowercase hex (``key.request_key``)."""
    if not isinstance(key, str) or not _KEY_RE.match(key):
        raise ValueError(f"a result cache key is 64 lowercase hex digits, got {key!r}")


class ResultCache(abc.ABC):
    """Entries by (tenant, request key) with a TTL; see the module docstring for the contract.

    Engines implement ``_load``, ``_store`` and ``sweep``; the checks, the encoding, the size
    limit and the counts are done here once.
    """

    backend: str = "abstract"

    def __init__(self, *, max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES) -> None:
        if max_entry_bytes < 1:
            raise ValueError(f"max_entry_bytes must be at least 1, got {max_entry_bytes}")
        self.max_entry_bytes = max_entry_bytes
        self.counts = CacheCounts()

    @property
    @abc.abstractmethod
    def location(self) -> str:
        """Where the entries live, for logs and errors (never a password)."""

    async def open(self) -> None:
        """Connect and bring the tables up to date (or check them); ``StoreUnavailableError`` when it cannot."""

    async def close(self) -> None:
        """Release connections."""

    async def ping(self) -> None:
        """``StoreUnavailableError`` unless the engine answers."""

    async def schema_status(self) -> SchemaStatus | None:
        """The cache tables' versioned schema; None for engines without one (memory, Redis)."""
        return None

    async def migrate(self) -> SchemaStatus | None:
        """Apply pending migrations of the cache tables (``agentd db migrate``)."""
        return None

    async def get(self, tenant: str, key: str, *, now: float) -> CachedResult | None:
        """The live entry for ``key`` in ``tenant``, or None (a miss)."""
        check_tenant(tenant)
        check_key(key)
        text = await self._load(tenant, key, now)
        if text is None:
            self.counts.misses += 1
            return None
        try:
            result = decode_entry(text)
        except ValueError:  # written by something else under our key: not ours to serve
            self.counts.misses += 1
            return None
        self.counts.hits += 1
        return result

    async def put(self, tenant: str, key: str, result: CachedResult, *, ttl_s: float, now: float) -> bool:
        """Store ``result`` until ``now + ttl_s`` (replacing an entry under the key); False (nothing
        stored) when its encoded form is longer than ``max_entry_bytes``."""
        check_tenant(tenant)
        check_key(key)
        if isinstance(ttl_s, bool) or not math.isfinite(ttl_s) or ttl_s <= 0:
            raise ValueError(f"ttl_s must be a positive number of seconds, got {ttl_s!r}")
        text = encode_entry(result)
        if len(text) > self.max_entry_bytes:
            self.counts.too_large += 1
            return False
        await self._store(tenant, key, text, now, now + ttl_s)
        self.counts.stores += 1
        return True

    @abc.abstractmethod
    async def _load(self, tenant: str, key: str, now: float) -> str | bytes | None:
        """The encoded entry when there is one that expires after ``now``."""

    @abc.abstractmethod
    async def _store(self, tenant: str, key: str, text: str, now: float, expires_at: float) -> None:
        """Store (or replace) the encoded entry, visible until ``expires_at``."""

    @abc.abstractmethod
    async def sweep(self, *, now: float) -> int:
        """Delete entries that expired at or before ``now``; how many (0: the engine expires them itself)."""
