"""`modelfleet.client`, sync and async, against a running fleet: every endpoint, and errors as exceptions.

(What a running fleet cannot easily produce, a timeout or a proxy's HTML error, goes through httpx's
MockTransport at the end.)
"""

import ast
import asyncio
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker.errors import NodeError, NodeUnavailable
from broker.events import EventBus, ModelEvent, Snapshot, model_event
from broker.operations import CATALOG, LOAD
from broker.schemas import ModelInfo, ModelState, NodeInfo
from modelfleet.client import (
    AsyncClient,
    Client,
    ModelfleetAPIError,
    ModelfleetClientError,
    ModelfleetConnectionError,
    ModelfleetTimeout,
    NodeReferenceError,
    UnexpectedResponse,
    pick_node,
)
from modelfleet.sse import StreamEvent
from tests.conftest import (
    OPERATOR_KEY,
    READ_KEY,
    Api,
    Fleet,
    Worker,
    free_port,
    node_info,
    register_gone_node,
    wait_for,
)

pytestmark = pytest.mark.timeout(90)


@pytest.fixture(scope="module")
def node(module_fleet: Fleet, models_dir: Path) -> Worker:
    return module_fleet.worker("client-node", models_dir)


@pytest.fixture(scope="module")
def api(module_fleet: Fleet, node: Worker) -> Api:
    return module_fleet.api()


@pytest.fixture
def client(api: Api, node: Worker) -> Iterator[Client]:
    with Client(api.url, OPERATOR_KEY) as fleet:
        yield fleet
        fleet.unload_all(node.fingerprint)


def test_node_endpoints(client: Client, node: Worker) -> None:
    assert client.healthz().ok
    [info] = client.nodes()
    assert isinstance(info, NodeInfo) and info.fingerprint == node.fingerprint and info.online
    assert client.node(node.fingerprint).name == "client-node"
    assert client.resolve_node("client-node").fingerprint == node.fingerprint
    assert client.resolve_node(node.fingerprint[:6]).fingerprint == node.fingerprint

    catalog = client.node_catalog(node.fingerprint)
    assert isinstance(catalog, CATALOG.result) and catalog.node == node.fingerprint and catalog.models == []
    files = {f.id: f for f in catalog.files}
    assert files["tiny-a"].estimate_bytes and files["tiny-a"].problem is None
    assert files["tiny-a"].backend == "ctransformers"
    assert files["broken"].estimate_bytes is None and files["broken"].problem

    loaded = client.load(node.fingerprint, "tiny-a", context_length=256, gpu_layers=0, backend="ctransformers")
    assert isinstance(loaded, LOAD.result)
    assert loaded.model_id == "tiny-a" and loaded.state is ModelState.LOADED and not loaded.already_loaded
    assert client.load(node.fingerprint, "tiny-a").already_loaded
    [model] = client.node_models(node.fingerprint)
    assert model.id == "tiny-a" and model.context_length == 256 and model.state is ModelState.LOADED
    assert model.backend == "ctransformers"

    unloaded = client.unload(node.fingerprint, "tiny-a")
    assert unloaded.model_id == "tiny-a" and unloaded.state is ModelState.UNLOADED
    client.load(node.fingerprint, "tiny-b")
    assert client.unload_all(node.fingerprint).unloaded == ["tiny-b"]
    assert client.node_models(node.fingerprint) == []


def test_pool_endpoints(client: Client, node: Worker) -> None:
    listed = client.pool_models()
    tiny_c = next(m for m in listed.data if m.id == "tiny-c")
    assert tiny_c.nodes == [node.fingerprint] and tiny_c.loaded_on == [] and listed.errors == []

    with pytest.raises(ModelfleetAPIError, match="Unknown backend 'vllm'"):
        client.pool_load("tiny-c", backend="vllm")
    placed = client.pool_load("tiny-c", pin=True, backend="ctransformers")
    assert placed.node == node.fingerprint and placed.node_name == "client-node" and not placed.already_loaded
    status = client.pool_status()
    assert status.loaded == ["tiny-c"] and status.loading_status["tiny-c"] is ModelState.LOADED
    mine = status.nodes[node.fingerprint]
    assert mine.online and mine.models and mine.models[0].pinned and mine.memory and mine.memory.used_bytes > 0
    assert mine.models[0].backend == "ctransformers"

    assert client.pool_unload("tiny-c").nodes == [node.fingerprint]
    client.pool_load("tiny-a")
    everything = client.pool_unload_all()
    assert everything.unloaded_models == ["tiny-a"] and everything.nodes == {node.fingerprint: ["tiny-a"]}


