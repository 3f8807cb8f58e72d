"""NodeRegistrar / NodeDirectory against fakeredis (our own Redis code; the real thing is in tests/e2e)."""

import asyncio
import json

import fakeredis
import pytest

from broker import keys
from broker.errors import NodeNotFound, NodeUnavailable
from broker.registry import (
    REGISTRY_GRACE,
    Beat,
    DuplicateNode,
    LostNodeOwnership,
    NodeDirectory,
    NodeRegistrar,
    is_fingerprint,
)
from broker.schemas import MemoryInfo, ModelFile, ModelState, NodeInfo
from tests.broker.conftest import Run
from tests.conftest import node_info

FP = "ab" * 16


def info(fp: str = FP) -> NodeInfo:
    return node_info(fp)


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


def registrar(server: fakeredis.FakeServer, fp: str = FP, ttl: float = 0.5) -> NodeRegistrar:
    return NodeRegistrar(fakeredis.FakeRedis(server=server), info(fp), interval=0.1, ttl=ttl)


def test_claim_registers_and_release_marks_offline(server: fakeredis.FakeServer) -> None:
    node = registrar(server)
    node.claim()
    client = fakeredis.FakeRedis(server=server)
    assert client.sismember(keys.nodes_set(), FP)
    assert client.get(keys.node_alive(FP)) == node.info.boot_id.encode()
    node.beat({"modelsLoaded": 2})
    node.release()
    assert not client.exists(keys.node_alive(FP))
    assert client.hexists(keys.node_info(FP), "registration")


def test_second_claim_while_first_beats_is_refused(server: fakeredis.FakeServer) -> None:
    first = registrar(server, ttl=2.0)
    first.claim()
    second = registrar(server, ttl=2.0)

    async def beat_while_claiming() -> None:
        loop = asyncio.get_running_loop()
        claim = loop.run_in_executor(None, lambda: second.claim(wait=1.5))
        while not claim.done():
            first.beat({})
            await asyncio.sleep(0.1)
        await claim

    with pytest.raises(DuplicateNode, match="already served"):
        asyncio.run(beat_while_claiming())


def test_claim_takes_over_a_dead_owner_after_its_ttl(server: fakeredis.FakeServer) -> None:
    dead = registrar(server, ttl=0.3)
    dead.claim()
    successor = registrar(server, ttl=0.3)
    successor.claim(wait=2.0)
    client = fakeredis.FakeRedis(server=server)
    assert client.get(keys.node_alive(FP)) == successor.info.boot_id.encode()
    with pytest.raises(LostNodeOwnership):
        dead.beat({})


def test_directory_reports_online_offline_and_stats(server: fakeredis.FakeServer) -> None:
    node = registrar(server)
    node.claim()
    node.beat({"modelsLoaded": 3, "memoryUsedBytes": 10, "rssBytes": 20})

    async def read() -> tuple[list[NodeInfo], NodeInfo]:
        directory = NodeDirectory(fakeredis.FakeAsyncRedis(server=server))
        return await directory.all(), await directory.get(FP)

    listed, one = asyncio.run(read())
    assert [n.fingerprint for n in listed] == [FP]
    assert one.online and one.models_loaded == 3 and one.memory_used_bytes == 10 and one.rss_bytes == 20
    node.release()
    assert not asyncio.run(read())[1].online


def test_a_node_seen_online_whose_registration_vanished_is_503_for_a_while(
    server: fakeredis.FakeServer, run: Run
) -> None:
    """Redis restarted without its data: the node registers again at its next heartbeat. Until then, a node seen
    online a moment ago is unavailable (retry), not unknown (404, which clients read as for good)."""
    node = registrar(server)
    node.claim()
    now = [100.0]
    directory = NodeDirectory(fakeredis.FakeAsyncRedis(server=server), clock=lambda: now[0])

    async def get() -> NodeInfo:
        return await directory.get(FP)

    assert run(get()).online
    fakeredis.FakeRedis(server=server).flushall()
    now[0] += REGISTRY_GRACE - 1
    with pytest.raises(NodeUnavailable) as lost:
        run(get())
    assert lost.value.details["retry_after"] > 0 and "registration is gone" in lost.value.message
    now[0] += 2
    with pytest.raises(NodeNotFound):
        run(get())
    with pytest.raises(NodeNotFound):  # never seen: unknown at once
        run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).get("cd" * 16))


