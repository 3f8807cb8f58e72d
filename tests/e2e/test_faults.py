"""Fault injection against a real fleet: nodes killed (SIGKILL), frozen (SIGSTOP) and duplicated, observed only
through the REST API, the node's queue in Redis and the worker's own log.

A frozen worker's heartbeat thread freezes with it, so its alive key lapses one heartbeat TTL (6 s by default)
later. Tests that need a frozen node to stay online (a job that waits, yet no `node_went_offline`) give it a
longer TTL, `FREEZE_TTL`, and `park` it right after a heartbeat.
"""

import os
import re
import signal
import stat
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis

from broker import keys
from modelfleet.up import default_signals
from tests.conftest import FREEZE_TTL, Fleet, Worker, modelfleet_command, node_json, park, queued, thaw, wait_for
from workers.identity import KEY_FILE, fingerprint

pytestmark = pytest.mark.timeout(120)

"""Heartbeat TTL of workers that `park` freezes: online for well over the 2 s deadlines those tests use."""


def node_url(worker: Worker, tail: str = "") -> str:
    return f"/api/v1/nodes/{worker.fingerprint}{tail}"


def model_ids(api: httpx.Client, worker: Worker) -> list[str]:
    response = api.get(node_url(worker, "/models"))
    assert response.status_code == 200, response.text
    return [m["id"] for m in response.json()["data"]]


@pytest.fixture
def frozen(fleet: Fleet) -> Iterator[list[Worker]]:
    """Workers a test froze; thawed at teardown so that the fleet can stop them."""
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        thaw(worker)


def start_again(fleet: Fleet, worker: Worker) -> Worker:
    """Start a worker with the same name and state dir as `worker`; wait until this new process is online."""
    offset = len(worker.log()) if worker.log_path.exists() else 0
    state_dir = Path(worker.argv[worker.argv.index("--state-dir") + 1])
    new = fleet.worker(worker.name, worker.models_dir, wait=False, state_dir=state_dir)
    client = fleet.redis.client()

    def ready() -> bool:
        if not new.alive():
            raise AssertionError(f"restarted worker exited:\n{new.log()[offset:][-3000:]}")
        return bool(client.exists(keys.node_alive(new.fingerprint))) and " ready." in new.log()[offset:]

    wait_for(ready, 30, f"worker {new.name} to come back online")
    return new


# 1. Offline before the request ------------------------------------------------------------------------------


def test_request_to_offline_node_fails_at_once_with_time_since_heartbeat(fleet: Fleet, models_dir: Path) -> None:
    worker = fleet.worker("gone", models_dir)
    api = fleet.api()
    with api.client() as client:
        assert node_json(client, worker)["online"] is True
        worker.signal(signal.SIGKILL)
        worker.wait(10)
        wait_for(lambda: node_json(client, worker)["online"] is False, 15, "the killed node to show offline")

        started = time.monotonic()
        response = client.get(node_url(worker, "/models"))
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert elapsed < 5, f"an offline node must be refused at once, not after the 30 s list timeout ({elapsed:.1f}s)"
        body = response.json()
        assert body["success"] is False
        assert body["code"] == "node_offline"
        assert body["details"]["node"] == worker.fingerprint
        since = body["details"]["seconds_since_heartbeat"]
        # The alive key (TTL 6 s) lapsed, so the last heartbeat is at least a few seconds old.
        assert isinstance(since, float) and since >= 4, body
        said = re.search(r"last heartbeat was (\d+) seconds ago", body["error"])
        assert said and abs(int(said.group(1)) - since) <= 1, body["error"]

        load = client.post(node_url(worker, "/models/load"), json={"modelId": "tiny-a"})
        assert load.status_code == 503 and load.json()["code"] == "node_offline", load.text
        # Nothing was enqueued for the dead node: its queue would otherwise fill up for nobody.
        assert queued(fleet, worker) == 0


# 2. Offline while the job waits -----------------------------------------------------------------------------


def test_node_freezing_during_job_fails_with_went_offline_long_before_timeout(
    fleet: Fleet, models_dir: Path, frozen: list[Worker]
) -> None:
    worker = fleet.worker("freezes", models_dir)
    api = fleet.api(MODELFLEET_LIST_TIMEOUT="60")
    with api.client(timeout=90) as client:
        assert model_ids(client, worker) == []
        frozen.append(worker)
        worker.signal(signal.SIGSTOP)

        started = time.monotonic()
        response = client.get(node_url(worker, "/models"))
        elapsed = time.monotonic() - started
        assert response.status_code == 503, response.text
        body = response.json()
        assert body["code"] == "node_went_offline", body
        assert body["details"]["node"] == worker.fingerprint
        # Detected through the heartbeat (TTL 6 s, checked every 1 s), not by the 60 s timeout.
        assert elapsed < 20, f"took {elapsed:.1f}s"

        # Thawed, the node re-takes its alive key and serves again; the abandoned list is skipped.
        thaw(worker)
        wait_for(lambda: node_json(client, worker)["online"], 15, "the thawed node to come back online")
        assert model_ids(client, worker) == []
        wait_for(lambda: "job_expired" in worker.log(), 10, "the abandoned list to be skipped")
        assert queued(fleet, worker) == 0


