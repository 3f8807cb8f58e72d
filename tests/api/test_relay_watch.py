"""The event relay's write deadline: a client whose write has waited past `write_timeout` is dropped, one between
writes or writing within it is not (fakeredis: the watch reads no Redis; real streams are in tests/e2e)."""

import asyncio
import time

import fakeredis

from api.events import EventRelay
from broker.registry import NodeDirectory


def test_the_watch_drops_only_a_client_whose_write_waited_past_the_deadline() -> None:
    async def run() -> None:
        client = fakeredis.FakeAsyncRedis()
        relay = EventRelay(client, NodeDirectory(client), write_timeout=0.2)
        stalled, idle, writing = relay.open(None), relay.open(None), relay.open(None)
        stalled.writing_since = time.monotonic() - 60
        writing.writing_since = time.monotonic() + 3600  # a write that has only just started, as far as it knows
        watch = asyncio.create_task(relay._watch())
        try:
            await asyncio.wait_for(stalled.dropped.wait(), 30)
        finally:
            watch.cancel()
        assert relay.stalled_total == 1
        assert not idle.dropped.is_set() and not writing.dropped.is_set()
        assert relay.clients == 2
        relay.heap.release()

    asyncio.run(run())
