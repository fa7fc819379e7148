"""Run records and events as the scripts take and give them: records are hashes (a flat
field/value list in a script's reply), events (sequence, JSON) argument pairs."""

from __future__ import annotations

from typing import Any, Sequence

from agentd.server.redis_common import text, utf8
from agentd.server.runs import codec
from agentd.server.runs.records import RunRecord, RunStatus
from agentd.server.runtime.events import RunEvent

__all__ = ["ACTION", "event_args", "record_from_hash", "record_from_reply", "retention_ms", "stream_entries"]

_STATUS = {status.value.encode(): status for status in RunStatus}
ACTION = b"action:"  # the record field of an answer of the caller: this, then its key


def _actions(fields: dict[bytes, bytes]) -> dict[str, dict[str, Any]]:
    return {
        text(name[len(ACTION):]): codec.decode_action(text(value))
        for name, value in fields.items()
        if name.startswith(ACTION)
    }


def record_from_hash(run_id: str, fields: dict[bytes, bytes]) -> RunRecord:
    checkpoint = fields.get(b"checkpoint")
    result = fields.get(b"result")
    return RunRecord(
        run_id=run_id,
        spec=codec.decode_spec(text(fields[b"spec"])),
        status=_STATUS[fields[b"status"]],
        create_time=float(fields[b"create_time"]),
        update_time=float(fields[b"update_time"]),
        owner=text(fields.get(b"owner", b"")),
        attempt=int(fields.get(b"attempt", 0)),
        lease_expires=float(fields.get(b"lease_expires", 0)),
        last_sequence=int(fields.get(b"last_sequence", 0)),
        checkpoint=codec.decode_checkpoint(text(checkpoint)) if checkpoint else None,
        result=codec.decode_payload(text(result)) if result else None,
        cancel_reason=text(fields.get(b"cancel_reason", b"")),
        trace_id=text(fields.get(b"trace_id", b"")),
        actions=_actions(fields),
        requeue_reason=text(fields.get(b"requeued", b"")),
    )


def record_from_reply(run_id: bytes | str, flat: list[bytes]) -> RunRecord:
    """A record from a script's HGETALL reply (a flat field/value list)."""
    rid = run_id if isinstance(run_id, str) else text(run_id)
    return record_from_hash(rid, dict(zip(flat[::2], flat[1::2])))


def event_args(events: Sequence[RunEvent]) -> list[Any]:
    """(sequence, JSON) pairs; ValueError unless the sequences are consecutive."""
    args: list[Any] = []
    if not events:
        return args
    first = events[0].sequence
    for i, event in enumerate(events):
        if event.sequence != first + i:
            raise ValueError(f"run {event.run_id}: event {event.sequence} does not follow {first + i - 1}")
        args.append(event.sequence)
        args.append(utf8(codec.encode_event(event)))
    return args


def retention_ms(retention_s: float) -> int:
    return max(1, int(-(-retention_s * 1000 // 1)))  # rounded up: a retention never ends early


def stream_entries(reply: Any) -> list[tuple[bytes, dict[bytes, bytes]]]:
    """The entries of the one stream an XREAD/XREADGROUP reply names (RESP2 list; RESP3 dict)."""
    if not reply:
        return []
    if isinstance(reply, dict):
        (entries,) = reply.values()
        return list(entries[0] if entries and isinstance(entries[0], list) else entries)
    return list(reply[0][1])
