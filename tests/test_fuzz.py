"""Fuzzing every RPC of a real server: no input may get UNKNOWN or INTERNAL, or a server traceback.

Two fuzzers, both deterministic (fixed seeds; hypothesis derandomized, without its
example database) and bounded (a fixed number of requests per RPC), so CI sends the same
requests every time, in about half a minute on two cores:

1. fields (``fuzz_fields``): hypothesis builds each RPC's request message from its
   descriptor. Three requests in four are valid (real names: a session with items, a
   finished run, a run waiting for an approval, a trace, real page tokens) but for one
   leaf field (``start.context``, ``items[0].tool_call.raw_arguments``...) holding a
   hostile value: NUL and other control characters, odd and long Unicode, forged page
   tokens, JSON that chokes parsers, int32/int64 edges, unknown enum values, Structs
   nested to the decoder's limit or holding NaN/Infinity, out-of-range timestamps; the
   fourth mixes hostile values into any field. So requests get past the first check and
   reach the stores. The Python client parses every reply.
2. wire (``fuzz_wire``): a valid request of every RPC, serialized, then mutated byte by
   byte (bit flips, insertions, truncation, varints past 64 bits, duplicated spans,
   unknown fields, a printable byte inside a string for another) with a seeded
   ``random.Random``, sent as raw bytes.

The server stores everything in Postgres (the strictest store: no NUL in text or jsonb,
int64 bounds) and runs on its own event loop in a thread (hypothesis drives synchronous
test functions). What the server answers depends a little on timing (a run still going or
not), what is sent does not. Any answer is fine except UNKNOWN and INTERNAL; a log handler fails the test
on any ERROR record from the agentd or grpc loggers that carries a traceback (or is
gRPC's "Unexpected ... raised by servicer method"). ``pytest -s`` prints what each RPC
answered, to see that the requests reach past validation.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import threading
import time
from collections import Counter
from typing import Any, Callable, Iterator

import grpc
import pytest
from google.protobuf import descriptor as pd
from google.protobuf import duration_pb2, field_mask_pb2, message_factory, struct_pb2, timestamp_pb2
from google.protobuf.message import Message
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from agentd.server import Agent, App, Script, call, calls, function_tool, say
from agentd.server.models.scripted import ScriptedProvider
from agentd.server.serve import RunningServer, start_server
from agentd.server.settings import Settings
from agentd.v1 import agent_service_pb2 as apb
from agentd.v1 import item_pb2
from agentd.v1 import session_service_pb2 as spb
from agentd.v1 import trace_service_pb2 as tpb
from tests.backends_postgres import POSTGRES_URL, dropped_afterwards, new_schema

EXAMPLES_PER_RPC = 200
MUTATIONS_PER_RPC = 150
SEED = 20240611
CALL_TIMEOUT_S = 5.0
BAD_CODES = {grpc.StatusCode.UNKNOWN, grpc.StatusCode.INTERNAL}


# -- the app under fuzz: fast, and every run ends by itself ---------------------------------


@function_tool
def get_weather(city: str) -> dict:
    """Current weather.

    Args:
        city: City name.
    """
    return {"city": city, "sky": "clear"}


@function_tool(needs_approval=True)
def refund(order_id: str) -> str:
    """Refund an order (approved first)."""
    return f"refunded {order_id}"


specialist = Agent(name="specialist", model="plain", instructions="Specialist.", tools=[get_weather])
assistant = Agent(name="assistant", model="tools", instructions="Help.", tools=[get_weather], handoffs=[specialist])
approver = Agent(name="approver", model="approve", instructions="Refund.", tools=[refund])
fuzz_app = App(agents=[assistant, specialist, approver])
scripts = {
    "tools": Script.of(calls(call("get_weather", city="Paris")), say("sunny")),
    "approve": Script.of(calls(call("refund", order_id="A-1")), say("refunded")),
}

# -- RPCs ------------------------------------------------------------------------------------

UNARY, SERVER_STREAM, BIDI = "unary", "server-stream", "bidi"
RPCS: dict[str, tuple[str, type[Message], str]] = {
    "ListAgents": ("AgentService", apb.ListAgentsRequest, UNARY),
    "GetAgent": ("AgentService", apb.GetAgentRequest, UNARY),
    "Run": ("AgentService", apb.RunRequest, BIDI),
    "StreamRun": ("AgentService", apb.StreamRunRequest, SERVER_STREAM),
    "CreateRun": ("AgentService", apb.CreateRunRequest, UNARY),
    "GetRun": ("AgentService", apb.GetRunRequest, UNARY),
    "ListRuns": ("AgentService", apb.ListRunsRequest, UNARY),
    "WatchRun": ("AgentService", apb.WatchRunRequest, SERVER_STREAM),
    "SubmitToolOutputs": ("AgentService", apb.SubmitToolOutputsRequest, UNARY),
    "ApproveToolCall": ("AgentService", apb.ApproveToolCallRequest, UNARY),
    "CreateSession": ("SessionService", spb.CreateSessionRequest, UNARY),
    "GetSession": ("SessionService", spb.GetSessionRequest, UNARY),
    "ListSessions": ("SessionService", spb.ListSessionsRequest, UNARY),
    "ListSessionItems": ("SessionService", spb.ListSessionItemsRequest, UNARY),
    "AddSessionItems": ("SessionService", spb.AddSessionItemsRequest, UNARY),
    "ListTraces": ("TraceService", tpb.ListTracesRequest, UNARY),
    "GetTrace": ("TraceService", tpb.GetTraceRequest, UNARY),
    # Last: they cancel, expire (a short TTL), empty or delete what the others aim at.
    "UpdateSession": ("SessionService", spb.UpdateSessionRequest, UNARY),
    "CancelRun": ("AgentService", apb.CancelRunRequest, UNARY),
    "PopSessionItem": ("SessionService", spb.PopSessionItemRequest, UNARY),
    "ClearSessionItems": ("SessionService", spb.ClearSessionItemsRequest, UNARY),
    "DeleteSession": ("SessionService", spb.DeleteSessionRequest, UNARY),
}
_MODULES = {"AgentService": apb, "SessionService": spb, "TraceService": tpb}


# -- the server, in a thread, and what it logs -----------------------------------------------


class Tracebacks(logging.Handler):
    """ERROR records with a traceback (or gRPC's 'Unexpected ... raised by servicer') from agentd/grpc."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if record.name.startswith(("agentd", "grpc")) and (
            record.exc_info or "Unexpected" in message or "Exception" in message
        ):
            self.records.append(f"{record.name}: {message[:300]}")


