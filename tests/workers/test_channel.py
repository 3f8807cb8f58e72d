"""A generation thread's events reach the event loop in order, all of them, with fewer wake-ups than events when
the loop is busy."""

import asyncio
import threading

from workers.inference.channel import Channel


def test_every_event_arrives_in_order_and_a_busy_loop_is_woken_less_often() -> None:
    async def run() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        channel: Channel[int] = Channel(loop)
        wakes = 0
        original = loop.call_soon_threadsafe

        def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
            nonlocal wakes
            wakes += 1
            return original(*args, **kwargs)

        loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
        producer = threading.Thread(target=lambda: [channel.put(i) for i in range(20_000)])
        producer.start()
        got = []
        while len(got) < 20_000:
            got.append(await channel.get())
            while not channel.empty():
                got.append(channel.get_nowait())
            await asyncio.sleep(0.001)  # the loop busy writing to a client
        producer.join()
        return got, wakes

    got, wakes = asyncio.run(run())
    assert got == list(range(20_000))
    assert wakes < 20_000 / 10


def test_a_consumer_that_waits_is_woken_by_the_next_event() -> None:
    async def run() -> int:
        channel: Channel[int] = Channel(asyncio.get_running_loop())
        threading.Timer(0.05, channel.put, args=(7,)).start()
        return await asyncio.wait_for(channel.get(), 5)

    assert asyncio.run(run()) == 7


def test_a_cancelled_wait_leaves_the_channel_usable() -> None:
    async def run() -> int:
        channel: Channel[int] = Channel(asyncio.get_running_loop())
        waiting = asyncio.ensure_future(channel.get())
        await asyncio.sleep(0.01)
        waiting.cancel()
        channel.put(1)
        return await asyncio.wait_for(channel.get(), 5)

    assert asyncio.run(run()) == 1
