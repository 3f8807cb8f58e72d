"""Routing and load on demand against fakeredis (the view following pool events: a real redis-server): replicas
from the node hashes, one load however many ask."""

import asyncio
import json
from datetime import UTC, datetime

import fakeredis
import pytest
import redis.asyncio as aioredis

from api.routing import NodeView, Router, replicas
from broker import keys
from broker.errors import InsufficientMemory, ModelFileNotFound, ModelNotLoaded
from broker.registry import NodeDirectory
from broker.schemas import ModelInfo, ModelState, NodeInfo
from tests.conftest import node_info

A, B = "aa" * 16, "bb" * 16


def model(model_id: str = "m", state: ModelState = ModelState.LOADED, healthy: bool = True, port: int = 1) -> ModelInfo:
    return ModelInfo(
        id=model_id,
        path=f"/models/{model_id}.gguf",
        endpoint=f"http://127.0.0.1:{port}/" if state is ModelState.LOADED else None,
        healthy=healthy,
        state=state,
        size_bytes=1,
        loaded_at=datetime.now(UTC),
    )


async def register(
    client: fakeredis.FakeAsyncRedis | aioredis.Redis, fp: str, models: list[ModelInfo], online: bool = True
) -> None:
    info = node_info(fp, name=fp[:4])
    await client.sadd(keys.nodes_set(), fp)
    await client.hset(keys.node_info(fp), "registration", info.model_dump_json(by_alias=True))
    await client.hset(keys.node_info(fp), "models", json.dumps([m.wire() for m in models]))
    if online:
        await client.set(keys.node_alive(fp), info.boot_id)


def node(online: bool = True) -> NodeInfo:
    return node_info(online=online)


def test_replicas_are_online_loaded_healthy_and_served() -> None:
    up, down = node(), node(online=False)
    nodes = [
        (up, [model("m"), model("loading", ModelState.LOADING), model("sick", healthy=False)]),
        (down, [model("m")]),
    ]
    found = replicas(nodes, "m")
    assert [(r.node.fingerprint, r.endpoint) for r in found] == [(up.fingerprint, "http://127.0.0.1:1")]
    assert replicas(nodes, "loading") == [] and replicas(nodes, "sick") == [] and replicas(nodes, "x") == []


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def router(server: fakeredis.FakeServer, load, *, on_demand: bool = True, timeout: float = 10.0) -> Router:  # type: ignore[no-untyped-def]
    client = fakeredis.FakeAsyncRedis(server=server)
    directory = NodeDirectory(client)
    return Router(client, directory, NodeView(directory, max_age=0), load, on_demand=on_demand, load_timeout=timeout)


def test_fifty_first_requests_over_two_processes_load_once(server: fakeredis.FakeServer) -> None:
    loads: list[str] = []

    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [])

        async def load(model_id: str) -> None:
            loads.append(model_id)
            await asyncio.sleep(0.2)  # the node loading it
            await register(client, A, [model(model_id)])

        heads = [router(server, load), router(server, load)]
        answers = await asyncio.gather(*(heads[i % 2].route("m") for i in range(50)))
        assert all(a[0].node.fingerprint == A for a in answers)

    asyncio.run(run())
    assert loads == ["m"]


def test_a_failed_load_is_answered_to_every_waiter_without_another_load(server: fakeredis.FakeServer) -> None:
    loads: list[str] = []

    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [])

        async def load(model_id: str) -> None:
            loads.append(model_id)
            await asyncio.sleep(0.1)
            raise InsufficientMemory("does not fit", needed_bytes=10)

        heads = [router(server, load), router(server, load)]
        outcomes = await asyncio.gather(*(heads[i % 2].route("m") for i in range(10)), return_exceptions=True)
        assert all(isinstance(o, InsufficientMemory) for o in outcomes), outcomes
        assert {o.details.get("needed_bytes") for o in outcomes if isinstance(o, InsufficientMemory)} == {10}

    asyncio.run(run())
    assert loads == ["m"]


def test_without_load_on_demand_an_unloaded_model_is_not_found(server: fakeredis.FakeServer) -> None:
    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [model("m", state=ModelState.UNLOADED)])

        async def load(model_id: str) -> None:
            raise AssertionError("must not load")

        with pytest.raises(ModelNotLoaded, match="loading on demand is off"):
            await router(server, load, on_demand=False).route("m")

    asyncio.run(run())


