"""StatsService: aggregates over the caller's tenant's ended runs, from the trace store.

The figures are computed where the traces are: by the archive's SQL (SQLite or Postgres,
shared by every replica), or over the memory store's traces when there is no archive
(``TraceStore.stats``). This edge validates the request (one field violation naming the
field), resolves the window's defaults, pages the groups and turns the store's
``GroupStats`` into the contract's messages.

Paging: groups come in (agent, version) order. A page token carries the window the first
page answered (so a window defaulting to "the last 24 hours" does not move between pages)
and the last group it held; it is bound to the tenant and to the request's other fields as
sent. A page also ends early when its groups' series together would pass
``MAX_PAGE_BUCKETS`` (a bound on the answer's size), always holding at least one group.

GetLiveStats: the replica's own state (its ``RunManager``: active runs, leases, capacity,
draining; the shared queue's depth through ``QueueDepth``) and two aggregates of the same
store, over every group of the caller's tenant: the last minutes in minute buckets, and today
(midnight UTC to now) in one day bucket. A trace archive that fails leaves ``recent`` unset with
its error instead of failing the call: a live view must show a replica whose archive is down.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import socket
import time
from typing import TYPE_CHECKING, Callable

import grpc
from google.protobuf import duration_pb2
from google.type import money_pb2

from agentd.server.auth.principal import current_principal
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.services import validation
from agentd.server.services.convert import timestamp_ns
from agentd.server.services.errors import unary_errors
from agentd.server.services.validation import InvalidArgument
from agentd.server.tracing.memory import (
    ANY_VERSION,
    GroupStats,
    InMemoryTraceStore,
    Percentiles,
    StatsFigures,
    StatsQuery,
    ToolFigures,
)
from agentd.server.tracing.store import TraceStore
from agentd.v1 import run_event_pb2
from agentd.v1 import stats_service_pb2 as pb
from agentd.v1 import stats_service_pb2_grpc as pb_grpc

if TYPE_CHECKING:
    from agentd.server.runs.manager import RunManager
    from agentd.server.tracing.capacity import QueueDepth

DEFAULT_WINDOW_NS = 24 * 3600 * 1_000_000_000
DEFAULT_PAGE_SIZE = 20
MAX_PAGE_SIZE = 100
# Buckets a window may span (24 hours of minutes is 1,440, or 1,441 when not on a minute boundary).
MAX_BUCKETS = 1500
# Buckets one page's groups may hold together (about 150 bytes each on the wire at most).
MAX_PAGE_BUCKETS = 10_000
CURRENCY = "USD"

_MINUTE_NS = 60 * 1_000_000_000
BUCKET_NS = {
    pb.TIME_BUCKET_MINUTE: _MINUTE_NS,
    pb.TIME_BUCKET_HOUR: 60 * _MINUTE_NS,
    pb.TIME_BUCKET_DAY: 24 * 60 * _MINUTE_NS,
}
_BUCKET_NAMES = {pb.TIME_BUCKET_MINUTE: "minute", pb.TIME_BUCKET_HOUR: "hour", pb.TIME_BUCKET_DAY: "day"}
_NANOS = 1_000_000_000
_DAY_NS = 24 * 60 * _MINUTE_NS
# GetLiveStats: the recent window's minutes (default, most), the error codes it names, and the
# groups read per archive page (a tenant with more agents costs more pages).
LIVE_DEFAULT_MINUTES = 5
LIVE_MAX_MINUTES = 60
LIVE_TOP_ERRORS = 5
_LIVE_PAGE = 100


class StatsService(pb_grpc.StatsServiceServicer):
    def __init__(
        self,
        store: TraceStore | InMemoryTraceStore,
        *,
        clock: Callable[[], int] = time.time_ns,
        runs: "RunManager | None" = None,
        queue: "QueueDepth | None" = None,
    ) -> None:
        """``runs`` and ``queue``: this replica's runs and the shared queue, for GetLiveStats (without
        them it answers zeros for the live state)."""
        self._store = store if isinstance(store, TraceStore) else TraceStore(store)
        self._clock = clock
        self._runs = runs
        self._queue = queue
        self._archive_id = ""

    @unary_errors
    async def GetStats(self, request: pb.GetStatsRequest, context: grpc.aio.ServicerContext) -> pb.GetStatsResponse:
        bucket = request.bucket or pb.TIME_BUCKET_HOUR
        width = BUCKET_NS.get(bucket)
        if width is None:
            raise InvalidArgument(
                "bucket", f"unknown bucket value {request.bucket}; send TIME_BUCKET_MINUTE, TIME_BUCKET_HOUR or"
                " TIME_BUCKET_DAY (unset: hours)"
            )
        if not 0 <= request.page_size <= MAX_PAGE_SIZE:
            raise InvalidArgument(
                "page_size",
                f"must be between 0 and {MAX_PAGE_SIZE} (0 means {DEFAULT_PAGE_SIZE}), got {request.page_size}",
            )
        size = request.page_size or DEFAULT_PAGE_SIZE
        agent = validation.resource_id("agent", request.agent, "agents") if request.agent else ""
        # Unset: any version; 0 is a version (app-module and file agents').
        agent_version = request.agent_version if request.HasField("agent_version") else None
        if agent_version is not None and agent_version < 0:
            raise InvalidArgument("agent_version", f"must not be negative, got {agent_version}")
        start_set, end_set = request.HasField("start_time"), request.HasField("end_time")
        start = validation.unix_ns("start_time", request.start_time) if start_set else 0
        end = validation.unix_ns("end_time", request.end_time) if end_set else 0
        if start_set and end_set and end <= start:
            raise InvalidArgument("end_time", "must be later than start_time")
        tenant = current_principal().tenant
        # A token continues the listing it came from: the same tenant and the same request fields
        # as sent (an unset time stays unset: the token carries the window the first page resolved).
        scope = "\x00".join([
            tenant, agent, "" if agent_version is None else str(agent_version), str(request.group_by_agent_version),
            str(bucket), str(start) if start_set else "-", str(end) if end_set else "-",
        ])
        cursor = validation.decode_page_token("stats", request.page_token, scope=scope)
        after = None
        if cursor is not None:
            parts = cursor.split(":", 3)
            if len(parts) != 4:
                raise validation.corrupted_token()
            start, end = validation.token_int(parts[0]), validation.token_int(parts[1])
            version = validation.token_int(parts[2].removeprefix("-")) * (-1 if parts[2].startswith("-") else 1)
            after = (validation.check_id("page_token", parts[3]), version)
        else:
            if not end_set:
                end = self._clock()
                if start_set and start >= end:
                    raise InvalidArgument("start_time", "must be in the past (end_time is unset: it means now)")
            if not start_set:
                start = max(end - DEFAULT_WINDOW_NS, 0)
            if end <= start:  # an end_time at the epoch: the default start cannot precede it
                raise InvalidArgument("end_time", "must be later than start_time (1970-01-01T00:00:00Z at the earliest)")
        buckets = (end - 1) // width - start // width + 1
        if buckets > MAX_BUCKETS:
            raise InvalidArgument(
                "bucket", f"the window spans {buckets} {_BUCKET_NAMES[bucket]} buckets; the limit is {MAX_BUCKETS}:"
                " choose wider buckets or a shorter window"
            )
        query = StatsQuery(
            tenant=tenant, start_ns=start, end_ns=end, bucket_ns=width, limit=size, agent=agent,
            agent_version=agent_version, by_version=request.group_by_agent_version, after=after,
        )
        groups, more = await self._store.stats(query)
        kept: list[GroupStats] = []
        held = 0
        for group in groups:
            if kept and held + len(group.buckets) > MAX_PAGE_BUCKETS:
                more = True
                break
            kept.append(group)
            held += len(group.buckets)
        response = pb.GetStatsResponse(
            start_time=timestamp_ns(start),
            end_time=timestamp_ns(end),
            bucket=bucket,
            groups=[_group(group, width, request.group_by_agent_version) for group in kept],
        )
        if more and kept:
            last = kept[-1]
            response.next_page_token = validation.encode_page_token(
                "stats", f"{start}:{end}:{last.agent_version}:{last.agent}", scope=scope
            )
        return response

    @unary_errors
    async def GetLiveStats(
        self, request: pb.GetLiveStatsRequest, context: grpc.aio.ServicerContext
    ) -> pb.GetLiveStatsResponse:
        if not 0 <= request.minutes <= LIVE_MAX_MINUTES:
            raise InvalidArgument(
                "minutes", f"must be between 0 and {LIVE_MAX_MINUTES} (0 means {LIVE_DEFAULT_MINUTES}), got {request.minutes}"
            )
        minutes = request.minutes or LIVE_DEFAULT_MINUTES
        tenant = current_principal().tenant
        now = self._clock()
        response = pb.GetLiveStatsResponse(read_time=timestamp_ns(now), archive=self._archive())
        runs = self._runs
        if runs is not None:
            response.replica = runs.replica_id
            response.active_runs = runs.active_count
            response.max_active_runs = runs.max_active_runs
            response.leases_held = runs.leases_held
            response.max_queued_runs = runs.max_queued_runs
            response.draining = runs.draining
        depth, recent = await asyncio.gather(
            self._queue.read() if self._queue is not None else _none(), self._recent(tenant, now, minutes),
            return_exceptions=True,
        )
        if isinstance(depth, int):
            response.queued_runs = depth
        if isinstance(recent, StoreUnavailableError):
            response.recent_error = str(recent) or "the trace archive is unavailable"
        elif isinstance(recent, BaseException):
            raise recent
        else:
            response.recent.CopyFrom(recent)
        return response

    def _archive(self) -> str:
        """An opaque id of where ``recent`` comes from: the same for replicas sharing the archive."""
        if not self._archive_id:
            archive = self._store.archive
            if archive is None:
                where = f"memory {self._runs.replica_id if self._runs is not None else id(self)}"
            elif "sqlite" in type(archive).__module__:  # a file: shared only on one host
                where = f"sqlite {socket.gethostname()} {archive.location}"
            else:
                where = archive.location
            self._archive_id = hashlib.sha256(where.encode()).hexdigest()[:16]
        return self._archive_id

    async def _recent(self, tenant: str, now: int, minutes: int) -> pb.RecentRunStats:
        first_minute = now // _MINUTE_NS - (minutes - 1)
        start = first_minute * _MINUTE_NS
        day_start = now - now % _DAY_NS
        window, today = await asyncio.gather(
            self._every_group(StatsQuery(tenant=tenant, start_ns=start, end_ns=now, bucket_ns=_MINUTE_NS,
                                         limit=_LIVE_PAGE, max_tools=0)),
            self._every_group(StatsQuery(tenant=tenant, start_ns=day_start, end_ns=now, bucket_ns=_DAY_NS,
                                         limit=_LIVE_PAGE, max_tools=0)),
        )
        per_minute = [0] * minutes
        completed = failed = cancelled = 0
        errors: dict[int, int] = {}
        for group in window:
            totals = group.totals
            completed += totals.completed
            failed += totals.failed
            cancelled += totals.cancelled
            for code, count in totals.errors.items():
                number = _error_code(code)
                errors[number] = errors.get(number, 0) + count
            for index, figures in group.buckets:
                if 0 <= index - first_minute < minutes:
                    per_minute[index - first_minute] += figures.runs
        total = sum(group.totals.runs for group in window)
        top = sorted(errors.items(), key=lambda item: (-item[1], item[0]))[:LIVE_TOP_ERRORS]
        return pb.RecentRunStats(
            start_time=timestamp_ns(start),
            end_time=timestamp_ns(now),
            runs_per_minute=per_minute,
            runs=total,
            completed_runs=completed,
            failed_runs=failed,
            cancelled_runs=cancelled,
            success_rate=_rate(completed, total),
            top_errors=[pb.ErrorCodeCount(code=code, runs=count) for code, count in top],  # type: ignore[arg-type]
            day_start_time=timestamp_ns(day_start),
            runs_today=sum(group.totals.runs for group in today),
            cost_today=_money(sum(group.totals.cost_nanos for group in today)),
            unpriced_runs_today=sum(group.totals.unpriced_runs for group in today),
        )

    async def _every_group(self, query: StatsQuery) -> list[GroupStats]:
        """Every group of ``query``'s window, page after page."""
        groups: list[GroupStats] = []
        while True:
            page, more = await self._store.stats(query)
            groups += page
            if not more or not page:
                return groups
            query = dataclasses.replace(query, after=(page[-1].agent, page[-1].agent_version))


