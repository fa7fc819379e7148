"""Request validation shared by the services: resource names, page sizes, page tokens.

Each failure is an ``InvalidArgument`` naming the field and saying what to send
instead; services turn it into INVALID_ARGUMENT.
"""

from __future__ import annotations

import base64
import binascii
import re

from google.protobuf import duration_pb2

SESSION_ID_RE = re.compile(r"^[A-Za-z0-9._:-]{1,128}$")
MAX_PAGE_SIZE = 1000


class InvalidArgument(Exception):
    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field


def resource_id(field: str, value: str, collection: str, *, allow_bare: bool = False) -> str:
    """The ``{id}`` of ``{collection}/{id}``."""
    prefix = f"{collection}/"
    if value.startswith(prefix):
        return value[len(prefix):]
    if allow_bare and value and "/" not in value:
        return value
    if not value:
        raise InvalidArgument(field, f"is required; send a resource name like '{collection}/ID'")
    raise InvalidArgument(field, f"must be a resource name like '{collection}/ID', got {value!r}")


def session_id(field: str, value: str, *, allow_bare: bool = False) -> str:
    sid = resource_id(field, value, "sessions", allow_bare=allow_bare)
    check_session_id(field, sid)
    return sid


def check_session_id(field: str, sid: str) -> None:
    if not SESSION_ID_RE.match(sid):
        raise InvalidArgument(field, f"session id {sid!r} must be 1-128 characters of A-Z a-z 0-9 . _ : -")


def page_size(value: int, default: int, field: str = "page_size") -> int:
    if value < 0 or value > MAX_PAGE_SIZE:
        raise InvalidArgument(field, f"must be between 0 and {MAX_PAGE_SIZE} (0 means {default}), got {value}")
    return value or default


def encode_page_token(kind: str, value: str) -> str:
    return base64.urlsafe_b64encode(f"{kind}|{value}".encode()).decode().rstrip("=")


def decode_page_token(kind: str, token: str, field: str = "page_token") -> str | None:
    """The value inside a token made by ``encode_page_token(kind, ...)``; None for an empty token."""
    if not token:
        return None
    try:
        raw = base64.urlsafe_b64decode(token + "=" * (-len(token) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        raw = ""
    found_kind, sep, value = raw.partition("|")
    if not sep or found_kind != kind:
        raise InvalidArgument(
            field, "is not a token this request can continue from; pass next_page_token from the previous "
            "response unchanged, with the same filters and order"
        )
    return value


MAX_TTL_S = 10 * 365 * 24 * 3600.0


def ttl_seconds(field: str, ttl: duration_pb2.Duration) -> float:
    """A session TTL in seconds; 0 means never expire."""
    if ttl.seconds < 0 or ttl.nanos < 0:
        raise InvalidArgument(field, "must be positive, or zero for no expiry")
    seconds = ttl.ToNanoseconds() / 1e9
    if seconds > MAX_TTL_S:
        raise InvalidArgument(field, f"must be at most {MAX_TTL_S:.0f}s (10 years)")
    return seconds
