"""Runs as resources: their status, what they run, and the errors of managing them."""

from __future__ import annotations

import enum
import math
from dataclasses import dataclass, field
from typing import Any

from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.events import Payload, RunCancelled, RunCompleted, RunFailed
from agentd.server.runtime.run_loop import RunInput
from agentd.server.tenancy import local


class RunStatus(str, enum.Enum):
    QUEUED = "queued"  # waiting for a replica with capacity, or behind its session's earlier runs
    RUNNING = "running"  # a replica holds its lease and executes it
    REQUIRES_ACTION = "requires_action"  # reserved: waiting for the caller (caller-executed tools, approvals)
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def is_terminal(self) -> bool:
        return self in TERMINAL_STATUSES


TERMINAL_STATUSES = frozenset({RunStatus.COMPLETED, RunStatus.FAILED, RunStatus.CANCELLED})


_STATUS_OF = {RunCompleted: RunStatus.COMPLETED, RunFailed: RunStatus.FAILED, RunCancelled: RunStatus.CANCELLED}


def terminal_status(payload: Payload) -> RunStatus:
    """The status a terminal payload gives its run."""
    try:
        return _STATUS_OF[type(payload)]  # type: ignore[index]
    except KeyError:
        raise ValueError(f"{type(payload).__name__} is not a terminal event") from None


class SessionPolicy(str, enum.Enum):
    """What a new run does when its session already has an active (queued or running) run."""

    REJECT = "reject"  # SessionBusyError
    ENQUEUE = "enqueue"  # queued behind; a session's runs execute one at a time in creation order


@dataclass(slots=True)
class RunRecord:
    run_id: str
    spec: RunInput
    status: RunStatus
    create_time: float  # unix seconds
    update_time: float
    owner: str = ""  # the replica executing it (RUNNING only)
    attempt: int = 0  # executions started so far; the fencing token of the current one
    lease_expires: float = 0.0  # unix seconds; RUNNING only
    last_sequence: int = 0  # newest event in the run's log
    checkpoint: Checkpoint | None = None
    result: Payload | None = None  # the terminal payload once the run ended
    cancel_reason: str = ""  # set by CancelRun; the executing replica ends the run
    trace_id: str = ""
    # What the caller sent for the run's tool calls, by action key (see ``action_key``):
    # {"output": str, "is_error": bool} for a caller-executed tool, {"approved": bool,
    # "reason": str} for an approval. The first answer for a key wins.
    actions: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Why the run was last put back in the queue after an execution began: LEASE_EXPIRED (its
    # replica stopped renewing) or HANDED_OFF (drained); empty before that. A replica that
    # claims the run reports it in its RunResumed event.
    requeue_reason: str = ""

    @property
    def awaiting(self) -> tuple[str, ...]:
        """Action keys the run waits for and has not received (empty unless it requires action)."""
        if self.status is not RunStatus.RUNNING or self.checkpoint is None:
            return ()
        return tuple(key for key in self.checkpoint.awaiting if key not in self.actions)

    @property
    def visible_status(self) -> RunStatus:
        """The status callers see: a running run waiting for them requires action."""
        return RunStatus.REQUIRES_ACTION if self.awaiting else self.status

    @property
    def session_id(self) -> str | None:
        return self.spec.session_id


# RunRecord.requeue_reason values (and RunResumed.reason, as run_event.proto documents them).
LEASE_EXPIRED = "lease expired"
HANDED_OFF = "handed off"


def action_key(kind: str, call_id: str) -> str:
    """The key of one answer the caller owes a run: ``approval:<call id>`` or ``output:<call id>``."""
    return f"{kind}:{call_id}"


@dataclass(slots=True, frozen=True)
class CreatedRun:
    record: RunRecord
    created: bool  # False: the request id named an existing run, which is returned unchanged


@dataclass(slots=True, frozen=True)
class RenewOutcome:
    lost: frozenset[str]  # runs whose lease this replica no longer holds: stop executing them
    cancel: dict[str, str]  # runs someone asked to cancel -> reason


@dataclass(slots=True, frozen=True)
class Control:
    """A message for whichever replica executes ``run_id`` (published on the ControlBus)."""

    run_id: str
    kind: str  # "cancel", or "action" (the caller answered; ``reason`` holds the action key)
    reason: str = ""


class SessionBusyError(Exception):
    def __init__(self, session_id: str, run_id: str) -> None:
        super().__init__(
            f"session {local(session_id)!r} already has an active run ({run_id}); wait for it to finish, cancel it, "
            "or start with session_policy=ENQUEUE to queue behind it"
        )
        self.session_id = session_id
        self.run_id = run_id


class DuplicateRunError(Exception):
    def __init__(self, request_id: str, run_id: str, status: str) -> None:
        going = "which is still going" if status in ("queued", "running", "requires_action") else f"which is {status}"
        super().__init__(
            f"request_id {local(request_id)!r} already started run {run_id}, {going}; "
            "follow it with WatchRun, or use a new request_id for a new run"
        )
        self.run_id = run_id


class RunNotFoundError(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist (or ended longer ago than AGENTD_RUN_RETENTION_S, or, on the"
                         " memory run store, beyond AGENTD_RUN_MEMORY_MAX_ENDED_RUNS/_BYTES)")


class LeaseLostError(Exception):
    """This replica no longer owns the run (its lease expired and another replica took it, or it was released)."""


class RunNotWaitingError(Exception):
    """An answer for a tool call the run is not waiting for (ended run, unknown call, answered twice)."""


class ServerDrainingError(Exception):
    pass


class QueueFullError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} runs are already queued (AGENTD_MAX_QUEUED_RUNS); retry later or add replicas"
        )


