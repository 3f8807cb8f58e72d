"""Pooled connections that a restarted Redis closed are not handed out again: the first commands after the
restart succeed, on the asyncio client (the API's) and the sync one (the workers')."""

import asyncio
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

from broker.connection import parse_redis_url
from modelfleet.up import redis_server_binary
from tests.conftest import free_port, wait_for


class Restartable:
    def __init__(self, root: Path) -> None:
        self.port = free_port()
        self.root = root
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        argv = [redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "", "--dir"]
        self.proc = subprocess.Popen([*argv, str(self.root), "--appendonly", "no"], stdout=subprocess.DEVNULL)
        wait_for(self.answers, 10, "redis-server")

    def answers(self) -> bool:
        try:
            return bool(redis.Redis(port=self.port, socket_timeout=1).ping())
        except redis.ConnectionError:
            return False

    def stop(self) -> None:
        assert self.proc is not None
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture
def server(tmp_path: Path) -> Iterator[Restartable]:
    s = Restartable(tmp_path)
    s.start()
    yield s
    s.stop()


def test_the_asyncio_client_reconnects_what_a_restart_closed(server: Restartable) -> None:
    async def run() -> list[object]:
        client = parse_redis_url(server.url).async_client(max_connections=10, timeout=5)
        await asyncio.gather(*(client.ping() for _ in range(5)))  # five pooled connections
        server.stop()
        server.start()
        await asyncio.sleep(0.2)  # the loop sees the closed connections
        results = await asyncio.gather(*(client.hgetall("k") for _ in range(5)), return_exceptions=True)
        await client.aclose()
        return results

    assert asyncio.run(run()) == [{}] * 5


def test_the_sync_client_reconnects_what_a_restart_closed(server: Restartable) -> None:
    client = parse_redis_url(server.url).client()
    assert client.ping()
    server.stop()
    server.start()
    time.sleep(0.2)
    assert client.hgetall("k") == {}