def checking(model_id: str = "m") -> ModelInfo:
    """Loaded, its first check running: not a replica yet."""
    return model(model_id, healthy=False).model_copy(update={"checking": True})


@pytest.mark.parametrize("on_demand", [True, False])
def test_requests_for_a_model_being_loaded_or_checked_wait_for_it(
    server: fakeredis.FakeServer, on_demand: bool
) -> None:
    """An operator's load is on its way (loading, then checking): requests wait for the replica, whether load
    on demand is on or off, and none loads it a second time."""

    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [model("m", state=ModelState.LOADING)])

        async def load(model_id: str) -> None:
            raise AssertionError("must not load: a node is loading it")

        head = router(server, load, on_demand=on_demand)
        waiting = [asyncio.create_task(head.route("m")) for _ in range(5)]
        await asyncio.sleep(0.1)
        await register(client, A, [checking()])
        await asyncio.sleep(0.1)
        assert not any(task.done() for task in waiting) and head.waiting == 5
        await register(client, A, [model("m")])
        answers = await asyncio.wait_for(asyncio.gather(*waiting), 5)
        assert {a[0].node.fingerprint for a in answers} == {A}

    asyncio.run(run())


def test_a_model_that_fails_its_first_check_is_not_waited_for_forever(server: fakeredis.FakeServer) -> None:
    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [checking()])

        async def load(model_id: str) -> None:
            raise AssertionError("load on demand is off")

        waiting = asyncio.create_task(router(server, load, on_demand=False).route("m"))
        await asyncio.sleep(0.1)
        await register(client, A, [model("m", healthy=False)])
        with pytest.raises(ModelNotLoaded, match="did not answer its first check"):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(run())


def test_a_model_unhealthy_since_a_failed_generation_is_waited_for_not_refused(server: fakeredis.FakeServer) -> None:
    """Not a failed first check: its next periodic check may find it well again, so requests wait for that."""

    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [model("m", healthy=False)])

        async def load(model_id: str) -> None:  # the pool's answer: already loaded there
            return None

        waiting = asyncio.create_task(router(server, load).route("m"))
        await asyncio.sleep(0.2)
        assert not waiting.done()
        await register(client, A, [model("m")])
        assert (await asyncio.wait_for(waiting, 5))[0].node.fingerprint == A

    asyncio.run(run())


def test_a_model_whose_load_failed_while_awaited_is_not_found_without_load_on_demand(
    server: fakeredis.FakeServer,
) -> None:
    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [model("m", state=ModelState.LOADING)])

        async def load(model_id: str) -> None:
            raise AssertionError("load on demand is off")

        waiting = asyncio.create_task(router(server, load, on_demand=False).route("m"))
        await asyncio.sleep(0.1)
        await register(client, A, [model("m", state=ModelState.FAILED, healthy=False)])
        with pytest.raises(ModelNotLoaded, match="no online node holds it now"):
            await asyncio.wait_for(waiting, 5)

    asyncio.run(run())


def test_a_load_on_demand_that_answers_after_the_deadline_still_finds_its_replica(
    server: fakeredis.FakeServer,
) -> None:
    """The wait for an arriving model used most of the timeout; the load it then makes answers late, with the
    replica listed: Redis is read once more rather than the load reported as timed out."""

    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, A, [model("m", state=ModelState.LOADING)])

        async def load(model_id: str) -> None:
            await asyncio.sleep(0.3)
            await register(client, A, [model("m")])

        waiting = asyncio.create_task(router(server, load, timeout=0.5).route("m"))
        await asyncio.sleep(0.4)
        await register(client, A, [])  # the node's own load went away: the head loads it on demand
        assert (await asyncio.wait_for(waiting, 5))[0].node.fingerprint == A

    asyncio.run(run())


