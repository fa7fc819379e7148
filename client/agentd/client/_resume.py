"""What the async and sync run streams share to resume a broken event stream.

A run's events carry a gap-free ``sequence`` from 1 (run_event.proto), and any
replica can replay them after a given sequence (``AgentService.WatchRun``). So a
client that remembers the run id and the last sequence it handed to its caller can
re-attach after a break and give the caller one unbroken sequence: drop what it has
already seen, refuse to skip anything. This module holds that bookkeeping
(``EventLog``), the decision of which errors are a broken stream rather than an
answer (``is_stream_break``) and the backoff with a time budget (``Reconnects``);
the streams themselves do the I/O.
"""

from __future__ import annotations

import random
import time

import grpc

from agentd.client._channel import INITIAL_BACKOFF_S, MAX_BACKOFF_S
from agentd.client.errors import RunStreamError, RunStreamGapError, error_reason
from agentd.v1 import run_event_pb2

TERMINAL_EVENTS = frozenset({"run_completed", "run_failed", "run_cancelled"})

DEFAULT_RESUME_TIMEOUT_S = 30.0
"""How long a stream keeps trying to re-attach after a break before giving up."""

CANCEL_TIMEOUT_S = 5.0
"""How long cancelling a run that the caller walked away from may take (stream or CancelRun)."""

HEALTHY_ATTEMPT_S = 1.0
"""An attempt that stayed open this long was a working connection: a later break starts a new outage."""

_BREAK_MARKERS = ("RST_STREAM", "Stream removed")


def is_stream_break(error: grpc.RpcError) -> bool:
    """True when an error means the *connection* failed, not that the server answered.

    - UNAVAILABLE: the replica went away, refused the stream or is draining.
    - CANCELLED: this client never cancels a call it still reads, so a CANCELLED
      status came from the other side (server stopping, proxy reset).
    - RESOURCE_EXHAUSTED with reason STREAM_LAGGED: the server ended a stream that fell
      too far behind the run's events; a WatchRun after the last event picks it up.
    - INTERNAL/UNKNOWN that say RST_STREAM or "Stream removed": HTTP/2 reset the
      stream under us (a proxy or load balancer dropped it).
    Everything else is an answer and goes to the caller unchanged: DEADLINE_EXCEEDED
    (the caller's time is up), INVALID_ARGUMENT, NOT_FOUND, FAILED_PRECONDITION,
    ALREADY_EXISTS, RESOURCE_EXHAUSTED, PERMISSION_DENIED, ... and any other
    INTERNAL/UNKNOWN (a server bug, which repeating would not fix).
    """
    code = error.code() if callable(getattr(error, "code", None)) else None
    if code in (grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.CANCELLED):
        return True
    if code == grpc.StatusCode.RESOURCE_EXHAUSTED:
        # The server ended a stream that fell too far behind the run: the client is reading
        # now, so re-attaching after its last event is the documented remedy.
        return error_reason(error) == "STREAM_LAGGED"
    if code in (grpc.StatusCode.INTERNAL, grpc.StatusCode.UNKNOWN):
        details = error.details() if callable(getattr(error, "details", None)) else ""
        return any(marker in (details or "") for marker in _BREAK_MARKERS)
    return False


class EventLog:
    """Where the caller is in a run's events: run id, last sequence handed out, ended or not."""

    def __init__(self, run_id: str = "", after_sequence: int = 0) -> None:
        self.run_id = run_id
        self.last_sequence = after_sequence
        self.terminal = False
        # Set when the server does not number its events (sequence 0, an older
        # server): nothing can be deduplicated, so a break cannot be resumed.
        self.unsequenced = False

    @property
    def resumable(self) -> bool:
        return not self.unsequenced

    def admit(self, event: run_event_pb2.RunEvent) -> bool:
        """True to hand ``event`` to the caller; False for a duplicate; raises on a gap or another run's event."""
        run_id, sequence = event.run_id, event.sequence  # (each read of a message field makes a new object)
        if self.run_id and run_id and run_id != self.run_id:
            raise RunStreamError(
                self.run_id, self.last_sequence, f"expected events of run {self.run_id}, got one of {run_id}"
            )
        if sequence == 0:
            self.unsequenced = True
        elif sequence <= self.last_sequence:
            return False
        elif sequence != self.last_sequence + 1:
            raise RunStreamGapError(self.run_id or run_id, self.last_sequence, sequence)
        else:
            self.last_sequence = sequence
        if not self.run_id:
            self.run_id = run_id
        self.terminal = event.WhichOneof("payload") in TERMINAL_EVENTS
        return True

    def gave_up(self, failure: BaseException, budget_s: float) -> RunStreamError:
        """The error for a stream that could not be re-attached within the resume budget (``failure``,
        the last attempt's error, is its ``__cause__``)."""
        if isinstance(failure, RunStreamError):
            return failure
        code = failure.code() if callable(getattr(failure, "code", None)) else None
        detail = failure.details() if callable(getattr(failure, "details", None)) else str(failure)
        what = f"{code.name}: {detail}" if code is not None else (detail or type(failure).__name__)
        return RunStreamError(
            self.run_id, self.last_sequence,
            f"could not re-attach to the event stream of run {self.run_id or '(not yet known)'} after event "
            f"{self.last_sequence} within {budget_s:g}s (resume_timeout_s) or the call's timeout; last error: "
            f"{what}. The run may still be going: watch it again with its run id and last_sequence",
        )

    def ended_early(self) -> RunStreamError:
        """The error for a stream that closed cleanly before the terminal event."""
        return RunStreamError(
            self.run_id, self.last_sequence,
            f"the event stream of run {self.run_id or '(not yet known)'} ended after event {self.last_sequence}"
            " without a terminal event",
        )


class Reconnects:
    """Backoff between re-attach attempts, within a time budget per outage.

    The first retry after a break is immediate (a new call: ``round_robin`` sends it to
    another replica), then 0.05 s doubling to 1 s, each with ±25 % jitter so clients
    cut off together do not come back in lockstep. An outage ends when an event with
    a new sequence arrives or an attempt stays connected for ``HEALTHY_ATTEMPT_S``; if
    one lasts longer than ``budget_s``, ``delay_after`` returns None and the caller
    raises the last failure. The budget is per outage, not per run, so a long run
    can live through any number of separate breaks.
    """

    def __init__(self, budget_s: float = DEFAULT_RESUME_TIMEOUT_S) -> None:
        self.budget_s = budget_s
        self._outage_began: float | None = None
        self._attempt_began: float | None = None
        self._failures = 0

    def attempt(self) -> None:
        """Call as each attempt begins."""
        self._attempt_began = time.monotonic()

    def progressed(self) -> None:
        """Call when an event with a new sequence arrives: the outage, if any, is over."""
        self._outage_began = None
        self._failures = 0

    def delay_after(self, deadline: float | None = None) -> float | None:
        """Seconds to wait before the next attempt, or None when the budget (or ``deadline``) is spent."""
        now = time.monotonic()
        if self._attempt_began is not None and now - self._attempt_began >= HEALTHY_ATTEMPT_S:
            self.progressed()
        if self._outage_began is None:
            self._outage_began = now
        left = self._outage_began + self.budget_s - now
        if deadline is not None:
            left = min(left, deadline - now)
        if left <= 0:
            return None
        if self._failures == 0:
            delay = 0.0
        else:
            delay = min(MAX_BACKOFF_S, INITIAL_BACKOFF_S * 2 ** (self._failures - 1))
            delay *= random.uniform(0.75, 1.25)
        self._failures += 1
        return min(delay, left)
