"""Agent definitions from a directory of YAML and JSON files (``agentd serve --agents-dir``).

The format. Every ``*.yaml``, ``*.yml`` and ``*.json`` file directly in the directory (not in
subdirectories; names starting with ``.`` are skipped) holds either one agent — a mapping of
``AgentDefinition`` fields — or several, as a list under a top-level ``agents`` key. Either
form may carry a ``$schema`` key (ignored here) so editors check the file against
``agent.schema.json``; in YAML the usual way is the comment
``# yaml-language-server: $schema=<path or URL of agent.schema.json>``.

Errors name the file, the line and the field (``triage.yaml:12: tools[1].parameters.type:
...``), for the YAML and JSON syntax as for every violation of a definition: all of a file's
problems are reported at once. A file is all or nothing: with any error it contributes no
agent. A file that had loaded before keeps serving the agents of its last good version
(``FilesSnapshot.kept``) until it is fixed or deleted; a deleted file's agents are gone. Two
files defining the same agent: the first in name order keeps it, the other is an error. A
directory that cannot be read keeps everything as it was.

YAML is read with PyYAML's safe loader, without timestamps (``2024-01-01`` stays a string),
rejecting duplicate keys and recursive aliases, and at most ``MAX_NODES`` nodes once aliases
are expanded; files are at most ``MAX_FILE_BYTES`` and the directory is read up to
``MAX_FILES`` files.

Reloading: ``load()`` re-reads only the files whose size, mtime, ctime or inode changed;
``watch()`` polls those every ``poll_interval_s`` and calls back with a fresh snapshot on a
change; ``request_reload()`` (a SIGHUP handler: ``loop.add_signal_handler(signal.SIGHUP,
files.request_reload)``) makes the watcher re-read every file now and call back even if
nothing changed; ``reload()`` does the same synchronously and returns the snapshot.
"""

from __future__ import annotations

import asyncio
import bisect
import inspect
import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Awaitable, Callable, Collection, Mapping, Union

import yaml

from agentd.server.agents.definition import AgentDefinition, Loc, find_violations, format_loc, reference_violations
from agentd.server.runtime.tools import FunctionTool

log = logging.getLogger("agentd.agents.files")

SUFFIXES = (".yaml", ".yml", ".json")
MAX_FILE_BYTES = 1 << 20
MAX_FILES = 1000
MAX_NODES = 100_000  # YAML nodes of one file with its aliases expanded

KnownAgents = Union[Collection[str], Callable[[], Collection[str]], None]


@dataclass(frozen=True, slots=True)
class FileError:
    """One problem of one file. ``line``: 1-based, None when it is not about a place in the file;
    ``field``: the path of the field in the file (``agents[1].tools[0].name``), "" for the file."""

    path: Path
    line: int | None
    field: str
    message: str

    def __str__(self) -> str:
        where = f"{self.path}:{self.line}" if self.line is not None else str(self.path)
        return f"{where}: {self.field}: {self.message}" if self.field else f"{where}: {self.message}"


@dataclass(frozen=True)
class FilesSnapshot:
    """The directory's agents as of one load.

    ``definitions``: every agent to serve, by name (including ``kept`` ones); ``paths``: the file
    each came from; ``errors``: every problem found; ``kept``: agents served from the last good
    version of a file that has errors now.
    """

    definitions: dict[str, AgentDefinition] = field(default_factory=dict)
    paths: dict[str, Path] = field(default_factory=dict)
    errors: list[FileError] = field(default_factory=list)
    kept: dict[str, Path] = field(default_factory=dict)


Signature = tuple[int, int, int, int]  # mtime_ns, ctime_ns, size, inode


@dataclass
class _Parsed:
    """One file read and parsed: its agents as (data, location prefix), its line finder, its errors."""

    signature: Signature
    agents: list[tuple[dict[str, Any], Loc]]
    lines: Callable[[Loc], int | None]
    errors: list[FileError]


