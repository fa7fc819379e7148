import datetime

from agentd.v1 import run_event_pb2 as _run_event_pb2
from google.protobuf import duration_pb2 as _duration_pb2
from google.protobuf import timestamp_pb2 as _timestamp_pb2
from google.type import money_pb2 as _money_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class TimeBucket(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TIME_BUCKET_UNSPECIFIED: _ClassVar[TimeBucket]
    TIME_BUCKET_MINUTE: _ClassVar[TimeBucket]
    TIME_BUCKET_HOUR: _ClassVar[TimeBucket]
    TIME_BUCKET_DAY: _ClassVar[TimeBucket]
TIME_BUCKET_UNSPECIFIED: TimeBucket
TIME_BUCKET_MINUTE: TimeBucket
TIME_BUCKET_HOUR: TimeBucket
TIME_BUCKET_DAY: TimeBucket

class GetStatsRequest(_message.Message):
    __slots__ = ("start_time", "end_time", "agent", "agent_version", "group_by_agent_version", "bucket", "page_size", "page_token")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    GROUP_BY_AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    PAGE_SIZE_FIELD_NUMBER: _ClassVar[int]
    PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    agent: str
    agent_version: int
    group_by_agent_version: bool
    bucket: TimeBucket
    page_size: int
    page_token: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., agent: _Optional[str] = ..., agent_version: _Optional[int] = ..., group_by_agent_version: _Optional[bool] = ..., bucket: _Optional[_Union[TimeBucket, str]] = ..., page_size: _Optional[int] = ..., page_token: _Optional[str] = ...) -> None: ...

class GetStatsResponse(_message.Message):
    __slots__ = ("start_time", "end_time", "bucket", "groups", "next_page_token")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    BUCKET_FIELD_NUMBER: _ClassVar[int]
    GROUPS_FIELD_NUMBER: _ClassVar[int]
    NEXT_PAGE_TOKEN_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    bucket: TimeBucket
    groups: _containers.RepeatedCompositeFieldContainer[AgentStats]
    next_page_token: str
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., bucket: _Optional[_Union[TimeBucket, str]] = ..., groups: _Optional[_Iterable[_Union[AgentStats, _Mapping]]] = ..., next_page_token: _Optional[str] = ...) -> None: ...

class AgentStats(_message.Message):
    __slots__ = ("agent", "agent_version", "totals", "buckets", "tools", "omitted_tools")
    AGENT_FIELD_NUMBER: _ClassVar[int]
    AGENT_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOTALS_FIELD_NUMBER: _ClassVar[int]
    BUCKETS_FIELD_NUMBER: _ClassVar[int]
    TOOLS_FIELD_NUMBER: _ClassVar[int]
    OMITTED_TOOLS_FIELD_NUMBER: _ClassVar[int]
    agent: str
    agent_version: int
    totals: RunStats
    buckets: _containers.RepeatedCompositeFieldContainer[StatsBucket]
    tools: _containers.RepeatedCompositeFieldContainer[ToolStats]
    omitted_tools: int
    def __init__(self, agent: _Optional[str] = ..., agent_version: _Optional[int] = ..., totals: _Optional[_Union[RunStats, _Mapping]] = ..., buckets: _Optional[_Iterable[_Union[StatsBucket, _Mapping]]] = ..., tools: _Optional[_Iterable[_Union[ToolStats, _Mapping]]] = ..., omitted_tools: _Optional[int] = ...) -> None: ...

class StatsBucket(_message.Message):
    __slots__ = ("start_time", "stats")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    STATS_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    stats: RunStats
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., stats: _Optional[_Union[RunStats, _Mapping]] = ...) -> None: ...

