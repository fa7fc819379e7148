"""Credentials out of text that leaves the server: caller-visible messages and logs.

``redact`` masks what credentials look like in free text (an upstream error body, an
exception message): ``user:password@`` in URLs, ``Authorization``-style schemes
(``Bearer …``, ``Basic …``), ``sk-…`` API keys, and the values of ``api-key``,
``password``, ``token``… fields, headers and query parameters. It is a safety net for
text agentd does not control, never a reason to put a secret into a message: code that
knows a secret (the configured API key) masks it by value too (``secrets=``).

``display_url`` is a URL fit to show: no user info, no query, no fragment.
"""

from __future__ import annotations

import re
from typing import Iterable
from urllib.parse import urlsplit, urlunsplit

MASK = "***"

_PATTERNS: tuple[tuple[re.Pattern[str], str], ...] = (
    # scheme://user:password@host → scheme://***@host
    (re.compile(r"(?P<scheme>\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^\s/@'\"<>]+@"), rf"\g<scheme>{MASK}@"),
    # Authorization header values: Bearer <token>, Basic <base64 of user:password>
    (re.compile(r"(?i)\b(?P<scheme>bearer)(?P<sep>\s+)(?!\*\*\*)[A-Za-z0-9._~+/=-]+"), rf"\g<scheme>\g<sep>{MASK}"),
    (
        re.compile(r"\b(?P<scheme>Basic)(?P<sep>\s+)(?=[A-Za-z0-9+/]*[0-9+/=])[A-Za-z0-9+/]{6,}={0,2}"),
        rf"\g<scheme>\g<sep>{MASK}",
    ),
    # OpenAI-style keys (sk-…, sk-proj-…) wherever they stand
    (re.compile(r"\bsk-[A-Za-z0-9_-]{6,}"), f"sk-{MASK}"),
    # api-key / x-api-key / password / secret / access_token… as a header, field or query parameter
    (
        re.compile(
            r"(?i)(?P<name>\b(?:x-)?(?:api[-_]?key|access[-_]?token|refresh[-_]?token|auth[-_]?token|"
            r"client[-_]?secret|secret|password|passwd|pwd|token)\b[\"']?\s*[:=]\s*[\"']?)"
            r"(?!\*\*\*)[^\s\"'&,;}]+"
        ),
        rf"\g<name>{MASK}",
    ),
    # signed-URL style query parameters: ?key=…, &sig=…
    (re.compile(r"(?i)(?P<name>[?&](?:key|sig|signature|code)=)[^&\s\"']+"), rf"\g<name>{MASK}"),
)


def redact(text: str, secrets: Iterable[str | None] = ()) -> str:
    """``text`` with credentials masked: the given ``secrets`` by value, then anything shaped like one."""
    for secret in secrets:
        if secret and len(secret) >= 4:
            text = text.replace(secret, MASK)
    for pattern, replacement in _PATTERNS:
        text = pattern.sub(replacement, text)
    return text


def display_url(url: str) -> str:
    """``url`` without user info, query or fragment (where credentials ride), and no trailing slash."""
    try:
        parts = urlsplit(str(url))
    except ValueError:
        return redact(str(url))
    netloc = parts.netloc.rpartition("@")[2]
    return urlunsplit((parts.scheme, netloc, parts.path, "", "")).rstrip("/")


def url_password(url: str) -> str | None:
    """The password a URL carries, if any (to mask it by value elsewhere)."""
    try:
        return urlsplit(str(url)).password
    except ValueError:
        return None