class FuzzTarget:
    """A real server on its own loop and thread, the real names it holds, and a channel to it."""

    def __init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fuzz-server", daemon=True)
        self._thread.start()
        # Postgres for sessions, runs and traces: the strictest about what it stores (no NUL in
        # text or jsonb, int64 bounds), so the fuzz finds what the lenient stores let through.
        self.schema = new_schema()
        config = Settings(port=0, store="postgres", postgres_url=POSTGRES_URL, postgres_schema=self.schema,
                          tool_timeout_s=2, shutdown_grace_s=0)
        models = ScriptedProvider(scripts, default=Script.of(say("ok")))
        self.server: RunningServer = self._run(start_server(config, fuzz_app, models=models))
        self.channel = grpc.insecure_channel(self.server.target)
        self.valid: dict[str, list[str]] = {}
        self.hostile: dict[str, list[str]] = {}
        self.seeds: dict[str, Message] = {}
        self.tracebacks = Tracebacks()
        self.outcomes: dict[tuple[str, str], Counter[str]] = {}
        logging.getLogger().addHandler(self.tracebacks)

    def _run(self, coroutine: Any) -> Any:
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result(timeout=60)

    def stub(self, method: str, *, raw: bool = False) -> Callable[..., Any]:
        service, request_type, kind = RPCS[method]
        make = {UNARY: self.channel.unary_unary, SERVER_STREAM: self.channel.unary_stream,
                BIDI: self.channel.stream_stream}[kind]
        path = f"/agentd.v1.{service}/{method}"
        if raw:
            return make(path)  # bytes in, bytes out
        response_type = getattr(_MODULES[service], f"{method}Response")
        return make(path, request_serializer=request_type.SerializeToString,
                    response_deserializer=response_type.FromString)

    def prepare(self) -> None:
        """Real resources to aim at: a session with items, a finished run and one waiting for an
        approval, a trace, page tokens of every listing; then the values and seeds built on them."""
        self.stub("CreateSession")(spb.CreateSessionRequest(session_id="fuzz"))
        self.stub("AddSessionItems")(spb.AddSessionItemsRequest(parent="sessions/fuzz", items=[
            item_pb2.Item(message=item_pb2.Message(role=item_pb2.ROLE_USER, text=f"m{i}")) for i in range(3)]))
        events = []
        for _ in range(2):
            events = [r.event for r in self.stub("StreamRun")(apb.StreamRunRequest(start=apb.StartRun(
                agent="agents/assistant", input="weather?", session="sessions/fuzz")), timeout=CALL_TIMEOUT_S)]
        done, trace_id = f"runs/{events[0].run_id}", events[0].trace_id
        waiting = self.stub("CreateRun")(apb.CreateRunRequest(start=apb.StartRun(
            agent="agents/approver", input="refund", session="sessions/waiting", detached=True))).run.name
        call_ids = ["call_missing"]
        for _ in range(250):
            info = self.stub("GetRun")(apb.GetRunRequest(name=waiting)).run
            if info.required_actions:
                call_ids.insert(0, info.required_actions[0].item.tool_call.call_id)
                break
            time.sleep(0.02)
        tokens = {
            "ListSessionItemsRequest": self.stub("ListSessionItems")(spb.ListSessionItemsRequest(
                parent="sessions/fuzz", page_size=1)).next_page_token,
            "ListSessionsRequest": self.stub("ListSessions")(spb.ListSessionsRequest(page_size=1)).next_page_token,
            "ListRunsRequest": self.stub("ListRuns")(apb.ListRunsRequest(
                session="sessions/fuzz", page_size=1)).next_page_token,
            "ListAgentsRequest": self.stub("ListAgents")(apb.ListAgentsRequest(page_size=1)).next_page_token,
            "ListTracesRequest": self.stub("ListTraces")(tpb.ListTracesRequest(page_size=1)).next_page_token,
        }
        sessions = ["sessions/fuzz"] * 5 + ["sessions/waiting", "sessions/new-1", "fuzz"]
        runs = [done, waiting, done.removeprefix("runs/"), "runs/run_missing"]
        self.valid = {
            "name": sessions,
            "parent": sessions, "session": sessions,
            # A start on the waiting run's session would queue behind it (ENQUEUE) until the call's deadline.
            "StartRun.session": [s for s in sessions if s != "sessions/waiting"],
            **{f"{m}Request.name": runs for m in ("GetRun", "CancelRun", "SubmitToolOutputs", "ApproveToolCall")},
            "WatchRunRequest.name": [done, "runs/run_missing"],  # not the waiting run: a watch would wait
            "GetAgentRequest.name": ["agents/assistant", "agents/specialist", "agents/nobody"],
            "GetTraceRequest.name": [f"traces/{trace_id}", trace_id, "traces/" + "0" * 32],
            "StartRun.agent": ["agents/assistant", "assistant", "agents/specialist", "agents/nobody"],
            "agent": ["", "assistant"],
            **{f"{kind}.page_token": ["", token] for kind, token in tokens.items()},
            "request_id": ["", "r-1", "r-2"],
            "session_id": ["", "fuzz", "new-2", "a:b.c_d-e"],
            "call_id": call_ids,
            "tool_name": ["get_weather", "refund", "transfer_to_specialist"],
            "input": ["hi", "weather in Paris?"],
            "paths": ["state", "metadata", "ttl"],
            "raw_arguments": ['{"city": "Paris"}', "{}", "not json"],
        }
        self.hostile = {
            # Names of the wrong kind (never the waiting run's: a WatchRun of it would wait for the deadline).
            "name": ["sessions/", "sessions/a/b", "runs/", "agents/", "traces/", "sessions/fuzz", "agents/assistant",
                     done, "x" * 300],
            # Tokens of other listings, and forged ones (the shape a reader of one would guess).
            **{f"{kind}.page_token": [*[t for k, t in tokens.items() if t and k != kind], "garbage",
                                      *map(_raw_token, forged)] for kind, forged in {
                "ListSessionItemsRequest": [f"items-oldest|{2**70}", f"items-newest|{2**64}", "items-oldest|-5",
                                            "items-oldest|x"],
                "ListRunsRequest": ["runs|garbage", f"runs|{waiting.removeprefix('runs/')}", "runs|1.5|run_x"],
                "ListTracesRequest": [f"traces|{2**70}:x", "traces|-1:x", "traces|5:"],
                "ListSessionsRequest": ["sessions|x", "sessions|"],
                "ListAgentsRequest": ["agents|\x00", "agents|zzz"],
            }.items()},
            "request_id": ["acme/r-1", "r" * 5000],
            "paths": ["item_count", "name", ""],
            "raw_arguments": HOSTILE_JSON,
        }
        self.seeds = _seed_requests(done, waiting, trace_id, call_ids[0], tokens)

    def close(self) -> None:
        for (method, kind), counts in sorted(self.outcomes.items()):
            print(f"{method:18} {kind:6} {dict(counts.most_common())}")
        logging.getLogger().removeHandler(self.tracebacks)
        self.channel.close()
        self._run(self.server.stop(grace_s=0))
        self._run(_drop_schema(self.schema))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()