class RunStats(_message.Message):
    __slots__ = ("runs", "completed_runs", "failed_runs", "cancelled_runs", "success_rate", "errors", "duration", "time_to_first_token", "input_tokens", "output_tokens", "cached_input_tokens", "reasoning_tokens", "cost", "unpriced_runs", "tool_calls", "tool_errors", "tool_error_rate")
    RUNS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_RUNS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RUNS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_RUNS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    TIME_TO_FIRST_TOKEN_FIELD_NUMBER: _ClassVar[int]
    INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    CACHED_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COST_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_RUNS_FIELD_NUMBER: _ClassVar[int]
    TOOL_CALLS_FIELD_NUMBER: _ClassVar[int]
    TOOL_ERRORS_FIELD_NUMBER: _ClassVar[int]
    TOOL_ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    runs: int
    completed_runs: int
    failed_runs: int
    cancelled_runs: int
    success_rate: float
    errors: _containers.RepeatedCompositeFieldContainer[ErrorCodeCount]
    duration: DurationPercentiles
    time_to_first_token: DurationPercentiles
    input_tokens: int
    output_tokens: int
    cached_input_tokens: int
    reasoning_tokens: int
    cost: _money_pb2.Money
    unpriced_runs: int
    tool_calls: int
    tool_errors: int
    tool_error_rate: float
    def __init__(self, runs: _Optional[int] = ..., completed_runs: _Optional[int] = ..., failed_runs: _Optional[int] = ..., cancelled_runs: _Optional[int] = ..., success_rate: _Optional[float] = ..., errors: _Optional[_Iterable[_Union[ErrorCodeCount, _Mapping]]] = ..., duration: _Optional[_Union[DurationPercentiles, _Mapping]] = ..., time_to_first_token: _Optional[_Union[DurationPercentiles, _Mapping]] = ..., input_tokens: _Optional[int] = ..., output_tokens: _Optional[int] = ..., cached_input_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., cost: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., unpriced_runs: _Optional[int] = ..., tool_calls: _Optional[int] = ..., tool_errors: _Optional[int] = ..., tool_error_rate: _Optional[float] = ...) -> None: ...

class ErrorCodeCount(_message.Message):
    __slots__ = ("code", "runs")
    CODE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    code: _run_event_pb2.RunErrorCode
    runs: int
    def __init__(self, code: _Optional[_Union[_run_event_pb2.RunErrorCode, str]] = ..., runs: _Optional[int] = ...) -> None: ...

class DurationPercentiles(_message.Message):
    __slots__ = ("count", "p50", "p95", "p99")
    COUNT_FIELD_NUMBER: _ClassVar[int]
    P50_FIELD_NUMBER: _ClassVar[int]
    P95_FIELD_NUMBER: _ClassVar[int]
    P99_FIELD_NUMBER: _ClassVar[int]
    count: int
    p50: _duration_pb2.Duration
    p95: _duration_pb2.Duration
    p99: _duration_pb2.Duration
    def __init__(self, count: _Optional[int] = ..., p50: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., p95: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ..., p99: _Optional[_Union[datetime.timedelta, _duration_pb2.Duration, _Mapping]] = ...) -> None: ...

class ToolStats(_message.Message):
    __slots__ = ("tool", "calls", "errors", "error_rate", "duration")
    TOOL_FIELD_NUMBER: _ClassVar[int]
    CALLS_FIELD_NUMBER: _ClassVar[int]
    ERRORS_FIELD_NUMBER: _ClassVar[int]
    ERROR_RATE_FIELD_NUMBER: _ClassVar[int]
    DURATION_FIELD_NUMBER: _ClassVar[int]
    tool: str
    calls: int
    errors: int
    error_rate: float
    duration: DurationPercentiles
    def __init__(self, tool: _Optional[str] = ..., calls: _Optional[int] = ..., errors: _Optional[int] = ..., error_rate: _Optional[float] = ..., duration: _Optional[_Union[DurationPercentiles, _Mapping]] = ...) -> None: ...

class GetLiveStatsRequest(_message.Message):
    __slots__ = ("minutes",)
    MINUTES_FIELD_NUMBER: _ClassVar[int]
    minutes: int
    def __init__(self, minutes: _Optional[int] = ...) -> None: ...

