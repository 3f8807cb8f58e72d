"""`GET /api/v1/events` against a real fleet: real workers publish, real API processes relay, real HTTP streams
read. Events the tests produce themselves go through `broker.events.EventBus`, the path a worker uses."""

import json
import signal
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from broker import keys
from broker.events import EventBus, model_event
from broker.schemas import ModelInfo, ModelState
from tests.conftest import (
    ALL_SECRETS,
    OPERATOR_KEY,
    READ_KEY,
    Api,
    Fleet,
    register_gone_node,
    wait_for,
)
from tests.e2e.test_faults import start_again
from workers.gguf_factory import write_endless_model, write_headless_llama

pytestmark = pytest.mark.timeout(120)

FAKE_NODE = "f" * 32


@dataclass
class Item:
    event: str
    id: str | None
    data: dict[str, Any]


@dataclass
class Stream:
    """An SSE client reading in a thread: what it received, and how its stream ended."""

    api: Api
    key: str = READ_KEY
    node: str | None = None
    last_event_id: str | None = None
    items: list[Item] = field(default_factory=list)
    comments: int = 0
    status: int | None = None
    headers: dict[str, str] = field(default_factory=dict)
    ended: str | None = None  # "closed" (the server ended it) or an error's name
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Stream":
        threading.Thread(target=self._read, daemon=True).start()
        wait_for(lambda: self.status is not None or self.ended, 10, "the stream to answer")
        return self

    def _read(self) -> None:
        headers = {"Authorization": f"Bearer {self.key}"} if self.key else {}
        if self.last_event_id:
            headers["Last-Event-ID"] = self.last_event_id
        params = {"node": self.node} if self.node else {}
        timeout = httpx.Timeout(10, read=None)
        try:
            with httpx.stream(
                "GET", self.api.url + "/api/v1/events", headers=headers, params=params, timeout=timeout
            ) as r:
                self.headers = dict(r.headers)
                self.status = r.status_code
                if r.status_code != 200:
                    r.read()
                    self.items.append(Item("error", None, r.json()))
                    self.ended = "closed"
                    return
                event, event_id, data = "message", None, []
                for line in r.iter_lines():
                    if self._stop.is_set():
                        break
                    if line.startswith(":"):
                        self.comments += 1
                    elif line.startswith("event: "):
                        event = line[7:]
                    elif line.startswith("id: "):
                        event_id = line[4:]
                    elif line.startswith("data: "):
                        data.append(line[6:])
                    elif line == "" and data:
                        self.items.append(Item(event, event_id, json.loads("\n".join(data))))
                        event, event_id, data = "message", None, []
            self.ended = "closed"
        except httpx.HTTPError as exc:
            self.ended = type(exc).__name__

    def close(self) -> None:
        self._stop.set()

    def changes(self, node: str | None = None) -> list[dict[str, Any]]:
        return [
            i.data
            for i in self.items
            if i.event == "distributed-pool-changed" and (node is None or i.data["node"] == node)
        ]

    def usage(self, model_id: str) -> list[dict[str, Any]]:
        """The `model-usage` figures of `model_id` received so far, oldest first, each with its event's node."""
        return [
            m | {"node": i.data["node"]}
            for i in self.items
            if i.event == "model-usage"
            for m in i.data["models"]
            if m["modelId"] == model_id
        ]

    def ids(self) -> list[str]:
        return [i.id for i in self.items if i.event == "distributed-pool-changed" and i.id]

    def wait(self, predicate: Any, timeout: float = 20, what: str = "events") -> None:
        wait_for(lambda: predicate(self), timeout, what)


@pytest.fixture
def streams() -> Iterator[list[Stream]]:
    opened: list[Stream] = []
    yield opened
    for s in opened:
        s.close()


def open_stream(streams: list[Stream], api: Api, **kwargs: Any) -> Stream:
    s = Stream(api, **kwargs).start()
    streams.append(s)
    return s


def as_id(value: str) -> tuple[int, int]:
    ms, seq = value.split("-")
    return int(ms), int(seq)


def fake_model(i: int, *, error: str | None = None) -> ModelInfo:
    return ModelInfo(
        id=f"m{i}", path=f"/models/m{i}.gguf", healthy=True, state=ModelState.LOADED, size_bytes=i, error=error
    )