class AgentFiles:
    """The agent files of ``directory``.

    ``app_tools``, ``app_guardrails``, ``known_agents`` (names, or a function returning them, read
    at each load; the directory's own agents are added) and ``allow_imports`` are the context of
    the reference checks (``definition.find_violations``): given, unknown tool refs, guardrail
    refs and handoff targets are errors with their file and line here, rather than problems the
    caller meets when it builds the agents. Files are the operator's, so ``module:attribute``
    refs may import (``allow_imports=True``) unless said otherwise.
    """

    def __init__(
        self,
        directory: str | os.PathLike[str],
        *,
        app_tools: Mapping[str, FunctionTool] | None = None,
        app_guardrails: Mapping[str, object] | None = None,
        known_agents: KnownAgents = None,
        allow_imports: bool = True,
    ) -> None:
        self.directory = Path(directory)
        self._app_tools = app_tools
        self._app_guardrails = app_guardrails
        self._known_agents = known_agents
        self._allow_imports = allow_imports
        self._parsed: dict[Path, _Parsed] = {}
        self._good: dict[Path, dict[str, AgentDefinition]] = {}  # each file's last good agents
        self._snapshot = FilesSnapshot()
        self._listing: object = None  # the directory signature of the last load
        self._lock = threading.Lock()
        self._reload_requested = False
        self._wake: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    @property
    def snapshot(self) -> FilesSnapshot:
        """The last load's snapshot."""
        return self._snapshot

    def load(self) -> FilesSnapshot:
        """Read what changed since the last load and validate every file; never raises for a file's problems."""
        return self._load(force=False)

    def reload(self) -> FilesSnapshot:
        """Read and validate every file again, changed or not."""
        return self._load(force=True)

    def request_reload(self) -> None:
        """Make ``watch()`` reload every file now and call back (SIGHUP); safe from any thread and
        from a signal handler installed with ``loop.add_signal_handler``. Without a watcher running,
        the next ``watch()`` starts with it."""
        self._reload_requested = True
        loop, wake = self._loop, self._wake
        if loop is not None and wake is not None and not loop.is_closed():
            loop.call_soon_threadsafe(wake.set)

    async def watch(
        self,
        on_change: Callable[[FilesSnapshot], Union[None, Awaitable[None]]],
        poll_interval_s: float = 1.0,
    ) -> None:
        """Poll the directory until cancelled; on a change (or ``request_reload``) load it and call
        ``on_change`` with the snapshot. A change is against the last load (``load()`` before
        ``watch()``, or the first poll loads and calls back). Reading happens on a worker thread.
        A failing callback is logged and the watch goes on."""
        self._loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()
        if self._reload_requested:
            self._wake.set()
        try:
            while True:
                try:
                    await asyncio.wait_for(self._wake.wait(), poll_interval_s)
                except TimeoutError:
                    pass
                self._wake.clear()
                forced, self._reload_requested = self._reload_requested, False
                try:
                    if not forced and await asyncio.to_thread(self._listing_signature) == self._listing:
                        continue
                    snapshot = await asyncio.to_thread(self._load, forced)
                except Exception:  # an agentd bug: keep watching
                    log.exception("could not load the agent files in %s", self.directory)
                    continue
                try:
                    result = on_change(snapshot)
                    if inspect.isawaitable(result):
                        await result
                except Exception:
                    log.exception("the agent files' change callback failed")
        finally:
            self._wake = None
            self._loop = None

    # -- loading -------------------------------------------------------------------------------

    def _files(self) -> tuple[list[tuple[Path, Signature]], list[FileError]]:
        """The directory's agent files (name order) with their signatures; OSError when it cannot be read."""
        found: list[tuple[Path, Signature]] = []
        errors: list[FileError] = []
        with os.scandir(self.directory) as entries:
            names = sorted(
                entry.name for entry in entries
                if entry.name.endswith(SUFFIXES) and not entry.name.startswith(".") and entry.is_file()
            )
        if len(names) > MAX_FILES:
            errors.append(FileError(
                self.directory, None, "", f"{len(names)} agent files; only the first {MAX_FILES} are read"
            ))
            names = names[:MAX_FILES]
        for name in names:
            path = self.directory / name
            try:
                st = path.stat()
            except OSError:
                continue  # deleted meanwhile
            found.append((path, (st.st_mtime_ns, st.st_ctime_ns, st.st_size, st.st_ino)))
        return found, errors

    def _listing_signature(self) -> object:
        try:
            return tuple(self._files()[0])
        except OSError as exc:
            return ("unreadable", exc.errno)

    def _load(self, force: bool) -> FilesSnapshot:
        with self._lock:
            snapshot = self._load_locked(force)
            self._snapshot = snapshot
            for error in snapshot.errors:
                log.warning("agent file: %s", error)
            return snapshot

    def _load_locked(self, force: bool) -> FilesSnapshot:
        try:
            files, errors = self._files()
        except OSError as exc:
            self._listing = ("unreadable", exc.errno)
            previous = self._snapshot
            problem = FileError(self.directory, None, "", f"cannot read the agents directory: {exc.strerror or exc}")
            return FilesSnapshot(dict(previous.definitions), dict(previous.paths), [problem], dict(previous.kept))
        self._listing = tuple(files)
        present = {path for path, _ in files}
        for path in list(self._parsed):
            if path not in present:
                del self._parsed[path]
        for path in list(self._good):
            if path not in present:
                del self._good[path]  # a deleted file's agents are gone
        for path, signature in files:
            cached = self._parsed.get(path)
            if force or cached is None or cached.signature != signature:
                self._parsed[path] = _parse_file(path, signature)

        # Each agent's own violations first; then its references, to the caller's agents and to
        # every agent the directory may serve (valid ones, and the last good versions of others).
        own: dict[tuple[Path, int], list[tuple[Loc, str]]] = {}
        directory_names: set[str] = set()
        for path, _ in files:
            directory_names.update(self._good.get(path, {}))
            for index, (data, _) in enumerate(self._parsed[path].agents):
                own[(path, index)] = find_violations(data)
                if not own[(path, index)]:
                    directory_names.add(data["name"])
        known = self._known_agents() if callable(self._known_agents) else self._known_agents
        known_names = None if known is None else set(known) | directory_names

        definitions: dict[str, AgentDefinition] = {}
        paths: dict[str, Path] = {}
        kept: dict[str, Path] = {}
        for path, _ in files:
            parsed = self._parsed[path]
            file_errors = list(parsed.errors)
            agents: dict[str, AgentDefinition] = {}
            for index, (data, prefix) in enumerate(parsed.agents):
                violations = own[(path, index)] + reference_violations(
                    data, app_tools=self._app_tools, known_agents=known_names, allow_imports=self._allow_imports,
                    app_guardrails=self._app_guardrails,
                )
                for loc, message in violations:
                    full = (*prefix, *loc)
                    file_errors.append(FileError(path, parsed.lines(full), format_loc(full), message))
                if violations:
                    continue
                name = data["name"]
                if name in agents:
                    where = (*prefix, "name")
                    file_errors.append(FileError(path, parsed.lines(where), format_loc(where),
                                                 f"the file defines agent {name!r} twice"))
                    continue
                if name in paths:
                    where = (*prefix, "name")
                    file_errors.append(FileError(path, parsed.lines(where), format_loc(where),
                                                 f"agent {name!r} is already defined in {paths[name]}"))
                    continue
                agents[name] = AgentDefinition.model_validate(data)
            errors.extend(sorted(file_errors, key=lambda e: e.line or 0))
            if not file_errors:
                self._good[path] = agents
            else:
                agents = {n: d for n, d in self._good.get(path, {}).items() if n not in paths}
                kept.update({name: path for name in agents})
            for name, definition in agents.items():
                definitions[name] = definition
                paths[name] = path
        return FilesSnapshot(definitions, paths, errors, kept)


