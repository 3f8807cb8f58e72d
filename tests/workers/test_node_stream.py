"""The node's event stream, between its generation thread and the event loop, without a model: the first token
goes out before the generation goes on, and the end of a stream never waits out the stream interval."""

import asyncio
import threading

import pytest

from broker.openai import CompletionRequest, Usage
from workers.inference import server
from workers.inference.channel import Channel
from workers.inference.runner import Delta, Event, Finished, Started
from workers.inference.server import _Relay, _stream

BODY = CompletionRequest(model="m", prompt="Once upon a time", stream=True)


async def returns_at_once(relay: _Relay, event: Event) -> bool:
    """Whether `relay.emit(event)`, called on a generation thread of its own, returns without waiting for a write
    (given 30 s: the tests that call this set an hour's wait)."""
    generation = threading.Thread(target=relay.emit, args=(event,))
    generation.start()
    await asyncio.to_thread(generation.join, 30)
    return not generation.is_alive()


def test_a_stream_ends_as_soon_as_its_generation_does_however_long_the_interval() -> None:
    """Writes an hour apart: the first token goes out at once, the rest with the end the moment it comes."""

    async def run() -> list[bytes]:
        events: Channel[Event] = Channel(asyncio.get_running_loop())
        first_out = threading.Event()

        def generate() -> None:
            events.put(Delta("Once"))
            assert first_out.wait(30)
            for text in (" upon", " a", " time"):
                events.put(Delta(text))
            events.put(Finished("length", Usage.of(4, 4)), last=True)

        producer = threading.Thread(target=generate)
        producer.start()
        watcher = asyncio.create_task(asyncio.sleep(3600))  # the request's watch of its connection
        writes = [w async for w in _stream(BODY, events, lambda: None, 3600, first_out.set, watcher)]
        producer.join()
        await asyncio.sleep(0)
        assert watcher.cancelled()  # ends with the stream
        return writes

    writes = asyncio.run(asyncio.wait_for(run(), 30))
    assert len(writes) == 2
    assert b'"text":"Once"' in writes[0]
    assert b'"text":" upon a time"' in writes[1] and b'"finish_reason":"length"' in writes[1]
    assert writes[1].endswith(b"data: [DONE]\n\n")


def test_a_streams_generation_waits_for_its_first_write(monkeypatch: pytest.MonkeyPatch) -> None:
    """`Started` goes out at once; after the first token, the generation goes on only once the stream says
    that token is written; later tokens, and an end, never wait."""
    monkeypatch.setattr(server, "FIRST_WRITE_WAIT", 3600)

    async def run() -> None:
        events: Channel[Event] = Channel(asyncio.get_running_loop())
        relay = _Relay(events, stream=True)
        relay.emit(Started(prompt_tokens=4))
        assert await events.get() == Started(prompt_tokens=4)
        generation = threading.Thread(target=relay.emit, args=(Delta("Once"),))
        generation.start()
        assert await events.get() == Delta("Once")
        await asyncio.sleep(0.05)
        assert generation.is_alive()  # waits for the write (an hour, here)
        relay.written()
        await asyncio.to_thread(generation.join, 30)
        assert not generation.is_alive()
        relay.emit(Delta(" upon"))
        assert await events.get() == Delta(" upon")

    asyncio.run(asyncio.wait_for(run(), 30))


def test_only_the_first_token_waits_even_when_its_write_never_came(monkeypatch: pytest.MonkeyPatch) -> None:
    """The first token's wait gives up after FIRST_WRITE_WAIT; the tokens after it never wait, written or not."""

    async def run() -> None:
        events: Channel[Event] = Channel(asyncio.get_running_loop())
        relay = _Relay(events, stream=True)
        relay.emit(Started(prompt_tokens=4))
        monkeypatch.setattr(server, "FIRST_WRITE_WAIT", 0.01)
        await asyncio.to_thread(relay.emit, Delta("Once"))  # waits 10 ms for a write that never comes
        monkeypatch.setattr(server, "FIRST_WRITE_WAIT", 3600)
        assert await returns_at_once(relay, Delta(" upon"))
        assert [events.get_nowait() for _ in range(3)] == [Started(4), Delta("Once"), Delta(" upon")]

    asyncio.run(asyncio.wait_for(run(), 60))


@pytest.mark.parametrize(
    ("stream", "event"),
    [
        # A stream that ends before any token: nothing was generated, nothing to wait for, the lease goes at once.
        (True, Finished("stop", Usage.of(4, 0))),
        # An unstreamed answer: nothing writes its tokens, so nothing waits for them.
        (False, Delta("Once")),
    ],
    ids=["a stream that ends before any token", "an unstreamed answer"],
)
def test_nothing_waits_for_a_write_that_will_not_come(
    monkeypatch: pytest.MonkeyPatch, stream: bool, event: Event
) -> None:
    monkeypatch.setattr(server, "FIRST_WRITE_WAIT", 3600)

    async def run() -> list[Event]:
        events: Channel[Event] = Channel(asyncio.get_running_loop())
        relay = _Relay(events, stream=stream)
        relay.emit(Started(prompt_tokens=4))
        assert await returns_at_once(relay, event)
        return [events.get_nowait(), events.get_nowait()]

    assert asyncio.run(run()) == [Started(prompt_tokens=4), event]
