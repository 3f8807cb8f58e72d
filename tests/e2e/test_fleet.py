"""A fleet of real nodes behind one API: independent queues, late joiners, concurrency over HTTP, and the real
stories260K model. One API and two nodes are shared by the module; every test starts with empty nodes.

Some tests freeze node A (SIGSTOP) to line jobs up in its queue and release them together. Its heartbeat thread
freezes too, so node A runs with a longer heartbeat TTL (`FREEZE_TTL`) to stay online meanwhile.
"""

import asyncio
import shutil
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from broker import keys
from tests.conftest import (
    FREEZE_TTL,
    OPERATOR_KEY,
    READ_KEY,
    Api,
    Fleet,
    Worker,
    node_json,
    park,
    queued,
    require_stories,
    thaw,
    wait_for,
)
from workers.gguf_factory import write_tiny_llama

pytestmark = pytest.mark.timeout(120)

STORIES_BYTES = 1185376
DEEP_LAYERS = 96  # ctransformers 0.2.27 aborts the whole process on tiny llamas of about 120 layers or more


@dataclass
class Nodes:
    api: Api
    a: Worker
    b: Worker
    extra: list[Worker] = field(default_factory=list)

    @property
    def all(self) -> list[Worker]:
        return [self.a, self.b, *self.extra]