# The settings a TenantLimitError names (``TenantLimitError.limit_name``).
TENANT_MAX_ACTIVE_RUNS = "AGENTD_TENANT_MAX_ACTIVE_RUNS"
TENANT_MAX_QUEUED_RUNS = "AGENTD_TENANT_MAX_QUEUED_RUNS"
TENANT_START_RATE = "AGENTD_TENANT_START_RATE"


@dataclass(slots=True, frozen=True)
class TenantLimits:
    """Per-tenant limits ``RunStore.create_run`` checks atomically with the creation, across every
    replica sharing the store (0: no limit).

    - ``max_active``: the tenant's unfinished runs (QUEUED, RUNNING, waiting for the caller),
      wherever they are: in the queue, behind their session, executing.
    - ``max_queued``: the tenant's runs waiting in the shared queue (claimable QUEUED runs, what
      ``max_queued`` bounds for everyone); checked only for a run that would join it.
    - ``start_rate`` / ``start_burst``: a token bucket per tenant, ``start_burst`` tokens, refilled at
      ``start_rate`` per second; each created run takes one. A start refused for any reason
      takes none. ``start_burst`` 0 means ``max(1, ceil(start_rate))``.
    """

    max_active: int = 0
    max_queued: int = 0
    start_rate: float = 0.0
    start_burst: int = 0

    def __post_init__(self) -> None:
        if self.max_active < 0 or self.max_queued < 0 or self.start_burst < 0:
            raise ValueError(f"tenant limits must be 0 (none) or more: {self}")
        if not (math.isfinite(self.start_rate) and self.start_rate >= 0):
            raise ValueError(f"the tenant start rate must be 0 (none) or a positive number, got {self.start_rate}")
        if self.start_burst == 0 and self.start_rate > 0:
            object.__setattr__(self, "start_burst", max(1, math.ceil(self.start_rate)))

    @property
    def enabled(self) -> bool:
        return bool(self.max_active or self.max_queued or self.start_rate)


class TenantLimitError(Exception):
    """A per-tenant limit refused a new run (nothing was created). ``limit`` is the setting's value;
    ``retry_after_s`` says when a start would be allowed (the rate limit only)."""

    def __init__(
        self, limit_name: str, tenant: str, limit: float, retry_after_s: float | None = None, *, burst: int = 0
    ) -> None:
        shown = str(int(limit)) if float(limit).is_integer() else f"{limit:g}"
        if limit_name == TENANT_MAX_ACTIVE_RUNS:
            text = (
                f"tenant {tenant!r} already has {shown} unfinished runs (queued, running or waiting for the "
                f"caller), the limit {limit_name}; wait for one to end or cancel one"
            )
        elif limit_name == TENANT_MAX_QUEUED_RUNS:
            text = (
                f"tenant {tenant!r} already has {shown} runs waiting in the queue, the limit {limit_name}; "
                "wait for one to start or cancel one, then retry"
            )
        else:
            wait = f"retry in {retry_after_s:.2f}s" if retry_after_s is not None else "retry later"
            text = (
                f"tenant {tenant!r} starts runs faster than {limit_name}={shown} per second allows"
                f"{f' (bursts of {burst}, AGENTD_TENANT_START_BURST)' if burst else ''}; {wait}"
            )
        super().__init__(text)
        self.limit_name = limit_name
        self.tenant = tenant
        self.limit = limit
        self.retry_after_s = retry_after_s