# -- parsing --------------------------------------------------------------------------------


def _parse_file(path: Path, signature: Signature) -> _Parsed:
    def failed(message: str, line: int | None = None) -> _Parsed:
        return _Parsed(signature, [], lambda loc: None, [FileError(path, line, "", message)])

    if signature[2] > MAX_FILE_BYTES:
        return failed(f"the file is {signature[2]} bytes; agent files are at most {MAX_FILE_BYTES}")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        return failed(f"cannot read the file: {exc.strerror or exc}")
    if len(raw) > MAX_FILE_BYTES:
        return failed(f"the file is {len(raw)} bytes; agent files are at most {MAX_FILE_BYTES}")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        return failed(f"not UTF-8 text (byte {exc.start})", line)
    try:
        if path.suffix == ".json":
            document, lines, duplicates = _parse_json(text)
        else:
            document, lines, duplicates = _parse_yaml(text)
    except _SyntaxProblem as exc:
        return failed(exc.message, exc.line)
    except RecursionError:
        return failed("the file nests too deeply")
    errors = [FileError(path, lines(loc), format_loc(loc), f"duplicate key {loc[-1]!r}") for loc in duplicates]
    agents: list[tuple[dict[str, Any], Loc]] = []
    if document is None:
        errors.append(FileError(path, None, "", "the file is empty; it holds one agent, or a list under 'agents'"))
    elif not isinstance(document, dict):
        errors.append(FileError(
            path, 1, "", f"the file holds a {_kind(document)}; it holds one agent (a mapping of its fields), "
            "or a list of agents under 'agents'"
        ))
    elif "agents" in document:
        for key in document:
            if key not in ("agents", "$schema"):
                errors.append(FileError(path, lines((key,)), format_loc((key,)),
                                        f"unknown field {key!r} beside 'agents' (a list of agents)"))
        listed = document["agents"]
        if not isinstance(listed, list) or not listed:
            errors.append(FileError(path, lines(("agents",)), "agents", "'agents' must be a non-empty list of agents"))
        else:
            for index, item in enumerate(listed):
                if isinstance(item, dict):
                    agents.append((item, ("agents", index)))
                else:
                    where = ("agents", index)
                    errors.append(FileError(path, lines(where), format_loc(where),
                                            f"an agent is a mapping of its fields, not a {_kind(item)}"))
    else:
        agents.append(({k: v for k, v in document.items() if k != "$schema"}, ()))
    return _Parsed(signature, agents, lines, errors)