# 3. Timeout -------------------------------------------------------------------------------------------------


def test_job_not_answered_in_time_is_a_504_naming_the_timeout(
    fleet: Fleet, models_dir: Path, frozen: list[Worker]
) -> None:
    worker = fleet.worker("slow", models_dir, MODELFLEET_HEARTBEAT_TTL=str(FREEZE_TTL))
    api = fleet.api(MODELFLEET_LOAD_TIMEOUT="2")
    with api.client() as client:
        frozen.append(worker)
        park(fleet, worker)  # online, but takes no job

        started = time.monotonic()
        response = client.post(node_url(worker, "/models/load"), json={"modelId": "tiny-a"})
        elapsed = time.monotonic() - started
        assert response.status_code == 504, response.text
        body = response.json()
        assert body == {
            "success": False,
            "code": "timeout",
            "error": body["error"],
            "details": {"timeout_seconds": 2.0},
        }
        assert "within 2 seconds" in body["error"], body["error"]
        assert "load" in body["error"]
        assert 2 <= elapsed < 10, f"answered after {elapsed:.1f}s"
        # The job is still waiting in the frozen node's queue (test 4 shows it never runs).
        assert queued(fleet, worker) == 1


# 4. Expiry --------------------------------------------------------------------------------------------------


def test_job_past_its_deadline_never_runs(fleet: Fleet, models_dir: Path, frozen: list[Worker]) -> None:
    worker = fleet.worker("late", models_dir, MODELFLEET_HEARTBEAT_TTL=str(FREEZE_TTL))
    api = fleet.api(MODELFLEET_LOAD_TIMEOUT="2")
    with api.client() as client:
        frozen.append(worker)
        park(fleet, worker)
        response = client.post(node_url(worker, "/models/load"), json={"modelId": "tiny-a"})
        assert response.status_code == 504, response.text
        assert queued(fleet, worker) == 1
        offset = len(worker.log())

        thaw(worker)

        def discarded() -> bool:
            tail = worker.log()[offset:]
            return "Discarding revoked task: modelfleet.load[" in tail or "job_expired" in tail

        wait_for(discarded, 15, "the node to discard the expired load")
        wait_for(lambda: queued(fleet, worker) == 0, 10, "the node's queue to drain")
        wait_for(lambda: node_json(client, worker)["online"], 15, "the node to be online")
        assert model_ids(client, worker) == [], "a load that expired before it was picked up must never run"
        assert node_json(client, worker)["modelsLoaded"] == 0
        # The node itself loads on request: what stopped the late load was its deadline, nothing else.
        assert client.post(node_url(worker, "/models/load"), json={"modelId": "tiny-a"}).status_code == 200
        assert model_ids(client, worker) == ["tiny-a"]


# 5. One worker per fingerprint ------------------------------------------------------------------------------


def test_second_worker_for_a_live_fingerprint_refuses_to_start(fleet: Fleet, models_dir: Path) -> None:
    first = fleet.worker("solo", models_dir)
    api = fleet.api()
    state_dir = Path(first.argv[first.argv.index("--state-dir") + 1])
    with api.client() as client:
        before = node_json(client, first)

        second = fleet.worker("solo-twin", models_dir, wait=False, state_dir=state_dir)
        assert second.fingerprint == first.fingerprint
        code = second.wait(30)
        assert code != 0, second.log()
        assert re.search(r"already served by a live worker|another worker", second.log()), second.log()[-3000:]

        # The first worker was not disturbed: same process registered, still online and serving.
        after = node_json(client, first)
        assert after["online"] is True
        assert (after["pid"], after["bootId"], after["name"]) == (first.pid, before["bootId"], "solo")
        assert client.post(node_url(first, "/models/load"), json={"modelId": "tiny-a"}).status_code == 200
        assert model_ids(client, first) == ["tiny-a"]
        assert first.alive()

        # A dead first worker does not block a restart: its alive key lapses and the newcomer takes it over.
        first.signal(signal.SIGKILL)
        first.wait(10)
        again = start_again(fleet, first)
        assert again.fingerprint == first.fingerprint
        node = node_json(client, again)
        assert node["online"] is True
        assert node["pid"] == again.pid and node["bootId"] != before["bootId"]
        # A new process starts empty: the model the killed process held is gone with it.
        assert model_ids(client, again) == []


