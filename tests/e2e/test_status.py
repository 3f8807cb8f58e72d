"""Fleet status (`GET /v1/models/status`) from what the nodes publish to Redis, against real workers: no job when
every node has published, a job to a node that has not, its own writes read back, and liveness respected."""

import signal
from pathlib import Path

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from broker import keys
from tests.conftest import OPERATOR_KEY, READ_KEY, Fleet, Worker, wait_for
from workers.gguf_factory import write_tiny_llama

pytestmark = pytest.mark.timeout(120)


def catalog_jobs(client: httpx.Client) -> float:
    """Catalog jobs this API process has sent so far, whatever their outcome."""
    response = client.get("/metrics")
    assert response.status_code == 200, response.text
    return sum(
        sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
        if sample.name == "modelfleet_jobs_total" and sample.labels.get("operation") == "catalog"
    )


def published(fleet: Fleet, worker: Worker) -> bool:
    client = fleet.redis.client()
    return bool(client.hexists(keys.node_info(worker.fingerprint), "files"))


def status(client: httpx.Client) -> dict:  # type: ignore[type-arg]
    response = client.get("/v1/models/status")
    assert response.status_code == 200, response.text
    return dict(response.json())


@pytest.fixture
def two_dirs(tmp_path: Path) -> tuple[Path, Path]:
    first, second = tmp_path / "models-one", tmp_path / "models-two"
    first.mkdir()
    second.mkdir()
    write_tiny_llama(first / "one-a.gguf", seed=1)
    write_tiny_llama(first / "one-b.gguf", seed=2)
    write_tiny_llama(second / "two-a.gguf", seed=3)
    return first, second


def test_status_sends_no_job_and_reads_its_own_writes(fleet: Fleet, two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    one = fleet.worker("one", first, "--memory-budget", "1GiB")
    two = fleet.worker("two", second, "--memory-budget", "1GiB")
    api = fleet.api()
    wait_for(lambda: published(fleet, one) and published(fleet, two), 20, "both nodes to publish their files")
    with api.client(OPERATOR_KEY) as op, api.client(READ_KEY) as reader:
        before = catalog_jobs(op)
        empty = status(reader)
        assert empty["loaded"] == []
        assert empty["loading_status"] == {"one-a": "unloaded", "one-b": "unloaded", "two-a": "unloaded"}
        assert [f["memory"]["used_bytes"] for f in empty["nodes"].values()] == [0, 0]

        load = op.post(f"/api/v1/nodes/{one.fingerprint}/models/load", json={"modelId": "one-a"})
        assert load.status_code == 200, load.text
        # Read right after the reply, without waiting: the node published the change before it replied.
        after = status(reader)
        assert after["loaded"] == ["one-a"] and after["loading_status"]["one-a"] == "loaded"
        mine = after["nodes"][one.fingerprint]
        assert [m["id"] for m in mine["models"]] == ["one-a"] and mine["memory"]["used_bytes"] > 0
        assert mine["memory"]["free_bytes"] == mine["memory"]["budget_bytes"] - mine["memory"]["used_bytes"]

        unload = op.post(f"/api/v1/nodes/{one.fingerprint}/models/unload", json={"modelId": "one-a"})
        assert unload.status_code == 200, unload.text
        again = status(reader)
        assert again["loaded"] == [] and again["nodes"][one.fingerprint]["memory"]["used_bytes"] == 0
        assert catalog_jobs(op) == before, "status sent a catalog job to nodes that had published theirs"

        # A file dropped into a models directory shows within a heartbeat.
        write_tiny_llama(second / "two-new.gguf", seed=4)
        wait_for(lambda: "two-new" in status(reader)["loading_status"], 20, "the new file in the status")


def test_a_node_that_has_not_published_is_asked(fleet: Fleet, two_dirs: tuple[Path, Path]) -> None:
    first, _ = two_dirs
    one = fleet.worker("one", first)
    api = fleet.api()
    wait_for(lambda: published(fleet, one), 20, "the node to publish its files")
    # As a node that is still reading its directory, or one of a version that does not publish them.
    fleet.redis.client().hdel(keys.node_info(one.fingerprint), "files")
    with api.client(OPERATOR_KEY) as op:
        before = catalog_jobs(op)
        answer = status(op)
        assert answer["loading_status"] == {"one-a": "unloaded", "one-b": "unloaded"}
        assert answer["nodes"][one.fingerprint]["online"] is True
        assert catalog_jobs(op) == before + 1


def test_a_dead_node_is_offline_in_the_status_with_nothing_loaded(fleet: Fleet, two_dirs: tuple[Path, Path]) -> None:
    first, second = two_dirs
    one = fleet.worker("one", first)
    two = fleet.worker("two", second, MODELFLEET_HEARTBEAT_TTL="3", MODELFLEET_HEARTBEAT_INTERVAL="0.5")
    api = fleet.api()
    wait_for(lambda: published(fleet, one) and published(fleet, two), 20, "both nodes to publish their files")
    with api.client(OPERATOR_KEY) as op:
        load = op.post(f"/api/v1/nodes/{two.fingerprint}/models/load", json={"modelId": "two-a"})
        assert load.status_code == 200, load.text
        assert status(op)["loaded"] == ["two-a"]

        two.signal(signal.SIGKILL)
        two.wait(10)
        # Its published models and memory stay in Redis, but its heartbeat lapses: it is offline, holds nothing.
        wait_for(lambda: not status(op)["nodes"][two.fingerprint]["online"], 20, "the killed node to go offline")
        answer = status(op)
        gone = answer["nodes"][two.fingerprint]
        assert gone["error"]["code"] == "node_offline" and "models" not in gone and "memory" not in gone
        assert answer["loaded"] == [] and "two-a" not in answer["loading_status"]
        assert answer["nodes"][one.fingerprint]["online"] is True

        # Restarted with another models directory: it shows the new one's files, never the old ones.
        third = second.parent / "models-three"
        third.mkdir()
        write_tiny_llama(third / "three-a.gguf", seed=5)
        back = fleet.worker("two", third)
        wait_for(lambda: published(fleet, back), 20, "the restarted node to publish its files")
        states = status(op)["loading_status"]
        assert "three-a" in states and "two-a" not in states
