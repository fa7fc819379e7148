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
