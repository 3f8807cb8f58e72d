"""The relay's usage path: one frame per update, built once, through the node filter, with no id (fakeredis: the
path reads no Redis; the real subscription, workers and HTTP streams are in tests/e2e/test_events.py)."""

import asyncio

import fakeredis

from api.events import EventRelay
from broker.events import USAGE_EVENT, ModelUsage, UsageEvent, now
from broker.registry import NodeDirectory

NODE, OTHER = "a" * 32, "b" * 32


def update(node: str, in_flight: int) -> bytes:
    usage = ModelUsage(model_id="m", in_flight=in_flight, queued=0, tokens_generated=5)
    return UsageEvent(node=node, at=now(), models=[usage]).model_dump_json(by_alias=True).encode()


def test_a_usage_update_reaches_the_clients_that_want_its_node_as_one_frame_without_an_id() -> None:
    async def run() -> None:
        client = fakeredis.FakeAsyncRedis()
        relay = EventRelay(client, NodeDirectory(client), queue_size=4)
        everything, this_node, other_node = relay.open(None), relay.open(NODE), relay.open(OTHER)
        relay._relay_usage(update(NODE, 1))
        relay._relay_usage(b'{"type": "model-usage", "node": 7}')  # malformed: dropped, nothing else happens
        assert relay.usage_relayed_total == 1
        assert not other_node.pending
        [(sid, frame)] = everything.pending
        assert sid is None and this_node.pending[0][1] is frame, "built once, the same bytes for every client"
        text = frame.decode()
        assert text.startswith(f"event: {USAGE_EVENT}\n") and "\nid:" not in text, "no id: not resumable"
        assert '"inFlight":1' in text

        # Delivered by the client's stream after what came before it, with pings, whatever the stream's cursor.
        relay._relay_usage(update(NODE, 0))
        frames = relay.frames(this_node, ((9, 9), b"snapshot\n\n"), None)
        assert await anext(frames) == b"snapshot\n\n"
        batch = await anext(frames)
        assert batch.count(b"event: model-usage") == 2 and batch.index(b'"inFlight":1') < batch.index(b'"inFlight":0')
        await frames.aclose()

        # A client too far behind is dropped, as for pool events.
        for _ in range(4):
            relay._relay_usage(update(NODE, 1))
        assert everything.dropped.is_set() and relay.dropped_total == 1
        relay.heap.release()

    asyncio.run(run())
