"""``python -m agentd.testing [--app module:app] [--port 8765]``: serve scripts until Ctrl-C.

With ``--app`` every model name answers with that app's ``offline_script`` (the demo app
then runs over real HTTP through the openai client); without it, a ``get_weather`` tool
call and a text answer. Enough to try agents end to end without an API key.

``--first-token-s`` and ``--chunk-interval-s`` give every turn a model's latency: seconds
before the first chunk, then between chunks (``bench/bench_scale.py`` uses them to load
agentd as a real model would).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses

from agentd.server.app import load_app
from agentd.server.models.script import Script, call, calls, say
from agentd.testing.scripted_openai import ScriptedOpenAIServer

DEMO_SCRIPT = Script.of(
    calls(call("get_weather", city="Paris")),
    say("It is sunny in Paris today, 24 °C."),
)


async def _serve(host: str, port: int, script: Script) -> None:
    async with ScriptedOpenAIServer(default=script, host=host, port=port) as server:
        print(f"scripted OpenAI endpoint on {server.base_url} (any model name); Ctrl-C to stop", flush=True)
        await asyncio.Event().wait()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m agentd.testing", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8765)
    parser.add_argument("--app", help="play this app's offline_script, e.g. agentd.examples.support:app")
    parser.add_argument("--first-token-s", type=float, default=0.0, help="seconds before each answer's first chunk")
    parser.add_argument("--chunk-interval-s", type=float, default=0.0, help="seconds between an answer's text chunks")
    args = parser.parse_args()
    script = DEMO_SCRIPT
    if args.app:
        offline = load_app(args.app).offline_script
        if offline is None:
            parser.error(f"{args.app} has no offline_script")
        script = offline
    if args.first_token_s or args.chunk_interval_s:
        script = Script(tuple(
            dataclasses.replace(turn, delay_s=args.first_token_s, chunk_delay_s=args.chunk_interval_s)
            for turn in script.turns
        ))
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve(args.host, args.port, script))


if __name__ == "__main__":
    main()