def test_api_errors_carry_code_status_and_message(api: Api, client: Client, node: Worker) -> None:
    with pytest.raises(ModelfleetAPIError) as missing:
        client.load(node.fingerprint, "no-such-model")
    assert missing.value.code == "model_file_not_found" and missing.value.status == 404
    assert "no-such-model" in missing.value.message and missing.value.is_a(NodeError)

    with pytest.raises(ModelfleetAPIError) as invalid:
        client.load(node.fingerprint, "../escape")
    assert invalid.value.status == 422 and invalid.value.code == "invalid_request"

    with pytest.raises(ModelfleetAPIError) as unknown:
        client.node("0" * 32)
    assert (unknown.value.status, unknown.value.code) == (404, "node_not_found")

    with Client(api.url, READ_KEY) as reader, pytest.raises(ModelfleetAPIError) as forbidden:
        reader.unload_all(node.fingerprint)
    assert (forbidden.value.status, forbidden.value.code) == (403, "forbidden")
    assert "read-only" in forbidden.value.message

    with Client(api.url, "wrong-key") as stranger, pytest.raises(ModelfleetAPIError) as refused:
        stranger.nodes()
    assert (refused.value.status, refused.value.code) == (401, "unauthenticated")

    with pytest.raises(NodeReferenceError) as nobody:
        client.resolve_node("nobody")
    assert nobody.value.code == "node_not_found" and "client-node" in nobody.value.message

    with Client(f"http://127.0.0.1:{free_port()}", OPERATOR_KEY) as gone, pytest.raises(ModelfleetConnectionError):
        gone.nodes()


def test_async_client(api: Api, node: Worker) -> None:
    async def scenario() -> None:
        async with AsyncClient(api.url, OPERATOR_KEY) as fleet:
            health, nodes, pool = await asyncio.gather(fleet.healthz(), fleet.nodes(), fleet.pool_models())
            assert health.ok and [n.fingerprint for n in nodes] == [node.fingerprint]
            assert "tiny-a" in {m.id for m in pool.data}
            assert (await fleet.resolve_node("client-node")).fingerprint == node.fingerprint
            assert (await fleet.node(node.fingerprint)).online

            # Two loads at once on one node, each its own request.
            a, b = await asyncio.gather(fleet.load(node.fingerprint, "tiny-a"), fleet.load(node.fingerprint, "tiny-b"))
            assert {a.model_id, b.model_id} == {"tiny-a", "tiny-b"}
            assert sorted(m.id for m in await fleet.node_models(node.fingerprint)) == ["tiny-a", "tiny-b"]
            assert (await fleet.unload(node.fingerprint, "tiny-a")).state is ModelState.UNLOADED
            assert (await fleet.unload_all(node.fingerprint)).unloaded == ["tiny-b"]

            placed = await fleet.pool_load("tiny-c")
            assert placed.node == node.fingerprint
            assert (await fleet.pool_status()).loaded == ["tiny-c"]
            assert (await fleet.pool_unload("tiny-c")).model == "tiny-c"
            assert (await fleet.pool_unload_all()).total_unloaded == 0

            with pytest.raises(ModelfleetAPIError) as not_loaded:
                await fleet.unload(node.fingerprint, "tiny-a")
            assert (not_loaded.value.status, not_loaded.value.code) == (404, "model_not_loaded")

    asyncio.run(scenario())


