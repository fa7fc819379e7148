"""AgentService's agent resources: list, get, create, update, delete, versions and aliases.

A mixin of ``AgentService`` (one gRPC service), kept apart from the run RPCs. It
translates between protos and the catalog (``agents.catalog``, every source) and the
agent store (``agents.store``, API agents); definitions are validated by the one pydantic
model every source shares (``agents.definition``), all problems at once.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

import grpc

from agentd.server.agents.catalog import AgentCatalog, AgentEntry, UnknownAgentError
from agentd.server.agents.definition import DefinitionError, parse_definition
from agentd.server.agents.store.base import (
    AgentExistsError,
    AgentNotFoundError,
    AgentStore,
    AgentVersionNotFoundError,
    AliasRecord,
    VersionConflictError,
)
from agentd.server.auth.principal import current_principal
from agentd.server.runtime.agent import AGENT_NAME_RE
from agentd.server.services import validation
from agentd.server.services.convert import dict_from_struct, struct_from_dict, timestamp_s
from agentd.server.services.errors import Answered, NotFound, unary_errors
from agentd.server.services.status import Problem
from agentd.server.services.validation import InvalidArgument
from agentd.v1 import agent_service_pb2 as pb

DEFAULT_AGENT_PAGE = 100
DEFAULT_VERSION_PAGE = 100
MAX_ALIASES_LISTED = 100
ALIAS_RE = re.compile(r"^[a-z0-9][a-z0-9_-]{0,63}$")
_SOURCES = {"code": pb.AGENT_SOURCE_CODE, "file": pb.AGENT_SOURCE_FILE, "api": pb.AGENT_SOURCE_API}


def agent_ref(field: str, value: str) -> tuple[str, str]:
    """``(agent id, rest)`` of ``agents/{agent}[/versions/{n}|/aliases/{alias}]`` or a bare id;
    ``rest`` is "" or ``versions/{n}`` / ``aliases/{alias}`` (validated)."""
    validation.check_id(field, value)
    if not value.startswith("agents/"):
        return validation.resource_id(field, value, "agents"), ""  # a bare id, or the rule's own message
    text = value.removeprefix("agents/")
    name, _, rest = text.partition("/")
    if not AGENT_NAME_RE.match(name):
        raise InvalidArgument(
            field, f"{validation.quote(value)} is not an agent name: send 'agents/ID' or a bare agent ID (1-64 of a-z 0-9 _ -)"
        )
    if rest:
        kind, _, ident = rest.partition("/")
        if kind == "versions" and ident.isdigit() and 0 < int(ident) < 2**53:
            return name, f"versions/{int(ident)}"
        if kind == "aliases" and ALIAS_RE.match(ident):
            return name, f"aliases/{ident}"
        raise InvalidArgument(
            field, f"{validation.quote(value)}: send 'agents/ID' or a bare agent ID, followed by nothing, "
            "'/versions/N' or '/aliases/ALIAS'"
        )
    return name, ""


def _not_found(field: str, name: str, detail: str = "") -> NotFound:
    return NotFound(
        f"{field}: {detail or f'agent {validation.quote(name)} does not exist'}",
        reason="AGENT_NOT_FOUND", resource=f"agents/{name}", metadata={"agent": name},
    )


def _definition_problem(field: str, error: DefinitionError) -> Answered:
    violations = tuple((f"{field}.{path}" if path else field, message) for path, message in error.violations)
    summary = "; ".join(f"{path}: {message}" for path, message in violations[:3])
    more = f" (and {len(violations) - 3} more)" if len(violations) > 3 else ""
    return Answered(Problem(
        grpc.StatusCode.INVALID_ARGUMENT, "INVALID_ARGUMENT", f"the agent definition is invalid: {summary}{more}",
        {"field": violations[0][0] if violations else field}, violations=violations,
    ))


def _read_only(name: str, source: str) -> Answered:
    return Answered(Problem(
        grpc.StatusCode.FAILED_PRECONDITION, "AGENT_READ_ONLY",
        f"agent {name!r} is defined in the server's {'app module' if source == 'code' else 'agent files'} and is "
        "read-only through the API; change it there",
        {"agent": name, "source": source},
    ))


def entry_to_proto(entry: AgentEntry, *, version_name: bool = False) -> pb.Agent:
    """An agent version as the API shows it."""
    compiled = entry.compiled
    agent = compiled.agent
    message = pb.Agent(
        name=f"agents/{entry.name}/versions/{entry.version}" if version_name else f"agents/{entry.name}",
        description=agent.description,
        model=compiled.model,
        handoffs=[f"agents/{h}" for h in agent.handoff_names],
        max_turns=agent.max_turns,
        version=entry.version,
        source=_SOURCES[entry.source],
    )
    for tool in compiled.current_tools():  # its own, then its MCP servers' as last listed
        message.tools.append(
            pb.Tool(name=tool.name, description=tool.description, parameters=struct_from_dict(tool.parameters),
                    strict=tool.strict, caller_executed=tool.caller_executed, needs_approval=tool.needs_approval)
        )
    if compiled.output_schema is not None:
        message.output_schema.update(compiled.output_schema.schema)
    if entry.definition is not None:
        message.definition.update(redacted_definition(entry.definition))
    if entry.create_time:
        message.create_time.CopyFrom(timestamp_s(entry.create_time))
        message.update_time.CopyFrom(timestamp_s(entry.update_time))
    return message


def alias_to_proto(record: AliasRecord) -> pb.AgentAlias:
    return pb.AgentAlias(
        name=f"agents/{record.agent}/aliases/{record.alias}",
        routes=[pb.AliasRoute(version=v, weight=w) for v, w in record.routes],
        update_time=timestamp_s(record.update_time),
    )


def mcp_host_violations(definition: Any, allowed: frozenset[str]) -> list[tuple[str, str]]:
    """The MCP servers of an API definition whose host the operator did not allow
    (``AGENTD_MCP_ALLOWED_HOSTS``): an API caller must not make the server connect into its network."""
    problems = []
    for i, server in enumerate(getattr(definition, "mcp_servers", None) or ()):
        url = getattr(server, "url", None)
        if url is None:
            continue
        parts = urlsplit(url)
        host = (parts.hostname or "").lower()
        if host not in allowed and f"{host}:{parts.port}" not in allowed:
            shown = ", ".join(sorted(allowed)) or "none: AGENTD_MCP_ALLOWED_HOSTS is empty"
            problems.append((f"mcp_servers[{i}].url",
                             f"host {host!r} is not one the server allows for agents made through the API ({shown})"))
    return problems


REDACTED = "<redacted>"


def redacted_definition(definition: dict[str, Any]) -> dict[str, Any]:
    """A definition as the API shows it: MCP header values are write-only (they hold credentials)."""
    servers = definition.get("mcp_servers")
    if not servers:
        return definition
    shown = dict(definition)
    shown["mcp_servers"] = [
        {**s, "headers": {k: REDACTED for k in s["headers"]}} if isinstance(s, dict) and s.get("headers") else s
        for s in servers
    ]
    return shown


class AgentResources:
    """The agent-resource RPCs of AgentService (mixed into it)."""

    _catalog: AgentCatalog
    _agent_store: AgentStore | None
    _mcp_allowed_hosts: frozenset[str] = frozenset()

    # -- reads ----------------------------------------------------------------------------

    @unary_errors
    async def ListAgents(self, request: pb.ListAgentsRequest, context: grpc.aio.ServicerContext) -> pb.ListAgentsResponse:
        size = validation.page_size(request.page_size, DEFAULT_AGENT_PAGE)
        after = validation.check_id("page_token", validation.decode_page_token("agents", request.page_token) or "")
        entries = [e for e in self._catalog.list(current_principal().tenant) if e.name > after][: size + 1]
        response = pb.ListAgentsResponse(agents=[entry_to_proto(e) for e in entries[:size]])
        if len(entries) > size:
            response.next_page_token = validation.encode_page_token("agents", entries[size - 1].name)
        return response

    @unary_errors
    async def GetAgent(self, request: pb.GetAgentRequest, context: grpc.aio.ServicerContext) -> pb.GetAgentResponse:
        name, rest = agent_ref("name", request.name)
        entry = await self.resolve_agent("name", name, rest)
        if entry.compiled.mcp is not None:  # its MCP servers' tools as they are now (bounded by their connect timeout)
            await entry.compiled.mcp.load()
        return pb.GetAgentResponse(agent=entry_to_proto(entry, version_name=rest.startswith("versions/")))

    async def resolve_agent(self, field: str, name: str, rest: str = "", session_id: str | None = None) -> AgentEntry:
        """The agent version a request names, or AGENT_NOT_FOUND naming what exists."""
        tenant = current_principal().tenant
        try:
            return await self._catalog.resolve(tenant, f"{name}/{rest}" if rest else name, session_id)
        except UnknownAgentError as exc:
            if rest:
                raise _not_found(field, name, str(exc)) from None
            known = ", ".join(e.name for e in self._catalog.list(tenant))
            raise _not_found(
                field, name, f"agent {validation.quote(name)} does not exist; this server hosts: {known}"
            ) from None

    @unary_errors
    async def ListAgentVersions(
        self, request: pb.ListAgentVersionsRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentVersionsResponse:
        name = self._api_agent_name("parent", request.parent)
        store = self._require_store("parent", name)
        size = validation.page_size(request.page_size, DEFAULT_VERSION_PAGE)
        before = validation.decode_page_token(f"agent-versions|{name}", request.page_token)
        before_version = int(before) if before and before.isdigit() else 0
        tenant = current_principal().tenant
        try:
            await store.get_agent(tenant, name)
            records = await store.list_versions(tenant, name, size + 1, before_version)
        except AgentNotFoundError:
            raise _not_found("parent", name) from None
        response = pb.ListAgentVersionsResponse()
        for record in records[:size]:
            entry = await self._catalog.get(tenant, name, record.version)
            response.versions.append(entry_to_proto(entry, version_name=True))
        if len(records) > size:
            response.next_page_token = validation.encode_page_token(
                f"agent-versions|{name}", str(records[size - 1].version)
            )
        return response

    @unary_errors
    async def ListAgentAliases(
        self, request: pb.ListAgentAliasesRequest, context: grpc.aio.ServicerContext
    ) -> pb.ListAgentAliasesResponse:
        name = self._api_agent_name("parent", request.parent)
        store = self._require_store("parent", name)
        tenant = current_principal().tenant
        try:
            await store.get_agent(tenant, name)
            aliases = await store.list_aliases(tenant, name)
        except AgentNotFoundError:
            raise _not_found("parent", name) from None
        return pb.ListAgentAliasesResponse(aliases=[alias_to_proto(a) for a in aliases[:MAX_ALIASES_LISTED]])

    # -- writes ---------------------------------------------------------------------------

    @unary_errors
    async def CreateAgent(
        self, request: pb.CreateAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.CreateAgentResponse:
        data = self._definition_data("definition", request.definition, required=True)
        definition = self._parse("definition", data)
        name = definition.name
        store = self._require_store("definition.name", name)
        principal = current_principal()
        source = self._catalog.names_taken(name)
        if source is not None:
            raise Answered(Problem(
                grpc.StatusCode.ALREADY_EXISTS, "AGENT_EXISTS",
                f"definition.name: agent {name!r} is defined in the server's "
                f"{'app module' if source == 'code' else 'agent files'}; choose another id",
                {"agent": name}, f"agents/{name}",
            ))
        self._build("definition", definition)
        try:
            record = await store.create_agent(
                principal.tenant, name, definition.model_dump(mode="json", exclude_none=True), principal.subject
            )
        except AgentExistsError:
            raise Answered(Problem(
                grpc.StatusCode.ALREADY_EXISTS, "AGENT_EXISTS",
                f"definition.name: agent {name!r} already exists; change it with UpdateAgent",
                {"agent": name}, f"agents/{name}",
            )) from None
        await self._catalog.refresh()
        entry = await self._catalog.get(principal.tenant, name, record.version)
        return pb.CreateAgentResponse(agent=entry_to_proto(entry))

    @unary_errors
    async def UpdateAgent(
        self, request: pb.UpdateAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.UpdateAgentResponse:
        name = self._api_agent_name("name", request.name)
        store = self._require_store("name", name)
        data = self._definition_data("definition", request.definition, required=True)
        if data.setdefault("name", name) != name:
            raise InvalidArgument("definition.name", f"is {validation.quote(str(data['name']))}; it must be {name!r}")
        definition = self._parse("definition", data)
        if request.expected_version < 0:
            raise InvalidArgument("expected_version", "must be 0 (any) or a version number")
        self._build("definition", definition)
        principal = current_principal()
        try:
            record = await store.update_agent(
                principal.tenant, name, definition.model_dump(mode="json", exclude_none=True),
                expected_version=request.expected_version or None, created_by=principal.subject,
            )
        except AgentNotFoundError:
            raise _not_found("name", name) from None
        except VersionConflictError as exc:
            latest = getattr(exc, "latest", None)
            raise Answered(Problem(
                grpc.StatusCode.ABORTED, "VERSION_CONFLICT",
                f"expected_version: agent {name!r} is at version {latest}, not {request.expected_version}; "
                "read it again and retry",
                {"agent": name, "expected_version": str(request.expected_version), "latest_version": str(latest)},
            )) from None
        await self._catalog.refresh()
        entry = await self._catalog.get(principal.tenant, name, record.version)
        return pb.UpdateAgentResponse(agent=entry_to_proto(entry))

    @unary_errors
    async def DeleteAgent(
        self, request: pb.DeleteAgentRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAgentResponse:
        name = self._api_agent_name("name", request.name)
        store = self._require_store("name", name)
        try:
            await store.delete_agent(current_principal().tenant, name)
        except AgentNotFoundError:
            raise _not_found("name", name) from None
        await self._catalog.refresh()
        return pb.DeleteAgentResponse()

    @unary_errors
    async def SetAgentAlias(
        self, request: pb.SetAgentAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.SetAgentAliasResponse:
        name, rest = agent_ref("alias.name", request.alias.name)
        if not rest.startswith("aliases/"):
            raise InvalidArgument("alias.name", "must be 'agents/AGENT/aliases/ALIAS'")
        self._check_writable(name)
        store = self._require_store("alias.name", name)
        routes = [(route.version, route.weight) for route in request.alias.routes]
        if not routes:
            raise InvalidArgument("alias.routes", "needs at least one route")
        for i, (version, weight) in enumerate(routes):
            if version < 1:
                raise InvalidArgument(f"alias.routes[{i}].version", "must be a version number (1 or more)")
            if not 1 <= weight <= 100:
                raise InvalidArgument(f"alias.routes[{i}].weight", "must be 1..100 (percent)")
        if len({v for v, _ in routes}) != len(routes):
            raise InvalidArgument("alias.routes", "names a version twice")
        if sum(w for _, w in routes) != 100:
            raise InvalidArgument("alias.routes", f"weights sum to {sum(w for _, w in routes)}; they must sum to 100")
        try:
            record = await store.set_alias(
                current_principal().tenant, name, rest.removeprefix("aliases/"), tuple(routes)
            )
        except AgentNotFoundError:
            raise _not_found("alias.name", name) from None
        except AgentVersionNotFoundError as exc:
            raise _not_found("alias.routes", name, f"agent {name!r} has no such version ({exc})") from None
        await self._catalog.refresh()
        return pb.SetAgentAliasResponse(alias=alias_to_proto(record))

    @unary_errors
    async def DeleteAgentAlias(
        self, request: pb.DeleteAgentAliasRequest, context: grpc.aio.ServicerContext
    ) -> pb.DeleteAgentAliasResponse:
        name, rest = agent_ref("name", request.name)
        if not rest.startswith("aliases/"):
            raise InvalidArgument("name", "must be 'agents/AGENT/aliases/ALIAS'")
        self._check_writable(name)
        store = self._require_store("name", name)
        try:
            await store.delete_alias(current_principal().tenant, name, rest.removeprefix("aliases/"))
        except (AgentNotFoundError, LookupError):
            raise _not_found("name", name, f"agent {name!r} has no alias {rest.removeprefix('aliases/')!r}") from None
        await self._catalog.refresh()
        return pb.DeleteAgentAliasResponse()

    # -- helpers --------------------------------------------------------------------------

    def _api_agent_name(self, field: str, value: str) -> str:
        name, rest = agent_ref(field, value)
        if rest:
            raise InvalidArgument(field, "must name an agent ('agents/AGENT'), not a version or an alias")
        self._check_writable(name)
        return name

    def _check_writable(self, name: str) -> None:
        source = self._catalog.names_taken(name)
        if source is not None:
            raise _read_only(name, source)

    def _require_store(self, field: str, name: str) -> AgentStore:
        if self._agent_store is None:
            raise _not_found(field, name, "this server keeps no agents made through the API (no agent store)")
        return self._agent_store

    @staticmethod
    def _definition_data(field: str, message: Any, *, required: bool) -> dict[str, Any]:
        if required and not message.fields:
            raise InvalidArgument(field, "is required: the agent definition (see agent.schema.json)")
        validation.check_struct(field, message)
        return dict_from_struct(message)

    def _parse(self, field: str, data: dict[str, Any]) -> Any:
        """The definition with every problem at once, references included (tools, guardrails and
        handoff targets the caller can see); imports by path are refused (API callers are not
        the operator)."""
        name = data.get("name") if isinstance(data.get("name"), str) else ""
        known = self._catalog.known_names(current_principal().tenant) | ({name} if name else set())
        try:
            definition = parse_definition(
                data, app_tools=self._catalog.app_tools, known_agents=known, allow_imports=False,
                app_guardrails=self._catalog.app_guardrails,
            )
        except DefinitionError as exc:
            raise _definition_problem(field, exc) from None
        refused = mcp_host_violations(definition, self._mcp_allowed_hosts)
        if refused:
            raise _definition_problem(field, DefinitionError(refused))
        return definition

    def _build(self, field: str, definition: Any) -> None:
        try:
            self._catalog.validate_new(current_principal().tenant, definition)
        except DefinitionError as exc:
            raise _definition_problem(field, exc) from None