class _SyntaxProblem(Exception):
    def __init__(self, message: str, line: int | None) -> None:
        super().__init__(message)
        self.message = message
        self.line = line


def _kind(value: Any) -> str:
    return {list: "list", str: "string", int: "number", float: "number", bool: "boolean"}.get(type(value), type(value).__name__)


class _Loader(yaml.SafeLoader):
    """The safe loader without timestamps: ``2024-01-01`` is a string, as in JSON."""


_Loader.yaml_implicit_resolvers = {
    first: [(tag, regexp) for tag, regexp in resolvers if tag != "tag:yaml.org,2002:timestamp"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


def _parse_yaml(text: str) -> tuple[Any, Callable[[Loc], int | None], list[Loc]]:
    loader = _Loader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
            raise _SyntaxProblem(f"invalid YAML: {problem}", mark.line + 1 if mark is not None else None) from None
        except yaml.YAMLError as exc:
            raise _SyntaxProblem(f"invalid YAML: {exc}", None) from None
        if root is None:
            return None, lambda loc: None, []
        _check_size(root)
        duplicates = _yaml_duplicates(root)
        try:
            document = loader.construct_document(root)
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            problem = " ".join(p for p in (exc.context, exc.problem) if p) or "invalid YAML"
            raise _SyntaxProblem(f"invalid YAML: {problem}", mark.line + 1 if mark is not None else None) from None
    finally:
        loader.dispose()
    return document, lambda loc: _yaml_line(root, loc), duplicates


def _check_size(root: yaml.Node) -> None:
    """At most MAX_NODES nodes once aliases are expanded, and no alias inside itself."""
    sizes: dict[int, int] = {}
    busy: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in busy:
            raise _SyntaxProblem("invalid YAML: an alias refers to a node that contains it", node.start_mark.line + 1)
        busy.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        busy.discard(key)
        if total > MAX_NODES:
            raise _SyntaxProblem(f"the file has more than {MAX_NODES} values once its aliases are expanded", None)
        sizes[key] = total
        return total

    size(root)


def _yaml_duplicates(root: yaml.Node) -> list[Loc]:
    found: list[Loc] = []
    seen: set[int] = set()
    stack: list[tuple[yaml.Node, Loc]] = [(root, ())]
    while stack:
        node, loc = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*loc, i)) for i, child in enumerate(node.value))
        elif isinstance(node, yaml.MappingNode):
            keys: set[str] = set()
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.tag != "tag:yaml.org,2002:merge":
                    if key.value in keys:
                        found.append((*loc, key.value))
                    keys.add(key.value)
                    stack.append((value, (*loc, key.value)))
    return found