def test_a_model_nobody_has_is_not_found_and_loads_again_later(server: fakeredis.FakeServer) -> None:
    loads: list[str] = []

    async def run() -> None:
        async def load(model_id: str) -> None:
            loads.append(model_id)
            raise ModelFileNotFound("no such file", model=model_id)

        head = router(server, load)
        with pytest.raises(ModelFileNotFound):
            await head.route("nope")
        client = fakeredis.FakeAsyncRedis(server=server)
        await client.delete(keys.ondemand_failed("nope"))  # as its short TTL would
        with pytest.raises(ModelFileNotFound):
            await head.route("nope")

    asyncio.run(run())
    assert loads == ["nope", "nope"]


def test_the_lock_of_a_dead_loader_lapses(server: fakeredis.FakeServer) -> None:
    async def run() -> None:
        client = fakeredis.FakeAsyncRedis(server=server)
        await register(client, B, [])
        await client.set(keys.ondemand_lock("m"), "dead-process", px=300)  # held by a process that died

        async def load(model_id: str) -> None:
            await register(client, B, [model(model_id)])

        [found] = await router(server, load).route("m")
        assert found.node.fingerprint == B

    asyncio.run(run())


async def with_model(server: fakeredis.FakeServer) -> fakeredis.FakeAsyncRedis:
    """A client of `server`, where node A holds model "m"."""
    client = fakeredis.FakeAsyncRedis(server=server)
    await register(client, A, [model("m")])
    return client


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_the_node_view_reads_redis_only_after_a_change_or_max_age(server: fakeredis.FakeServer) -> None:
    async def run() -> None:
        client = await with_model(server)
        clock = Clock()
        view = NodeView(NodeDirectory(client), max_age=1.0, clock=clock)
        assert replicas(await view.nodes(), "m") and view.reads == 1
        await register(client, A, [])  # unloaded, but no event told this view yet
        assert replicas(await view.nodes(), "m") and view.reads == 1  # from memory
        view.changed()
        assert not replicas(await view.nodes(), "m") and view.reads == 2
        await register(client, A, [model("m")])
        clock.now = 0.99
        assert not replicas(await view.nodes(), "m") and view.reads == 2
        clock.now = 1.0  # never older than max_age, event or not
        assert replicas(await view.nodes(), "m") and view.reads == 3
        answers = await asyncio.gather(*(view.nodes() for _ in range(20)), return_exceptions=True)
        assert view.reads == 3 and all(a == answers[0] for a in answers)

    asyncio.run(run())


def test_requests_arriving_together_share_one_read(server: fakeredis.FakeServer) -> None:
    async def run() -> None:
        client = await with_model(server)
        view = NodeView(NodeDirectory(client))
        answers = await asyncio.gather(*(view.nodes() for _ in range(20)))
        assert view.reads == 1 and all(replicas(a, "m") for a in answers)

    asyncio.run(run())


def test_a_request_after_a_change_does_not_wait_for_a_read_begun_before_it(server: fakeredis.FakeServer) -> None:
    async def run() -> None:
        client = await with_model(server)
        view = NodeView(NodeDirectory(client))
        before = asyncio.ensure_future(view.nodes())  # its read is under way ...
        await asyncio.sleep(0)
        await register(client, A, [])
        view.changed()  # ... when the model goes away
        after = await view.nodes()
        assert not replicas(after, "m") and view.reads == 2
        await before
        assert not replicas(await view.nodes(), "m")  # the older read did not overwrite the newer copy

    asyncio.run(run())


def test_a_pool_event_marks_the_view_stale(redis: str) -> None:
    """Over a real redis-server: the view follows the events channel on a connection of `api.redis_line`'s."""

    async def run() -> None:
        client = aioredis.Redis.from_url(redis)
        await register(client, A, [model("m")])
        view = NodeView(NodeDirectory(client))
        following = asyncio.create_task(view.follow(client))
        await asyncio.wait_for(view.subscribed.wait(), 5)
        assert replicas(await view.nodes(), "m")
        await register(client, A, [])
        assert replicas(await view.nodes(), "m")  # from memory: no event yet
        await client.publish(keys.events_channel(), "1-0\n{}")  # what a node's publish sends with the change
        for _ in range(100):
            if not replicas(await view.nodes(), "m"):
                break
            await asyncio.sleep(0.01)
        assert not replicas(await view.nodes(), "m")
        following.cancel()
        await client.aclose()

    asyncio.run(run())
