"""Runs as resources: their status, what they run, and the errors of managing them."""

from __future__ import annotations

import enum
import json
import math
from dataclasses import dataclass, field
from typing import Any, Sequence

from agentd.server.runtime.checkpoint import Checkpoint
from agentd.server.runtime.events import Payload, RunCancelled, RunCompleted, RunFailed
from agentd.server.runtime.run_loop import RunInput
from agentd.server.services.validation import quote
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


def split_action_key(key: str) -> tuple[str, str]:
    """(kind, call id) of an action key."""
    kind, _, call_id = key.partition(":")
    return kind, call_id


# What makes two answers for one action key the same answer (a repeat), by kind: the fields
# compared. An approval is the decision (a repeat may word its reason differently; the first
# reason stands); an output is its text and error flag. Other kinds compare every field.
ANSWER_FIELDS: dict[str, tuple[str, ...]] = {"output": ("output", "is_error"), "approval": ("approved",)}


def answer_fields(key: str, action: dict[str, Any]) -> tuple[str, ...]:
    """The fields of ``action`` that make it the answer it is (see ``ANSWER_FIELDS``)."""
    return ANSWER_FIELDS.get(split_action_key(key)[0]) or tuple(sorted(action))


def same_answer(key: str, recorded: dict[str, Any], action: dict[str, Any]) -> bool:
    """True when ``action`` repeats the ``recorded`` answer for ``key``."""
    if split_action_key(key)[0] not in ANSWER_FIELDS:
        return recorded == action
    return all(recorded.get(f) == action.get(f) for f in answer_fields(key, action))


def answer_identity(key: str, action: dict[str, Any]) -> str:
    """``action``'s fields that make it the answer it is, as JSON text: two answers for ``key`` are the
    same answer exactly when their identities are equal texts (what an engine that cannot read the
    fields back compares)."""
    fields = answer_fields(key, action)
    return json.dumps({f: action.get(f) for f in fields}, ensure_ascii=False, separators=(",", ":"), sort_keys=True)


def unanswered(record: RunRecord) -> tuple[str, ...]:
    """The action keys the run waits for and has no answer for, whether it executes or is queued
    between executions; empty once it ended."""
    if record.status.is_terminal or record.checkpoint is None:
        return ()
    return tuple(key for key in record.checkpoint.awaiting if key not in record.actions)


def describe_waits(keys: Sequence[str]) -> str:
    """Action keys in the caller's terms: "a tool output for call 'c1' and an approval for call 'c2'"."""
    parts = []
    for key in keys:
        kind, call_id = split_action_key(key)
        parts.append(f"{_a(_answer_noun(kind))} for call {call_id!r}")
    if not parts:
        return "no answer now"
    return parts[0] if len(parts) == 1 else f"{', '.join(parts[:-1])} and {parts[-1]}"


def check_answers(answers: Sequence[tuple[str, dict[str, Any]]]) -> None:
    """ValueError unless the answers' keys are distinct (what ``RunStore.submit_answers`` takes)."""
    keys = [key for key, _ in answers]
    if len(set(keys)) != len(keys):
        raise ValueError(f"answers repeat an action key: {keys}")


@dataclass(slots=True, frozen=True)
class Answered:
    """What ``RunStore.submit_answers`` did: the run afterwards, and the keys this call recorded
    (the others were repeats of answers the run had; a call the engine retried after its reply
    was lost may report none)."""

    record: RunRecord
    recorded: tuple[str, ...]


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
        self.request_id = request_id
        self.run_id = run_id


class RunNotFoundError(Exception):
    def __init__(self, run_id: str) -> None:
        super().__init__(f"run {run_id!r} does not exist (or ended longer ago than AGENTD_RUN_RETENTION_S, or, on the"
                         " memory run store, beyond AGENTD_RUN_MEMORY_MAX_ENDED_RUNS/_BYTES)")
        self.run_id = run_id


class LeaseLostError(Exception):
    """This replica no longer owns the run (its lease expired and another replica took it, or it was released)."""


# RunNotWaitingError.reason values (a later structured-error layer puts them into error details).
RUN_NOT_WAITING = "RUN_NOT_WAITING"  # an unknown call, the wrong kind of answer for it, or the run ended
ANSWER_CONFLICT = "ANSWER_CONFLICT"  # a different answer for a call that already has one

