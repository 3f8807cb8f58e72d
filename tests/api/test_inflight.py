"""In-flight leases against a real redis-server (their picks and releases run on `api.redis_line`'s connections;
real API processes are in tests/e2e)."""

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator

import pytest
import redis
import redis.asyncio as aioredis

from api.inflight import InFlight
from broker import keys
from tests.conftest import RedisServer

A, B = "aa" * 16, "bb" * 16


@pytest.fixture
def server(redis_server: RedisServer) -> str:
    """The server's URL, with no leases on A or B."""
    redis.Redis.from_url(redis_server.url).delete(keys.inflight(A), keys.inflight(B))
    return redis_server.url


@contextlib.asynccontextmanager
async def processes(server: str, count: int = 1, lease: float = 30.0) -> AsyncIterator[list[InFlight]]:
    """`count` API processes' leases, each on a client of its own; stopped and closed on the way out."""
    clients = [aioredis.Redis.from_url(server) for _ in range(count)]
    flights = [InFlight(client, lease=lease) for client in clients]
    try:
        yield flights
    finally:
        for flight in flights:
            await flight.stop()
        for client in clients:
            await client.aclose()


def test_picks_the_least_loaded_node_across_processes(server: str) -> None:
    async def run() -> None:
        async with processes(server, 2) as (one, two):  # two API processes
            leases = []
            for i in range(10):
                lease, _ = await (one if i % 2 else two).acquire([A, B])
                leases.append(lease)
            assert await one.counts([A, B]) == {A: 5, B: 5}
            for lease in leases[:4]:
                await one.release(lease)
            counts = await two.counts([A, B])
            assert sum(counts.values()) == 6
            emptier = min(counts, key=counts.__getitem__)
            lease, seen = await one.acquire([A, B])
            assert lease.node == emptier and seen == counts

    asyncio.run(run())


def test_release_frees_at_once(server: str) -> None:
    async def run() -> None:
        async with processes(server) as (flight,):
            lease, before = await flight.acquire([A])
            assert before == {A: 0} and flight.held == 1
            assert await flight.counts([A]) == {A: 1}
            await flight.release(lease)
            assert await flight.counts([A]) == {A: 0} and flight.held == 0

    asyncio.run(run())


def test_a_crashed_process_stops_counting_after_its_lease(server: str) -> None:
    async def run() -> None:
        async with processes(server, 2, lease=1.0) as (crashed, alive), aioredis.Redis.from_url(server) as client:
            await crashed.acquire([A])  # and never released nor renewed: the process died
            kept, _ = await alive.acquire([A])
            assert await alive.counts([A]) == {A: 2}
            # Age the dead lease past its expiry rather than sleeping a second: its score is its expiry.
            dead = [m for m in await client.zrange(keys.inflight(A), 0, -1) if m.decode() != kept.member]
            await client.zadd(keys.inflight(A), {dead[0]: int(time.time() * 1000) - 1})
            await alive.renew()
            assert await alive.counts([A]) == {A: 1}
            _, seen = await alive.acquire([A])  # a pick drops the dead member for good
            assert seen == {A: 1}
            assert await client.zcard(keys.inflight(A)) == 2

    asyncio.run(run())


def test_renewal_never_revives_a_released_lease(server: str) -> None:
    async def run() -> None:
        async with processes(server) as (flight,):
            lease, _ = await flight.acquire([A])
            await flight.release(lease)
            await flight.renew()
            assert await flight.counts([A]) == {A: 0}

    asyncio.run(run())


def test_a_pick_after_redis_forgot_its_scripts_still_works(server: str) -> None:
    async def run() -> None:
        async with processes(server) as (flight,):
            first, _ = await flight.acquire([A])
            async with aioredis.Redis.from_url(server) as admin:
                await admin.script_flush()  # as after a restart: EVALSHA answers NOSCRIPT
            second, seen = await flight.acquire([A])
            assert seen == {A: 1} and await flight.counts([A]) == {A: 2}
            for lease in (first, second):
                await flight.release(lease)
            assert await flight.counts([A]) == {A: 0}

    asyncio.run(run())
