"""The Postgres and Redis servers the test suite talks to, found or started once per session.

For each of the two, in order:

1. the server named by ``AGENTD_TEST_POSTGRES_URL`` / ``AGENTD_TEST_REDIS_URL``, when set;
2. the local default (Postgres on 127.0.0.1:5432 database ``test``, Redis on
   127.0.0.1:6379) when it answers;
3. otherwise a throwaway server started from the local binaries (``initdb``/``postgres``,
   ``redis-server``) on a free loopback port, in a temporary directory that is removed
   with the server when the session ends.

``AGENTD_TEST_THROWAWAY_SERVERS=1`` skips 1 and 2, so CI can keep path 3 working on a
machine whose local servers answer. When no path works, ``provision`` raises
``NoServerError`` with one message saying what to install, and the session stops at once.

Why local binaries and not containers or pip-packaged servers: the binaries are one
``apt-get``/``brew`` install away on every developer machine and CI image, start in about
a second, and need no registry at test time; the pip-packaged servers are years old
(Redis 6.0 is below agentd's minimum) and a container engine cannot pull images offline.

The resolved URLs are written back to the environment, so ``tests/backends_*`` and the
``agentd serve`` processes that tests start read the same servers.
"""

from __future__ import annotations

import glob
import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, MutableMapping, Sequence
from urllib.parse import urlsplit

import redis

from agentd.server.redis_common import MIN_REDIS_VERSION, parse_version

POSTGRES_ENV = "AGENTD_TEST_POSTGRES_URL"
REDIS_ENV = "AGENTD_TEST_REDIS_URL"
FORCE_ENV = "AGENTD_TEST_THROWAWAY_SERVERS"
POSTGRES_DEFAULT = "postgresql://postgres@127.0.0.1:5432/test"
REDIS_DEFAULT = "redis://127.0.0.1:6379/0"
START_TIMEOUT_S = 30.0

INSTALL_HINT = (
    "install PostgreSQL (15 or newer) and Redis ({redis}+) so that `initdb`, `postgres` and `redis-server`"
    " are on PATH (Debian/Ubuntu: `apt-get install postgresql redis-server`; macOS: `brew install postgresql redis`),"
    " or point {pg_env} and {redis_env} at running servers"
)


class NoServerError(Exception):
    """No server could be found or started; the message says what to install."""


@dataclass
class Throwaway:
    """A server process this session started, and the directory it lives in."""

    name: str
    url: str
    process: subprocess.Popen[bytes]
    directory: Path
    log: Path

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after 10 s) and delete its directory."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        shutil.rmtree(self.directory, ignore_errors=True)


@dataclass
class Servers:
    postgres_url: str
    redis_url: str
    started: list[Throwaway] = field(default_factory=list)

    def stop(self) -> None:
        for server in reversed(self.started):
            server.stop()
        self.started.clear()


def answers(url: str, timeout_s: float = 0.5) -> bool:
    """True when something accepts TCP connections at the URL's host and port."""
    parts = urlsplit(url)
    default_port = 5432 if parts.scheme.startswith("postgres") else 6379
    try:
        with socket.create_connection((parts.hostname or "127.0.0.1", parts.port or default_port), timeout_s):
            return True
    except OSError:
        return False


def default_search_dirs() -> list[str]:
    """PATH, then Debian's versioned Postgres directories (newest first), which are not on PATH."""
    versioned = sorted(glob.glob("/usr/lib/postgresql/*/bin"), key=lambda d: parse_version(d.split("/")[-2]))
    return [*os.environ.get("PATH", "").split(os.pathsep), *reversed(versioned)]


