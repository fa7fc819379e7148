"""Sessions and items as the scripts take and give them: metadata and state as field/value
arguments, items as ``"<seq>|<created_at>|<item JSON>"`` records."""

from __future__ import annotations

import json
from typing import Any

from agentd.server.redis_common import text, utf8
from agentd.server.runtime.items import Item, item_from_dict
from agentd.server.sessions.base import SessionRecord, StoredItem, expiry

__all__ = [
    "decode_metadata",
    "decode_state",
    "dumps",
    "encode_metadata",
    "encode_state",
    "encode_ttl",
    "history_item",
    "score_pairs",
    "session_record",
    "stored_item",
]

_encode_json = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_decode_json = json.JSONDecoder().decode


def dumps(value: Any) -> bytes:
    return utf8(_encode_json(value))


def encode_ttl(ttl_s: float | None) -> str:
    return repr(float(ttl_s)) if ttl_s else ""


def encode_metadata(metadata: dict[str, str]) -> list[bytes]:
    args: list[bytes] = []
    for key, value in metadata.items():
        if not isinstance(key, str) or not isinstance(value, str):
            raise TypeError(f"session metadata must map strings to strings, got {key!r}: {value!r}")
        args += (utf8(key), utf8(value))
    return args


def encode_state(state: dict[str, Any]) -> list[bytes]:
    args: list[bytes] = []
    for key, value in state.items():
        if not isinstance(key, str):  # the key JSON would write for it (1 -> "1", True -> "true")
            key = next(iter(json.loads(_encode_json({key: None}))))
        args += (utf8(key), dumps(value))
    return args


def decode_metadata(flat: list[bytes]) -> dict[str, str]:
    return {text(flat[i]): text(flat[i + 1]) for i in range(0, len(flat), 2)}


def decode_state(flat: list[bytes]) -> dict[str, Any]:
    return {text(flat[i]): json.loads(flat[i + 1]) for i in range(0, len(flat), 2)}


def session_record(session_id: str, reply: list[Any]) -> SessionRecord:
    created_at, updated, ttl, metadata, state, count = reply
    updated_at = float(updated)
    ttl_s = float(ttl) if ttl is not None else None
    return SessionRecord(
        session_id=session_id,
        created_at=float(created_at),
        updated_at=updated_at,
        metadata=decode_metadata(metadata),
        state=decode_state(state),
        item_count=count,
        ttl_s=ttl_s,
        expires_at=expiry(updated_at, ttl_s),
    )


def stored_item(session_id: str, record: bytes) -> StoredItem:
    seq, created_at, data = text(record).split("|", 2)  # one decode; JSON parses fastest from str
    return StoredItem(session_id, int(seq), float(created_at), item_from_dict(_decode_json(data)))


def history_item(record: bytes) -> Item:
    return item_from_dict(_decode_json(text(record).split("|", 2)[2]))


def score_pairs(reply: list[Any]) -> list[tuple[bytes, float]]:
    """ZRANGE ... WITHSCORES as redis-py parses it: (member, score) pairs."""
    return [(member, float(score)) for member, score in reply]