def test_stalled_worker_is_replaced_and_stands_down_when_it_wakes(
    fleet: Fleet, models_dir: Path, frozen: list[Worker]
) -> None:
    stalled = fleet.worker("stalls", models_dir)
    api = fleet.api()
    state_dir = Path(stalled.argv[stalled.argv.index("--state-dir") + 1])
    frozen.append(stalled)
    stalled.signal(signal.SIGSTOP)

    # Its alive key stops being refreshed, so a newcomer sees the TTL run down and takes the node over.
    newcomer = fleet.worker("takes-over", models_dir, state_dir=state_dir)
    with api.client() as client:
        node = node_json(client, newcomer)
        assert node["online"] is True and node["pid"] == newcomer.pid

        # Woken up, the old process finds its key taken and stops instead of consuming the node's queue too.
        thaw(stalled)
        stalled.wait(30)
        assert "took over node" in stalled.log(), stalled.log()[-3000:]
        assert newcomer.alive()
        assert node_json(client, newcomer)["pid"] == newcomer.pid
        assert client.post(node_url(newcomer, "/models/load"), json={"modelId": "tiny-a"}).status_code == 200
        assert model_ids(client, newcomer) == ["tiny-a"]


# 6. Identity ------------------------------------------------------------------------------------------------


def start_worker_without_key(fleet: Fleet, name: str, models_dir: Path, state_dir: Path) -> Worker:
    """Start a worker the way an operator does on a fresh machine: no node.key yet; the worker makes it."""
    argv = [*modelfleet_command(), "worker", "--name", name, "--models-dir", str(models_dir)]
    argv += ["--state-dir", str(state_dir)]
    proc = Worker(name, argv, fleet.env(), fleet.root / f"worker-{name}.log", models_dir=models_dir)
    fleet.procs.append(proc.start())
    client = fleet.redis.client()

    def registered() -> bool:
        if not proc.alive():
            raise AssertionError(f"worker {name} exited:\n{proc.log()[-3000:]}")
        return " ready." in proc.log() and (state_dir / KEY_FILE).exists()

    wait_for(registered, 30, f"worker {name} to start")
    proc.fingerprint = fingerprint(bytes.fromhex((state_dir / KEY_FILE).read_text().strip()))
    assert client.exists(keys.node_alive(proc.fingerprint))
    return proc


def test_node_key_gives_each_state_dir_its_own_stable_fingerprint(fleet: Fleet, models_dir: Path) -> None:
    state_a, state_b = fleet.root / "fresh-a", fleet.root / "fresh-b"
    a = start_worker_without_key(fleet, "ident-a", models_dir, state_a)
    b = start_worker_without_key(fleet, "ident-b", models_dir, state_b)
    key_a = (state_a / KEY_FILE).read_text()
    assert stat.S_IMODE(os.stat(state_a / KEY_FILE).st_mode) == 0o600
    assert a.fingerprint != b.fingerprint

    api = fleet.api()
    with api.client() as client:
        nodes = {n["fingerprint"]: n for n in client.get("/api/v1/nodes").json()["data"]}
        assert set(nodes) == {a.fingerprint, b.fingerprint}
        assert nodes[a.fingerprint]["name"] == "ident-a" and nodes[b.fingerprint]["name"] == "ident-b"
        assert all(n["online"] for n in nodes.values())

        # A clean stop marks the node offline at once; a restart comes back under the same fingerprint.
        a.stop()
        assert node_json(client, a)["online"] is False
        again = start_again(fleet, a)
        assert again.fingerprint == a.fingerprint
        assert (state_a / KEY_FILE).read_text() == key_a
        node = node_json(client, again)
        assert node["online"] is True and node["pid"] == again.pid
        assert {n["fingerprint"] for n in client.get("/api/v1/nodes").json()["data"]} == {
            a.fingerprint,
            b.fingerprint,
        }
        assert fleet.redis.client().scard(keys.nodes_set()) == 2


def test_worker_started_before_redis_waits_for_it(fleet: Fleet, models_dir: Path, tmp_path: Path) -> None:
    from modelfleet.up import redis_server_binary
    from tests.conftest import free_port

    port = free_port()
    url = f"redis://127.0.0.1:{port}/0"
    worker = fleet.worker("early", models_dir, wait=False, MODELFLEET_REDIS_URL=url)
    wait_for(lambda: "is not answering" in worker.log(), 20, "the worker to say it is waiting for Redis")
    assert worker.alive()
    server = subprocess.Popen(
        [redis_server_binary(), "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--dir", str(tmp_path)],
        stdout=subprocess.DEVNULL,
        preexec_fn=default_signals,
    )
    try:
        client = redis.Redis.from_url(url)

        def online() -> bool:
            assert worker.alive(), worker.log()[-2000:]
            try:
                return bool(client.exists(keys.node_alive(worker.fingerprint)))
            except redis.ConnectionError:
                return False  # our redis-server is still starting

        wait_for(online, 30, "the node to come online once Redis is up")
    finally:
        worker.stop()
        server.terminate()
        server.wait(10)


def test_worker_with_a_wrong_redis_password_exits_with_a_clear_error(fleet: Fleet, models_dir: Path) -> None:
    wrong = fleet.redis.url.replace(fleet.redis.password, "not-the-password")
    worker = fleet.worker("badpass", models_dir, wait=False, MODELFLEET_REDIS_URL=wrong)
    assert worker.wait(30) != 0
    assert "refused this worker's credentials" in worker.log()
    assert "not-the-password" not in worker.log()