@pytest.fixture(scope="module")
def fleet_models(models_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The shared models (copied: a symlink would resolve outside the dir), plus `deep`, a tiny llama with many
    layers whose load takes tens of milliseconds instead of one: long enough for an unload to arrive meanwhile."""
    root = tmp_path_factory.mktemp("fleet-models")
    for path in models_dir.glob("*.gguf"):
        if path.is_file() and not path.is_symlink():
            shutil.copy(path, root / path.name)
    write_tiny_llama(root / "deep.gguf", n_layer=DEEP_LAYERS)
    return root


@pytest.fixture(scope="module")
def nodes(module_fleet: Fleet, fleet_models: Path) -> Nodes:
    api = module_fleet.api()  # before the nodes: a node may join a running API
    return Nodes(
        api,
        module_fleet.worker("fleet-a", fleet_models, MODELFLEET_HEARTBEAT_TTL=str(FREEZE_TTL)),
        module_fleet.worker("fleet-b", fleet_models),
    )


@pytest.fixture
def op(nodes: Nodes) -> Iterator[httpx.Client]:
    """An operator client; every node is thawed and emptied before and after the test."""
    with nodes.api.client(OPERATOR_KEY) as client:
        _reset(nodes, client)
        yield client
        _reset(nodes, client)


def _reset(nodes: Nodes, client: httpx.Client) -> None:
    for worker in nodes.all:
        thaw(worker)
    for worker in nodes.all:
        wait_for(lambda w=worker: node_json(client, w)["online"], 15, f"{worker.name} to be online")
        response = client.post(models_url(worker, "unload-all"))
        assert response.status_code == 200, response.text


def models_url(worker: Worker, action: str = "") -> str:
    return f"/api/v1/nodes/{worker.fingerprint}/models" + (f"/{action}" if action else "")


def listing(client: httpx.Client, worker: Worker) -> dict[str, dict[str, Any]]:
    response = client.get(models_url(worker))
    assert response.status_code == 200, response.text
    return {m["id"]: m for m in response.json()["data"]}


def async_client(nodes: Nodes, connections: int = 16) -> httpx.AsyncClient:
    limits = httpx.Limits(max_connections=connections, max_keepalive_connections=connections)
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    return httpx.AsyncClient(base_url=nodes.api.url, headers=headers, timeout=60, limits=limits)


async def wait_async(condition: Any, timeout: float, what: str) -> None:
    """`wait_for` for a running event loop: polls without blocking the requests in flight."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)


# 7. Independent queues --------------------------------------------------------------------------------------


def test_each_node_has_its_own_queue_and_models(nodes: Nodes, op: httpx.Client) -> None:
    a, b = nodes.a, nodes.b
    assert a.fingerprint != b.fingerprint
    assert node_json(op, a)["queue"] == keys.node_queue(a.fingerprint) != node_json(op, b)["queue"]

    assert op.post(models_url(a, "load"), json={"modelId": "tiny-a"}).status_code == 200
    assert op.post(models_url(b, "load"), json={"modelId": "tiny-b"}).status_code == 200
    assert list(listing(op, a)) == ["tiny-a"]
    on_b = listing(op, b)
    assert list(on_b) == ["tiny-b"]

    response = op.post(models_url(a, "unload-all"))
    assert response.status_code == 200, response.text
    assert response.json()["unloaded"] == ["tiny-a"] and response.json()["node"] == a.fingerprint
    assert listing(op, a) == {}
    assert listing(op, b) == on_b, "unload-all on one node must leave the other untouched"


# 8. A node joining a running API ----------------------------------------------------------------------------


def test_worker_started_after_the_api_joins_without_restart(
    nodes: Nodes, op: httpx.Client, module_fleet: Fleet, fleet_models: Path
) -> None:
    before = {n["fingerprint"] for n in op.get("/api/v1/nodes").json()["data"]}
    late = module_fleet.worker("fleet-late", fleet_models)
    nodes.extra.append(late)
    assert late.fingerprint not in before

    listed = {n["fingerprint"]: n for n in op.get("/api/v1/nodes").json()["data"]}
    assert late.fingerprint in listed and listed[late.fingerprint]["online"] is True
    assert listed[late.fingerprint]["name"] == "fleet-late"
    response = op.post(models_url(late, "load"), json={"modelId": "tiny-c"})
    assert response.status_code == 200, response.text
    assert response.json()["node"] == late.fingerprint
    assert listing(op, late)["tiny-c"]["state"] == "loaded"


# 9. Concurrent loads of one model ---------------------------------------------------------------------------


def test_concurrent_loads_of_one_model_load_it_once(nodes: Nodes, op: httpx.Client, module_fleet: Fleet) -> None:
    a = nodes.a

    async def fire() -> list[httpx.Response]:
        async with async_client(nodes) as client:
            # Line the eight jobs up in the frozen node's queue, so that its threads take them together.
            park(module_fleet, a)
            try:
                loads = [
                    asyncio.create_task(client.post(models_url(a, "load"), json={"modelId": "tiny-a"}))
                    for _ in range(8)
                ]
                await wait_async(lambda: queued(module_fleet, a) == 8, 10, "eight loads in the node's queue")
            finally:
                thaw(a)
            return await asyncio.gather(*loads)

    replies = asyncio.run(fire())
    assert [r.status_code for r in replies] == [200] * 8, [r.text for r in replies]
    bodies = [r.json() for r in replies]
    assert all(b["state"] == "loaded" and b["modelId"] == "tiny-a" for b in bodies)
    # A load that ran answers alreadyLoaded=false; joiners of that load get its very outcome (same loadSeconds);
    # later ones find it loaded. Two loads would show as two different outcomes.
    outcomes = {b["loadSeconds"] for b in bodies if not b["alreadyLoaded"]}
    assert len(outcomes) == 1, bodies
    assert all(b["loadSeconds"] == 0.0 for b in bodies if b["alreadyLoaded"])

    first = listing(op, a)
    assert list(first) == ["tiny-a"]
    # Loading it again, concurrently, does not reload it: its loadedAt stays the same.
    again = asyncio.run(_post_many(nodes, models_url(a, "load"), {"modelId": "tiny-a"}, 8))
    assert all(r.status_code == 200 and r.json()["alreadyLoaded"] for r in again), [r.text for r in again]
    assert listing(op, a)["tiny-a"]["loadedAt"] == first["tiny-a"]["loadedAt"]


async def _post_many(nodes: Nodes, url: str, body: dict[str, Any], n: int) -> list[httpx.Response]:
    async with async_client(nodes) as client:
        return await asyncio.gather(*(client.post(url, json=body) for _ in range(n)))


# 10. Hundreds of waits --------------------------------------------------------------------------------------


def test_hundreds_of_waiting_requests_leave_other_requests_fast(
    nodes: Nodes, op: httpx.Client, module_fleet: Fleet
) -> None:
    a, b = nodes.a, nodes.b
    assert op.post(models_url(b, "load"), json={"modelId": "tiny-b"}).status_code == 200

    async def scenario() -> tuple[list[httpx.Response], list[float]]:
        loop = asyncio.get_running_loop()
        async with async_client(nodes, connections=320) as crowd, async_client(nodes) as probe:
            park(module_fleet, a)
            try:
                waits = [asyncio.create_task(crowd.get(models_url(a))) for _ in range(300)]
                await wait_async(lambda: queued(module_fleet, a) == 300, 20, "300 lists in the frozen node's queue")
                assert not any(w.done() for w in waits)

                timings = []
                started = loop.time()
                listed = await probe.get("/api/v1/nodes")
                timings.append(loop.time() - started)
                assert listed.status_code == 200
                assert {n["fingerprint"] for n in listed.json()["data"]} >= {a.fingerprint, b.fingerprint}
                started = loop.time()
                on_b = await probe.get(models_url(b))
                timings.append(loop.time() - started)
                assert on_b.status_code == 200, on_b.text
                assert [m["id"] for m in on_b.json()["data"]] == ["tiny-b"]
                # Both answered while all 300 still wait on the frozen node.
                assert not any(w.done() for w in waits), "the frozen node answered a list"
            finally:
                thaw(a)
            return await asyncio.gather(*waits), timings

    replies, timings = asyncio.run(scenario())
    assert all(t < 2 for t in timings), timings
    statuses = [r.status_code for r in replies]
    assert statuses == [200] * 300, {s: statuses.count(s) for s in set(statuses)}
    assert all(r.json() == {"data": []} for r in replies)
    assert queued(module_fleet, a) == 0


# 11. Unload during load -------------------------------------------------------------------------------------


def test_unload_sent_while_loading_waits_then_unloads(nodes: Nodes, op: httpx.Client, module_fleet: Fleet) -> None:
    a = nodes.a
    # Once loaded and unloaded, the node has the file's header cached: a load registers the model at once, then
    # spends its time in the backend, which is when the unload should find it.
    assert op.post(models_url(a, "load"), json={"modelId": "deep"}).status_code == 200
    assert op.post(models_url(a, "unload"), json={"modelId": "deep"}).status_code == 200

    async def race() -> tuple[httpx.Response, httpx.Response]:
        async with async_client(nodes) as client:
            # Freeze the node so that both jobs are queued, load first, and reach it back to back.
            park(module_fleet, a)
            try:
                load = asyncio.create_task(client.post(models_url(a, "load"), json={"modelId": "deep"}))
                await wait_async(lambda: queued(module_fleet, a) == 1, 10, "the load in the node's queue")
                unload = asyncio.create_task(client.post(models_url(a, "unload"), json={"modelId": "deep"}))
                await wait_async(lambda: queued(module_fleet, a) == 2, 10, "the unload behind it")
            finally:
                thaw(a)
            return await load, await unload

    load, unload = asyncio.run(race())
    assert load.status_code == 200, load.text
    assert load.json()["state"] == "loaded"
    if unload.status_code == 404:
        # The unload's thread looked before the load's thread had registered the model: a legal order.
        assert unload.json()["code"] == "model_not_loaded", unload.text
        assert listing(op, a)["deep"]["state"] == "loaded"
    else:
        assert unload.status_code == 200, unload.text
        assert unload.json()["state"] == "unloaded"
        assert listing(op, a) == {}


# 12. The real model -----------------------------------------------------------------------------------------


def test_real_stories_model_loads_lists_and_unloads(nodes: Nodes, op: httpx.Client) -> None:
    require_stories()
    b = nodes.b
    response = op.post(models_url(b, "load"), json={"modelId": "stories260K", "contextLength": 256})
    assert response.status_code == 200, response.text
    assert response.json()["alreadyLoaded"] is False

    with nodes.api.client(READ_KEY) as reader:
        model = listing(reader, b)["stories260K"]
    assert model["state"] == "loaded"
    assert model["healthy"] is True
    assert model["sizeBytes"] == STORIES_BYTES
    assert model["contextLength"] == 256
    assert model["loadedAt"] is not None
    assert Path(model["path"]).name == "stories260K.gguf"

    response = op.post(models_url(b, "unload"), json={"modelId": "stories260K"})
    assert response.status_code == 200, response.text
    assert response.json()["state"] == "unloaded"
    assert listing(op, b) == {}
    again = op.post(models_url(b, "unload"), json={"modelId": "stories260K"})
    assert again.status_code == 404 and again.json()["code"] == "model_not_loaded"
