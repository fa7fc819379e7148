"""Runs answered from the result cache, and completed runs kept in it.

An agent opts in with ``Agent(cache=ResultCaching(ttl_s, allow_tools))`` (``cache`` in a
definition); ``runtime.agent.ResultCaching`` has the rules. The run loop
(``AgentRunner.result_cache``) calls two hooks of ``CachedRuns``:

- ``replay(run, starting, sink)`` as a new run's execution begins (not a takeover), once its
  agent version resolved. When the run may be cached (``plan``) and the cache holds an entry for
  its request, it emits ``RunStarted`` and ``RunCompleted`` marked ``cached`` and returns True:
  the run is complete. It is still a run like any other: it was created in the run store (an id,
  a request id, tenant limits), its two events are written to its log by its ``ActiveRun`` as
  any run's are, and ``GetRun``/``WatchRun`` read it from any replica. It reads no history,
  calls no model, runs no tool and no guardrail, and records no trace: its events carry the
  trace id of the run that produced the entry. Otherwise (a miss) it returns False and the run
  executes.
- ``store(run, starting, completed, sink)`` as a run is about to emit its ``RunCompleted`` (its
  output passed its guardrails and was checkpointed): the end of the run goes into the cache
  *before* the run is seen to complete, so a caller that repeats the request once it saw the
  first one complete gets the hit. Failed, cancelled and tripped runs never get there; nor does
  a run that is taken over after its final checkpoint (it completes without storing).

A cache outage never fails a run: a lookup waits at most ``timeout_s`` (then, or when the
store fails, it is a miss), and a store too (then the run goes on and the write finishes in
the background). Both are logged. Hits and misses are counted in ``agentd.cache.lookups``
(``tracing.metrics.CacheMetrics``) and in the cache's ``counts``; runs that may not be cached
are not looked up, so they count in neither.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from agentd.server.cache.base import CachedResult, ResultCache
from agentd.server.cache.key import agents_fingerprint, request_key
from agentd.server.cache.upkeep import CacheSweeper
from agentd.server.runtime.agent import CompiledAgent
from agentd.server.runtime.errors import AgentdError, StoreUnavailableError
from agentd.server.runtime.events import RunCancelled, RunCompleted, RunStarted
from agentd.server.runtime.usage import Usage

if TYPE_CHECKING:
    from agentd.server.agents.catalog import AgentCatalog
    from agentd.server.runtime.run_loop import EventSink, RunInput
    from agentd.server.tracing.metrics import CacheMetrics

log = logging.getLogger("agentd.cache")

__all__ = ["MAX_GRAPH", "CachedRuns"]

# The most agents a run's handoff graph may hold for it to be cached (beyond: never cached).
MAX_GRAPH = 256
# Distinct (agent, reason) refusals logged once each, at most this many.
_MAX_REFUSALS_LOGGED = 1024


@dataclass(slots=True, frozen=True)
class _Plan:
    """How a run is cached: its request key and its agent's TTL."""

    key: str
    ttl_s: float


