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