def _yaml_line(root: yaml.Node, loc: Loc) -> int | None:
    """The line of the field at ``loc``: its key's line for a mapping entry, its own for a list
    item; for a field that is not there (a missing one), the line of the deepest node that is."""
    node = root
    line = root.start_mark.line + 1
    for part in loc:
        if isinstance(node, yaml.MappingNode) and isinstance(part, str):
            for key, value in reversed(node.value):  # the last duplicate wins, as when loading
                if isinstance(key, yaml.ScalarNode) and key.value == part:
                    line, node = key.start_mark.line + 1, value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line


_WHITESPACE = re.compile(r"[ \t\n\r]*")


def _parse_json(text: str) -> tuple[Any, Callable[[Loc], int | None], list[Loc]]:
    try:
        document = json.loads(text)
    except json.JSONDecodeError as exc:
        raise _SyntaxProblem(f"invalid JSON: {exc.msg} (column {exc.colno})", exc.lineno) from None
    except ValueError as exc:  # an integer past the digit limit
        raise _SyntaxProblem(f"invalid JSON: {exc}", None) from None
    positions: dict[Loc, int] = {}
    duplicates: list[Loc] = []
    try:
        _index_json(text, 0, (), positions, duplicates)
    except RecursionError:
        positions.clear()  # errors without lines, rather than none at all
    line_starts = [0] + [m.end() for m in re.finditer("\n", text)]

    def line(loc: Loc) -> int | None:
        for depth in range(len(loc), -1, -1):  # the deepest place that is in the file
            position = positions.get(loc[:depth])
            if position is not None:
                return bisect.bisect_right(line_starts, position)
        return None

    return document, line, duplicates


def _index_json(text: str, pos: int, loc: Loc, positions: dict[Loc, int], duplicates: list[Loc]) -> int:
    """Record where each value (a mapping entry: its key) starts; returns the end of the value at ``pos``.
    The text is valid JSON already (``json.loads`` read it)."""
    pos = _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]
    positions.setdefault(loc, pos)
    char = text[pos]
    if char == "{":
        pos = _WHITESPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        if text[pos] == "}":
            return pos + 1
        keys: set[str] = set()
        while True:
            key_start = pos
            key, pos = json.decoder.scanstring(text, pos + 1)  # type: ignore[attr-defined]
            if key in keys:
                duplicates.append((*loc, key))
            keys.add(key)
            positions[(*loc, key)] = key_start  # the last duplicate wins, as when loading
            pos = _WHITESPACE.match(text, pos).end() + 1  # type: ignore[union-attr]  # past ':'
            pos = _index_json(text, pos, (*loc, key), positions, duplicates)
            positions[(*loc, key)] = key_start
            pos = _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos] == "}":
                return pos + 1
            pos = _WHITESPACE.match(text, pos + 1).end()  # type: ignore[union-attr]  # past ','
    if char == "[":
        pos = _WHITESPACE.match(text, pos + 1).end()  # type: ignore[union-attr]
        if text[pos] == "]":
            return pos + 1
        index = 0
        while True:
            pos = _index_json(text, pos, (*loc, index), positions, duplicates)
            index += 1
            pos = _WHITESPACE.match(text, pos).end()  # type: ignore[union-attr]
            if text[pos] == "]":
                return pos + 1
            pos += 1  # past ','
    _, end = _SCALARS.raw_decode(text, pos)
    return end


_SCALARS = json.JSONDecoder()
