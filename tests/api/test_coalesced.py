"""The head joins the chunks that arrived while it was writing the last one, and loses or reorders none."""

import asyncio
from collections.abc import AsyncIterator

import httpx
import pytest

from api.proxy import coalesced


async def upstream(chunks: list[bytes], *, fail: bool = False, gap: float = 0.0) -> AsyncIterator[bytes]:
    for chunk in chunks:
        yield chunk
        await asyncio.sleep(gap)
    if fail:
        raise httpx.RemoteProtocolError("the node's connection broke")


def test_a_slow_writer_gets_what_arrived_meanwhile_in_one_piece() -> None:
    async def run() -> list[bytes]:
        out = []
        async for batch in coalesced(upstream([b"%d," % i for i in range(100)])):
            out.append(batch)
            await asyncio.sleep(0.01)  # writing to a slow client: the node sends the rest meanwhile
        return out

    out = asyncio.run(run())
    assert b"".join(out) == b"".join(b"%d," % i for i in range(100))  # all of it, in order
    assert len(out) < 10  # joined, not one write per chunk


def test_a_fast_writer_passes_each_chunk_as_it_comes() -> None:
    async def run() -> list[bytes]:
        return [batch async for batch in coalesced(upstream([b"a", b"b", b"c"], gap=0.02))]

    assert asyncio.run(run()) == [b"a", b"b", b"c"]


def test_the_nodes_failure_is_raised_after_what_came_before_it() -> None:
    async def run() -> list[bytes]:
        got = []
        with pytest.raises(httpx.RemoteProtocolError):
            async for batch in coalesced(upstream([b"a", b"b"], fail=True, gap=0.01)):
                got.append(batch)
        return got

    assert b"".join(asyncio.run(run())) == b"ab"


def test_a_writer_that_stops_stops_the_reader() -> None:
    closed = asyncio.Event()

    async def endless() -> AsyncIterator[bytes]:
        try:
            while True:
                yield b"x"
                await asyncio.sleep(0.001)
        finally:
            closed.set()

    async def run() -> None:
        stream = coalesced(endless())
        async for _ in stream:
            break
        await stream.aclose()  # what the client going away does to the proxy's loop
        await asyncio.wait_for(closed.wait(), 1)

    asyncio.run(run())