async def _none() -> None:
    return None


def _group(group: GroupStats, width: int, by_version: bool) -> pb.AgentStats:
    message = pb.AgentStats(
        agent=f"agents/{group.agent}",
        totals=_figures(group.totals),
        buckets=[pb.StatsBucket(start_time=timestamp_ns(index * width), stats=_figures(figures))
                 for index, figures in group.buckets],
        tools=[_tool(tool) for tool in group.tools],
        omitted_tools=max(group.tool_count - len(group.tools), 0),
    )
    if by_version and group.agent_version != ANY_VERSION:
        message.agent_version = group.agent_version
    return message


def _rate(part: int, whole: int) -> float:
    return part / whole if whole else 0.0


def _error_code(code: str) -> int:
    """The RunErrorCode of a stored code ("model_error"); UNSPECIFIED for none or one the contract lacks."""
    name = f"RUN_ERROR_CODE_{code.upper()}"
    return run_event_pb2.RunErrorCode.Value(name) if code and name in run_event_pb2.RunErrorCode.keys() else 0


def _money(nanos: int) -> money_pb2.Money:
    """US dollars from whole nano-dollars (never negative: costs are)."""
    return money_pb2.Money(currency_code=CURRENCY, units=nanos // _NANOS, nanos=nanos % _NANOS)


def _duration(ns: int) -> duration_pb2.Duration:
    duration = duration_pb2.Duration()
    duration.FromNanoseconds(ns)
    return duration


def _percentiles(values: Percentiles, ns_per_unit: float) -> pb.DurationPercentiles:
    message = pb.DurationPercentiles(count=values.count)
    if values.count:
        for name in ("p50", "p95", "p99"):
            value = getattr(values, name)
            if value is not None:
                getattr(message, name).CopyFrom(_duration(round(value * ns_per_unit)))
    return message


def _figures(figures: StatsFigures) -> pb.RunStats:
    codes: dict[int, int] = {}
    for code, runs in figures.errors.items():
        number = _error_code(code)
        codes[number] = codes.get(number, 0) + runs
    return pb.RunStats(
        runs=figures.runs,
        completed_runs=figures.completed,
        failed_runs=figures.failed,
        cancelled_runs=figures.cancelled,
        success_rate=_rate(figures.completed, figures.runs),
        errors=[pb.ErrorCodeCount(code=code, runs=runs)  # type: ignore[arg-type]
                for code, runs in sorted(codes.items(), key=lambda item: (-item[1], item[0]))],
        duration=_percentiles(figures.duration_ns, 1),
        time_to_first_token=_percentiles(figures.ttft_ms, 1_000_000),
        input_tokens=figures.input_tokens,
        output_tokens=figures.output_tokens,
        cached_input_tokens=figures.cached_input_tokens,
        reasoning_tokens=figures.reasoning_tokens,
        cost=_money(figures.cost_nanos),
        unpriced_runs=figures.unpriced_runs,
        tool_calls=figures.tool_calls,
        tool_errors=figures.tool_errors,
        tool_error_rate=_rate(figures.tool_errors, figures.tool_calls),
    )


def _tool(tool: ToolFigures) -> pb.ToolStats:
    return pb.ToolStats(
        tool=tool.tool,
        calls=tool.calls,
        errors=tool.errors,
        error_rate=_rate(tool.errors, tool.calls),
        duration=_percentiles(tool.duration_ns, 1),
    )