_ANSWER_NOUNS = {"output": "tool output", "approval": "approval"}


def _answer_noun(kind: str) -> str:
    return _ANSWER_NOUNS.get(kind, f"{kind} answer")


def _a(noun: str) -> str:
    return f"{'an' if noun[:1] in 'aeiou' else 'a'} {noun}"


class RunNotWaitingError(Exception):
    """An answer the run does not take: for a call it is not waiting for (an unknown call, the
    wrong kind of answer for the call, or a run that ended: ``reason`` RUN_NOT_WAITING), or
    different from the answer the call already has (ANSWER_CONFLICT; the first answer stands).

    ``run_id``, ``call_id`` (the refused answer's call), ``waiting_for`` (the call ids the run
    still waits for an answer for, in the order it asked) and ``reason`` are for structured
    error details; the message says the same for a person, in the caller's terms (never the
    internal action keys). ``refusing`` builds it from the run as the store saw it.
    """

    def __init__(
        self,
        message: str = "",
        *,
        run_id: str = "",
        call_id: str = "",
        waiting_for: Sequence[str] = (),
        reason: str = RUN_NOT_WAITING,
    ) -> None:
        if reason not in (RUN_NOT_WAITING, ANSWER_CONFLICT):
            raise ValueError(f"unknown RunNotWaitingError reason {reason!r}")
        super().__init__(message or f"run {run_id} does not take this answer for call {call_id!r}")
        self.run_id: str = run_id
        self.call_id: str = call_id
        self.waiting_for: list[str] = list(waiting_for)
        self.reason: str = reason

    @classmethod
    def refusing(cls, record: RunRecord, key: str, action: dict[str, Any]) -> "RunNotWaitingError":
        """Why ``record`` (read atomically with the refusal) does not take ``action`` for ``key``:
        ANSWER_CONFLICT when the key has a different answer, else RUN_NOT_WAITING."""
        kind, call_id = split_action_key(key)
        run_id = record.run_id
        waits = unanswered(record)
        waiting_for = list(dict.fromkeys(split_action_key(k)[1] for k in waits))
        ended = f" (the run has ended: {record.status.value})" if record.status.is_terminal else ""
        existing = record.actions.get(key)
        if existing is not None and not same_answer(key, existing, action):
            if kind == "approval":
                had = "approved" if existing.get("approved") else "denied"
                now = "approving" if action.get("approved") else "denying"
                text = (f"run {run_id} already has a decision for call {call_id!r}: it was {had}; the first answer "
                        f"stands, so {now} it now is refused{ended}")
            elif kind == "output":
                shown = quote(str(existing.get("output", "")))
                error = " (is_error)" if existing.get("is_error") else ""
                text = (f"run {run_id} already has a tool output for call {call_id!r}: {shown}{error}; the first "
                        f"answer stands, so a different output is refused (a retry must repeat the output and "
                        f"is_error exactly){ended}")
            else:
                text = (f"run {run_id} already has a different answer for call {call_id!r}; the first answer "
                        f"stands{ended}")
            return cls(text, run_id=run_id, call_id=call_id, waiting_for=waiting_for, reason=ANSWER_CONFLICT)
        noun = _answer_noun(kind)
        if record.status.is_terminal:
            text = (f"run {run_id} has ended ({record.status.value}) and takes no new answers (it has no {noun} "
                    f"for call {call_id!r})")
        elif call_id in waiting_for:
            text = (f"run {run_id} is not waiting for {_a(noun)} for call {call_id!r}; it waits for "
                    f"{describe_waits(waits)}")
        else:
            text = f"run {run_id} is not waiting for call {call_id!r}; it waits for {describe_waits(waits)}"
        return cls(text, run_id=run_id, call_id=call_id, waiting_for=waiting_for, reason=RUN_NOT_WAITING)


class ServerDrainingError(Exception):
    pass


class QueueFullError(Exception):
    def __init__(self, limit: int) -> None:
        super().__init__(
            f"{limit} runs are already queued (AGENTD_MAX_QUEUED_RUNS); retry later or add replicas"
        )
        self.limit = limit


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
