"""The client's SSE decoder on the wire format, including what a conforming server may send and ours does not."""

import io
import json
from datetime import UTC, datetime

from broker.events import ModelEvent, NodeEvent, Snapshot, UsageEvent, model_event, usage_event
from broker.schemas import ModelInfo, ModelState
from modelfleet.commands import EventPrinter
from modelfleet.sse import SseDecoder, StreamEvent

FP = "ab" * 16


def decode(text: str, decoder: SseDecoder | None = None) -> list[StreamEvent]:
    decoder = decoder or SseDecoder()
    return [e for line in text.split("\n") if (e := decoder.feed(line)) is not None]


def loaded_json() -> str:
    info = ModelInfo(id="m", path="/m.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1)
    return model_event("model-loaded", FP, info).model_dump_json(by_alias=True)


def test_typed_events_ids_and_pings() -> None:
    snapshot = Snapshot(at=datetime.now(UTC), nodes=[]).model_dump_json(by_alias=True)
    online = json.dumps(
        {"type": "node-online", "node": FP, "name": "n", "state": "online", "at": "2026-01-01T00:00:00Z"}
    )
    text = (
        f"event: snapshot\ndata: {snapshot}\nid: 1-0\n\n: ping\n\n"
        f"event: distributed-pool-changed\ndata: {loaded_json()}\nid: 2-0\n\n"
        f"event: distributed-pool-changed\ndata: {online}\nid: 3-0\n\n"
    )
    decoder = SseDecoder()
    first, second, third = decode(text, decoder)
    assert first.kind == "snapshot" and isinstance(first.data, Snapshot) and first.id == "1-0"
    assert isinstance(second.data, ModelEvent) and second.data.model_id == "m" and second.id == "2-0"
    assert isinstance(third.data, NodeEvent) and third.data.name == "n"
    assert decoder.last_event_id == "3-0"


def test_multiline_data_retry_and_fields_without_a_space() -> None:
    decoder = SseDecoder()
    (event,) = decode('retry: 2500\nevent:other\ndata:{"a":\ndata: 1}\n\n', decoder)
    assert event.kind == "other" and event.raw == {"a": 1} and event.data is None
    assert decoder.retry == 2.5 and event.id is None


def test_what_this_version_does_not_know_is_passed_on_untyped() -> None:
    unknown = json.dumps({"type": "node-draining", "node": FP})
    (event,) = decode(f"event: distributed-pool-changed\ndata: {unknown}\nid: 5-0\n\n")
    assert event.data is None and event.raw["type"] == "node-draining" and event.id == "5-0"
    (broken,) = decode("event: snapshot\ndata: not json\n\n")
    assert broken.data is None and broken.raw == "not json"


def test_blank_lines_without_data_dispatch_nothing_and_the_id_persists() -> None:
    decoder = SseDecoder()
    assert decode("\n\nid: 7-0\n\n", decoder) == []
    (event,) = decode(f"event: distributed-pool-changed\ndata: {loaded_json()}\n\n", decoder)
    assert event.id == "7-0"  # an event without an id: line keeps the last one (as EventSource does)


def test_text_cut_anywhere_and_every_line_ending() -> None:
    text = f"event: distributed-pool-changed\r\ndata: {loaded_json()}\rid: 2-0\r\n\r\n: ping\n\n"
    for cut in range(1, len(text)):
        decoder = SseDecoder()
        events = decoder.feed_text(text[:cut]) + decoder.feed_text(text[cut:])
        assert [(e.kind, e.id) for e in events] == [("distributed-pool-changed", "2-0")], cut
        assert isinstance(events[0].data, ModelEvent)


def test_unicode_line_separators_do_not_end_a_line() -> None:
    """U+2028 and U+0085 are allowed in model ids; only CR and LF end an SSE line."""
    data = json.dumps({"type": "node-draining", "note": "a\u2028b\x85c"}, ensure_ascii=False)
    (event,) = SseDecoder().feed_text(f"event: x\ndata: {data}\n\n")
    assert event.raw["note"] == "a\u2028b\x85c"


def test_an_event_cut_before_its_blank_line_is_not_counted_as_received() -> None:
    decoder = SseDecoder("1-0")
    assert decoder.feed_text(f"event: distributed-pool-changed\ndata: {loaded_json()}\nid: 2-0\n") == []
    assert decoder.last_event_id == "1-0"  # the connection breaks here: resume after 1-0, so 2-0 comes again
    decoder.reset()
    (event,) = decoder.feed_text(f"event: distributed-pool-changed\ndata: {loaded_json()}\nid: 2-0\n\n")
    assert event.id == "2-0" and isinstance(event.data, ModelEvent) and decoder.last_event_id == "2-0"


def test_a_usage_update_is_typed_and_leaves_the_last_event_id_alone() -> None:
    usage = usage_event(FP, [ModelInfo(id="m", path="/m.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1)])
    decoder = SseDecoder()
    text = (
        f"event: distributed-pool-changed\ndata: {loaded_json()}\nid: 8-0\n\n"
        f"event: model-usage\ndata: {usage.model_dump_json(by_alias=True)}\n\n"
    )
    pool, gauge = decode(text, decoder)
    assert isinstance(pool.data, ModelEvent)
    assert isinstance(gauge.data, UsageEvent) and gauge.kind == "model-usage"
    assert gauge.data == usage and gauge.data.models[0].in_flight == 0
    assert decoder.last_event_id == "8-0", "a resume goes on after the last pool event"


def test_the_events_command_prints_pool_events_and_skips_usage_updates() -> None:
    out = io.StringIO()
    printer = EventPrinter({FP: "node-a"}, out)
    usage = usage_event(FP, [ModelInfo(id="m", path="/m.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1)])
    text = (
        f"event: model-usage\ndata: {usage.model_dump_json(by_alias=True)}\n\n"
        f"event: distributed-pool-changed\ndata: {loaded_json()}\nid: 9-0\n\n"
        f"event: model-usage\ndata: {usage.model_dump_json(by_alias=True)}\n\n"
    )
    for item in decode(text):
        printer(item)
    [line] = out.getvalue().splitlines()
    assert line.split("  ")[1:] == ["node-a", "model-loaded", "m", "1 B"], "one line: the pool event's"
