"""Request validation shared by the services: resource names, ids, text, Structs, page sizes, page tokens.

Each failure is an ``InvalidArgument`` naming the field and saying what to send
instead; services turn it into INVALID_ARGUMENT. What a caller sent is echoed only
through ``quote``: a short prefix, never the whole value (a status message travels in
the reply's metadata, which has a size limit).

What the rules keep out of the stores, whichever store runs:

- resource names (every request field naming an agent, session, run or trace):
  ``{collection}/{id}`` or the bare ``{id}``, nothing else (``resource_id``);
- ids and names (request ids, run, session, agent, trace and call ids, tool names,
  trace labels, metadata keys): no control characters, at most ``MAX_ID_CHARS``;
- text (run input, item text, tool outputs, reasons, metadata values, Struct strings
  and keys): no NUL (U+0000), which Postgres can keep neither in text nor in jsonb;
- Structs (a run's ``context``, session ``state``, a tool call's ``arguments``): at most
  ``MAX_JSON_DEPTH`` levels of objects and arrays, and finite numbers only (JSON has no
  NaN or Infinity);
- page tokens: only one made by this server for the same listing (kind, tenant,
  parent, filters) continues it; anything else is refused before it reaches a store.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import math
import re
from typing import Any

from google.protobuf import duration_pb2, struct_pb2, timestamp_pb2

from agentd.server.runtime.items import MAX_JSON_DEPTH

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_PAGE_SIZE = 1000
# Ids and names a caller sends (request ids, run and call ids...): at most this many characters.
MAX_ID_CHARS = 200
# How much of a caller's value an error message quotes.
QUOTE_CHARS = 64

_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")


class InvalidArgument(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


def quote(value: str, limit: int = QUOTE_CHARS) -> str:
    """``repr`` of at most ``limit`` characters of a caller's value, ``…`` marking a cut."""
    if len(value) <= limit:
        return repr(value)
    return f"{value[:limit]!r}… ({len(value)} characters)"


# Ids and text


def check_id(field: str, value: str, *, max_chars: int = MAX_ID_CHARS) -> str:
    """An id or name: no control characters, at most ``max_chars`` characters."""
    if len(value) > max_chars:
        raise InvalidArgument(field, f"is {len(value)} characters; the limit is {max_chars}")
    found = _CONTROL.search(value)
    if found:
        raise InvalidArgument(
            field, f"must not contain control characters (U+{ord(found.group()):04X} at position {found.start()})"
        )
    return value


def check_text(field: str, value: str) -> str:
    """Free text: anything but NUL (U+0000)."""
    position = value.find("\x00")
    if position >= 0:
        raise InvalidArgument(field, f"must not contain NUL characters (U+0000 at position {position})")
    return value


def check_string_map(field: str, values: Any) -> dict[str, str]:
    """A ``map<string, string>`` (metadata): keys are names, values text."""
    result = {}
    for key, value in values.items():
        check_id(f"{field} key", key)
        check_text(f"{field}[{quote(key)}]", value)
        result[key] = value
    return result


def check_struct(field: str, message: struct_pb2.Struct | struct_pb2.ListValue | struct_pb2.Value) -> None:
    """A Struct (or ListValue/Value) a caller sent: depth, finite numbers, no NUL in keys or strings.

    Iterative, one pass over the message: nothing a caller nests can exhaust the stack.
    """
    stack: list[tuple[Any, int]] = [(message, 0)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, struct_pb2.Value):
            kind = node.WhichOneof("kind")
            if kind == "struct_value":
                stack.append((node.struct_value, depth))
            elif kind == "list_value":
                stack.append((node.list_value, depth))
            elif kind == "string_value":
                check_text(field, node.string_value)
            elif kind == "number_value" and not math.isfinite(node.number_value):
                raise InvalidArgument(field, "holds NaN or Infinity, which JSON cannot represent; send finite numbers")
            continue
        if depth + 1 > MAX_JSON_DEPTH:
            raise InvalidArgument(field, f"nests deeper than {MAX_JSON_DEPTH} levels of objects and arrays")
        if isinstance(node, struct_pb2.Struct):
            for key, value in node.fields.items():
                check_text(f"{field} key", key)
                stack.append((value, depth + 1))
        else:
            stack.extend((value, depth + 1) for value in node.values)


# Resource names
#
# One rule for every request field that names a resource (an agent, a session, a run, a
# trace, the parent of items): the full resource name (``sessions/abc``) or the bare id
# (``abc``). A name in another collection (``runs/x`` where a session is expected), an
# empty id (``sessions/``) or a deeper path (``sessions/a/b``) is INVALID_ARGUMENT naming
# the field and the form expected. Responses always carry full names.

# The collections, and what one of their ids is called in messages.
COLLECTIONS = {"agents": "agent", "sessions": "session", "runs": "run", "traces": "trace"}


def name_forms(collection: str) -> str:
    """The accepted forms of a name in ``collection``, as error messages state them."""
    return f"'{collection}/ID' or a bare {COLLECTIONS[collection]} ID"


