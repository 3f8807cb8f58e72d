"""The pool-event contract against fakeredis: the publish script's modes and the event schemas.

The real relay, workers and HTTP streams are in tests/e2e/test_events.py."""

import json
from datetime import UTC, datetime

import fakeredis
import pytest
from pydantic import ValidationError

from broker import keys
from broker.events import EventBus, ModelEvent, NodeEvent, model_event, parse_event, parse_usage, stream_id, usage_event
from broker.schemas import ModelInfo, ModelState

FP = "cd" * 16


@pytest.fixture
def client() -> fakeredis.FakeRedis:
    return fakeredis.FakeRedis()


def node_event(kind: str = "node-online", reason: str | None = None) -> NodeEvent:
    state = "online" if kind == "node-online" else "offline"
    return NodeEvent.model_validate(
        {"type": kind, "node": FP, "name": "n", "state": state, "at": datetime.now(UTC), "reason": reason}
    )


def model(state: ModelState = ModelState.LOADED, error: str | None = None) -> ModelInfo:
    return ModelInfo(id="org/m", path="/models/org/m.gguf", healthy=True, state=state, size_bytes=10, error=error)


def history(client: fakeredis.FakeRedis) -> list[dict[str, object]]:
    return [json.loads(fields[b"event"]) for _, fields in client.xrange(keys.events_stream())]


def test_a_model_event_is_stored_published_and_sets_the_node_models(client: fakeredis.FakeRedis) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.events_channel())
    bus = EventBus(client)
    event_id = bus.publish(model_event("model-loaded", FP, model()), models=[model()])
    assert event_id is not None and stream_id(event_id) is not None
    (stored,) = history(client)
    assert stored["type"] == "model-loaded" and stored["modelId"] == "org/m" and stored["state"] == "loaded"
    # The first read takes the subscribe confirmation (and returns None for it).
    message = pubsub.get_message(timeout=1) or pubsub.get_message(timeout=1)
    assert message is not None
    published_id, _, raw = message["data"].decode().partition("\n")
    assert published_id == event_id and json.loads(raw) == stored
    assert json.loads(client.hget(keys.node_info(FP), "models")) == [model().wire()]


def test_ids_increase_and_the_history_is_capped(client: fakeredis.FakeRedis) -> None:
    bus = EventBus(client, history=100)
    ids = [bus.publish(model_event("model-loading", FP, model(ModelState.LOADING))) for _ in range(1000)]
    pairs = [stream_id(i) for i in ids]
    assert pairs == sorted(pairs) and len(set(pairs)) == 1000  # type: ignore[type-var]
    assert client.xlen(keys.events_stream()) < 1000  # MAXLEN ~ trims in whole nodes, approximately


def test_node_online_is_announced_once_per_boot(client: fakeredis.FakeRedis) -> None:
    bus = EventBus(client)
    assert bus.publish(node_event(), mode="online", boot="b1") is not None
    assert bus.publish(node_event(), mode="online", boot="b1") is None
    assert bus.publish(node_event(), mode="online", boot="b2") is not None
    assert client.hget(keys.node_info(FP), "announced") == b"online:b2"


def test_a_lapsed_node_is_announced_offline_exactly_once(client: fakeredis.FakeRedis) -> None:
    bus = EventBus(client)
    offline = node_event("node-offline", "heartbeat-lapsed")
    assert bus.publish(offline, mode="lapsed") is None  # never announced online: nothing to take back
    bus.publish(node_event(), mode="online", boot="b1")
    client.set(keys.node_alive(FP), "b1")
    assert bus.publish(offline, mode="lapsed") is None  # still alive
    client.delete(keys.node_alive(FP))
    assert bus.publish(offline, mode="lapsed", models=[]) is not None
    assert [bus.publish(offline, mode="lapsed") for _ in range(3)] == [None] * 3  # the other API processes
    assert client.hget(keys.node_info(FP), "announced") == b"offline:b1"
    assert client.hget(keys.node_info(FP), "models") == b"[]"
    assert [e["type"] for e in history(client)] == ["node-online", "node-offline"]


