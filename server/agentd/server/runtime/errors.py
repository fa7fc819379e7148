"""Exceptions the runtime raises across module boundaries.

Services map them to gRPC statuses; the agent loop maps model and store failures to
``RunFailed`` events. Messages are written for the person who must fix the cause.
"""

from agentd.server.tenancy import local


class AgentdError(Exception):
    """Base of agentd's own errors."""


class ModelUnavailableError(AgentdError):
    """The model endpoint could not be reached, timed out, or kept failing (429/5xx) after retries."""


class ModelError(AgentdError):
    """The model endpoint refused the request (bad key, bad request, unknown model...)."""


class SessionNotFoundError(AgentdError):
    def __init__(self, session_id: str) -> None:
        # The id as the caller knows it: another tenant's session reads exactly like a missing one.
        super().__init__(f"session {local(session_id)!r} does not exist")
        self.session_id = session_id


class SessionExistsError(AgentdError):
    def __init__(self, session_id: str) -> None:
        super().__init__(f"session {local(session_id)!r} already exists")
        self.session_id = session_id


class StoreUnavailableError(AgentdError):
    """The session store's backend failed (disk, database or network); nothing was written."""


class AppConfigError(AgentdError):
    """The app module's agents or tools are inconsistent (raised at load, never mid-run)."""


class TemplateKeyError(AgentdError):
    """An agent's instructions template names context keys the run's context does not hold.

    Raised when the instructions are rendered (every turn); the agent loop ends the run with
    ``RunFailed`` carrying this message. It names the keys, never the context's values.
    """

    def __init__(self, agent: str, missing: list[str], given: list[str]) -> None:
        wanted = ", ".join(repr(key) for key in missing)
        have = ", ".join(repr(key) for key in given[:20]) + (", ..." if len(given) > 20 else "") or "none"
        super().__init__(
            f"agent {agent!r}'s instructions use the context key(s) {wanted}, which the run's context "
            f"does not hold (its keys: {have}); pass them in the request's context"
        )
        self.agent = agent
        self.missing = list(missing)