class CachedRuns:
    """The result cache's hooks into runs (see the module docstring)."""

    def __init__(
        self,
        cache: ResultCache,
        agents: "AgentCatalog",
        *,
        metrics: "CacheMetrics | None" = None,
        timeout_s: float = 1.0,
        sweep_interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.cache = cache
        self._agents = agents
        self.metrics = metrics
        self.timeout_s = timeout_s
        #: Unix seconds now: entries' times and expiry (tests move it to expire entries).
        self.clock = clock
        self.sweeper = CacheSweeper(cache, interval_s=sweep_interval_s, clock=lambda: self.clock())
        self._plans: weakref.WeakKeyDictionary[Any, _Plan] = weakref.WeakKeyDictionary()
        self._writes: set[asyncio.Future[None]] = set()
        self._refusals: set[tuple[str, str, int, str]] = set()

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        self.sweeper.start()

    async def close(self) -> None:
        """Stop sweeping, let writes in flight finish (briefly), close the cache."""
        await self.sweeper.stop()
        if self._writes:
            await asyncio.wait(set(self._writes), timeout=max(self.timeout_s, 1.0))
        await self.cache.close()

    # -- which runs ------------------------------------------------------------------------

    def plan(self, run: "RunInput", starting: CompiledAgent) -> _Plan | None:
        """How ``run`` is cached, or None when it may not be (``ResultCaching``'s rules)."""
        policy = starting.agent.cache
        if policy is None or run.session_id is not None:
            return None
        graph: dict[str, CompiledAgent] = {starting.name: starting}
        pending = list(starting.agent.handoff_names)
        while pending:
            name = pending.pop()
            if name in graph:
                continue
            if len(graph) >= MAX_GRAPH:
                self._refused(run, "it can hand off to more than %d agents" % MAX_GRAPH)
                return None
            try:
                target = self._agents.handoff(run.tenant, name)
            except AgentdError:  # a target that is gone: the run fails if it hands off; nothing to cache
                return None
            graph[name] = target
            pending.extend(target.agent.handoff_names)
        for compiled in graph.values():
            refusal = compiled.agent.cache_refusal(policy.allow_tools)
            if refusal is not None:
                whose = "it" if compiled is starting else f"agent {compiled.name!r}, which it can hand off to,"
                self._refused(run, f"{whose} cannot be cached: {refusal}")
                return None
        try:
            key = request_key(
                tenant=run.tenant, agent=run.agent, version=run.agent_version,
                fingerprint=agents_fingerprint(graph.values()), input=run.input,
                input_items=[item.to_dict() for item in run.input_items], context=run.context,
                max_turns=run.max_turns,
            )
        except (TypeError, ValueError) as exc:  # a context JSON cannot hold (never from the API)
            log.debug("run %s: not cached: its request has no key (%s)", run.run_id, exc)
            return None
        return _Plan(key, float(policy.ttl_s))

    def _refused(self, run: "RunInput", why: str) -> None:
        marker = (run.tenant, run.agent, run.agent_version, why)
        if marker in self._refusals or len(self._refusals) >= _MAX_REFUSALS_LOGGED:
            return
        self._refusals.add(marker)
        log.warning("agent %r (version %d) opts into result caching, but its runs are never cached: %s",
                    run.agent, run.agent_version, why)

    # -- hooks -----------------------------------------------------------------------------

    async def replay(self, run: "RunInput", starting: CompiledAgent, sink: "EventSink") -> bool:
        """Complete ``run`` from the cache (True), or leave it to execute (False)."""
        if starting.agent.cache is None:  # most agents: nothing to do
            return False
        began = time.perf_counter()
        try:
            plan = self.plan(run, starting)
        except Exception:  # a bug here must not cost the run
            log.exception("run %s: result cache lookup skipped", run.run_id)
            return False
        if plan is None:
            return False
        try:
            self._plans[sink] = plan  # what store() uses, so a miss is hashed once
        except TypeError:  # a sink without weak references: store() computes it again
            pass
        result: CachedResult | None = None
        try:
            async with asyncio.timeout(self.timeout_s):
                result = await self.cache.get(run.tenant, plan.key, now=self.clock())
        except asyncio.CancelledError:
            # Cancelled while looking up: the run ends here, as the loop ends a cancelled run.
            reason = getattr(sink, "cancel_reason", "") or "cancelled"
            sink.emit(RunCancelled(reason, Usage(), 0))
            return True
        except TimeoutError:
            log.warning("run %s: result cache lookup took over %.2fs (%s); running it", run.run_id,
                        self.timeout_s, self.cache.location)
        except StoreUnavailableError as exc:
            log.warning("run %s: result cache lookup failed (%s); running it", run.run_id, exc)
        except Exception:
            log.exception("run %s: result cache lookup failed; running it", run.run_id)
        if self.metrics is not None:
            self.metrics.lookup(starting.name, result is not None)
        if result is None:
            return False
        if result.trace_id:
            sink.trace_id = result.trace_id
        sink.emit(RunStarted(starting.name, "", 0, run.request_id, 0, run.agent_version, cached=True))
        sink.emit(RunCompleted(result.final_output, result.last_agent, result.usage.copy(), result.turns,
                               time.perf_counter() - began, cached=True))
        log.debug("run %s answered from the result cache (entry of run %s)", run.run_id, result.run_id)
        return True

    async def store(self, run: "RunInput", starting: CompiledAgent, completed: RunCompleted, sink: "EventSink") -> None:
        """Keep the end of ``run``, about to complete with ``completed``, when it may be cached."""
        if starting.agent.cache is None:  # most agents: nothing to do
            return
        try:
            plan = self._plans.pop(sink, None)
        except TypeError:
            plan = None
        if plan is None:
            try:
                plan = self.plan(run, starting)  # (a run resumed on this replica, or a sink without weakrefs)
            except Exception:
                log.exception("run %s: its result is not cached", run.run_id)
                return
        if plan is None or completed.cached:
            return
        now = self.clock()
        result = CachedResult(completed.final_output, completed.last_agent, completed.usage.copy(), completed.turns,
                              run.run_id, getattr(sink, "trace_id", ""), now)
        write = asyncio.ensure_future(self._put(run, plan, result, now))
        self._writes.add(write)
        write.add_done_callback(self._writes.discard)
        try:
            await asyncio.wait({write}, timeout=self.timeout_s)  # past it, the write goes on without the run
        except asyncio.CancelledError:
            write.cancel()  # the run ends cancelled: not kept (unless the write was through already)
            raise

    async def _put(self, run: "RunInput", plan: _Plan, result: CachedResult, now: float) -> None:
        try:
            stored = await self.cache.put(run.tenant, plan.key, result, ttl_s=plan.ttl_s, now=now)
        except StoreUnavailableError as exc:
            log.warning("run %s: its result was not cached (%s)", run.run_id, exc)
        except (TypeError, ValueError) as exc:
            log.warning("run %s: its result was not cached: %s", run.run_id, exc)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("run %s: its result was not cached", run.run_id)
        else:
            if not stored:
                log.info("run %s: its result was not cached: larger than AGENTD_RESULT_CACHE_MAX_ENTRY_BYTES (%d)",
                         run.run_id, self.cache.max_entry_bytes)


async def open_cached_runs(settings: Any, agents: "AgentCatalog", trace_provider: Any = None) -> CachedRuns | None:
    """The result cache the settings select (beside the sessions), opened, with its hooks; None
    when ``AGENTD_RESULT_CACHE`` is off, or when the cache cannot open (logged: the server then
    runs without it, every run executing, rather than not at all)."""
    if not settings.result_cache:
        return None
    from agentd.server.cache.factory import build_result_cache

    meter_provider = getattr(trace_provider, "meter_provider", None)
    metrics = None
    if meter_provider is not None:
        from agentd.server.tracing.metrics import CacheMetrics

        metrics = CacheMetrics(meter_provider)
    cache = build_result_cache(settings)
    try:
        await cache.open()
    except StoreUnavailableError as exc:
        await cache.close()
        log.error("the result cache is unavailable, so no run is cached (agents' cache options are ignored): %s", exc)
        return None
    return CachedRuns(
        cache, agents, metrics=metrics, timeout_s=settings.result_cache_timeout_s,
        sweep_interval_s=settings.result_cache_sweep_interval_s,
    )