def find_binary(name: str, search_dirs: Sequence[str]) -> str | None:
    for directory in search_dirs:
        candidate = Path(directory) / name
        if directory and candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_until(ready: Callable[[], bool], server: Throwaway) -> None:
    """Poll ``ready`` until it holds; fail with the server's log when it exits or takes too long."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while not ready():
        if server.process.poll() is not None or time.monotonic() > deadline:
            log = server.log.read_text(errors="replace")[-2000:] if server.log.exists() else ""
            server.stop()
            raise NoServerError(f"the throwaway {server.name} server did not start:\n{log}")
        time.sleep(0.05)


def _unprivileged_user() -> str | None:
    """Postgres refuses to run as root: when we are root, run it as ``postgres`` or ``nobody``."""
    if os.geteuid() != 0:
        return None
    for name in ("postgres", "nobody"):
        try:
            pwd.getpwnam(name)
            return name
        except KeyError:
            continue
    raise NoServerError("running as root with neither a `postgres` nor a `nobody` user to run Postgres as")


def start_postgres(search_dirs: Sequence[str]) -> Throwaway:
    """initdb into a temporary directory, then run ``postgres`` on a free loopback port.

    Durability is switched off (fsync, full-page writes): the data is thrown away anyway.
    """
    initdb, postgres = find_binary("initdb", search_dirs), find_binary("postgres", search_dirs)
    if not initdb or not postgres:
        raise NoServerError("no `initdb`/`postgres` binaries")
    user = _unprivileged_user()
    directory = Path(tempfile.mkdtemp(prefix="agentd-test-postgres-"))
    if user:
        entry = pwd.getpwnam(user)
        os.chown(directory, entry.pw_uid, entry.pw_gid)
    data, log = directory / "data", directory / "postgres.log"
    run_as = {"user": user} if user else {}
    with open(log, "wb") as out:
        init = subprocess.run(
            [initdb, "-D", str(data), "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync"],
            stdout=out, stderr=subprocess.STDOUT, cwd=directory, **run_as,  # type: ignore[call-overload]
        )
    if init.returncode != 0:
        detail = log.read_text(errors="replace")[-2000:]
        shutil.rmtree(directory, ignore_errors=True)
        raise NoServerError(f"initdb failed:\n{detail}")
    port = free_port()
    settings = {
        "listen_addresses": "127.0.0.1", "port": str(port), "unix_socket_directories": str(directory),
        "fsync": "off", "synchronous_commit": "off", "full_page_writes": "off", "max_connections": "300",
    }
    args = [postgres, "-D", str(data)] + [f"-c{key}={value}" for key, value in settings.items()]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            args, stdout=out, stderr=subprocess.STDOUT, cwd=directory, **run_as  # type: ignore[call-overload]
        )
    server = Throwaway("postgres", f"postgresql://postgres@127.0.0.1:{port}/postgres", process, directory, log)
    _wait_until(lambda: "ready to accept connections" in log.read_text(errors="replace"), server)
    return server


def start_redis(search_dirs: Sequence[str]) -> Throwaway:
    """``redis-server`` on a free loopback port, persistence off, its files in a temporary directory."""
    binary = find_binary("redis-server", search_dirs)
    if not binary:
        raise NoServerError("no `redis-server` binary")
    directory = Path(tempfile.mkdtemp(prefix="agentd-test-redis-"))
    log, port = directory / "redis.log", free_port()
    args = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
            "--dir", str(directory), "--logfile", str(log)]
    process = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, cwd=directory)
    server = Throwaway("redis", f"redis://127.0.0.1:{port}/0", process, directory, log)

    def pong() -> bool:
        try:
            return bool(redis.Redis(port=port, socket_connect_timeout=0.5).ping())
        except redis.RedisError:
            return False

    _wait_until(pong, server)
    return server


def redis_version(url: str) -> str:
    """The server's ``redis_version``; empty when it cannot be asked."""
    client = redis.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=5)
    try:
        return str(client.info("server").get("redis_version", ""))
    except redis.RedisError:
        return ""
    finally:
        client.close()


def check_redis_version(url: str) -> None:
    """Stop the session when the Redis server is older than agentd's minimum, saying so."""
    version = redis_version(url)
    if version and parse_version(version) < MIN_REDIS_VERSION:
        need = ".".join(map(str, MIN_REDIS_VERSION))
        raise NoServerError(
            f"the Redis server at {url} is version {version}; agentd needs Redis {need} or newer:"
            f" upgrade it, or unset {REDIS_ENV} to let the suite start its own"
        )


def provision(
    env: MutableMapping[str, str] | None = None, search_dirs: Sequence[str] | None = None
) -> Servers:
    """Resolve both servers (see the module docstring), export their URLs into ``env``, return them."""
    env = os.environ if env is None else env
    dirs = default_search_dirs() if search_dirs is None else search_dirs
    force = env.get(FORCE_ENV, "").lower() in ("1", "true", "yes")
    servers = Servers(postgres_url="", redis_url="")
    starters: Mapping[str, tuple[str, str, Callable[[Sequence[str]], Throwaway]]] = {
        "postgres": (POSTGRES_ENV, POSTGRES_DEFAULT, start_postgres),
        "redis": (REDIS_ENV, REDIS_DEFAULT, start_redis),
    }
    try:
        for name, (variable, default, start) in starters.items():
            url = "" if force else env.get(variable) or (default if answers(default) else "")
            if not url:
                try:
                    server = start(dirs)
                except NoServerError as exc:
                    hint = INSTALL_HINT.format(
                        redis=".".join(map(str, MIN_REDIS_VERSION)), pg_env=POSTGRES_ENV, redis_env=REDIS_ENV
                    )
                    raise NoServerError(
                        f"the tests need Postgres and Redis, and no {name} server could be used or started"
                        f" ({exc}): {hint}"
                    ) from None
                servers.started.append(server)
                url = server.url
            setattr(servers, f"{name}_url", url)
            env[variable] = url
        check_redis_version(servers.redis_url)
    except BaseException:
        servers.stop()
        raise
    return servers