def test_fingerprint_shape() -> None:
    assert is_fingerprint(FP)
    assert not is_fingerprint("../etc") and not is_fingerprint("AB" * 16) and not is_fingerprint("a" * 15)


def test_heartbeat_model_states_and_budget(server: fakeredis.FakeServer) -> None:
    node = registrar(server)
    node.claim()
    # A newer node may report a state this API does not know: it is skipped, not fatal.
    node.beat({"modelStates": {"loaded": 2, "loading": 1, "hibernating": 4}, "memoryBudgetBytes": 1000})
    one = asyncio.run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).get(FP))
    assert one.model_states == {ModelState.LOADED: 2, ModelState.LOADING: 1} and one.memory_budget_bytes == 1000
    assert one.wire()["modelStates"] == {"loaded": 2, "loading": 1} and one.wire()["memoryBudgetBytes"] == 1000
    node.beat({"memoryBudgetBytes": 0})  # no budget
    assert asyncio.run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).get(FP)).memory_budget_bytes is None


def test_a_record_from_a_newer_or_broken_node_does_not_break_the_listing(server: fakeredis.FakeServer) -> None:
    good = registrar(server)
    good.claim()
    good.beat({"modelsLoaded": 1})
    client = fakeredis.FakeRedis(server=server)
    newer = info("cd" * 16).wire() | {"gpus": ["A100"]}  # a field this version does not know
    client.sadd(keys.nodes_set(), "cd" * 16, "ef" * 16)
    client.hset(keys.node_info("cd" * 16), mapping={"registration": json.dumps(newer), "heartbeat": "{}"})
    client.hset(keys.node_info("ef" * 16), "registration", "{not json")

    nodes = asyncio.run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).all())
    assert sorted(n.fingerprint for n in nodes) == sorted([FP, "cd" * 16])
    assert next(n for n in nodes if n.fingerprint == FP).models_loaded == 1

    # Heartbeats whose fields have the wrong shape: the node is still listed, without its heartbeat figures.
    for beat in ({"at": "2026-01-01T00:00:00+00:00", "modelStates": []}, {"at": "x"}, {"rssBytes": 1e400}, []):
        client.hset(keys.node_info("cd" * 16), "heartbeat", json.dumps(beat))
        nodes = asyncio.run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).all())
        assert "cd" * 16 in {n.fingerprint for n in nodes}, beat


def test_consuming_belongs_to_the_boot_that_said_it(server: fakeredis.FakeServer) -> None:
    first = registrar(server, ttl=0.3)
    first.claim()

    def read() -> NodeInfo:
        return asyncio.run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).get(FP))

    assert not read().consuming
    first.mark_consuming()
    assert read().consuming
    successor = registrar(server, ttl=0.3)  # the same node restarted: a new boot, not consuming yet
    successor.claim(wait=2.0)
    assert read().online and not read().consuming


def test_a_consumer_that_stops_clears_its_mark_and_no_other_boots(server: fakeredis.FakeServer) -> None:
    node = registrar(server)
    node.claim()
    client = fakeredis.FakeRedis(server=server)
    node.mark_consuming()
    node.mark_consuming(False)
    assert client.hget(keys.node_info(FP), "consuming") is None
    node.mark_consuming()
    client.flushall()  # Redis lost everything while the consumer was down; it came back before the consumer did
    node._consuming = False  # what mark_consuming(False) leaves when Redis cannot be reached
    node.beat({})
    assert client.hget(keys.node_info(FP), "consuming") is None
    client.hset(keys.node_info(FP), "consuming", "another-boot")
    node.mark_consuming(False)
    node.beat({})
    assert client.hget(keys.node_info(FP), "consuming") == b"another-boot", "only this boot's mark is cleared"


def test_a_beat_re_registers_a_node_whose_records_redis_lost(server: fakeredis.FakeServer) -> None:
    node = registrar(server)
    node.claim()
    node.mark_consuming()
    assert node.beat({}) == Beat(retaken=False, reregistered=False)
    client = fakeredis.FakeRedis(server=server)
    client.flushall()  # as a Redis restart without persistence, or a failover to an empty replica, would
    assert node.beat({}) == Beat(retaken=True, reregistered=True)
    assert client.sismember(keys.nodes_set(), FP)
    assert client.hget(keys.node_info(FP), "boot") == node.info.boot_id.encode()
    assert client.hget(keys.node_info(FP), "consuming") == node.info.boot_id.encode()
    assert node.beat({}) == Beat(retaken=False, reregistered=False)