async def _drop_schema(schema: str) -> None:
    async with dropped_afterwards(schema):
        pass


def _raw_token(text: str) -> str:
    """A page token as a forger would make one."""
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


@pytest.fixture(scope="module")
def target() -> Iterator[FuzzTarget]:
    fuzz = FuzzTarget()
    try:
        fuzz.prepare()
        yield fuzz
    finally:
        fuzz.close()


# -- values: a valid request with one (or a few) hostile fields -------------------------------
#
# A request wrong everywhere stops at its first check. So a request is built valid (real
# names, small numbers, known enum values, plain Structs, sane times), then one leaf field
# (a path such as ``start.context`` or ``items[0].tool_call.raw_arguments``) gets a hostile
# value; one request in four instead mixes hostile values into any field.

HOSTILE_JSON = [
    "[" * 100_000, '{"a":' * 40 + "1" + "}" * 40, '{"a":' * 21 + "1" + "}" * 21, '{"x": NaN}', '{"x": 1e999}',
    '{"x": ' + "9" * 5000 + "}", '{"x": [' + "[" * 990 + "]" * 990 + "]}",
]
HOSTILE_STRINGS = [
    "", " ", "\x00", "a\x00b", "\x1b[31m", "line\nbreak", "\t", "\x7f", "\u0085", "\u202e\u2066", "\ufeff",
    "\U0001f600" * 3, "é" * 300, "/", "../..", "%s%n%x", "runs|garbage", "\\", "'\"", "x" * 5000, "-1", "NaN",
    "9" * 400, *HOSTILE_JSON,
]
_hostile_text = st.one_of(
    st.sampled_from(HOSTILE_STRINGS),
    st.text(st.characters(exclude_categories=("Cs",)), max_size=40),
    st.text(st.characters(codec="ascii"), min_size=200, max_size=300),
)
_INT_EDGES = [-1, 1000, 1001, 2**31 - 1, -(2**31), 2**53, 2**62, 2**63 - 1, -(2**63)]


