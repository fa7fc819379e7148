"""``python -m agentd.testing --port 8765``: serve a demo script until Ctrl-C.

Any model name answers with a ``get_weather`` tool call, then a text answer, which is
enough to try an agent end to end without an API key.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib

from agentd.server.models.script import Script, call, calls, say
from agentd.testing.scripted_openai import ScriptedOpenAIServer

DEMO_SCRIPT = Script.of(
    calls(call("get_weather", city="Paris")),
    say("It is sunny in Paris today, 24 °C."),
)


async def _serve(host: str, port: int) -> None:
    async with ScriptedOpenAIServer(default=DEMO_SCRIPT, host=host, port=port) as server:
        print(f"scripted OpenAI endpoint on {server.base_url} (any model name); Ctrl-C to stop", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agentd.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    args = parser.parse_args()
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port))


if __name__ == "__main__":
    main()