def publish_many(client: redis.Redis, count: int, *, start: int = 0, error: str | None = None) -> list[str]:
    bus = EventBus(client)
    model = fake_model(0, error=error)
    return [
        str(bus.publish(model_event("model-loaded", FAKE_NODE, model.model_copy(update={"id": f"m{i}"}))))
        for i in range(start, start + count)
    ]


def test_load_and_unload_stream_in_order(fleet: Fleet, models_dir: Path, streams: list[Stream]) -> None:
    worker = fleet.worker("ev1", models_dir)
    api = fleet.api()
    s = open_stream(streams, api)
    assert s.status == 200
    assert s.headers["content-type"].startswith("text/event-stream")
    assert s.headers["cache-control"] == "no-cache"
    assert s.headers["x-accel-buffering"] == "no"
    s.wait(lambda s: s.items, what="the snapshot")
    first = s.items[0]
    assert first.event == "snapshot" and first.id is not None
    (node,) = first.data["nodes"]
    assert node["fingerprint"] == worker.fingerprint and node["online"] is True and node["models"] == []

    with api.client() as client:
        base = f"/api/v1/nodes/{worker.fingerprint}/models"
        assert client.post(base + "/load", json={"modelId": "tiny-a"}).status_code == 200
        assert client.post(base + "/unload", json={"modelId": "tiny-a"}).status_code == 200

    def done(s: Stream) -> bool:
        return any(e["type"] == "model-unloaded" for e in s.changes(worker.fingerprint))

    s.wait(done)
    changes = [e for e in s.changes(worker.fingerprint) if e.get("modelId") == "tiny-a"]
    kinds = ["model-loading", "model-loaded", "model-checked", "model-unloading", "model-unloaded"]
    assert [e["type"] for e in changes] == kinds
    assert [e["state"] for e in changes] == ["loading", "loaded", "loaded", "unloading", "unloaded"]
    assert [e["model"]["healthy"] for e in changes] == [False, False, True, False, False]
    assert [e["model"]["checking"] for e in changes] == [False, True, False, False, False]
    assert all(e["node"] == worker.fingerprint and e["at"] for e in changes)
    ids = [as_id(i) for i in s.ids()]
    assert ids == sorted(ids) and len(set(ids)) == len(ids) and ids[0] > as_id(first.id)

    # A client connecting now starts from a snapshot that already holds what happened.
    with api.client() as client:
        client.post(f"/api/v1/nodes/{worker.fingerprint}/models/load", json={"modelId": "tiny-b"}).raise_for_status()
    late = open_stream(streams, api, node=worker.fingerprint)
    late.wait(lambda s: s.items, what="the snapshot")
    (node,) = late.items[0].data["nodes"]
    assert [(m["id"], m["state"]) for m in node["models"]] == [("tiny-b", "loaded")]
    raw = json.dumps([i.data for i in s.items + late.items])
    assert not any(secret in raw for secret in ALL_SECRETS)


