import datetime

from agentd.v1 import item_pb2 as _item_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import struct_pb2 as _struct_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.type import money_pb2 as _money_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RunErrorCode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RUN_ERROR_CODE_UNSPECIFIED: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_MAX_TURNS_EXCEEDED: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_MODEL_UNAVAILABLE: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_MODEL_ERROR: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_INVALID_OUTPUT: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_SESSION_UNAVAILABLE: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_INTERNAL: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_GUARDRAIL_TRIPPED: _ClassVar[RunErrorCode]
    RUN_ERROR_CODE_INVALID_CONTEXT: _ClassVar[RunErrorCode]

class RequiredAction(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    REQUIRED_ACTION_UNSPECIFIED: _ClassVar[RequiredAction]
    REQUIRED_ACTION_TOOL_OUTPUT: _ClassVar[RequiredAction]
    REQUIRED_ACTION_APPROVAL: _ClassVar[RequiredAction]

class GuardrailStage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    GUARDRAIL_STAGE_UNSPECIFIED: _ClassVar[GuardrailStage]
    GUARDRAIL_STAGE_INPUT: _ClassVar[GuardrailStage]
    GUARDRAIL_STAGE_OUTPUT: _ClassVar[GuardrailStage]
    GUARDRAIL_STAGE_TOOL_BEFORE: _ClassVar[GuardrailStage]
    GUARDRAIL_STAGE_TOOL_AFTER: _ClassVar[GuardrailStage]
RUN_ERROR_CODE_UNSPECIFIED: RunErrorCode
RUN_ERROR_CODE_MAX_TURNS_EXCEEDED: RunErrorCode
RUN_ERROR_CODE_MODEL_UNAVAILABLE: RunErrorCode
RUN_ERROR_CODE_MODEL_ERROR: RunErrorCode
RUN_ERROR_CODE_INVALID_OUTPUT: RunErrorCode
RUN_ERROR_CODE_SESSION_UNAVAILABLE: RunErrorCode
RUN_ERROR_CODE_INTERNAL: RunErrorCode
RUN_ERROR_CODE_GUARDRAIL_TRIPPED: RunErrorCode
RUN_ERROR_CODE_INVALID_CONTEXT: RunErrorCode
REQUIRED_ACTION_UNSPECIFIED: RequiredAction
REQUIRED_ACTION_TOOL_OUTPUT: RequiredAction
REQUIRED_ACTION_APPROVAL: RequiredAction
GUARDRAIL_STAGE_UNSPECIFIED: GuardrailStage
GUARDRAIL_STAGE_INPUT: GuardrailStage
GUARDRAIL_STAGE_OUTPUT: GuardrailStage
GUARDRAIL_STAGE_TOOL_BEFORE: GuardrailStage
GUARDRAIL_STAGE_TOOL_AFTER: GuardrailStage

class RunEvent(_message.Message):
    __slots__ = ("run_id", "sequence", "create_time", "trace_id", "run_started", "agent_updated", "text_delta", "message_output", "tool_called", "tool_output", "handoff", "usage_updated", "run_completed", "run_failed", "run_cancelled", "run_resumed", "action_required", "history_compacted", "guardrail_tripped", "hosted_tool_call")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    SEQUENCE_FIELD_NUMBER: _ClassVar[int]
    CREATE_TIME_FIELD_NUMBER: _ClassVar[int]
    TRACE_ID_FIELD_NUMBER: _ClassVar[int]
    RUN_STARTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_UPDATED_FIELD_NUMBER: _ClassVar[int]
    TEXT_DELTA_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLED_FIELD_NUMBER: _ClassVar[int]
    TOOL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    HANDOFF_FIELD_NUMBER: _ClassVar[int]
    USAGE_UPDATED_FIELD_NUMBER: _ClassVar[int]
    RUN_COMPLETED_FIELD_NUMBER: _ClassVar[int]
    RUN_FAILED_FIELD_NUMBER: _ClassVar[int]
    RUN_CANCELLED_FIELD_NUMBER: _ClassVar[int]
    RUN_RESUMED_FIELD_NUMBER: _ClassVar[int]
    ACTION_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    HISTORY_COMPACTED_FIELD_NUMBER: _ClassVar[int]
    GUARDRAIL_TRIPPED_FIELD_NUMBER: _ClassVar[int]
    HOSTED_TOOL_CALL_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    sequence: int
    create_time: _timestamp_pb2.Timestamp
    trace_id: str
    run_started: RunStarted
    agent_updated: AgentUpdated
    text_delta: TextDelta
    message_output: MessageOutput
    tool_called: ToolCalled
    tool_output: ToolOutput
    handoff: Handoff
    usage_updated: UsageUpdated
    run_completed: RunCompleted
    run_failed: RunFailed
    run_cancelled: RunCancelled
    run_resumed: RunResumed
    action_required: ActionRequired
    history_compacted: HistoryCompacted
    guardrail_tripped: GuardrailTripped
    hosted_tool_call: HostedToolCall
    def __init__(self, run_id: _Optional[str] = ..., sequence: _Optional[int] = ..., create_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., trace_id: _Optional[str] = ..., run_started: _Optional[_Union[RunStarted, _Mapping]] = ..., agent_updated: _Optional[_Union[AgentUpdated, _Mapping]] = ..., text_delta: _Optional[_Union[TextDelta, _Mapping]] = ..., message_output: _Optional[_Union[MessageOutput, _Mapping]] = ..., tool_called: _Optional[_Union[ToolCalled, _Mapping]] = ..., tool_output: _Optional[_Union[ToolOutput, _Mapping]] = ..., handoff: _Optional[_Union[Handoff, _Mapping]] = ..., usage_updated: _Optional[_Union[UsageUpdated, _Mapping]] = ..., run_completed: _Optional[_Union[RunCompleted, _Mapping]] = ..., run_failed: _Optional[_Union[RunFailed, _Mapping]] = ..., run_cancelled: _Optional[_Union[RunCancelled, _Mapping]] = ..., run_resumed: _Optional[_Union[RunResumed, _Mapping]] = ..., action_required: _Optional[_Union[ActionRequired, _Mapping]] = ..., history_compacted: _Optional[_Union[HistoryCompacted, _Mapping]] = ..., guardrail_tripped: _Optional[_Union[GuardrailTripped, _Mapping]] = ..., hosted_tool_call: _Optional[_Union[HostedToolCall, _Mapping]] = ...) -> None: ...

class TokenUsage(_message.Message):
    __slots__ = ("input_tokens", "output_tokens", "total_tokens", "requests", "reasoning_tokens", "cached_input_tokens", "cost", "unpriced_calls")
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_CALLS_FIELD_NUMBER: _ClassVar[int]
    input_tokens: int
    output_tokens: int
    total_tokens: int
    requests: int
    reasoning_tokens: int
    cached_input_tokens: int
    cost: _money_pb2.Money
    unpriced_calls: int
    def __init__(self, input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., total_tokens: _Optional[int] = ..., requests: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., unpriced_calls: _Optional[int] = ...) -> None: ...

class RunStarted(_message.Message):
    __slots__ = ("agent", "session", "history_items", "request_id", "history_omitted", "agent_version", "cached")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SESSION_FIELD_NUMBER: _ClassVar[int]
    HISTORY_ITEMS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    HISTORY_OMITTED_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    agent: str
    session: str
    history_items: int
    request_id: str
    history_omitted: int
    agent_version: int
    cached: bool
    def __init__(self, agent: _Optional[str] = ..., session: _Optional[str] = ..., history_items: _Optional[int] = ..., request_id: _Optional[str] = ..., history_omitted: _Optional[int] = ..., agent_version: _Optional[int] = ..., cached: _Optional[bool] = ...) -> None: ...

class AgentUpdated(_message.Message):
    __slots__ = ("agent",)
    AGENT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    def __init__(self, agent: _Optional[str] = ...) -> None: ...

class TextDelta(_message.Message):
    __slots__ = ("agent", "text")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    agent: str
    text: str
    def __init__(self, agent: _Optional[str] = ..., text: _Optional[str] = ...) -> None: ...

class MessageOutput(_message.Message):
    __slots__ = ("agent", "item")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    agent: str
    item: _item_pb2.Item
    def __init__(self, agent: _Optional[str] = ..., item: _Optional[_Union[_item_pb2.Item, _Mapping]] = ...) -> None: ...

class ToolCalled(_message.Message):
    __slots__ = ("agent", "item")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    agent: str
    item: _item_pb2.Item
    def __init__(self, agent: _Optional[str] = ..., item: _Optional[_Union[_item_pb2.Item, _Mapping]] = ...) -> None: ...

class ToolOutput(_message.Message):
    __slots__ = ("agent", "item", "duration")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    agent: str
    item: _item_pb2.Item
    duration: _duration_pb2.Duration
    def __init__(self, agent: _Optional[str] = ..., item: _Optional[_Union[_item_pb2.Item, _Mapping]] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class Handoff(_message.Message):
    __slots__ = ("from_agent", "to_agent", "call_id")
    FROM_AGENT_FIELD_NUMBER: _ClassVar[int]
    TO_AGENT_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    from_agent: str
    to_agent: str
    call_id: str
    def __init__(self, from_agent: _Optional[str] = ..., to_agent: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class UsageUpdated(_message.Message):
    __slots__ = ("agent", "model", "turn", "run")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    TURN_FIELD_NUMBER: _ClassVar[int]
    RUN_FIELD_NUMBER: _ClassVar[int]
    agent: str
    model: str
    turn: TokenUsage
    run: TokenUsage
    def __init__(self, agent: _Optional[str] = ..., model: _Optional[str] = ..., turn: _Optional[_Union[TokenUsage, _Mapping]] = ..., run: _Optional[_Union[TokenUsage, _Mapping]] = ...) -> None: ...

class RunCompleted(_message.Message):
    __slots__ = ("final_output", "last_agent", "usage", "turns", "duration", "cached")
    FINAL_OUTPUT_FIELD_NUMBER: _ClassVar[int]
    LAST_AGENT_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    CACHED_FIELD_NUMBER: _ClassVar[int]
    final_output: _struct_pb2.Value
    last_agent: str
    usage: TokenUsage
    turns: int
    duration: _duration_pb2.Duration
    cached: bool
    def __init__(self, final_output: _Optional[_Union[_struct_pb2.Value, _Mapping]] = ..., last_agent: _Optional[str] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., turns: _Optional[int] = ..., duration: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., cached: _Optional[bool] = ...) -> None: ...

class RunFailed(_message.Message):
    __slots__ = ("code", "message", "usage", "turns")
    CODE_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    code: RunErrorCode
    message: str
    usage: TokenUsage
    turns: int
    def __init__(self, code: _Optional[_Union[RunErrorCode, str]] = ..., message: _Optional[str] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., turns: _Optional[int] = ...) -> None: ...

class RunCancelled(_message.Message):
    __slots__ = ("reason", "usage", "turns")
    REASON_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    reason: str
    usage: TokenUsage
    turns: int
    def __init__(self, reason: _Optional[str] = ..., usage: _Optional[_Union[TokenUsage, _Mapping]] = ..., turns: _Optional[int] = ...) -> None: ...

class RunResumed(_message.Message):
    __slots__ = ("attempt", "reason", "turns")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    TURNS_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    reason: str
    turns: int
    def __init__(self, attempt: _Optional[int] = ..., reason: _Optional[str] = ..., turns: _Optional[int] = ...) -> None: ...

class ActionRequired(_message.Message):
    __slots__ = ("action", "agent", "item")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    ITEM_FIELD_NUMBER: _ClassVar[int]
    action: RequiredAction
    agent: str
    item: _item_pb2.Item
    def __init__(self, action: _Optional[_Union[RequiredAction, str]] = ..., agent: _Optional[str] = ..., item: _Optional[_Union[_item_pb2.Item, _Mapping]] = ...) -> None: ...

class HistoryCompacted(_message.Message):
    __slots__ = ("agent", "summary", "summarised_items", "kept_items", "dropped_items")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    SUMMARISED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    KEPT_ITEMS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_ITEMS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    summary: _item_pb2.Item
    summarised_items: int
    kept_items: int
    dropped_items: int
    def __init__(self, agent: _Optional[str] = ..., summary: _Optional[_Union[_item_pb2.Item, _Mapping]] = ..., summarised_items: _Optional[int] = ..., kept_items: _Optional[int] = ..., dropped_items: _Optional[int] = ...) -> None: ...

class GuardrailTripped(_message.Message):
    __slots__ = ("guardrail", "stage", "agent", "reason", "output", "tool_name", "call_id")
    GUARDRAIL_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FIELD_NUMBER: _ClassVar[int]
    TOOL_NAME_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    guardrail: str
    stage: GuardrailStage
    agent: str
    reason: str
    output: _struct_pb2.Struct
    tool_name: str
    call_id: str
    def __init__(self, guardrail: _Optional[str] = ..., stage: _Optional[_Union[GuardrailStage, str]] = ..., agent: _Optional[str] = ..., reason: _Optional[str] = ..., output: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ..., tool_name: _Optional[str] = ..., call_id: _Optional[str] = ...) -> None: ...

class HostedToolCall(_message.Message):
    __slots__ = ("agent", "tool", "call_id", "status", "details")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    TOOL_FIELD_NUMBER: _ClassVar[int]
    CALL_ID_FIELD_NUMBER: _ClassVar[int]
    STATUS_FIELD_NUMBER: _ClassVar[int]
    DETAILS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    tool: str
    call_id: str
    status: str
    details: _struct_pb2.Struct
    def __init__(self, agent: _Optional[str] = ..., tool: _Optional[str] = ..., call_id: _Optional[str] = ..., status: _Optional[str] = ..., details: _Optional[_Union[_struct_pb2.Struct, _Mapping]] = ...) -> None: ...