def test_a_clean_stop_and_an_unnoticed_restart(client: fakeredis.FakeRedis) -> None:
    bus = EventBus(client)
    stopped, replaced = node_event("node-offline", "stopped"), node_event("node-offline", "restarted")
    bus.publish(node_event(), mode="online", boot="b1")
    assert bus.publish(stopped, mode="stopped", boot="old") is None  # not the boot that is announced
    assert bus.publish(replaced, mode="replaced", boot="b1") is None  # the same boot is not its own successor
    assert bus.publish(replaced, mode="replaced", boot="b2") is not None  # b1 died unnoticed; b2 says so
    assert bus.publish(replaced, mode="replaced", boot="b2") is None
    bus.publish(node_event(), mode="online", boot="b2")
    assert bus.publish(stopped, mode="stopped", boot="b2") is not None
    assert bus.publish(stopped, mode="stopped", boot="b2") is None
    assert [e.get("reason") for e in history(client)] == [None, "restarted", None, "stopped"]


def test_model_event_carries_the_error_of_a_failed_load() -> None:
    failed = model_event("model-load-failed", FP, model(ModelState.FAILED, error="bad magic"))
    assert failed.error == "bad magic" and failed.model_id == "org/m"
    assert model_event("model-loaded", FP, model(error="stale")).error is None
    with pytest.raises(ValidationError):
        model_event("model-exploded", FP, model())


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        "[]",
        '{"no": "type"}',
        '{"type": "node-exploded", "node": "x"}',
        '{"type": "model-loaded", "node": "x"}',
        '{"type": "node-online", "node": "x", "name": "n", "state": "sideways", "at": "2026-01-01T00:00:00Z"}',
        '{"type": []}',
        "[" * 100_000,
        b"\xff\xfe",
    ],
)
def test_parse_event_refuses_what_is_not_a_pool_event(raw: str | bytes) -> None:
    with pytest.raises(ValidationError):  # and nothing else, whatever the bytes
        parse_event(raw)


def test_parse_event_reads_both_kinds_and_ignores_a_newer_writers_extra_fields() -> None:
    loaded = model_event("model-loaded", FP, model())
    raw = json.loads(loaded.model_dump_json(by_alias=True)) | {"addedLater": 1}
    assert parse_event(json.dumps(raw)) == loaded
    nested = json.loads(loaded.model_dump_json(by_alias=True))
    nested["model"]["quantization"] = "q4"  # a field a newer worker's ModelInfo has
    assert parse_event(json.dumps(nested)) == loaded
    online = node_event()
    assert isinstance(parse_event(online.model_dump_json(by_alias=True)), NodeEvent)
    assert isinstance(parse_event(loaded.model_dump_json(by_alias=True)), ModelEvent)


@pytest.mark.parametrize(
    ("value", "expected"),
    [("1-0", (1, 0)), ("1700000000000-12", (1700000000000, 12)), ("1-", None), ("x-1", None), (None, None)],
)
def test_stream_id(value: str | None, expected: tuple[int, int] | None) -> None:
    assert stream_id(value) == expected


def test_a_usage_update_is_published_apart_and_written_only_while_online_for_its_boot(
    client: fakeredis.FakeRedis,
) -> None:
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    pubsub.subscribe(keys.usage_channel())
    bus = EventBus(client)
    busy = model().model_copy(update={"in_flight": 1, "queued": 2, "tokens_generated": 7})
    usage = usage_event(FP, [busy])
    assert not bus.publish_usage(usage, models=[busy], boot="b1"), "not announced online: nothing written"
    assert client.hget(keys.node_info(FP), "models") is None
    bus.publish(node_event(), models=[model()], mode="online", boot="b1")

    assert bus.publish_usage(usage, models=[busy], boot="b1")
    assert json.loads(client.hget(keys.node_info(FP), "models")) == [busy.wire()]
    message = pubsub.get_message(timeout=1) or pubsub.get_message(timeout=1)
    assert message is not None
    assert parse_usage(message["data"]) == usage
    assert usage.models[0].model_dump(by_alias=True) == {
        "modelId": "org/m",
        "inFlight": 1,
        "queued": 2,
        "tokensGenerated": 7,
        "lastUsed": None,
    }
    assert [e["type"] for e in history(client)] == ["node-online"], "never in the pool's history"
    assert not bus.publish_usage(usage, models=[], boot="another boot")
    assert json.loads(client.hget(keys.node_info(FP), "models")) == [busy.wire()]

    # Once the node stopped (or an API process declared it offline), a late update of that boot changes nothing.
    bus.publish(node_event("node-offline", "stopped"), models=[], mode="stopped", boot="b1")
    assert not bus.publish_usage(usage, models=[busy], boot="b1")
    assert json.loads(client.hget(keys.node_info(FP), "models")) == []