def test_a_load_that_fails_in_the_backend_streams_model_load_failed(
    fleet: Fleet, tmp_path: Path, streams: list[Stream]
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    write_headless_llama(models / "headless.gguf")
    worker = fleet.worker("ev-fail", models)
    api = fleet.api()
    s = open_stream(streams, api, node=worker.fingerprint)
    s.wait(lambda s: s.items, what="the snapshot")
    with api.client() as client:
        refused = client.post(f"/api/v1/nodes/{worker.fingerprint}/models/load", json={"modelId": "headless"})
    assert refused.status_code == 422, refused.text
    s.wait(lambda s: any(e["type"] == "model-load-failed" for e in s.changes()), what="model-load-failed")
    loading, failed = s.changes()
    assert loading["type"] == "model-loading" and failed["modelId"] == "headless" and failed["state"] == "failed"
    assert failed["error"] == refused.json()["error"] and "ctransformers could not load" in failed["error"]
    assert worker.alive()


def test_the_stream_needs_a_key_and_a_known_node(module_fleet: Fleet, streams: list[Stream]) -> None:
    api = module_fleet.api()
    assert open_stream(streams, api, key="").status == 401
    assert open_stream(streams, api, key="wrong").status == 401
    missing = open_stream(streams, api, node=FAKE_NODE)
    assert missing.status == 404 and missing.items[0].data["code"] == "node_not_found"
    assert open_stream(streams, api, node="../x").status == 404
    assert open_stream(streams, api, key=OPERATOR_KEY).status == 200


def test_node_filter_and_replay_after_last_event_id(fleet: Fleet, streams: list[Stream]) -> None:
    client = fleet.redis.client()
    api = fleet.api()
    other = "e" * 32
    everything = open_stream(streams, api)
    everything.wait(lambda s: s.items)
    bus = EventBus(client)
    for i in range(3):
        bus.publish(model_event("model-loading", other, fake_model(i)))
    ids = publish_many(client, 5)
    everything.wait(lambda s: len(s.changes()) == 8)
    assert [e["modelId"] for e in everything.changes(FAKE_NODE)] == [f"m{i}" for i in range(5)]

    # Reconnecting after the second event replays the three it missed, then live ones; no snapshot.
    resumed = open_stream(streams, api, last_event_id=ids[1])
    later = publish_many(client, 2, start=5)
    resumed.wait(lambda s: len(s.changes()) == 5)
    assert resumed.items[0].event == "distributed-pool-changed"
    assert resumed.ids() == ids[2:] + later
    assert [e["modelId"] for e in resumed.changes()] == ["m2", "m3", "m4", "m5", "m6"]

    # An id the history no longer holds (or never did) gets a fresh snapshot.
    for stale in ("1-0", "not-an-id", ids[-1] + "9"):
        fresh = open_stream(streams, api, last_event_id=stale)
        fresh.wait(lambda s: s.items)
        assert fresh.items[0].event == "snapshot"


def test_malformed_events_are_dropped_and_the_relay_goes_on(fleet: Fleet, streams: list[Stream]) -> None:
    client = fleet.redis.client()
    api = fleet.api()
    s = open_stream(streams, api)
    s.wait(lambda s: s.items)
    first = publish_many(client, 1)
    junk = [
        b'{"type": "model-loaded"}',
        b"not json",
        b'{"type": "node-exploded", "node": "x"}',
        b'{"type": []}',
        b"\xff\xfe not utf-8",
        b"[" * 100_000,
    ]
    for raw in junk:
        junk_id = client.xadd(keys.events_stream(), {"event": raw})
        client.publish(keys.events_channel(), junk_id + b"\n" + raw)
    # The channel's content is never trusted: a forged id far in the future must not make the relay skip
    # every real event after it.
    client.publish(keys.events_channel(), "99999999999999-0\n{}")
    client.publish(keys.events_channel(), b"\xff no id at all")
    last = publish_many(client, 1, start=1)
    s.wait(lambda s: len(s.changes()) == 2)
    assert s.ids() == first + last
    replayed = open_stream(streams, api, last_event_id=first[0])
    replayed.wait(lambda s: len(s.changes()) == 1)
    assert replayed.ids() == last
    later = publish_many(client, 1, start=2)
    s.wait(lambda s: len(s.changes()) == 3)
    assert s.ids() == first + last + later
    assert api.alive() and "dropped malformed pool event" in api.log() and "Traceback" not in api.log()


def test_a_burst_never_drops_a_client_that_keeps_up(fleet: Fleet, streams: list[Stream]) -> None:
    """1,500 events back to back against a mailbox of 64: the relay yields between pages, so a reader that
    keeps up is never pushed over its limit."""
    client = fleet.redis.client()
    api = fleet.api(MODELFLEET_SSE_QUEUE_SIZE="64")
    s = open_stream(streams, api)
    s.wait(lambda s: s.items)
    pipe = client.pipeline(transaction=False)
    bus = EventBus(pipe)
    for i in range(1500):
        bus.publish(model_event("model-loaded", FAKE_NODE, fake_model(i)))
    pipe.execute()
    s.wait(lambda s: len(s.changes()) == 1500, timeout=60, what="all 1,500 events")
    assert s.ended is None and [e["modelId"] for e in s.changes()] == [f"m{i}" for i in range(1500)]
    with api.client() as http:
        assert "modelfleet_sse_clients_dropped_total 0.0" in http.get("/metrics").text


def test_history_lost_under_the_relay_ends_streams_to_resync(fleet: Fleet, streams: list[Stream]) -> None:
    client = fleet.redis.client()
    api = fleet.api()
    s = open_stream(streams, api)
    s.wait(lambda s: s.items)
    ids = publish_many(client, 2)
    s.wait(lambda s: len(s.changes()) == 2)
    client.delete(keys.events_stream())  # as a Redis restart without persistence would
    publish_many(client, 1, start=2)
    s.wait(lambda s: s.ended is not None, what="the stream to end")
    assert s.ended == "closed" and len(s.changes()) == 2
    again = open_stream(streams, api, last_event_id=ids[-1])
    again.wait(lambda s: s.items)
    assert again.items[0].event == "snapshot"  # the old id is gone: it starts over from where the pool stands
    after = publish_many(client, 1, start=3)
    again.wait(lambda s: len(s.changes()) == 1, what="live events after the resync")
    assert again.ids() == after
    assert "event history lost" in api.log()


def test_killed_worker_goes_offline_and_comes_back_online(
    fleet: Fleet, models_dir: Path, streams: list[Stream]
) -> None:
    worker = fleet.worker("ev-kill", models_dir)
    api = fleet.api()
    s = open_stream(streams, api, node=worker.fingerprint)
    s.wait(lambda s: s.items)
    worker.signal(signal.SIGKILL)
    killed_at = time.monotonic()
    s.wait(lambda s: any(e["type"] == "node-offline" for e in s.changes()), timeout=10, what="node-offline")
    assert time.monotonic() - killed_at < 10
    offline = s.changes()[-1]
    assert offline == offline | {"node": worker.fingerprint, "name": "ev-kill", "state": "offline"}
    assert offline["reason"] == "heartbeat-lapsed"

    start_again(fleet, worker)
    s.wait(lambda s: s.changes()[-1]["type"] == "node-online", what="node-online")
    assert [e["type"] for e in s.changes()] == ["node-offline", "node-online"]


def test_a_clean_stop_is_announced_once(fleet: Fleet, models_dir: Path, streams: list[Stream]) -> None:
    worker = fleet.worker("ev-stop", models_dir)
    api = fleet.api()
    s = open_stream(streams, api, node=worker.fingerprint)
    s.wait(lambda s: s.items)
    worker.stop()
    s.wait(lambda s: s.changes(), what="node-offline")
    (offline,) = s.changes()
    assert offline["type"] == "node-offline" and offline["reason"] == "stopped"


def test_two_apis_publish_one_offline_event(fleet: Fleet, models_dir: Path, streams: list[Stream]) -> None:
    worker = fleet.worker("ev-two", models_dir)
    apis = [fleet.api(), fleet.api()]
    watchers = [open_stream(streams, api, node=worker.fingerprint) for api in apis]
    worker.signal(signal.SIGKILL)
    for s in watchers:
        s.wait(lambda s: s.changes(), timeout=15, what="node-offline")
    time.sleep(3)  # three more liveness ticks of both APIs: a second announcement would have happened by now
    client = fleet.redis.client()
    history = [json.loads(f[b"event"]) for _, f in client.xrange(keys.events_stream())]
    offline = [e for e in history if e["type"] == "node-offline" and e["node"] == worker.fingerprint]
    assert len(offline) == 1
    for s in watchers:
        assert [e["type"] for e in s.changes()] == ["node-offline"]


def test_relay_recovers_from_a_killed_subscription_and_replay_is_exactly_once(
    fleet: Fleet, streams: list[Stream]
) -> None:
    client = fleet.redis.client()
    api = fleet.api()
    s = open_stream(streams, api)
    s.wait(lambda s: s.items)
    published: list[str] = []
    stop = threading.Event()

    def produce() -> None:
        bus = EventBus(fleet.redis.client())
        i = 0
        while not stop.is_set():
            published.append(str(bus.publish(model_event("model-loaded", FAKE_NODE, fake_model(i)))))
            i += 1
            time.sleep(0.005)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    try:
        for _ in range(3):
            wait_for(lambda: len(published) > 50, 10)
            killed = client.client_kill_filter(_type="pubsub")
            assert killed >= 1
            time.sleep(0.3)
        # The first client leaves halfway; it reconnects with the last id it saw.
        s.close()
        seen = list(s.ids())
        resumed = open_stream(streams, api, last_event_id=seen[-1])
        time.sleep(0.5)
        client.client_kill_filter(_type="pubsub")
        time.sleep(0.5)
    finally:
        stop.set()
        producer.join()
    resumed.wait(lambda r: r.ids() and r.ids()[-1] == published[-1], what="every event")
    combined = seen + resumed.ids()
    assert combined == published  # each exactly once, in order, across the reconnect
    assert "event subscription lost" in api.log()


def test_a_client_that_never_reads_is_dropped_and_the_others_keep_up(fleet: Fleet, streams: list[Stream]) -> None:
    client = fleet.redis.client()
    api = fleet.api(MODELFLEET_SSE_QUEUE_SIZE="16")
    reader = open_stream(streams, api)
    reader.wait(lambda s: s.items)
    port = int(api.url.rsplit(":", 1)[1])
    stuck = socket.socket()
    stuck.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stuck.connect(("127.0.0.1", port))
    stuck.sendall(f"GET /api/v1/events HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {READ_KEY}\r\n\r\n".encode())
    try:
        with api.client() as http:
            wait_for(lambda: "modelfleet_sse_clients 2.0" in http.get("/metrics").text, 10, "two clients")
            ids: list[str] = []
            for batch in range(60):  # ~10 MB in all: more than the stuck client's socket buffers hold
                ids += publish_many(client, 10, start=10 * batch, error="x" * 16_000)
                want = len(ids)
                reader.wait(lambda s, want=want: len(s.changes()) == want, what="the reader to keep up")
            assert reader.ids() == ids and reader.ended is None
            metrics = http.get("/metrics").text
        assert "modelfleet_sse_clients_dropped_total 1.0" in metrics
        assert "modelfleet_sse_clients 1.0" in metrics
        assert "fell 16 events behind and was disconnected" in api.log()
        assert "ASGI callable returned without completing response" not in api.log()  # a cut on purpose
    finally:
        stuck.close()


def test_pings_and_forgetting_a_gone_client(fleet: Fleet, streams: list[Stream]) -> None:
    api = fleet.api(MODELFLEET_SSE_PING_INTERVAL="0.3")
    s = open_stream(streams, api)
    s.wait(lambda s: s.comments >= 2, what="two pings")
    with api.client() as http:
        assert "modelfleet_sse_clients 1.0" in http.get("/metrics").text
        s.close()  # the reader drops the connection at its next line (a ping)
        wait_for(lambda: "modelfleet_sse_clients 0.0" in http.get("/metrics").text, 5, "the client to be forgotten")


def test_sigterm_with_50_open_streams_exits_within_the_graceful_timeout(fleet: Fleet, streams: list[Stream]) -> None:
    api = fleet.api("--graceful-timeout", "5")
    opened = [open_stream(streams, api) for _ in range(50)]
    for s in opened:
        s.wait(lambda s: s.items)
    with api.client() as http:
        assert "modelfleet_sse_clients 50.0" in http.get("/metrics").text
    started = time.monotonic()
    api.signal(signal.SIGTERM)
    # uvicorn re-raises the signal it caught once it has shut down, so a clean stop exits "by SIGTERM".
    assert api.wait(10) in (0, -signal.SIGTERM)
    assert time.monotonic() - started < 5
    log = api.log()
    assert "Finished server process" in log and "timeout graceful shutdown exceeded" not in log
    wait_for(lambda: all(s.ended for s in opened), 5, "every stream to end")
    assert {s.ended for s in opened} == {"closed"}  # ended cleanly by the server, not cut
    assert "closing 50 event streams" in log


def test_usage_streams_live_as_model_usage_and_never_as_a_pool_change(
    fleet: Fleet, tmp_path: Path, streams: list[Stream]
) -> None:
    models = tmp_path / "usage-models"
    models.mkdir()
    write_endless_model(models / "endless.gguf")
    worker = fleet.worker("usage-a", models, "--threads", "1")
    ghost = register_gone_node(fleet)
    api = fleet.api()
    with api.client() as operator:
        body = {"modelId": "endless", "contextLength": 2048}
        response = operator.post(f"/api/v1/nodes/{worker.fingerprint}/models/load", json=body)
        assert response.status_code == 200, response.text
    everything = open_stream(streams, api)  # as a client written from the reference reads it, and as ours does
    mine = open_stream(streams, api, node=worker.fingerprint)
    others = open_stream(streams, api, node=ghost.fingerprint)
    for s in (everything, mine, others):
        s.wait(lambda s: s.items, what="the snapshot")
    assert everything.changes() == [], "the load's events came before the snapshot"

    # 1,500 tokens of a model that never ends its text take well over ten seconds (`write_endless_model`).
    prompt = {"model": "endless", "prompt": "Once upon a time", "stream": True, "max_tokens": 1500, "temperature": 0}
    with api.client(READ_KEY) as client, client.stream("POST", "/v1/completions", json=prompt) as answer:
        assert answer.status_code == 200
        assert answer.headers["x-modelfleet-node"] == worker.fingerprint
        lines = answer.iter_lines()  # kept: a generator dropped would close the response, and the node would stop
        next(lines)
        mine.wait(lambda s: any(u["inFlight"] == 1 for u in s.usage("endless")), what="usage: one in flight")
        first = next(u for u in mine.usage("endless") if u["inFlight"] == 1)
        # Tokens keep coming with nothing marking them: the next update, a second later, counts them.
        mine.wait(
            lambda s: s.usage("endless")[-1]["tokensGenerated"] > first["tokensGenerated"],
            what="a later update with more tokens",
        )
        assert mine.usage("endless")[-1]["inFlight"] == 1 and mine.usage("endless")[-1]["lastUsed"]
    # The client left: the generation stops, and the update after the last change says so.
    mine.wait(lambda s: s.usage("endless")[-1]["inFlight"] == 0, what="usage: none in flight")
    everything.wait(
        lambda s: s.usage("endless") and s.usage("endless")[-1]["inFlight"] == 0, what="the same, unfiltered"
    )
    final = mine.usage("endless")[-1]
    assert final["queued"] == 0 and final["tokensGenerated"] >= first["tokensGenerated"]
    assert {u["node"] for u in everything.usage("endless")} == {worker.fingerprint}
    # The snapshot a client starts from now reads the node's hash, which the last update wrote.
    late = open_stream(streams, api, node=worker.fingerprint)
    late.wait(lambda s: s.items, what="the late snapshot")
    [node] = late.items[0].data["nodes"]
    [held] = [m for m in node["models"] if m["id"] == "endless"]
    assert held["inFlight"] == 0 and held["tokensGenerated"] == final["tokensGenerated"]

    # Markers: a pool event on each node after everything above. Pool events are ordered within a stream, so once
    # a stream holds its marker it holds the pool events before it. (Usage frames come on a subscription of their
    # own, in no order with pool events: those this test counts on all arrived before `final` above.)
    EventBus(fleet.redis.client()).publish(model_event("model-loaded", ghost.fingerprint, fake_model(1)))
    with api.client() as operator:
        response = operator.post(f"/api/v1/nodes/{worker.fingerprint}/models/unload", json={"modelId": "endless"})
        assert response.status_code == 200, response.text
    everything.wait(lambda s: len(s.changes()) == 3, what="the ghost's event and the unload's two")
    others.wait(lambda s: s.changes(), what="the ghost's event")
    # A client listening only for distributed-pool-changed saw those three events, nothing for the generation.
    assert sorted(e["type"] for e in everything.changes()) == ["model-loaded", "model-unloaded", "model-unloading"]
    usage_items = [i for i in everything.items if i.event == "model-usage"]
    assert usage_items and all(i.id is None for i in usage_items), "usage updates carry no id: not resumable"
    assert [i.event for i in others.items] == ["snapshot", "distributed-pool-changed"], "the node filter holds"
    stored = [fields[b"event"] for _, fields in fleet.redis.client().xrange(keys.events_stream())]
    assert not any(b'"model-usage"' in raw for raw in stored), "the pool's history holds no usage"
