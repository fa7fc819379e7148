"""API keys: random secrets whose SHA-256 hashes live in a JSON file, re-read when it changes.

A key looks like ``agentd_<id>_<secret>``: the id finds the entry (and names the key in
audit lines), the hash of the whole key proves it. Only hashes are stored: the file can
be read by operators and backed up without exposing a credential. The secret is 32
random bytes, so a fast hash is enough (there is nothing to brute-force). Rotating is
adding a new key, moving callers to it, then deleting the old entry. The file's mtime,
size and inode are checked on every call (one ``stat``, about a microsecond), so a new
key works and a revoked one stops at once, without a restart; a file that fails to
parse keeps the previous keys serving (and logs why).

File format::

    {"keys": [{"id": "k7Qe2", "sha256": "<hex>", "subject": "billing-svc", "tenant": "acme",
               "scopes": ["runs:write", "runs:read", "sessions:read"], "created": "2026-11-26T10:00:00Z"}]}
"""

from __future__ import annotations

import datetime
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import tempfile
from dataclasses import dataclass
from pathlib import Path

from agentd.server.auth.base import AuthenticationError, Authenticator, Credentials
from agentd.server.auth.principal import Principal, Scope, parse_scopes

log = logging.getLogger("agentd.auth")

KEY_PREFIX = "agentd_"
_KEY_RE = re.compile(r"^agentd_([A-Za-z0-9]{4,32})_([A-Za-z0-9_-]{20,128})$")
_ID_RE = re.compile(r"^[A-Za-z0-9]{4,32}$")
_TENANT_RE = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class KeyEntry:
    key_id: str
    sha256: str
    subject: str
    tenant: str
    scopes: frozenset[Scope]


def parse_key_file(text: str, source: str) -> dict[str, KeyEntry]:
    """Entries by id; ``ValueError`` naming the first bad entry."""
    data = json.loads(text)
    entries = data.get("keys") if isinstance(data, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{source}: expected an object with a 'keys' list")
    keys: dict[str, KeyEntry] = {}
    for index, raw in enumerate(entries):
        where = f"{source}: keys[{index}]"
        if not isinstance(raw, dict):
            raise ValueError(f"{where}: expected an object")
        key_id, digest = str(raw.get("id", "")), str(raw.get("sha256", "")).lower()
        tenant, subject = str(raw.get("tenant", "")), str(raw.get("subject", ""))
        if not _ID_RE.match(key_id):
            raise ValueError(f"{where}: 'id' must be 4-32 letters or digits")
        if not re.fullmatch(r"[0-9a-f]{64}", digest):
            raise ValueError(f"{where}: 'sha256' must be the 64-hex-digit SHA-256 of the key")
        if not _TENANT_RE.match(tenant):
            raise ValueError(f"{where}: 'tenant' must be 1-64 characters of A-Z a-z 0-9 . _ -")
        if key_id in keys:
            raise ValueError(f"{where}: id {key_id!r} appears twice")
        scopes = raw.get("scopes", [])
        if not isinstance(scopes, list):
            raise ValueError(f"{where}: 'scopes' must be a list")
        keys[key_id] = KeyEntry(key_id, digest, subject or f"key:{key_id}", tenant, parse_scopes(scopes))
    return keys


class ApiKeyAuthenticator(Authenticator):
    """Checks ``authorization: Bearer agentd_…`` against the hashes in a key file."""

    name = "api_key"

    def __init__(self, path: Path) -> None:
        self._path = path
        self._keys: dict[str, KeyEntry] = {}
        self._signature: tuple[int, int, int] | None = None
        self._reload(initial=True)

    def accepts(self, credentials: Credentials) -> bool:
        return bool(credentials.bearer and credentials.bearer.startswith(KEY_PREFIX))

    async def authenticate(self, credentials: Credentials) -> Principal:
        self._reload(initial=False)
        match = _KEY_RE.match(credentials.bearer or "")
        entry = self._keys.get(match.group(1)) if match else None
        # Compare digests in constant time; an unknown id still pays for one hash.
        presented = hash_key(credentials.bearer or "")
        if entry is None or not hmac.compare_digest(presented, entry.sha256):
            raise AuthenticationError("the API key is not valid (unknown, revoked or mistyped)")
        return Principal(entry.subject, entry.tenant, entry.scopes, method=self.name, key_id=entry.key_id)

    def _reload(self, *, initial: bool) -> None:
        """Re-read the file if it changed; at start a broken file is an error, later it is logged."""
        try:
            stat = self._path.stat()
            signature = (stat.st_mtime_ns, stat.st_size, stat.st_ino)
            if signature == self._signature:
                return
            keys = parse_key_file(self._path.read_text(encoding="utf-8"), str(self._path))
        except (OSError, ValueError) as exc:
            if initial:
                raise ValueError(f"cannot load API keys: {exc}") from None
            log.error("API key file not reloaded, the previous keys keep serving: %s", exc)
            return
        self._keys, self._signature = keys, signature
        log.info("loaded %d API key(s) from %s", len(keys), self._path)


# --- managing the key file (agentd keys create/list/revoke) --------------------------


def new_key() -> tuple[str, str]:
    """A fresh (key id, full key)."""
    key_id = secrets.token_hex(4)
    return key_id, f"{KEY_PREFIX}{key_id}_{secrets.token_urlsafe(32)}"


def _read_entries(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    data = json.loads(path.read_text(encoding="utf-8"))
    parse_key_file(json.dumps(data), str(path))  # refuse to extend a broken file
    return list(data["keys"])


def _write_entries(path: Path, entries: list[dict[str, object]]) -> None:
    """Replace the file atomically (a server re-reading it never sees half a file), mode 0600."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w", encoding="utf-8") as out:
        json.dump({"keys": entries}, out, indent=2)
        out.write("\n")
    os.chmod(tmp, 0o600)
    os.replace(tmp, path)


def create_key(path: Path, *, tenant: str, subject: str, scopes: list[str]) -> tuple[str, str]:
    """Add a key to the file; returns (id, key). The key itself is shown once and never stored."""
    if not _TENANT_RE.match(tenant):
        raise ValueError(f"tenant {tenant!r} must be 1-64 characters of A-Z a-z 0-9 . _ -")
    unknown = sorted(set(scopes) - {scope.value for scope in Scope})
    if unknown:
        raise ValueError(f"unknown scope(s) {', '.join(unknown)}; known: {', '.join(s.value for s in Scope)}")
    entries = _read_entries(path)
    key_id, key = new_key()
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    entries.append({"id": key_id, "sha256": hash_key(key), "subject": subject or f"key:{key_id}",
                    "tenant": tenant, "scopes": scopes, "created": created})
    _write_entries(path, entries)
    return key_id, key


def revoke_key(path: Path, key_id: str) -> bool:
    entries = _read_entries(path)
    kept = [entry for entry in entries if entry.get("id") != key_id]
    if len(kept) == len(entries):
        return False
    _write_entries(path, kept)
    return True


def list_keys(path: Path) -> list[dict[str, object]]:
    return [{k: v for k, v in entry.items() if k != "sha256"} for entry in _read_entries(path)]
