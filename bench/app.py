"""The benchmark app: one agent, one tool, a zero-latency script (tool call, tool output, final text)."""

from agentd.server import Agent, App, Script, call, calls, function_tool, say


@function_tool
def echo(text: str) -> str:
    """Return the text unchanged."""
    return text


@function_tool
async def echo_async(text: str) -> str:
    """Return the text unchanged (async)."""
    return text


bench = Agent(name="bench", instructions="Benchmark agent.", tools=[echo_async, echo])
app = App(
    agents=[bench],
    offline_script=Script.of(
        calls(call("echo_async", text="ping")),
        say("pong: the tool answered ping"),
    ),
)


# The same agent with a model that takes 20 ms per turn: replicas are then bound by their
# run capacity (AGENTD_MAX_ACTIVE_RUNS), not the CPU, which is how work distribution shows.
slow_app = App(
    agents=[bench],
    offline_script=Script.of(
        calls(call("echo_async", text="ping"), delay_s=0.02),
        say("pong: the tool answered ping", delay_s=0.02),
    ),
)


# A model's shape at scale (bench/bench_scale.py): a tool call, then a 20-word streamed
# answer; the scripted endpoint adds the latency (time to first token, pace).
scale_app = App(
    agents=[Agent(name="bench", instructions="Benchmark agent.", tools=[echo_async], model_api="chat_completions"),
            Agent(name="bench_responses", instructions="Benchmark agent.", tools=[echo_async],
                  model_api="responses")],
    offline_script=Script.of(
        calls(call("echo_async", text="ping")),
        say("pong: the tool answered ping, and here are a few more words so that the answer streams as twenty chunks."),
    ),
)
