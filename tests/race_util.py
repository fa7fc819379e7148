"""What the cancel-race and takeover tests share: an app whose tool records every start and
can be held, in-process replicas on one run store, and a way to "kill" one of them.

The replicas are real servers (gRPC, run store on a real Redis or Postgres) in the test's
process, so a test can stop one at an exact point: ``Crash.kill()`` makes a replica behave
as if its process died there (no store call it makes from then on reaches the store, so
its leases lapse and its writes never land), without racing a signal against a timer.
"""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Awaitable, Callable

from agentd.client import AgentdClient
from agentd.server import Agent, App, RunContext, function_tool
from agentd.server.models.openai_chat import OpenAIProvider
from agentd.server.runs.records import LeaseLostError
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.serve import RunningServer, start_server
from agentd.server.settings import Settings
from agentd.testing import ScriptedOpenAIServer
from agentd.v1 import agent_service_pb2 as pb
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema
from tests.backends_redis import REDIS_URL, delete_prefix, new_prefix

MODEL = "racer"  # the scripted model the agent asks (ScriptedOpenAIServer.set_script(MODEL, ...))


@dataclass
class Start:
    label: str
    call_id: str
    run_id: str
    durable: bool | None = None  # the turn that asked for the call was durable when it started


@dataclass
class ToolBook:
    """Every execution of the ``act`` tool, and the means to hold one."""

    starts: list[Start] = field(default_factory=list)
    finishes: list[tuple[str, str]] = field(default_factory=list)  # (label, call id)
    # Labels whose first execution waits until ``release`` is set (a tool still running).
    hold: set[str] = field(default_factory=set)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    # Called as a tool starts, before it does anything else (may await).
    on_start: Callable[[Start], Awaitable[None]] | None = None

    def labels(self) -> list[str]:
        return [s.label for s in self.starts]

    def starts_of(self, label: str) -> list[Start]:
        return [s for s in self.starts if s.label == label]


book = ToolBook()


def reset_book() -> ToolBook:
    global book
    book = ToolBook()
    return book


@function_tool
async def act(ctx: RunContext, label: str) -> str:
    """Do something with a side effect (records each execution).

    Args:
        label: What to do.
    """
    entry = Start(label, getattr(ctx, "call_id", ""), ctx.run_id)
    book.starts.append(entry)
    book.started.set()
    if book.on_start is not None:
        await book.on_start(entry)
    if label in book.hold and book.starts_of(label)[0] is entry:
        await book.release.wait()
    book.finishes.append((label, entry.call_id))
    return f"{label} done"


racer = Agent(name="racer", model=MODEL, instructions="Do what is asked, with the act tool.", tools=[act])
app = App(agents=[racer])


# --- stores and servers -----------------------------------------------------------------


@asynccontextmanager
async def shared_stores(engine: str, *, sessions: bool = False) -> AsyncIterator[dict[str, Any]]:
    """Settings for a fresh namespace of ``engine`` (memory, redis, postgres); with ``sessions``
    the session store lives there too, so every replica given these settings shares it."""
    if engine == "memory":
        yield {"run_store": "memory", **({"store": "memory"} if sessions else {})}
    elif engine == "redis":
        prefix = new_prefix()
        try:
            yield {"run_store": "redis", "redis_url": REDIS_URL, "redis_prefix": prefix,
                   **({"store": "redis"} if sessions else {})}
        finally:
            await delete_prefix(prefix)
    elif engine == "postgres":
        schema = new_schema()
        async with dropped_afterwards(schema):
            yield {"run_store": "postgres", "postgres_url": POSTGRES_URL, "postgres_schema": schema,
                   **({"store": "postgres"} if sessions else {})}
    else:
        raise ValueError(engine)


@dataclass
class Replica:
    name: str
    server: RunningServer
    client: AgentdClient

    @property
    def store(self) -> Any:
        return self.server.runs.store