def test_url_and_key_from_the_environment(api: Api, node: Worker, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MODELFLEET_URL", api.url)
    monkeypatch.setenv("MODELFLEET_KEY", READ_KEY)
    with Client() as fleet:
        assert fleet.node(node.fingerprint).fingerprint == node.fingerprint
        with pytest.raises(ModelfleetAPIError) as forbidden:
            fleet.unload_all(node.fingerprint)
        assert forbidden.value.status == 403


# Without a fleet: node references, and answers a fleet does not give.


def info(fp: str, name: str, *, online: bool = True) -> NodeInfo:
    return node_info(fp, name, online=online)


def test_node_references() -> None:
    alpha, beta = info("abc1" + "0" * 28, "alpha"), info("abd2" + "0" * 28, "beta")
    old_beta = info("ffff" + "0" * 28, "beta", online=False)
    nodes = [alpha, beta, old_beta]
    assert pick_node(nodes, alpha.fingerprint) is alpha
    assert pick_node(nodes, "alpha") is alpha
    assert pick_node(nodes, "abc") is alpha
    assert pick_node(nodes, "beta") is beta  # the online one of two namesakes
    with pytest.raises(NodeReferenceError) as ambiguous:
        pick_node(nodes, "ab")
    assert ambiguous.value.code == "ambiguous_node" and alpha.fingerprint in ambiguous.value.message
    with pytest.raises(NodeReferenceError) as two_offline:
        pick_node([old_beta, info("eeee" + "0" * 28, "beta", online=False)], "beta")
    assert two_offline.value.code == "ambiguous_node"
    with pytest.raises(NodeReferenceError) as none:
        pick_node(nodes, "gamma")
    assert none.value.code == "node_not_found"


def mocked(handler: httpx.MockTransport) -> Client:
    return Client("http://fleet.invalid", "k", transport=handler)


def test_answers_a_fleet_does_not_give() -> None:
    with pytest.raises(ModelfleetClientError) as no_scheme:
        Client("localhost:8000")
    assert no_scheme.value.code == "invalid_url"

    def timeout(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    with pytest.raises(ModelfleetTimeout) as slow:
        mocked(httpx.MockTransport(timeout)).nodes()
    assert slow.value.code == "client_timeout" and isinstance(slow.value, ModelfleetConnectionError)

    proxy = httpx.MockTransport(lambda request: httpx.Response(502, text="<html>Bad Gateway</html>"))
    with pytest.raises(ModelfleetAPIError) as gateway:
        mocked(proxy).nodes()
    assert (gateway.value.status, gateway.value.code) == (502, "http_error")

    other = httpx.MockTransport(lambda request: httpx.Response(200, json={"items": []}))
    with pytest.raises(UnexpectedResponse):
        mocked(other).nodes()

    degraded = httpx.MockTransport(lambda request: httpx.Response(503, json={"status": "degraded", "redis": "down"}))
    assert not mocked(degraded).healthz().ok

    offline = {"success": False, "error": "Node x is offline.", "code": "node_offline", "details": {"node": "x"}}
    with pytest.raises(ModelfleetAPIError) as unavailable:
        mocked(httpx.MockTransport(lambda request: httpx.Response(503, json=offline))).node_models("x")
    assert unavailable.value.is_a(NodeUnavailable) and unavailable.value.details == {"node": "x"}


def test_the_client_and_cli_need_no_worker_code() -> None:
    """A laptop with only the client installed has no ctransformers: the client must not import `workers`."""
    probe = "import sys, modelfleet.client, modelfleet.cli; print(sorted({m.split('.')[0] for m in sys.modules}))"
    loaded = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    assert not {"workers", "ctransformers", "api", "fastapi", "celery"} & set(ast.literal_eval(loaded))


# The event stream.


def collect(events: Iterator[StreamEvent], into: list[StreamEvent], stop: threading.Event) -> threading.Thread:
    def run() -> None:
        try:
            for item in events:
                into.append(item)
                if stop.is_set():
                    return
        except Exception:
            if not stop.is_set():  # once stopped, the test closes the client under the stream
                raise

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_events_typed_and_errors(api: Api, client: Client, node: Worker) -> None:
    seen: list[StreamEvent] = []
    stop = threading.Event()
    with Client(api.url, READ_KEY) as reader:
        collect(reader.events(node.fingerprint), seen, stop)
        wait_for(lambda: seen, 10, "the snapshot")
        client.load(node.fingerprint, "tiny-a")
        wait_for(lambda: any(isinstance(e.data, ModelEvent) and e.data.type == "model-loaded" for e in seen), 10)
        stop.set()
    snapshot = seen[0]
    assert isinstance(snapshot.data, Snapshot) and [n.fingerprint for n in snapshot.data.nodes] == [node.fingerprint]
    changes = [e.data for e in seen[1:]]
    assert all(isinstance(e, ModelEvent) and e.node == node.fingerprint for e in changes)
    assert [(e.type, e.model_id) for e in changes if isinstance(e, ModelEvent)][:2] == [
        ("model-loading", "tiny-a"),
        ("model-loaded", "tiny-a"),
    ]

    with pytest.raises(ModelfleetAPIError) as unknown:
        next(iter(client.events("f" * 32)))
    assert (unknown.value.status, unknown.value.code) == (404, "node_not_found")
    with Client(api.url, "wrong") as anonymous, pytest.raises(ModelfleetAPIError) as refused:
        next(iter(anonymous.events()))
    assert refused.value.status == 401
    with Client(f"http://127.0.0.1:{free_port()}", READ_KEY) as nowhere, pytest.raises(ModelfleetConnectionError):
        next(iter(nowhere.events()))


def test_async_events(api: Api, node: Worker) -> None:
    async def scenario() -> list[StreamEvent]:
        seen: list[StreamEvent] = []
        async with AsyncClient(api.url, OPERATOR_KEY) as fleet:

            async def follow() -> None:
                async for item in fleet.events():
                    seen.append(item)
                    if isinstance(item.data, ModelEvent) and item.data.type == "model-unloaded":
                        return

            reading = asyncio.create_task(follow())
            while not seen:
                await asyncio.sleep(0.05)
            await fleet.load(node.fingerprint, "tiny-b")
            await fleet.unload(node.fingerprint, "tiny-b")
            await asyncio.wait_for(reading, 20)
        return seen

    seen = asyncio.run(scenario())
    assert isinstance(seen[0].data, Snapshot)
    kinds = [e.data.type for e in seen[1:] if isinstance(e.data, ModelEvent) and e.data.model_id == "tiny-b"]
    assert kinds == ["model-loading", "model-loaded", "model-checked", "model-unloading", "model-unloaded"]


def test_events_resume_across_an_api_restart(fleet: Fleet) -> None:
    """The head restarts: the client reconnects by itself and resumes after the last event it saw, so every
    event arrives exactly once, in order, with no second snapshot."""
    port = free_port()
    ghost = register_gone_node(fleet)
    first = fleet.api(port=port)
    url = f"http://127.0.0.1:{port}"
    client = fleet.redis.client()
    seen: list[StreamEvent] = []
    retries: list[tuple[str, float]] = []
    stop = threading.Event()
    with Client(url, READ_KEY) as reader:
        # Only the events this test publishes: another module's node (on the same Redis) may announce itself.
        events = reader.events(ghost.fingerprint, on_retry=lambda error, delay: retries.append((error.code, delay)))
        collect(events, seen, stop)
        wait_for(lambda: seen, 10, "the snapshot")
        before = publish(client, ghost.fingerprint, 0, 3)
        wait_for(lambda: len(seen) == 4, 10, "three events")
        first.stop()
        during = publish(client, ghost.fingerprint, 3, 3)  # while no API runs
        fleet.api(port=port)
        after = publish(client, ghost.fingerprint, 6, 2)
        wait_for(lambda: len(seen) == 9, 20, "every event after the restart")
        stop.set()
    assert [e.kind for e in seen] == ["snapshot"] + ["distributed-pool-changed"] * 8
    assert [e.id for e in seen[1:]] == before + during + after
    assert retries and retries[0][0] == "connection_error"


def publish(client: redis.Redis, node: str, start: int, count: int) -> list[str]:
    bus = EventBus(client)
    info = ModelInfo(id="m", path="/m.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1)
    return [
        str(bus.publish(model_event("model-loaded", node, info.model_copy(update={"id": f"m{i}"}))))
        for i in range(start, start + count)
    ]


def test_events_retry_a_passing_refusal_but_not_a_final_one() -> None:
    """After the stream has opened, a 503 (a head shutting down, a proxy while it restarts) is retried like a
    lost connection, resuming after the last id; a 401 ends the stream; before it opened, both raise at once."""

    def stream(event_id: str) -> httpx.Response:
        info = ModelInfo(id=event_id, path="/m.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1)
        data = model_event("model-loaded", "e" * 32, info).model_dump_json(by_alias=True)
        body = f"retry: 10\nevent: distributed-pool-changed\ndata: {data}\nid: {event_id}\n\n"
        return httpx.Response(200, text=body, headers={"content-type": "text/event-stream"})

    busy = {"success": False, "error": "shutting down", "code": "shutting_down", "details": {}}
    denied = {"success": False, "error": "bad key", "code": "unauthenticated", "details": {}}
    answers = iter([stream("1-0"), httpx.Response(503, json=busy), stream("2-0"), httpx.Response(401, json=denied)])
    asked_after: list[str | None] = []

    def handler(request: httpx.Request) -> httpx.Response:
        asked_after.append(request.headers.get("last-event-id"))
        return next(answers)

    retries: list[str] = []
    seen: list[StreamEvent] = []
    with pytest.raises(ModelfleetAPIError) as final:
        for item in mocked(httpx.MockTransport(handler)).events(on_retry=lambda e, d: retries.append(e.code)):
            seen.append(item)
    assert [e.id for e in seen] == ["1-0", "2-0"] and final.value.status == 401
    assert asked_after == [None, "1-0", "1-0", "2-0"]
    assert retries == ["connection_error", "shutting_down", "connection_error"]

    first_busy = httpx.MockTransport(lambda request: httpx.Response(503, json=busy))
    with pytest.raises(ModelfleetAPIError) as at_once:
        next(iter(mocked(first_busy).events()))
    assert at_once.value.code == "shutting_down"