def resource_id(field: str, value: str, collection: str) -> str:
    """The ``{id}`` of ``{collection}/{id}`` or of a bare ``{id}``, checked as an id (``check_id``)."""
    expected = name_forms(collection)
    if not value:
        raise InvalidArgument(field, f"is required; send {expected}")
    head, slash, rest = value.partition("/")
    if not slash:
        rid = value
    elif head != collection:
        other = COLLECTIONS.get(head)
        what = f"names a {other}, not a {COLLECTIONS[collection]}" if other else "is not a resource name here"
        raise InvalidArgument(field, f"{quote(value)} {what}; send {expected}")
    elif not rest or "/" in rest:
        raise InvalidArgument(field, f"must be {expected}, got {quote(value)}")
    else:
        rid = rest
    return check_id(field, rid)


def session_id(field: str, value: str) -> str:
    """The session id of a session name or bare id (``resource_id``), in the session id alphabet."""
    sid = resource_id(field, value, "sessions")
    check_session_id(field, sid)
    return sid


def check_session_id(field: str, sid: str) -> None:
    if not SESSION_ID_RE.match(sid):
        raise InvalidArgument(field, f"session id {quote(sid)} must be 1-128 characters of A-Z a-z 0-9 . _ : -")


def request_id(field: str, value: str) -> str:
    """An idempotency key: an id without '/' (a tenant's keys are stored as 'tenant/key')."""
    check_id(field, value)
    if "/" in value:
        raise InvalidArgument(field, "must not contain '/'; use any other characters, e.g. a UUID")
    return value


# Page sizes and tokens


def page_size(value: int, default: int, field: str = "page_size") -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(field, f"must be between 0 and {MAX_PAGE_SIZE} (0 means {default}), got {value}")
    return value or default


MAX_TOKEN_CHARS = 1024  # the tokens this server makes are a few hundred characters at most
_NOT_A_TOKEN = (
    "is not a token this request can continue from; pass next_page_token from the previous "
    "response unchanged, with the same filters and order"
)


def _token_check(kind: str, scope: str, value: str) -> str:
    """A checksum binding a token's position to its listing: a token made for another listing
    (another session, tenant, order or filter) or edited by hand does not verify."""
    digest = hashlib.sha256("\x00".join((kind, scope, value)).encode("utf-8", "surrogatepass")).digest()
    return base64.urlsafe_b64encode(digest[:9]).decode()


def encode_page_token(kind: str, value: str, scope: str = "") -> str:
    """An opaque token continuing the listing ``kind``/``scope`` after ``value``."""
    raw = f"{kind}|{_token_check(kind, scope, value)}|{value}"
    return base64.urlsafe_b64encode(raw.encode()).decode().rstrip("=")


def decode_page_token(kind: str, token: str, field: str = "page_token", scope: str = "") -> str | None:
    """The value inside a token made by ``encode_page_token(kind, ..., scope)``; None for an empty token."""
    if not token:
        return None
    if len(token) > MAX_TOKEN_CHARS:
        raise InvalidArgument(field, _NOT_A_TOKEN)
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    found_kind, _, rest = raw.partition("|")
    check, sep, value = rest.partition("|")
    if not sep or found_kind != kind or check != _token_check(kind, scope, value):
        raise InvalidArgument(field, _NOT_A_TOKEN)
    return value


def corrupted_token(field: str = "page_token") -> InvalidArgument:
    return InvalidArgument(field, "is corrupted; pass next_page_token unchanged")


MAX_INT64 = 2**63 - 1


def token_int(value: str, field: str = "page_token") -> int:
    """A non-negative int64 position inside a page token."""
    if not value.isascii() or not value.isdigit() or len(value) > 19 or int(value) > MAX_INT64:
        raise corrupted_token(field)
    return int(value)


# Times


MAX_TTL_S = 10 * 365 * 24 * 3600.0


def ttl_seconds(field: str, ttl: duration_pb2.Duration) -> float:
    """A session TTL in seconds; 0 means never expire."""
    if ttl.seconds < 0 or ttl.nanos < 0:
        raise InvalidArgument(field, "must be positive, or zero for no expiry")
    seconds = ttl.ToNanoseconds() / 1e9
    if seconds > MAX_TTL_S:
        raise InvalidArgument(field, f"must be at most {MAX_TTL_S:.0f}s (10 years)")
    return seconds


# The range of google.protobuf.Timestamp: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59Z.
_MIN_TIMESTAMP_S = -62_135_596_800
_MAX_TIMESTAMP_S = 253_402_300_799


def unix_ns(field: str, value: timestamp_pb2.Timestamp) -> int:
    """A filter time as Unix nanoseconds, clamped to int64 (what the stores hold).

    Refuses what is not a valid Timestamp (nanos outside 0..999,999,999, seconds outside
    years 1-9999) and times before 1970 (no run started then)."""
    if not 0 <= value.nanos <= 999_999_999 or not _MIN_TIMESTAMP_S <= value.seconds <= _MAX_TIMESTAMP_S:
        raise InvalidArgument(
            field, "is not a valid timestamp: seconds must be within years 1-9999 and nanos within 0..999999999"
        )
    if value.seconds < 0:
        raise InvalidArgument(field, "must be at or after 1970-01-01T00:00:00Z")
    return min(value.seconds * 1_000_000_000 + value.nanos, MAX_INT64)
