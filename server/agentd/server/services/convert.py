"""Translation between domain types and ``agentd.v1`` messages; the only place both meet."""

from __future__ import annotations

import json
from typing import Any, Callable

from google.protobuf import json_format, struct_pb2
from google.protobuf.duration_pb2 import Duration
from google.protobuf.timestamp_pb2 import Timestamp
from google.type import money_pb2

from agentd.server.pricing import CURRENCY, nano_dollars
from agentd.server.runs.records import RunRecord, RunStatus
from agentd.server.runtime import events as ev
from agentd.server.runtime.items import (
    ContentPart,
    FilePart,
    ImagePart,
    Item,
    MessageItem,
    TextPart,
    ReasoningItem,
    SummaryItem,
    ToolCallItem,
    ToolResultItem,
    parse_json_object,
    parts_text,
)
from agentd.server.runtime.usage import Usage
from agentd.server.services.validation import InvalidArgument, check_id, check_struct, check_text
from agentd.server.sessions.base import SessionRecord, StoredItem
from agentd.server.tenancy import local
from agentd.v1 import agent_service_pb2, item_pb2, run_event_pb2, session_service_pb2

_ROLE_TO_PROTO = {
    "user": item_pb2.ROLE_USER,
    "assistant": item_pb2.ROLE_ASSISTANT,
    "system": item_pb2.ROLE_SYSTEM,
    "developer": item_pb2.ROLE_DEVELOPER,
}
_ROLE_FROM_PROTO = {v: k for k, v in _ROLE_TO_PROTO.items()}


