"""A generation thread's events reach the event loop in order, all of them, with fewer wake-ups than events when
the loop is busy."""

import asyncio
import threading

from workers.inference.channel import Channel


def count_wakes(loop: asyncio.AbstractEventLoop) -> list[int]:
    """A counter (its one item) of the loop's `call_soon_threadsafe` calls: each is a wake-up from a thread."""
    wakes = [0]
    original = loop.call_soon_threadsafe

    def counting(*args, **kwargs):  # type: ignore[no-untyped-def]
        wakes[0] += 1
        return original(*args, **kwargs)

    loop.call_soon_threadsafe = counting  # type: ignore[method-assign]
    return wakes


def test_every_event_arrives_in_order_and_a_busy_loop_is_woken_less_often() -> None:
    async def run() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        channel: Channel[int] = Channel(loop)
        wakes = count_wakes(loop)
        producer = threading.Thread(target=lambda: [channel.put(i) for i in range(20_000)])
        producer.start()
        got = []
        while len(got) < 20_000:
            got.append(await channel.get())
            while not channel.empty():
                got.append(channel.get_nowait())
            await asyncio.sleep(0.001)  # the loop busy writing to a client
        producer.join()
        return got, wakes[0]

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


def test_a_pause_is_cut_short_by_the_last_item_only() -> None:
    """While the consumer spaces its reads out, ordinary items do not wake it; the last one does, at once."""

    async def run() -> tuple[list[int], int]:
        loop = asyncio.get_running_loop()
        channel: Channel[int] = Channel(loop)
        wakes = count_wakes(loop)

        def produce() -> None:
            for i in range(100):
                channel.put(i)
            channel.put(100, last=True)

        pausing = asyncio.ensure_future(channel.pause(3600))
        await asyncio.sleep(0.01)  # the pause is waiting before anything is put
        producer = threading.Thread(target=produce)
        producer.start()
        await asyncio.wait_for(pausing, 30)  # an hour's pause, ended by the last item
        producer.join()
        got = []
        while not channel.empty():
            got.append(channel.get_nowait())
        return got, wakes[0]

    got, wakes = asyncio.run(run())
    assert got == list(range(101))
    assert wakes == 1


def test_a_pause_after_the_last_item_does_not_wait() -> None:
    async def run() -> int:
        channel: Channel[int] = Channel(asyncio.get_running_loop())
        channel.put(1, last=True)
        await asyncio.wait_for(channel.pause(3600), 30)
        return await channel.get()

    assert asyncio.run(run()) == 1


def test_a_pause_ends_after_its_time_without_the_last_item() -> None:
    async def run() -> list[int]:
        channel: Channel[int] = Channel(asyncio.get_running_loop())
        channel.put(1)
        await asyncio.wait_for(channel.pause(0.01), 30)
        channel.put(2)
        return [await channel.get(), await channel.get()]

    assert asyncio.run(run()) == [1, 2]