def test_a_restart_takes_over_at_once_from_a_holder_known_dead(server: fakeredis.FakeServer) -> None:
    dead = registrar(server, ttl=30)
    dead.claim()
    successor = registrar(server, ttl=30)
    # Waiting out a 30 s TTL within 2 s is impossible: the claim succeeds only by taking over at once.
    successor.claim(wait=2, holder_gone=lambda holder: holder.boot_id == dead.info.boot_id)
    assert fakeredis.FakeRedis(server=server).get(keys.node_alive(FP)) == successor.info.boot_id.encode()


def test_an_offline_node_shows_when_it_last_beat_but_no_live_figures(server: fakeredis.FakeServer) -> None:
    node = registrar(server)
    node.claim()
    node.beat({"modelsLoaded": 1, "modelStates": {"loading": 1}, "memoryUsedBytes": 5, "rssBytes": 7})
    node.release()
    offline = asyncio.run(NodeDirectory(fakeredis.FakeAsyncRedis(server=server)).get(FP))
    assert not offline.online and offline.last_heartbeat is not None
    assert (offline.models_loaded, offline.model_states, offline.memory_used_bytes, offline.rss_bytes) == (0, {}, 0, 0)


def test_published_files_and_memory_make_the_catalog_until_the_next_registration(
    server: fakeredis.FakeServer, run: Run
) -> None:
    node = registrar(server)
    node.claim()
    directory = NodeDirectory(fakeredis.FakeAsyncRedis(server=server))
    [(_, catalog)] = run(directory.with_catalogs())
    assert catalog is None, "nothing published yet: the API must ask the node"

    file = ModelFile(id="m", path="/models/m.gguf", size_bytes=10, estimate_bytes=20, backend="ctransformers")
    node.publish_files([file])
    node.publish_memory(MemoryInfo(budget_bytes=100, used_bytes=20, free_bytes=80, evictable_bytes=20))
    client = fakeredis.FakeRedis(server=server)
    client.hset(keys.node_info(FP), "models", json.dumps([{"id": "m", "state": "loaded", "future": 1}]))
    [(_, catalog)] = run(directory.with_catalogs())
    assert catalog is not None and catalog.files == [file] and catalog.memory.free_bytes == 80
    assert catalog.models == [], "a model list this version cannot read is shown as none"

    client.hset(keys.node_info(FP), "memory", "{broken")
    assert run(directory.with_catalogs())[0][1] is None

    node.publish_memory(MemoryInfo(budget_bytes=100, used_bytes=0, free_bytes=100, evictable_bytes=0))
    registrar(server).claim(wait=0.5, holder_gone=lambda _: True)  # a new process of the same node
    assert not client.hexists(keys.node_info(FP), "files") and not client.hexists(keys.node_info(FP), "memory")


def test_live_keeps_an_online_boot_s_record_until_get_reads_the_node_again(
    server: fakeredis.FakeServer, run: Run
) -> None:
    first = registrar(server, ttl=5)
    first.claim()
    client = fakeredis.FakeRedis(server=server)
    directory = NodeDirectory(fakeredis.FakeAsyncRedis(server=server))
    seen = run(directory.live(FP))
    assert seen.online and seen.boot_id == first.info.boot_id
    # Kept without a read: a job sent with it is guarded by its boot id (api.sender), not by this record.
    client.hset(keys.node_info(FP), "registration", json.dumps(first.info.wire() | {"name": "renamed"}))
    client.delete(keys.node_alive(FP))
    assert run(directory.live(FP)) is seen
    # A full read replaces it; an offline node is not kept.
    assert not run(directory.get(FP)).online
    assert run(directory.live(FP)).name == "renamed"

    second = registrar(server, ttl=5)  # a new process of the node: another boot id
    second.claim()
    assert run(directory.live(FP)).boot_id == second.info.boot_id != first.info.boot_id
    assert run(directory.live(FP)) is run(directory.live(FP))
    with pytest.raises(NodeNotFound):
        run(directory.live("not-a-fingerprint"))
