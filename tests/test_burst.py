"""A burst of starts: every caller gets a run or RESOURCE_EXHAUSTED, never CANCELLED.

gRPC core cancels calls beyond its pending-request cap (1,000 by default) before the
server sees them: no run, and a status raw clients do not retry. The server leaves room
for bursts in the core and counts calls in progress itself, answering the excess
RESOURCE_EXHAUSTED (serve.server_options, auth.interceptor).
"""

from __future__ import annotations

import asyncio
import collections
from pathlib import Path

import grpc

from agentd.server import Script, call, calls, say
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import agent_service_pb2_grpc as apb_grpc
from tests.conftest import start_harness

BURST = 2000
CHANNELS = 20


async def burst(target: str, agent: str, *, hold: bool) -> collections.Counter[str]:
    """Start BURST runs at once over CHANNELS connections; what each caller got.

    ``hold``: keep every stream that got a run open until every caller has its answer
    (the runs wait for an approval), so the calls in progress only grow during the burst.
    """
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)]) for _ in range(CHANNELS)
    ]
    stubs = [apb_grpc.AgentServiceStub(channel) for channel in channels]
    codes: collections.Counter[str] = collections.Counter()
    everyone_answered = asyncio.Event()

    def answered(what: str) -> None:
        codes[what] += 1
        if sum(codes.values()) == BURST:
            everyone_answered.set()

    async def start(i: int) -> None:
        call_ = stubs[i % CHANNELS].StreamRun(
            apb.StreamRunRequest(start=apb.StartRun(agent=f"agents/{agent}", input=f"burst {i}")), timeout=120
        )
        try:
            if hold:
                first = await call_.read()
                answered("RUN" if first.event.WhichOneof("payload") == "run_started" else "other")
                await everyone_answered.wait()
                call_.cancel()
            else:
                kinds = [response.event.WhichOneof("payload") async for response in call_]
                answered("RUN" if kinds[0] == "run_started" and kinds[-1] == "run_completed" else kinds[-1])
        except grpc.aio.AioRpcError as exc:
            answered(exc.code().name)

    try:
        await asyncio.gather(*(start(i) for i in range(BURST)))
    finally:
        for channel in channels:
            await channel.close()
    return codes


async def test_a_burst_within_the_limit_is_served_in_full(model_server, tmp_path: Path) -> None:
    model_server.set_script("assistant", Script.of(say("ok")))
    h = await start_harness(model_server, tmp_path, store="memory")
    try:
        codes = await burst(h.target, "assistant", hold=False)
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
    assert codes == {"RUN": BURST}


async def test_a_burst_over_the_limit_is_refused_with_resource_exhausted(model_server, tmp_path: Path) -> None:
    model_server.set_script("operator", Script.of(calls(call("issue_refund", order_id="A-1", amount_eur=1.0)), say("ok")))
    h = await start_harness(model_server, tmp_path, store="memory", max_concurrent_rpcs=300)
    try:
        codes = await burst(h.target, "operator", hold=True)
    finally:
        await h.client.close()
        await h.server.stop(grace_s=0)
    assert codes == {"RUN": 300, "RESOURCE_EXHAUSTED": BURST - 300}
