"""Errors the client raises when a run ends without a final output."""

from __future__ import annotations

from agentd.v1 import run_event_pb2


class RunError(Exception):
    """A run ended without a final output."""

    def __init__(self, run_id: str, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id


class RunFailedError(RunError):
    def __init__(self, run_id: str, failed: run_event_pb2.RunFailed) -> None:
        code = run_event_pb2.RunErrorCode.Name(failed.code)
        super().__init__(run_id, f"run {run_id} failed ({code}): {failed.message}")
        self.code = failed.code
        self.code_name = code
        self.detail = failed.message


class RunCancelledError(RunError):
    def __init__(self, run_id: str, cancelled: run_event_pb2.RunCancelled) -> None:
        super().__init__(run_id, f"run {run_id} was cancelled: {cancelled.reason}")
        self.reason = cancelled.reason


class RunStreamError(Exception):
    """The client could not follow a run's event stream to its end.

    Raised when a broken stream could not be re-attached within the resume budget
    after it ended without a terminal event, when the server sent another run's
    events, or (as ``RunStreamGapError``) when events went missing. The run itself
    may still be going: ``run_id`` and ``last_sequence`` say where the caller was.
    """

    def __init__(self, run_id: str, last_sequence: int, message: str) -> None:
        super().__init__(message)
        self.run_id = run_id
        self.last_sequence = last_sequence


class RunStreamGapError(RunStreamError):
    """An event arrived whose sequence is beyond the next one expected: events were lost.

    Sequences grow by one with no gaps (see run_event.proto), so this is a server bug
    or a mismatched replica, never a normal outage; it is raised, not retried.
    """

    def __init__(self, run_id: str, last_sequence: int, got: int) -> None:
        super().__init__(
            run_id, last_sequence,
            f"run {run_id}: expected event {last_sequence + 1} after {last_sequence}, got {got}: events were lost",
        )
        self.got = got
