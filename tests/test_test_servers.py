"""The suite's own server provisioning (tests/servers.py) and the Redis version floor.

These keep the "fresh laptop" promise honest: with no Postgres or Redis answering, the
suite starts throwaway ones from local binaries and removes them; with no binaries
either, it stops at once with one message saying what to install; a Redis older than
agentd's minimum is named as such, by the suite and by the server itself.
"""

from __future__ import annotations

import socketserver
import threading
from pathlib import Path
from typing import Iterator

import asyncpg
import pytest
import redis

from agentd.server.redis_common import connect_redis
from agentd.server.runtime.errors import StoreUnavailableError
from agentd.server.sessions.redis import RedisSessionStore
from tests import servers


async def test_forced_throwaway_servers_start_answer_and_are_removed() -> None:
    env = {servers.FORCE_ENV: "1", servers.POSTGRES_ENV: "postgresql://ignored@127.0.0.1:1/x"}
    started = servers.provision(env)
    try:
        assert [s.name for s in started.started] == ["postgres", "redis"]
        assert env[servers.POSTGRES_ENV] == started.postgres_url != "postgresql://ignored@127.0.0.1:1/x"
        assert env[servers.REDIS_ENV] == started.redis_url
        connection = await asyncpg.connect(started.postgres_url, timeout=10)
        try:
            assert (await connection.fetchval("SELECT 1 + 1")) == 2
        finally:
            await connection.close()
        client = redis.Redis.from_url(started.redis_url)
        assert client.ping()
        client.close()
    finally:
        processes = [(s.process, s.directory) for s in started.started]
        started.stop()
    for process, directory in processes:
        assert process.poll() is not None, "a throwaway server outlived the session"
        assert not directory.exists(), f"{directory} was left behind"


def test_no_binaries_and_nothing_answering_fails_at_once_saying_what_to_install(tmp_path: Path) -> None:
    env = {servers.FORCE_ENV: "1"}
    with pytest.raises(servers.NoServerError) as failure:
        servers.provision(env, search_dirs=[str(tmp_path)])
    message = str(failure.value)
    assert "no postgres server could be used or started" in message
    assert "apt-get install postgresql redis-server" in message
    assert servers.POSTGRES_ENV in message and servers.REDIS_ENV in message
    assert servers.POSTGRES_ENV not in env  # nothing half-provisioned


class _OldRedis(socketserver.StreamRequestHandler):
    """Speaks just enough RESP to look like a Redis 6.0 server: HELLO, PING, INFO, and OK to the rest."""

    def handle(self) -> None:
        while True:
            header = self.rfile.readline()
            if not header.startswith(b"*"):
                return
            args = []
            for _ in range(int(header[1:])):
                length = int(self.rfile.readline()[1:])
                args.append(self.rfile.read(length + 2)[:-2])
            command = args[0].upper()
            if command == b"HELLO":  # RESP3 handshake, when the client asks for it
                self.wfile.write(b"%%2\r\n+server\r\n+redis\r\n+proto\r\n:%s\r\n" % args[1])
            elif command == b"PING":
                self.wfile.write(b"+PONG\r\n")
            elif command == b"INFO":
                body = b"# Server\r\nredis_version:6.0.9\r\nredis_mode:standalone\r\n"
                self.wfile.write(b"$%d\r\n%s\r\n" % (len(body), body))
            else:
                self.wfile.write(b"+OK\r\n")


@pytest.fixture
def old_redis_url() -> Iterator[str]:
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _OldRedis)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"redis://127.0.0.1:{server.server_address[1]}/0"
    finally:
        server.shutdown()
        server.server_close()


def test_the_suite_names_a_redis_that_is_too_old(old_redis_url: str) -> None:
    with pytest.raises(servers.NoServerError, match=r"is version 6\.0\.9; agentd needs Redis 6\.2\.0 or newer"):
        servers.provision({servers.REDIS_ENV: old_redis_url, servers.POSTGRES_ENV: servers.POSTGRES_DEFAULT})


async def test_the_redis_store_refuses_a_server_that_is_too_old(old_redis_url: str) -> None:
    store = RedisSessionStore(connect_redis(url=old_redis_url), prefix="agentd-old")
    with pytest.raises(StoreUnavailableError, match=r"version 6\.0\.9; agentd needs Redis 6\.2\.0 or newer"):
        await store.open()
    await store.close()