def _weighted(odds: int, likely: st.SearchStrategy[Any], other: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``likely`` about ``odds`` times in ``odds + 1`` (``one_of`` would not weight its branches:
    hypothesis favours variety)."""
    return st.sampled_from((True,) * odds + (False,)).flatmap(lambda first: likely if first else other)


_json_leaf = st.one_of(st.none(), st.booleans(), st.integers(-1000, 1000), st.text(max_size=10))
_valid_json = st.recursive(
    _json_leaf, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
_hostile_json = st.recursive(
    st.one_of(_json_leaf, st.floats(allow_nan=True, allow_infinity=True), st.integers(-(2**70), 2**70),
              _hostile_text),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(_hostile_text, inner, max_size=3), max_leaves=8,
)


def _deep(depth: int, lists: bool) -> dict[str, Any]:
    value: Any = 1
    for _ in range(depth - 1):
        value = [value] if lists else {"a": value}
    return {"x": value}


def _struct_message(value: dict[str, Any]) -> struct_pb2.Struct:
    message = struct_pb2.Struct()
    message.update(value)
    return message


_valid_struct = st.dictionaries(st.text(max_size=8), _valid_json, max_size=4).map(_struct_message)
_hostile_struct = st.one_of(
    st.sampled_from([{"x": float("nan")}, {"x": [float("inf")]}, {"x": -float("inf")}, {"\x00": 1},
                     {"x": "\x00"}, {"x": 1e308, "y": 2**63}]),
    st.dictionaries(_hostile_text, _hostile_json, max_size=4),
    st.builds(_deep, st.integers(15, 33), st.booleans()),  # objects decode up to about 33 deep
    st.builds(_deep, st.integers(33, 48), st.just(True)),  # lists further
).map(_struct_message)


def _time(cls: type[Message], max_seconds: int, hostile: bool) -> st.SearchStrategy[Message]:
    if not hostile:
        return st.builds(lambda s, n: cls(seconds=s, nanos=n), st.integers(0, max_seconds),
                         st.integers(0, 999_999_999))
    return st.builds(lambda s, n: cls(seconds=s, nanos=n),
                     st.one_of(st.sampled_from(_INT_EDGES), st.integers(-(2**40), 2**40)),
                     st.one_of(st.sampled_from([-1, 10**9, 2**31 - 1, -(2**31)]), st.integers(-(2**31), 2**31 - 1)))


def _string(owner: str, field: str, target: FuzzTarget, hostile: bool) -> st.SearchStrategy[str]:
    if not hostile:
        return st.sampled_from(target.valid.get(f"{owner}.{field}") or target.valid.get(field) or ["", "hello"])
    own = target.hostile.get(f"{owner}.{field}") or target.hostile.get(field)  # forged tokens, JSON...: mostly
    return _weighted(3, st.sampled_from(own), _hostile_text) if own else _hostile_text


def _value(owner: str, field: pd.FieldDescriptor, target: FuzzTarget, hostile: bool) -> st.SearchStrategy[Any]:
    """A valid or a hostile value for one (non-repeated) field."""
    t = field.type
    if t == pd.FieldDescriptor.TYPE_STRING:
        return _string(owner, field.name, target, hostile)
    if t == pd.FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if t == pd.FieldDescriptor.TYPE_BYTES:  # image/file data: small, any bytes
        return st.binary(max_size=64) if hostile else st.sampled_from([b"", b"\x89PNG"])
    if t in (pd.FieldDescriptor.TYPE_INT32, pd.FieldDescriptor.TYPE_INT64):
        bits = 31 if t == pd.FieldDescriptor.TYPE_INT32 else 63
        if not hostile:
            return st.integers(0, 3)
        return st.one_of(st.sampled_from([e for e in _INT_EDGES if -(2**bits) <= e < 2**bits]),
                         st.integers(-(2**bits), 2**bits - 1))
    if t == pd.FieldDescriptor.TYPE_ENUM:  # valid: a named value other than the UNSPECIFIED zero
        if hostile:
            return st.one_of(st.sampled_from([0, -1, len(field.enum_type.values)]), st.integers(-(2**31), 2**31 - 1))
        return st.sampled_from([v.number for v in field.enum_type.values if v.number] or [0])
    if t == pd.FieldDescriptor.TYPE_MESSAGE:
        return _message(field.message_type, target, hostile)
    raise AssertionError(f"no strategy for {field.full_name} (type {t})")


def _message(descriptor: pd.Descriptor, target: FuzzTarget, hostile: bool) -> st.SearchStrategy[Message]:
    """A message: every field valid (``hostile`` False), or any field perhaps hostile."""
    name = descriptor.full_name
    if name == "google.protobuf.Struct":
        return _weighted(2, _hostile_struct, _valid_struct) if hostile else _valid_struct
    if name == "google.protobuf.Timestamp":
        return _time(timestamp_pb2.Timestamp, 4_000_000_000, hostile)
    if name == "google.protobuf.Duration":
        return _time(duration_pb2.Duration, 86_400, hostile)
    if name == "google.protobuf.FieldMask":
        return st.builds(lambda paths: field_mask_pb2.FieldMask(paths=paths),
                         st.lists(_string("FieldMask", "paths", target, hostile), max_size=3))

    def value(field: pd.FieldDescriptor) -> st.SearchStrategy[Any]:
        valid = _value(descriptor.name, field, target, False)
        return _weighted(3, valid, _value(descriptor.name, field, target, True)) if hostile else valid

    fields: dict[str, st.SearchStrategy[Any]] = {}
    oneofs: dict[str, list[st.SearchStrategy[Any]]] = {}
    for field in descriptor.fields:
        if _is_map(field):
            key, val = field.message_type.fields_by_name["key"], field.message_type.fields_by_name["value"]
            strategy: st.SearchStrategy[Any] = st.dictionaries(value(key), value(val), max_size=3)
        elif field.is_repeated:
            strategy = st.lists(value(field), min_size=1, max_size=2)
        else:
            strategy = value(field)
        if field.containing_oneof is not None:  # at most one member of a oneof
            oneofs.setdefault(field.containing_oneof.name, []).append(strategy.map(lambda v, n=field.name: (n, v)))
        else:
            fields[field.name] = _weighted(5, strategy, st.none())  # None: left unset
    for oneof, members in oneofs.items():  # RunRequest.start three times as likely as a control message
        choices = (*(0, 0, 0)[: 3 if descriptor.name == "RunRequest" else 0], *range(len(members)),
                   *((None,) if hostile else ()))
        fields[f"oneof {oneof}"] = st.sampled_from(choices).flatmap(
            lambda i, m=members: st.none() if i is None else m[i])
    return st.fixed_dictionaries(fields).map(lambda values: _build(descriptor, values))


def _is_map(field: pd.FieldDescriptor) -> bool:
    return field.message_type is not None and field.message_type.GetOptions().map_entry


def _build(descriptor: pd.Descriptor, values: dict[str, Any]) -> Message:
    message = message_factory.GetMessageClass(descriptor)()
    chosen = [v for k, v in values.items() if k.startswith("oneof ") and v is not None]
    plain = [(k, v) for k, v in values.items() if not k.startswith("oneof ")]
    for name, value in [*plain, *chosen]:
        if value is not None:
            _set(message, descriptor.fields_by_name[name], value)
    return message


def _set(message: Message, field: pd.FieldDescriptor, value: Any) -> None:
    target = getattr(message, field.name)
    if _is_map(field):
        target.clear()
        target.update(value)
    elif field.is_repeated:
        del target[:]
        if field.message_type is not None:
            for item in value:
                target.add().CopyFrom(item)
        else:
            target.extend(value)
    elif field.message_type is not None:
        target.CopyFrom(value)
    else:
        setattr(message, field.name, value)


_WELL_KNOWN = ("google.protobuf.Struct", "google.protobuf.Timestamp", "google.protobuf.Duration",
               "google.protobuf.FieldMask")


def _leaf_paths(descriptor: pd.Descriptor, prefix: tuple[pd.FieldDescriptor, ...] = ()) -> list[tuple[Any, ...]]:
    """Every field a hostile value can go into, as a path of field descriptors from the request."""
    paths: list[tuple[Any, ...]] = []
    for field in descriptor.fields:
        path = (*prefix, field)
        nested = field.message_type is not None and not _is_map(field) and \
            field.message_type.full_name not in _WELL_KNOWN
        paths.extend(_leaf_paths(field.message_type, path) if nested else [path])
    return paths


def _with_hostile_leaf(message: Message, path: tuple[pd.FieldDescriptor, ...], value: Any,
                       fillers: list[Message]) -> Message:
    """``message`` with the field at ``path`` set to ``value`` (a repeated field: its first element).

    A message on the way that is not there yet (an empty list, another member of a oneof)
    is first filled with a valid one (``fillers``, one per step), so the request stays valid
    but for the hostile value."""
    current = message
    for field, filler in zip(path[:-1], fillers):
        container = getattr(current, field.name)
        if field.is_repeated:
            if not len(container):
                container.add().CopyFrom(filler)
            current = container[0]
        else:
            if not current.HasField(field.name):
                container.CopyFrom(filler)
            current = container
    leaf = path[-1]
    if leaf.is_repeated and not _is_map(leaf):
        container = getattr(current, leaf.name)
        if leaf.message_type is not None:
            (container[0] if len(container) else container.add()).CopyFrom(value)
        elif len(container):
            container[0] = value
        else:
            container.append(value)
    else:
        _set(current, leaf, value)
    return message


def _request(descriptor: pd.Descriptor, target: FuzzTarget) -> st.SearchStrategy[Message]:
    """Three times in four a valid request with one hostile leaf, else hostile values anywhere."""
    paths = _leaf_paths(descriptor)

    def one_hostile(path: tuple[pd.FieldDescriptor, ...]) -> st.SearchStrategy[Message]:
        leaf, owner = path[-1], path[-1].containing_type.name
        if _is_map(leaf):
            key, val = leaf.message_type.fields_by_name["key"], leaf.message_type.fields_by_name["value"]
            bad = st.dictionaries(_value(owner, key, target, True), _value(owner, val, target, True),
                                  min_size=1, max_size=2)
        else:
            bad = _value(owner, leaf, target, True)
        fillers = st.tuples(*(_message(field.message_type, target, False) for field in path[:-1]))
        return st.builds(lambda message, value, fill: _with_hostile_leaf(message, path, value, list(fill)),
                         _message(descriptor, target, False), bad, fillers)

    return _weighted(3, st.sampled_from(paths).flatmap(one_hostile), _message(descriptor, target, True))


# -- calling, and what counts as a failure ----------------------------------------------------


def _call(target: FuzzTarget, method: str, request: Any) -> grpc.StatusCode:
    raw = isinstance(request, bytes)
    stub, kind = target.stub(method, raw=raw), RPCS[method][2]
    try:
        if kind == UNARY:
            replies = [stub(request, timeout=CALL_TIMEOUT_S)]
        elif kind == SERVER_STREAM:
            replies = list(stub(request, timeout=CALL_TIMEOUT_S))
        else:
            replies = list(stub(iter([request]), timeout=CALL_TIMEOUT_S))
    except grpc.RpcError as exc:
        return exc.code()
    assert all(reply is not None for reply in replies), f"{method}: a reply the client could not parse"
    return grpc.StatusCode.OK


def _send(target: FuzzTarget, method: str, request: Message | bytes) -> None:
    start = len(target.tracebacks.records)
    code = _call(target, method, request)
    kind = "raw" if isinstance(request, bytes) else "fields"
    target.outcomes.setdefault((method, kind), Counter())[code.name] += 1
    tracebacks = target.tracebacks.records[start:]
    shown = repr(request[:300]) if isinstance(request, bytes) else str(request)[:800]
    assert code not in BAD_CODES and not tracebacks, f"{method}: {code.name} for {shown}; server logged {tracebacks}"


# -- 1. every field of every request, with hypothesis ----------------------------------------


def fuzz_fields(target: FuzzTarget, method: str) -> None:
    @settings(max_examples=EXAMPLES_PER_RPC, deadline=None, derandomize=True, database=None,
              phases=(Phase.explicit, Phase.generate, Phase.shrink), print_blob=False,
              suppress_health_check=list(HealthCheck))
    @given(request=_request(RPCS[method][1].DESCRIPTOR, target))
    def fuzz(request: Message) -> None:
        _send(target, method, request)

    fuzz()


# -- 2. byte mutations of a valid request of every RPC ----------------------------------------


def _seed_requests(done: str, waiting: str, trace_id: str, call_id: str, tokens: dict[str, str]) -> dict[str, Message]:
    """One valid request per RPC, with as many fields set as it has."""
    state = _struct_message({"plan": "pro", "n": 3, "tags": ["a", "b"], "nested": {"ok": True, "none": None}})
    start = apb.StartRun(agent="agents/assistant", input="weather?", session="sessions/fuzz", context=state,
                         max_turns=5, request_id="seed", trace=apb.TraceOptions(
                             workflow_name="wf", group_id="g", metadata={"k": "v"}),
                         session_policy=apb.SESSION_POLICY_ENQUEUE)
    items = [
        item_pb2.Item(agent="assistant", message=item_pb2.Message(role=item_pb2.ROLE_USER, text="hi")),
        item_pb2.Item(tool_call=item_pb2.ToolCall(call_id="c1", tool_name="get_weather", arguments=state)),
        item_pb2.Item(tool_result=item_pb2.ToolResult(call_id="c1", tool_name="get_weather", output="sunny")),
    ]
    session = spb.Session(name="sessions/fuzz", metadata={"k": "v"}, state=state,
                          ttl=duration_pb2.Duration(seconds=3600))
    return {
        "ListAgents": apb.ListAgentsRequest(page_size=1, page_token=tokens["ListAgentsRequest"]),
        "GetAgent": apb.GetAgentRequest(name="agents/assistant"),
        "Run": apb.RunRequest(start=start),
        "StreamRun": apb.StreamRunRequest(start=start),
        "CreateRun": apb.CreateRunRequest(start=start),
        "GetRun": apb.GetRunRequest(name=done),
        "ListRuns": apb.ListRunsRequest(session="sessions/fuzz", page_size=1, page_token=tokens["ListRunsRequest"]),
        "WatchRun": apb.WatchRunRequest(name=done, after_sequence=2),
        "SubmitToolOutputs": apb.SubmitToolOutputsRequest(name=waiting, outputs=[
            apb.ToolOutputSubmission(call_id=call_id, output="done", is_error=True)]),
        "ApproveToolCall": apb.ApproveToolCallRequest(name=waiting, approval=apb.ToolApproval(
            call_id=call_id, approved=False, reason="no")),
        "CreateSession": spb.CreateSessionRequest(session_id="seeded", session=session, request_id="seed"),
        "GetSession": spb.GetSessionRequest(name="sessions/fuzz"),
        "ListSessions": spb.ListSessionsRequest(page_size=1, page_token=tokens["ListSessionsRequest"]),
        "UpdateSession": spb.UpdateSessionRequest(session=session, update_mask=field_mask_pb2.FieldMask(
            paths=["state", "metadata", "ttl"])),
        "ListSessionItems": spb.ListSessionItemsRequest(parent="sessions/fuzz", page_size=1,
                                                         page_token=tokens["ListSessionItemsRequest"],
                                                         order=spb.ITEM_ORDER_OLDEST_FIRST),
        "AddSessionItems": spb.AddSessionItemsRequest(parent="sessions/fuzz", items=items, request_id="seed"),
        "ListTraces": tpb.ListTracesRequest(
            page_size=1, workflow_name="agentd run", group_id="fuzz",
            agent="assistant", status=tpb.SPAN_STATUS_OK, start_time_from=timestamp_pb2.Timestamp(seconds=1),
            start_time_to=timestamp_pb2.Timestamp(seconds=4_000_000_000)),
        "GetTrace": tpb.GetTraceRequest(name=f"traces/{trace_id}"),
        "CancelRun": apb.CancelRunRequest(name=waiting, reason="fuzz"),
        "PopSessionItem": spb.PopSessionItemRequest(parent="sessions/fuzz"),
        "ClearSessionItems": spb.ClearSessionItemsRequest(parent="sessions/fuzz"),
        "DeleteSession": spb.DeleteSessionRequest(name="sessions/fuzz"),
    }


def _mutate(data: bytes, rng: random.Random) -> bytes:
    buf = bytearray(data)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(16)
        position = rng.randrange(len(buf) + 1)
        if op >= 7:  # keep the wire format: a printable byte (most likely inside a string) for another
            printable = [i for i, byte in enumerate(buf) if 0x20 <= byte < 0x7F]
            if printable:
                buf[rng.choice(printable)] = rng.choice(b"\x00\x01\x1b\x7f /|:.-_0aZ9{[\"\\")
        elif op == 0 and buf:  # flip a bit
            buf[min(position, len(buf) - 1)] ^= 1 << rng.randrange(8)
        elif op == 1:  # insert random bytes
            buf[position:position] = rng.randbytes(rng.randint(1, 8))
        elif op == 2:  # truncate
            del buf[position:]
        elif op == 3 and buf:  # an interesting byte: NUL, invalid UTF-8, a length or a tag
            buf[min(position, len(buf) - 1)] = rng.choice([0x00, 0x7F, 0x80, 0xFF, 0xC0, 0xED, 0x0A, 0x12, 0x22])
        elif op == 4:  # a length-delimited field whose varint length runs past 64 bits
            buf[position:position] = bytes([0x12]) + b"\xff" * 9 + b"\x01"
        elif op == 5 and buf:  # duplicate a span (repeated fields, nested lengths)
            begin = rng.randrange(len(buf))
            buf[position:position] = buf[begin:begin + rng.randint(1, 16)]
        elif op == 6:  # an unknown field, or a known one with the wrong wire type
            buf[position:position] = bytes([rng.randrange(1, 256)]) + rng.randbytes(rng.randint(0, 4))
    return bytes(buf)


def fuzz_wire(target: FuzzTarget, method: str) -> None:
    rng = random.Random(f"{SEED}:{method}")
    seed = target.seeds[method]
    seeds = [seed.SerializeToString()]
    if "page_token" in seed.DESCRIPTOR.fields_by_name:  # and without the token, which few mutations leave valid
        bare = type(seed)()
        bare.CopyFrom(seed)
        bare.ClearField("page_token")
        seeds.append(bare.SerializeToString())
    for index in range(MUTATIONS_PER_RPC):
        _send(target, method, _mutate(seeds[index % len(seeds)], rng))


# -- the test: both fuzzers, RPC by RPC (in RPCS order: the destructive ones last) -------------


@pytest.mark.parametrize(("method", "fuzzer"), [(m, f) for m in RPCS for f in ("fields", "wire")])
def test_fuzz(target: FuzzTarget, method: str, fuzzer: str) -> None:
    try:
        (fuzz_fields if fuzzer == "fields" else fuzz_wire)(target, method)
    except BaseException:
        # The server thread may still be logging the traceback of what failed. On Python 3.11
        # formatting a traceback parses source with ast, whose depth counter all threads share:
        # pytest parsing this test's source for its report at the same moment fails with
        # "SystemError: AST constructor recursion depth mismatch" and aborts the session.
        time.sleep(1.0)
        raise
