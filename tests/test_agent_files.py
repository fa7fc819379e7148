"""Agent files (--agents-dir): YAML and JSON definitions, errors naming file, line and field, a
broken file keeping its last good version, change detection, and the published JSON Schema."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from typing import Any

import jsonschema
import pytest

from agentd.server import function_tool
from agentd.server.agents import files as files_module
from agentd.server.agents.files import AgentFiles, FileError, FilesSnapshot
from agentd.server.agents.schema import SCHEMA_PATH, file_schema, main as schema_main, render


@function_tool
def double(n: int) -> int:
    """Double a number."""
    return n * 2


TRIAGE = """\
# yaml-language-server: $schema=../agent.schema.json
name: triage
description: Routes customers.
instructions: |
  Help {user}.
tools:
  - type: caller
    name: lookup_order
    parameters:
      type: object
      properties:
        order_id: {type: string}
      required: [order_id]
  - type: python
    ref: double
handoffs: [billing]
"""

BILLING = """\
{
  "$schema": "./agent.schema.json",
  "name": "billing",
  "description": "Refunds.",
  "output_schema": {"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
}
"""


def write(directory: Path, name: str, text: str) -> Path:
    path = directory / name
    path.write_text(text, encoding="utf-8")
    return path


def messages(snapshot: FilesSnapshot) -> list[tuple[str, int | None, str]]:
    return [(e.path.name, e.line, e.field) for e in snapshot.errors]


def error_at(snapshot: FilesSnapshot, name: str, field: str) -> FileError:
    matching = [e for e in snapshot.errors if e.path.name == name and e.field == field]
    assert len(matching) == 1, snapshot.errors
    return matching[0]


def test_a_directory_of_yaml_and_json_agents_loads(tmp_path: Path) -> None:
    write(tmp_path, "triage.yaml", TRIAGE)
    write(tmp_path, "billing.json", BILLING)
    write(tmp_path, "more.yml", "agents:\n  - name: a\n    handoffs: [b]\n  - name: b\n    handoffs: [a]\n")
    write(tmp_path, "notes.txt", "not an agent")
    write(tmp_path, ".hidden.yaml", "name: hidden\n")
    (tmp_path / "sub").mkdir()
    write(tmp_path / "sub", "nested.yaml", "name: nested\n")
    files = AgentFiles(tmp_path, app_tools={"double": double}, known_agents=())
    snapshot = files.load()
    assert snapshot.errors == []
    assert sorted(snapshot.definitions) == ["a", "b", "billing", "triage"]
    assert snapshot.paths["triage"] == tmp_path / "triage.yaml" and snapshot.paths["a"] == tmp_path / "more.yml"
    triage = snapshot.definitions["triage"]
    assert triage.instructions == "Help {user}.\n" and triage.context_keys == ("user",)
    assert snapshot.definitions["billing"].output_schema == {
        "type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"]}
    assert files.snapshot is snapshot


def test_yaml_errors_name_file_line_and_field_all_at_once(tmp_path: Path) -> None:
    write(tmp_path, "triage.yaml", """\
name: triage
instructions: Help {user.name}
tools:
  - type: caller
    name: lookup_order
    parameters:
      type: object
      properties:
        order_id:
          type: strng
  - type: python
    ref: doubel
handoffs:
  - billing
  - ghost
model_settings:
  temperature: 7
colour: blue
""")
    snapshot = AgentFiles(tmp_path, app_tools={"double": double}, known_agents=["billing"]).load()
    assert messages(snapshot) == [
        ("triage.yaml", 2, "instructions"),
        ("triage.yaml", 10, "tools[0].parameters.properties.order_id.type"),
        ("triage.yaml", 12, "tools[1].ref"),
        ("triage.yaml", 15, "handoffs[1]"),
        ("triage.yaml", 17, "model_settings.temperature"),
        ("triage.yaml", 18, "colour"),
    ]
    assert snapshot.definitions == {}
    text = str(error_at(snapshot, "triage.yaml", "handoffs[1]"))
    assert text.startswith(f"{tmp_path / 'triage.yaml'}:15: handoffs[1]: ") and "'ghost'" in text
    assert "did you mean 'double'?" in error_at(snapshot, "triage.yaml", "tools[1].ref").message


def test_json_errors_name_file_line_and_field(tmp_path: Path) -> None:
    write(tmp_path, "agents.json", """\
{
  "agents": [
    {"name": "ok"},
    {
      "name": "bad",
      "max_turns": 0,
      "tools": [
        {"type": "caller", "name": "t", "parameters": {"type": "array"}}
      ],
      "guardrails": {"output": [{"type": "regex", "name": "r", "pattern": "("}]}
    }
  ]
}
""")
    write(tmp_path, "syntax.json", '{\n  "name": "x",\n  "description": "unterminated\n}\n')
    write(tmp_path, "dup.json", '{\n  "name": "a",\n  "name": "b"\n}\n')
    snapshot = AgentFiles(tmp_path).load()
    assert messages(snapshot) == [
        ("agents.json", 6, "agents[1].max_turns"),
        ("agents.json", 8, "agents[1].tools[0].parameters.type"),
        ("agents.json", 10, "agents[1].guardrails.output[0].pattern"),
        ("dup.json", 3, "name"),
        ("syntax.json", 3, ""),
    ]
    assert "invalid JSON" in error_at(snapshot, "syntax.json", "").message
    assert "duplicate key 'name'" in error_at(snapshot, "dup.json", "name").message
    # A file is all or nothing: the valid agent beside the broken one is not served either.
    assert snapshot.definitions == {}


@pytest.mark.parametrize("text, line, field, fragment", [
    ("name: a\n  description: x\n", 2, "", "invalid YAML"),
    ("name: a\ntools: [\n", 3, "", "invalid YAML"),
    ("name: a\nname: b\n", 2, "name", "duplicate key 'name'"),
    ("- name: a\n", 1, "", "holds a list"),
    ("", None, "", "the file is empty"),
    ("agents: []\n", 1, "agents", "non-empty list"),
    ("agents:\n  - name: a\nname: b\n", 3, "name", "beside 'agents'"),
    ("agents:\n  - name: a\n  - just a string\n", 3, "agents[1]", "not a string"),
    ("agents:\n  - name: a\n  - name: a\n", 3, "agents[1].name", "defines agent 'a' twice"),
    ("a: &x [*x]\n", 1, "", "contains it"),
    ("name: a\ntools:\n  - type: caller\n    description: no name\n", 3, "tools[0].name", "is required"),
])
def test_file_level_problems(tmp_path: Path, text: str, line: int | None, field: str, fragment: str) -> None:
    write(tmp_path, "f.yaml", text)
    snapshot = AgentFiles(tmp_path).load()
    error = error_at(snapshot, "f.yaml", field)
    assert error.line == line and fragment in error.message, error
    assert snapshot.definitions == {}


def test_yaml_reads_dates_as_strings_and_rejects_alias_bombs(tmp_path: Path) -> None:
    write(tmp_path, "dated.yaml", "name: dated\ndescription: 2024-01-01\n")
    bomb = "name: bomb\ndescription: x\nx0: &a0 [z, z, z, z, z, z, z, z, z, z]\n" + "".join(
        f"x{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]\n" for i in range(1, 7))
    write(tmp_path, "bomb.yaml", bomb)
    snapshot = AgentFiles(tmp_path).load()
    assert snapshot.definitions["dated"].description == "2024-01-01"
    assert [e.message for e in snapshot.errors if e.path.name == "bomb.yaml"] == [
        f"the file has more than {files_module.MAX_NODES} values once its aliases are expanded"]


def test_files_too_large_or_not_utf8_are_errors(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(files_module, "MAX_FILE_BYTES", 100)
    write(tmp_path, "big.yaml", "name: big\ndescription: " + "x" * 200 + "\n")
    (tmp_path / "latin.yaml").write_bytes(b"name: a\ndescription: caf\xe9\n")
    snapshot = AgentFiles(tmp_path).load()
    assert "at most 100" in error_at(snapshot, "big.yaml", "").message
    latin = error_at(snapshot, "latin.yaml", "")
    assert (latin.line, "not UTF-8" in latin.message) == (2, True)


def test_a_broken_file_keeps_its_last_good_version_until_fixed_or_deleted(tmp_path: Path) -> None:
    path = write(tmp_path, "triage.yaml", "name: triage\ninstructions: v1\n")
    files = AgentFiles(tmp_path)
    assert files.load().definitions["triage"].instructions == "v1"

    write(tmp_path, "triage.yaml", "name: triage\ninstructions: v2\nmax_turns: -3\n")
    snapshot = files.load()
    assert messages(snapshot) == [("triage.yaml", 3, "max_turns")]
    assert snapshot.definitions["triage"].instructions == "v1" and snapshot.kept == {"triage": path}

    write(tmp_path, "triage.yaml", "name: triage\ninstructions: v3\n")
    snapshot = files.load()
    assert (snapshot.errors, snapshot.kept, snapshot.definitions["triage"].instructions) == ([], {}, "v3")

    write(tmp_path, "triage.yaml", "name: triage\n  broken: [\n")  # a syntax error keeps it too
    assert files.load().definitions["triage"].instructions == "v3"
    path.unlink()
    snapshot = files.load()
    assert (snapshot.definitions, snapshot.errors) == ({}, [])
    # A new file that never loaded contributes nothing.
    write(tmp_path, "new.yaml", "name: new\nmax_turns: 0\n")
    assert files.load().definitions == {}


def test_the_same_agent_in_two_files_is_an_error_for_the_later_one(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: shared\ndescription: from a\n")
    write(tmp_path, "b.yaml", "description: from b\nname: shared\n")
    snapshot = AgentFiles(tmp_path).load()
    assert snapshot.definitions["shared"].description == "from a"
    error = error_at(snapshot, "b.yaml", "name")
    assert error.line == 2 and "already defined in" in error.message and "a.yaml" in error.message


def test_handoffs_may_target_agents_of_other_files_and_of_the_app(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\nhandoffs: [b, from-app]\n")
    write(tmp_path, "b.yaml", "name: b\nhandoffs: [a]\n")
    app_agents = {"from-app"}
    files = AgentFiles(tmp_path, known_agents=lambda: app_agents)
    assert files.load().errors == []
    app_agents = set()  # the callable is read at every load
    files = AgentFiles(tmp_path, known_agents=lambda: app_agents)
    assert messages(files.load()) == [("a.yaml", 2, "handoffs[1]")]
    # Without known agents, references are left to whoever builds the agents.
    assert AgentFiles(tmp_path).load().errors == []
    # An agent of a file that does not load is not a target.
    write(tmp_path, "b.yaml", "name: b\nhandoffs: [a]\nmax_turns: 0\n")
    snapshot = AgentFiles(tmp_path, known_agents={"from-app"}).load()
    assert messages(snapshot) == [("a.yaml", 2, "handoffs[0]"), ("b.yaml", 3, "max_turns")]


def test_imports_are_allowed_in_files_unless_said_otherwise(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\ntools:\n  - type: python\n    ref: json:dumps\n")
    snapshot = AgentFiles(tmp_path, app_tools={}).load()
    assert "not a tool" in error_at(snapshot, "a.yaml", "tools[0].ref").message
    snapshot = AgentFiles(tmp_path, app_tools={}, allow_imports=False).load()
    assert "would import Python code" in error_at(snapshot, "a.yaml", "tools[0].ref").message


def test_an_unreadable_directory_keeps_everything(tmp_path: Path) -> None:
    directory = tmp_path / "agents"
    directory.mkdir()
    write(directory, "a.yaml", "name: a\n")
    files = AgentFiles(directory)
    assert list(files.load().definitions) == ["a"]
    (directory / "a.yaml").unlink()
    directory.rmdir()
    snapshot = files.load()
    assert list(snapshot.definitions) == ["a"]
    assert [(e.path, e.line) for e in snapshot.errors] == [(directory, None)]
    assert "cannot read the agents directory" in snapshot.errors[0].message


def test_only_changed_files_are_read_again(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    write(tmp_path, "a.yaml", "name: a\n")
    write(tmp_path, "b.yaml", "name: b\n")
    files = AgentFiles(tmp_path)
    files.load()
    parsed: list[str] = []
    real = files_module._parse_file
    monkeypatch.setattr(files_module, "_parse_file", lambda path, sig: parsed.append(path.name) or real(path, sig))
    files.load()
    assert parsed == []
    write(tmp_path, "b.yaml", "name: b\ndescription: changed\n")
    assert files.load().definitions["b"].description == "changed" and parsed == ["b.yaml"]
    files.reload()
    assert sorted(parsed) == ["a.yaml", "b.yaml", "b.yaml"]


# -- watching ---------------------------------------------------------------------------------


class Watcher:
    """``AgentFiles.watch`` in a task, its callbacks in a queue (the test waits on the queue)."""

    def __init__(self, files: AgentFiles, fail_first: bool = False) -> None:
        self.files = files
        self.snapshots: asyncio.Queue[FilesSnapshot] = asyncio.Queue()
        self.fail_first = fail_first
        self.task: asyncio.Task[None] | None = None

    async def on_change(self, snapshot: FilesSnapshot) -> None:
        self.snapshots.put_nowait(snapshot)
        if self.fail_first:
            self.fail_first = False
            raise RuntimeError("the callback failed")

    async def __aenter__(self) -> "Watcher":
        self.task = asyncio.create_task(self.files.watch(self.on_change, poll_interval_s=0.005))
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self.task is not None
        self.task.cancel()
        await asyncio.gather(self.task, return_exceptions=True)

    async def next(self) -> FilesSnapshot:
        return await asyncio.wait_for(self.snapshots.get(), 10)


async def test_the_watcher_reports_changes_additions_breakage_and_deletions(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\ninstructions: one\n")
    files = AgentFiles(tmp_path)
    files.load()
    async with Watcher(files) as watcher:
        write(tmp_path, "a.yaml", "name: a\ninstructions: two, longer\n")
        snapshot = await watcher.next()
        assert snapshot.definitions["a"].instructions == "two, longer"

        write(tmp_path, "b.json", '{"name": "b"}')
        assert sorted((await watcher.next()).definitions) == ["a", "b"]

        write(tmp_path, "a.yaml", "name: a\ninstructions: three\nbogus: 1\n")
        snapshot = await watcher.next()
        assert messages(snapshot) == [("a.yaml", 3, "bogus")]
        assert snapshot.definitions["a"].instructions == "two, longer" and "a" in snapshot.kept

        (tmp_path / "b.json").unlink()
        assert sorted((await watcher.next()).definitions) == ["a"]
        assert watcher.snapshots.empty()  # one callback per change


async def test_a_reload_request_reloads_every_file_and_calls_back_without_a_change(tmp_path: Path) -> None:
    write(tmp_path, "a.yaml", "name: a\n")
    files = AgentFiles(tmp_path)
    first = files.load()
    async with Watcher(files, fail_first=True) as watcher:
        files.request_reload()  # what a SIGHUP handler does
        snapshot = await watcher.next()
        assert snapshot is not first and list(snapshot.definitions) == ["a"]
        # The callback raised: the watcher goes on.
        files.request_reload()
        assert list((await watcher.next()).definitions) == ["a"]


async def test_a_mtime_only_change_is_seen(tmp_path: Path) -> None:
    path = write(tmp_path, "a.yaml", "name: a\ndescription: x\n")
    files = AgentFiles(tmp_path)
    files.load()
    async with Watcher(files) as watcher:
        path.write_text("name: a\ndescription: y\n")  # same size
        stat = path.stat()
        os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1_000_000_000))
        assert (await watcher.next()).definitions["a"].description == "y"


# -- the published JSON Schema ------------------------------------------------------------------


def test_the_published_schema_is_up_to_date() -> None:
    assert SCHEMA_PATH.read_text(encoding="utf-8") == render(), (
        "agent.schema.json is stale: run python -m agentd.server.agents.schema")
    assert schema_main(["--check"]) == 0


def test_the_schema_accepts_agent_files_and_refuses_bad_shapes(tmp_path: Path) -> None:
    import yaml

    schema = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    assert schema == file_schema()
    jsonschema.Draft202012Validator.check_schema(schema)
    validator = jsonschema.Draft202012Validator(schema)
    good = [yaml.safe_load(TRIAGE), json.loads(BILLING), {"agents": [{"name": "a"}, {"name": "b", "handoffs": ["a"]}]},
            {"name": "g", "guardrails": {"input": [{"type": "regex", "name": "r", "pattern": "x", "flags": "i"}],
                                         "tool": [{"type": "classifier", "name": "c", "agent": "g2"}]}}]
    for document in good:
        assert list(validator.iter_errors(document)) == [], document
    bad = [{"name": "a", "colour": "blue"}, {"agents": []}, {"name": "A"}, {"name": "a", "max_turns": 0},
           {"name": "a", "tools": [{"type": "shell"}]}, {"agents": [{"name": "a"}], "name": "b"},
           {"name": "a", "guardrails": {"input": [{"type": "deny_list", "name": "d", "words": []}]}}]
    for document in bad:
        assert list(validator.iter_errors(document)) != [], document