class GetLiveStatsResponse(_message.Message):
    __slots__ = ("replica", "read_time", "active_runs", "max_active_runs", "leases_held", "queued_runs", "max_queued_runs", "draining", "archive", "recent", "recent_error")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    READ_TIME_FIELD_NUMBER: _ClassVar[int]
    ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_ACTIVE_RUNS_FIELD_NUMBER: _ClassVar[int]
    LEASES_HELD_FIELD_NUMBER: _ClassVar[int]
    QUEUED_RUNS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_RUNS_FIELD_NUMBER: _ClassVar[int]
    DRAINING_FIELD_NUMBER: _ClassVar[int]
    ARCHIVE_FIELD_NUMBER: _ClassVar[int]
    RECENT_FIELD_NUMBER: _ClassVar[int]
    RECENT_ERROR_FIELD_NUMBER: _ClassVar[int]
    replica: str
    read_time: _timestamp_pb2.Timestamp
    active_runs: int
    max_active_runs: int
    leases_held: int
    queued_runs: int
    max_queued_runs: int
    draining: bool
    archive: str
    recent: RecentRunStats
    recent_error: str
    def __init__(self, replica: _Optional[str] = ..., read_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., active_runs: _Optional[int] = ..., max_active_runs: _Optional[int] = ..., leases_held: _Optional[int] = ..., queued_runs: _Optional[int] = ..., max_queued_runs: _Optional[int] = ..., draining: _Optional[bool] = ..., archive: _Optional[str] = ..., recent: _Optional[_Union[RecentRunStats, _Mapping]] = ..., recent_error: _Optional[str] = ...) -> None: ...

class RecentRunStats(_message.Message):
    __slots__ = ("start_time", "end_time", "runs_per_minute", "runs", "completed_runs", "failed_runs", "cancelled_runs", "success_rate", "top_errors", "day_start_time", "runs_today", "cost_today", "unpriced_runs_today")
    START_TIME_FIELD_NUMBER: _ClassVar[int]
    END_TIME_FIELD_NUMBER: _ClassVar[int]
    RUNS_PER_MINUTE_FIELD_NUMBER: _ClassVar[int]
    RUNS_FIELD_NUMBER: _ClassVar[int]
    COMPLETED_RUNS_FIELD_NUMBER: _ClassVar[int]
    FAILED_RUNS_FIELD_NUMBER: _ClassVar[int]
    CANCELLED_RUNS_FIELD_NUMBER: _ClassVar[int]
    SUCCESS_RATE_FIELD_NUMBER: _ClassVar[int]
    TOP_ERRORS_FIELD_NUMBER: _ClassVar[int]
    DAY_START_TIME_FIELD_NUMBER: _ClassVar[int]
    RUNS_TODAY_FIELD_NUMBER: _ClassVar[int]
    COST_TODAY_FIELD_NUMBER: _ClassVar[int]
    UNPRICED_RUNS_TODAY_FIELD_NUMBER: _ClassVar[int]
    start_time: _timestamp_pb2.Timestamp
    end_time: _timestamp_pb2.Timestamp
    runs_per_minute: _containers.RepeatedScalarFieldContainer[int]
    runs: int
    completed_runs: int
    failed_runs: int
    cancelled_runs: int
    success_rate: float
    top_errors: _containers.RepeatedCompositeFieldContainer[ErrorCodeCount]
    day_start_time: _timestamp_pb2.Timestamp
    runs_today: int
    cost_today: _money_pb2.Money
    unpriced_runs_today: int
    def __init__(self, start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., end_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., runs_per_minute: _Optional[_Iterable[int]] = ..., runs: _Optional[int] = ..., completed_runs: _Optional[int] = ..., failed_runs: _Optional[int] = ..., cancelled_runs: _Optional[int] = ..., success_rate: _Optional[float] = ..., top_errors: _Optional[_Iterable[_Union[ErrorCodeCount, _Mapping]]] = ..., day_start_time: _Optional[_Union[datetime.datetime, _timestamp_pb2.Timestamp, _Mapping]] = ..., runs_today: _Optional[int] = ..., cost_today: _Optional[_Union[_money_pb2.Money, _Mapping]] = ..., unpriced_runs_today: _Optional[int] = ...) -> None: ...