async def start_replica(model: ScriptedOpenAIServer, tmp_path: Path, name: str, **settings: Any) -> Replica:
    defaults: dict[str, Any] = dict(
        port=0, store="sqlite", sqlite_path=tmp_path / f"{name}.db", trace_store="memory", tool_timeout_s=30,
        shutdown_grace_s=0, replica_id=name,
    )
    config = Settings(**{**defaults, **settings})
    provider = OpenAIProvider(api_key="test-key", base_url=model.base_url, timeout_s=10, max_retries=0)
    server = await start_server(config, app, models=provider)
    return Replica(name, server, AgentdClient(server.target, resume=False))


async def stop_replica(replica: Replica) -> None:
    await replica.client.close()
    await replica.server.stop(grace_s=0)


# --- runs ---------------------------------------------------------------------------------


def start_message(input: str = "go", **fields: Any) -> pb.StartRun:
    return pb.StartRun(agent="agents/racer", input=input, **fields)


async def watch(client: AgentdClient, run_id: str, timeout_s: float = 20.0) -> list:
    """The run's whole log, up to its terminal event (bounded: a hang fails the test)."""
    async def read() -> list:
        call = client.agents.WatchRun(pb.WatchRunRequest(name=f"runs/{run_id}"))
        return [response.event async for response in call]

    return await asyncio.wait_for(read(), timeout_s)


def kinds(events: list) -> list[str]:
    return [e.WhichOneof("payload") for e in events]


def model_requests(model: ScriptedOpenAIServer) -> int:
    return sum(1 for body in model.requests if body.get("model") == MODEL)


# --- killing a replica in process -----------------------------------------------------------

_STORE_CALLS = (
    "create_run", "get_run", "list_runs", "active_run", "claim", "renew", "record_progress", "finish", "release",
    "requeue_expired", "cancel", "submit_action", "sweep", "read_events", "wait_events",
)
_WRITES = ("record_progress", "finish")


class Crash:
    """Play the death of a replica's process: after ``kill()`` every run store call the replica
    makes waits until ``end()`` (the test's clean-up) and then fails, so its leases lapse and
    nothing it does afterwards reaches the store. Its tools are left where they are (a test
    holding one keeps it held); the replica's gRPC server keeps answering, but tests only
    talk to the survivors."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self.dead = False
        self._ended = asyncio.Event()
        store = replica.store
        for name in _STORE_CALLS:
            setattr(store, name, self._guarded(name, getattr(store, name)))

    def _guarded(self, name: str, real: Callable[..., Awaitable[Any]]) -> Callable[..., Awaitable[Any]]:
        async def call(*args: Any, **kwargs: Any) -> Any:
            await self.checkpoint(name)
            reply = await real(*args, **kwargs)
            await self.checkpoint(name)  # a call in flight at the kill: done in the store, its reply lost
            return reply

        return call

    async def checkpoint(self, name: str = "record_progress") -> None:
        """Where a dead replica stops: wait for the end, then fail as the engine would."""
        if not self.dead:
            return
        await self._ended.wait()
        if name in _WRITES:
            raise LeaseLostError("the replica was killed")
        raise StoreUnavailableError("the replica was killed")

    def kill(self) -> None:
        self.dead = True
        # Its background work dies with it: no claim in flight may take the run it is losing.
        for task in self.replica.server.runs._tasks:
            task.cancel()

    def end(self) -> None:
        self._ended.set()


def intercept(store: Any, name: str, hook: Callable[..., Awaitable[Any]]) -> None:
    """Replace ``store.name`` with ``hook(real, *args, **kwargs)``."""
    real = getattr(store, name)

    async def call(*args: Any, **kwargs: Any) -> Any:
        return await hook(real, *args, **kwargs)

    setattr(store, name, call)


async def until(predicate: Callable[[], bool], timeout_s: float = 10.0) -> None:
    """Yield to the loop until ``predicate()`` (for state the test cannot await directly)."""
    deadline = time.monotonic() + timeout_s
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out waiting for a condition")
        await asyncio.sleep(0.005)
