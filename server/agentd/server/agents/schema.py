"""The JSON Schema of agent files, published beside this module as ``agent.schema.json``.

Generated from ``AgentDefinition``: a file is one agent, or ``{"agents": [...]}``; either may
carry ``$schema`` for editors. ``python -m agentd.server.agents.schema`` rewrites the file;
``--check`` exits 1 when it is stale (tests/test_agent_files.py fails then too).

The schema checks the shape of a definition (fields, types, ranges, patterns); what needs
more — template syntax, JSON schemas inside a definition, references to tools and agents —
only agentd checks (``agentd.server.agents.definition``).
"""

from __future__ import annotations

import copy
import json
import sys
from pathlib import Path
from typing import Any

from agentd.server.agents.definition import AgentDefinition

SCHEMA_PATH = Path(__file__).with_name("agent.schema.json")

_SCHEMA_KEY = {"type": "string", "description": "The JSON Schema of this file, for editors; agentd ignores it."}


def file_schema() -> dict[str, Any]:
    """The schema of an agent file."""
    agent = AgentDefinition.model_json_schema()
    defs = agent.pop("$defs", {})
    single = copy.deepcopy(agent)
    single["properties"] = {"$schema": _SCHEMA_KEY, **single["properties"]}
    defs["AgentDefinition"] = agent
    defs["AgentFile"] = single
    return {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "agentd agent file",
        "description": (
            "One agentd agent definition, or several as a list under 'agents'. Generated from "
            "agentd.server.agents.definition.AgentDefinition by `python -m agentd.server.agents.schema`."
        ),
        "anyOf": [
            {"$ref": "#/$defs/AgentFile"},
            {
                "type": "object",
                "properties": {
                    "$schema": _SCHEMA_KEY,
                    "agents": {
                        "type": "array",
                        "items": {"$ref": "#/$defs/AgentDefinition"},
                        "minItems": 1,
                        "description": "The agents of this file.",
                    },
                },
                "required": ["agents"],
                "additionalProperties": False,
            },
        ],
        "$defs": dict(sorted(defs.items())),
    }


def render() -> str:
    return json.dumps(file_schema(), indent=2, ensure_ascii=False) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    text = render()
    if args == ["--check"]:
        if not SCHEMA_PATH.exists() or SCHEMA_PATH.read_text(encoding="utf-8") != text:
            print(f"{SCHEMA_PATH} is stale: run python -m agentd.server.agents.schema", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python -m agentd.server.agents.schema [--check]", file=sys.stderr)
        return 2
    SCHEMA_PATH.write_text(text, encoding="utf-8")
    print(f"wrote {SCHEMA_PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