def timestamp_ns(ns: int) -> Timestamp:
    return Timestamp(seconds=ns // 1_000_000_000, nanos=ns % 1_000_000_000)


def timestamp_s(seconds: float) -> Timestamp:
    return timestamp_ns(int(seconds * 1_000_000_000))


def duration(seconds: float) -> Duration:
    whole = int(seconds)
    return Duration(seconds=whole, nanos=int((seconds - whole) * 1_000_000_000))


def struct_from_dict(data: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(data)
    return message


def dict_from_struct(message: struct_pb2.Struct) -> dict[str, Any]:
    return json_format.MessageToDict(message)


def value_from_python(value: Any) -> struct_pb2.Value:
    message = struct_pb2.Value()
    if isinstance(value, str):
        message.string_value = value
    else:
        json_format.ParseDict(value, message)
    return message


# Items


def item_to_proto(item: Item, stored: StoredItem | None = None) -> item_pb2.Item:
    message = item_pb2.Item(agent=item.agent)
    if stored is not None:
        message.name = f"sessions/{local(stored.session_id)}/items/{stored.sequence}"
        message.sequence = stored.sequence
        message.create_time.CopyFrom(timestamp_s(stored.created_at))
    if type(item) is MessageItem:
        message.message.role = _ROLE_TO_PROTO[item.role]
        message.message.text = item.text
        message.message.parts.extend(part_to_proto(part) for part in item.parts)
    elif type(item) is ToolCallItem:
        call = message.tool_call
        call.call_id = item.call_id
        call.tool_name = item.tool_name
        # The arguments as a Struct only when every client can parse it back: a JSON object,
        # at most MAX_JSON_DEPTH deep, finite numbers. Anything else (malformed, too deep, not
        # an object), whoever wrote it, stays the verbatim text in raw_arguments: never parsed
        # past what is safe, so no stored item can make a session or a run's events unreadable.
        # ``arguments`` is always set when they are an object, even ``{}`` (a handoff's): a
        # Struct left unset would read as "no arguments" (JSON null) with raw_arguments empty.
        arguments = parse_json_object(item.arguments) if item.arguments else {}
        if arguments is not None:
            call.arguments.SetInParent()
            call.arguments.update(arguments)
        else:
            call.raw_arguments = item.arguments
    elif type(item) is SummaryItem:
        summary = message.summary
        summary.text = item.text
        summary.summarised_items = item.summarised_items
        summary.kept_items = item.kept_items
    elif type(item) is ReasoningItem:
        # The summary only: the encrypted reasoning never leaves the server.
        message.reasoning.SetInParent()
        message.reasoning.summary.extend(item.summary)
    else:
        result = message.tool_result
        result.call_id = item.call_id
        result.tool_name = item.tool_name
        result.output = item.output
        result.is_error = item.is_error
    return message


# One part's data (and a URL); StartRun also bounds the total. Half the default message limit,
# so any stored item fits a reply (ListSessionItems pages by bytes too: MAX_ITEM_PAGE_BYTES).
MAX_PART_DATA_BYTES = 4 * 1024 * 1024
_IMAGE_DETAILS = frozenset({"", "auto", "low", "high"})


def part_to_proto(part: ContentPart) -> item_pb2.ContentPart:
    if type(part) is TextPart:
        return item_pb2.ContentPart(text=part.text)
    if type(part) is ImagePart:
        return item_pb2.ContentPart(image=item_pb2.ImagePart(
            url=part.url, data=part.data, mime_type=part.mime_type, detail=part.detail))
    assert type(part) is FilePart
    return item_pb2.ContentPart(file=item_pb2.FilePart(
        file_id=part.file_id, data=part.data, filename=part.filename, mime_type=part.mime_type))


def _check_mime(field: str, value: str) -> str:
    check_id(field, value)
    if value and ("/" not in value or " " in value or ";" in value or "," in value):
        raise InvalidArgument(field, f"must be a MIME type like image/png, got {value!r}")
    return value


def part_from_proto(part: item_pb2.ContentPart, field: str) -> ContentPart:
    """A caller's content part, validated (the field path names the offending field)."""
    kind = part.WhichOneof("part")
    if kind == "text":
        return TextPart(check_text(f"{field}.text", part.text))
    if kind == "image":
        image = part.image
        if bool(image.url) == bool(image.data):
            raise InvalidArgument(f"{field}.image", "exactly one of url and data is required")
        if image.detail not in _IMAGE_DETAILS:
            raise InvalidArgument(f"{field}.image.detail", f"must be auto, low or high, got {image.detail!r}")
        if image.url:
            url = image.url
            if len(url) > MAX_PART_DATA_BYTES:
                raise InvalidArgument(f"{field}.image.url", f"is {len(url)} characters; the limit is "
                                      f"{MAX_PART_DATA_BYTES}")
            lowered = url[:8].lower()
            if not (lowered.startswith("http://") or lowered.startswith("https://") or lowered.startswith("data:")):
                raise InvalidArgument(f"{field}.image.url", "must be an http(s) or data: URL")
            check_id(f"{field}.image.url", url, max_chars=MAX_PART_DATA_BYTES)
            if lowered.startswith("http") and "://" in url and not url.split("://", 1)[1].strip("/"):
                raise InvalidArgument(f"{field}.image.url", "has no host")
            return ImagePart(url=url, detail=image.detail)
        if len(image.data) > MAX_PART_DATA_BYTES:
            raise InvalidArgument(f"{field}.image.data", f"is {len(image.data)} bytes; the limit is "
                                  f"{MAX_PART_DATA_BYTES}")
        if not image.mime_type:
            raise InvalidArgument(f"{field}.image.mime_type", "is required with data")
        mime = _check_mime(f"{field}.image.mime_type", image.mime_type)
        if not mime.startswith("image/"):
            raise InvalidArgument(f"{field}.image.mime_type", f"must be an image type (image/...), got {mime!r}")
        return ImagePart(data=image.data, mime_type=mime, detail=image.detail)
    if kind == "file":
        file = part.file
        if bool(file.file_id) == bool(file.data):
            raise InvalidArgument(f"{field}.file", "exactly one of file_id and data is required")
        check_id(f"{field}.file.file_id", file.file_id)
        check_id(f"{field}.file.filename", file.filename)
        mime = _check_mime(f"{field}.file.mime_type", file.mime_type)
        if file.data:
            if len(file.data) > MAX_PART_DATA_BYTES:
                raise InvalidArgument(f"{field}.file.data", f"is {len(file.data)} bytes; the limit is "
                                      f"{MAX_PART_DATA_BYTES}")
            if not file.filename:
                raise InvalidArgument(f"{field}.file.filename", "is required with data")
        return FilePart(file_id=file.file_id, data=file.data, filename=file.filename, mime_type=mime)
    raise InvalidArgument(field, "must hold text, image or file")


def item_from_proto(message: item_pb2.Item, field: str) -> Item:
    """A caller's item, validated: ids without control characters, text without NUL, and
    ``arguments`` within the Struct limits (``raw_arguments`` is kept verbatim, never parsed here)."""
    kind = message.WhichOneof("content")
    check_id(f"{field}.agent", message.agent)
    if kind == "message":
        role = _ROLE_FROM_PROTO.get(message.message.role)
        if role is None:
            raise InvalidArgument(
                f"{field}.message.role", "must be ROLE_USER, ROLE_ASSISTANT, ROLE_SYSTEM or ROLE_DEVELOPER"
            )
        if message.message.parts:
            parts = tuple(
                part_from_proto(part, f"{field}.message.parts[{i}]") for i, part in enumerate(message.message.parts)
            )
            return MessageItem(role, parts_text(parts), message.agent, parts=parts)  # type: ignore[arg-type]
        check_text(f"{field}.message.text", message.message.text)
        return MessageItem(role, message.message.text, message.agent)  # type: ignore[arg-type]
    if kind == "tool_call":
        call = message.tool_call
        if not call.call_id or not call.tool_name:
            raise InvalidArgument(f"{field}.tool_call", "call_id and tool_name are required")
        check_id(f"{field}.tool_call.call_id", call.call_id)
        check_id(f"{field}.tool_call.tool_name", call.tool_name)
        if call.raw_arguments:
            arguments = check_text(f"{field}.tool_call.raw_arguments", call.raw_arguments)
        else:
            check_struct(f"{field}.tool_call.arguments", call.arguments)
            arguments = json.dumps(dict_from_struct(call.arguments), separators=(",", ":"))
        return ToolCallItem(call.call_id, call.tool_name, arguments, message.agent)
    if kind == "tool_result":
        result = message.tool_result
        if not result.call_id:
            raise InvalidArgument(f"{field}.tool_result.call_id", "is required")
        check_id(f"{field}.tool_result.call_id", result.call_id)
        check_id(f"{field}.tool_result.tool_name", result.tool_name)
        check_text(f"{field}.tool_result.output", result.output)
        return ToolResultItem(result.call_id, result.tool_name, result.output, result.is_error, message.agent)
    if kind == "summary":
        summary = message.summary
        check_text(f"{field}.summary.text", summary.text)
        if summary.summarised_items < 0:
            raise InvalidArgument(f"{field}.summary.summarised_items", "must be 0 or more")
        if summary.kept_items < 0:
            raise InvalidArgument(f"{field}.summary.kept_items", "must be 0 or more")
        return SummaryItem(summary.text, summary.summarised_items, summary.kept_items, message.agent)
    if kind == "reasoning":
        for index, part in enumerate(message.reasoning.summary):
            check_text(f"{field}.reasoning.summary[{index}]", part)
        # No encrypted reasoning: kept for reading, never sent to a model.
        return ReasoningItem("", tuple(message.reasoning.summary), "", message.agent)
    raise InvalidArgument(field, "must set one of message, tool_call, tool_result, summary or reasoning")


def stored_item_to_proto(stored: StoredItem) -> item_pb2.Item:
    return item_to_proto(stored.item, stored)


def session_to_proto(record: SessionRecord) -> session_service_pb2.Session:
    message = session_service_pb2.Session(
        name=f"sessions/{local(record.session_id)}",
        create_time=timestamp_s(record.created_at),
        update_time=timestamp_s(record.updated_at),
        metadata=record.metadata,
        item_count=record.item_count,
    )
    message.state.update(record.state)
    if record.ttl_s is not None:
        message.ttl.FromNanoseconds(round(record.ttl_s * 1e9))
    if record.expires_at is not None:
        message.expire_time.CopyFrom(timestamp_s(record.expires_at))
    return message


# Run events (the hot path: one conversion per event)


def usage_to_proto(usage: Usage) -> run_event_pb2.TokenUsage:
    message = run_event_pb2.TokenUsage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        total_tokens=usage.total_tokens,
        requests=usage.requests,
        reasoning_tokens=usage.reasoning_tokens,
        cached_input_tokens=usage.cached_input_tokens,
        unpriced_calls=usage.unpriced_calls,
    )
    if usage.cost_usd is not None:  # unset: unknown (no call priced), never 0
        message.cost.CopyFrom(money_from_nanos(nano_dollars(usage.cost_usd)))
    return message


def money_from_nanos(nanos: int) -> money_pb2.Money:
    """US dollars from whole nano-dollars (costs are never negative)."""
    return money_pb2.Money(currency_code=CURRENCY, units=nanos // _NANOS_PER_USD, nanos=nanos % _NANOS_PER_USD)


_NANOS_PER_USD = 1_000_000_000


_ERROR_CODES = {
    ev.RunErrorCode.MAX_TURNS_EXCEEDED: run_event_pb2.RUN_ERROR_CODE_MAX_TURNS_EXCEEDED,
    ev.RunErrorCode.MODEL_UNAVAILABLE: run_event_pb2.RUN_ERROR_CODE_MODEL_UNAVAILABLE,
    ev.RunErrorCode.MODEL_ERROR: run_event_pb2.RUN_ERROR_CODE_MODEL_ERROR,
    ev.RunErrorCode.INVALID_OUTPUT: run_event_pb2.RUN_ERROR_CODE_INVALID_OUTPUT,
    ev.RunErrorCode.SESSION_UNAVAILABLE: run_event_pb2.RUN_ERROR_CODE_SESSION_UNAVAILABLE,
    ev.RunErrorCode.INTERNAL: run_event_pb2.RUN_ERROR_CODE_INTERNAL,
    ev.RunErrorCode.GUARDRAIL_TRIPPED: run_event_pb2.RUN_ERROR_CODE_GUARDRAIL_TRIPPED,
    ev.RunErrorCode.INVALID_CONTEXT: run_event_pb2.RUN_ERROR_CODE_INVALID_CONTEXT,
}


def _run_started(p: ev.RunStarted, out: run_event_pb2.RunEvent) -> None:
    m = out.run_started
    m.agent = p.agent
    m.session = f"sessions/{local(p.session_id)}" if p.session_id else ""
    m.history_items = p.history_items
    m.request_id = local(p.request_id)
    m.history_omitted = p.history_omitted
    m.agent_version = p.agent_version
    if p.cached:
        m.cached = True


def _agent_updated(p: ev.AgentUpdated, out: run_event_pb2.RunEvent) -> None:
    out.agent_updated.agent = p.agent


def _text_delta(p: ev.TextDelta, out: run_event_pb2.RunEvent) -> None:
    m = out.text_delta
    m.agent = p.agent
    m.text = p.text


def _message_output(p: ev.MessageOutput, out: run_event_pb2.RunEvent) -> None:
    out.message_output.agent = p.agent
    out.message_output.item.CopyFrom(item_to_proto(p.item))


def _tool_called(p: ev.ToolCalled, out: run_event_pb2.RunEvent) -> None:
    out.tool_called.agent = p.agent
    out.tool_called.item.CopyFrom(item_to_proto(p.item))


def _tool_output(p: ev.ToolOutput, out: run_event_pb2.RunEvent) -> None:
    m = out.tool_output
    m.agent = p.agent
    m.item.CopyFrom(item_to_proto(p.item))
    m.duration.CopyFrom(duration(p.duration_s))


def _handoff(p: ev.Handoff, out: run_event_pb2.RunEvent) -> None:
    m = out.handoff
    m.from_agent = p.from_agent
    m.to_agent = p.to_agent
    m.call_id = p.call_id


def _usage_updated(p: ev.UsageUpdated, out: run_event_pb2.RunEvent) -> None:
    m = out.usage_updated
    m.agent = p.agent
    m.model = p.model
    m.turn.CopyFrom(usage_to_proto(p.turn))
    m.run.CopyFrom(usage_to_proto(p.run))


def _run_completed(p: ev.RunCompleted, out: run_event_pb2.RunEvent) -> None:
    m = out.run_completed
    m.final_output.CopyFrom(value_from_python(p.final_output))
    m.last_agent = p.last_agent
    m.usage.CopyFrom(usage_to_proto(p.usage))
    m.turns = p.turns
    m.duration.CopyFrom(duration(p.duration_s))
    if p.cached:
        m.cached = True


def _run_failed(p: ev.RunFailed, out: run_event_pb2.RunEvent) -> None:
    m = out.run_failed
    m.code = _ERROR_CODES[p.code]
    m.message = p.message
    m.usage.CopyFrom(usage_to_proto(p.usage))
    m.turns = p.turns


def _run_cancelled(p: ev.RunCancelled, out: run_event_pb2.RunEvent) -> None:
    m = out.run_cancelled
    m.reason = p.reason
    m.usage.CopyFrom(usage_to_proto(p.usage))
    m.turns = p.turns


def _run_resumed(p: ev.RunResumed, out: run_event_pb2.RunEvent) -> None:
    m = out.run_resumed
    m.attempt = p.attempt
    m.reason = p.reason
    m.turns = p.turns


_ACTIONS = {
    "tool_output": run_event_pb2.REQUIRED_ACTION_TOOL_OUTPUT,
    "approval": run_event_pb2.REQUIRED_ACTION_APPROVAL,
}


def _action_required(p: ev.ActionRequired, out: run_event_pb2.RunEvent) -> None:
    m = out.action_required
    m.action = _ACTIONS[p.kind]
    m.agent = p.agent
    m.item.CopyFrom(item_to_proto(p.item))


def _history_compacted(p: ev.HistoryCompacted, out: run_event_pb2.RunEvent) -> None:
    m = out.history_compacted
    m.agent = p.agent
    summary = m.summary
    summary.CopyFrom(item_to_proto(p.summary))
    summary.name = f"sessions/{local(p.session_id)}/items/{p.summary_sequence}"
    summary.sequence = p.summary_sequence
    m.summarised_items = p.summarised_items
    m.kept_items = p.kept_items
    m.dropped_items = p.dropped_items


_GUARDRAIL_STAGES = {
    "input": run_event_pb2.GUARDRAIL_STAGE_INPUT,
    "output": run_event_pb2.GUARDRAIL_STAGE_OUTPUT,
    "tool_before": run_event_pb2.GUARDRAIL_STAGE_TOOL_BEFORE,
    "tool_after": run_event_pb2.GUARDRAIL_STAGE_TOOL_AFTER,
}


def _guardrail_tripped(p: ev.GuardrailTripped, out: run_event_pb2.RunEvent) -> None:
    m = out.guardrail_tripped
    m.guardrail = p.guardrail
    m.stage = _GUARDRAIL_STAGES.get(p.stage, run_event_pb2.GUARDRAIL_STAGE_UNSPECIFIED)
    m.agent = p.agent
    m.reason = p.reason
    if p.output:
        m.output.update(p.output)
    m.tool_name = p.tool_name
    m.call_id = p.call_id


def _hosted_tool_call(p: ev.HostedToolCall, out: run_event_pb2.RunEvent) -> None:
    m = out.hosted_tool_call
    m.agent = p.agent
    m.tool = p.tool
    m.call_id = p.call_id
    m.status = p.status
    if p.details:
        m.details.update(p.details)


_PAYLOAD_WRITERS: dict[type, Callable[[Any, run_event_pb2.RunEvent], None]] = {
    ev.RunStarted: _run_started,
    ev.AgentUpdated: _agent_updated,
    ev.TextDelta: _text_delta,
    ev.MessageOutput: _message_output,
    ev.ToolCalled: _tool_called,
    ev.ToolOutput: _tool_output,
    ev.Handoff: _handoff,
    ev.UsageUpdated: _usage_updated,
    ev.RunCompleted: _run_completed,
    ev.RunFailed: _run_failed,
    ev.RunCancelled: _run_cancelled,
    ev.RunResumed: _run_resumed,
    ev.ActionRequired: _action_required,
    ev.HistoryCompacted: _history_compacted,
    ev.GuardrailTripped: _guardrail_tripped,
    ev.HostedToolCall: _hosted_tool_call,
}


def write_run_event(event: ev.RunEvent, out: run_event_pb2.RunEvent) -> None:
    """Fill ``out`` in place (typically a response's ``event`` field, saving a copy per event)."""
    out.run_id = event.run_id
    out.sequence = event.sequence
    create_time = out.create_time  # (each read of a message field is a lookup)
    create_time.seconds, create_time.nanos = divmod(event.time_ns, 1_000_000_000)
    out.trace_id = event.trace_id
    _PAYLOAD_WRITERS[type(event.payload)](event.payload, out)


_RUN_STATUS = {
    RunStatus.QUEUED: agent_service_pb2.RUN_STATUS_QUEUED,
    RunStatus.RUNNING: agent_service_pb2.RUN_STATUS_RUNNING,
    RunStatus.REQUIRES_ACTION: agent_service_pb2.RUN_STATUS_REQUIRES_ACTION,
    RunStatus.COMPLETED: agent_service_pb2.RUN_STATUS_COMPLETED,
    RunStatus.FAILED: agent_service_pb2.RUN_STATUS_FAILED,
    RunStatus.CANCELLED: agent_service_pb2.RUN_STATUS_CANCELLED,
}
_RESULT_FIELD = {ev.RunCompleted: "completed", ev.RunFailed: "failed", ev.RunCancelled: "cancelled"}


def run_to_proto(record: RunRecord) -> agent_service_pb2.RunInfo:
    spec = record.spec
    info = agent_service_pb2.RunInfo(
        name=f"runs/{record.run_id}",
        status=_RUN_STATUS[record.visible_status],
        agent=f"agents/{spec.agent}",
        agent_version=spec.agent_version,
        session=f"sessions/{local(spec.session_id)}" if spec.session_id else "",
        request_id=local(spec.request_id),
        create_time=timestamp_s(record.create_time),
        update_time=timestamp_s(record.update_time),
        replica=record.owner,
        attempt=record.attempt,
        last_sequence=record.last_sequence,
    )
    if record.result is not None:
        event = run_event_pb2.RunEvent()
        _PAYLOAD_WRITERS[type(record.result)](record.result, event)
        field = _RESULT_FIELD[type(record.result)]  # type: ignore[index]
        getattr(info, field).CopyFrom(getattr(event, f"run_{field}"))
    if record.checkpoint is not None:
        calls = {i.call_id: i for i in record.checkpoint.pending if isinstance(i, ToolCallItem)}
        for key in record.awaiting:
            kind, _, call_id = key.partition(":")
            if call_id in calls:
                required = info.required_actions.add(action=_ACTIONS[_ACTION_KINDS[kind]],
                                                     agent=record.checkpoint.agent)
                required.item.CopyFrom(item_to_proto(calls[call_id]))
    return info


_ACTION_KINDS = {"approval": "approval", "output": "tool_output"}
