"""The in-process result cache: the reference engine (``AGENTD_STORE=memory``), one process only.

Bounded three ways: an entry longer than ``max_entry_bytes`` is not stored (``ResultCache``),
and at most ``max_entries`` entries of at most ``max_bytes`` in all (their encoded sizes) are
kept: storing beyond either bound evicts the least recently used entries first (a hit counts
as a use), counted in ``counts.evicted``. An expired entry is dropped when it is next read or
swept. Every method does its work without awaiting, so each is atomic on the event loop.
"""

from __future__ import annotations

from collections import OrderedDict

from agentd.server.cache.base import DEFAULT_MAX_ENTRY_BYTES, ResultCache

__all__ = ["DEFAULT_MAX_BYTES", "DEFAULT_MAX_ENTRIES", "MemoryResultCache"]

# AGENTD_RESULT_CACHE_MEMORY_MAX_ENTRIES / _MAX_BYTES.
DEFAULT_MAX_ENTRIES = 10_000
DEFAULT_MAX_BYTES = 64 * 1024 * 1024


class MemoryResultCache(ResultCache):
    """Entries in an LRU-ordered dict (least recently used first); lost when the process exits."""

    backend = "memory"

    def __init__(
        self,
        *,
        max_entry_bytes: int = DEFAULT_MAX_ENTRY_BYTES,
        max_entries: int = DEFAULT_MAX_ENTRIES,
        max_bytes: int = DEFAULT_MAX_BYTES,
    ) -> None:
        super().__init__(max_entry_bytes=max_entry_bytes)
        if max_entries < 1 or max_bytes < 1:
            raise ValueError(f"max_entries and max_bytes must be at least 1, got {max_entries} and {max_bytes}")
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        # (tenant, key) -> (encoded entry, expires_at)
        self._entries: OrderedDict[tuple[str, str], tuple[str, float]] = OrderedDict()
        self._bytes = 0

    @property
    def location(self) -> str:
        return "memory"

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def size_bytes(self) -> int:
        """The encoded size of the entries held (what ``max_bytes`` bounds)."""
        return self._bytes

    def _drop(self, slot: tuple[str, str]) -> None:
        text, _ = self._entries.pop(slot)
        self._bytes -= len(text)

    async def _load(self, tenant: str, key: str, now: float) -> str | None:
        slot = (tenant, key)
        entry = self._entries.get(slot)
        if entry is None:
            return None
        if entry[1] <= now:
            self._drop(slot)
            return None
        self._entries.move_to_end(slot)
        return entry[0]

    async def _store(self, tenant: str, key: str, text: str, now: float, expires_at: float) -> None:
        slot = (tenant, key)
        if slot in self._entries:
            self._drop(slot)
        self._entries[slot] = (text, expires_at)
        self._bytes += len(text)
        while len(self._entries) > self.max_entries or self._bytes > self.max_bytes:
            oldest = next(iter(self._entries))
            if oldest == slot:  # only the new entry is left (max_bytes below its size): it stays
                break
            self._drop(oldest)
            self.counts.evicted += 1

    async def sweep(self, *, now: float) -> int:
        expired = [slot for slot, (_, expires_at) in self._entries.items() if expires_at <= now]
        for slot in expired:
            self._drop(slot)
        return len(expired)
