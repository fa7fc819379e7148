"""The stream benchmark's app (bench/bench_stream.py): one agent whose zero-latency scripted
model answers with ``BENCH_STREAM_DELTAS`` (10,000) word-sized text deltas, as fast as it can."""

import os

from agentd.server import Agent, App, Script, say

DELTAS = int(os.environ.get("BENCH_STREAM_DELTAS", "10000"))

# "w0001 w0002 ...": each word (with its space) is one text delta of 6 characters.
TEXT = " ".join(f"w{i % 10_000:04d}" for i in range(DELTAS))

app = App(
    agents=[Agent(name="stream", instructions="Stream benchmark agent.")],
    offline_script=Script.of(say(TEXT)),
)
