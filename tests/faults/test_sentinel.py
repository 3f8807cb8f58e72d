"""Redis Sentinel: the fleet on a `redis+sentinel://` URL, and the master SIGKILLed during a stream of loads.

A real master, a real replica and a real sentinel (`redis-server --sentinel`), all with a password on the data
nodes. The API, the worker and their Celery connections all find the master through the sentinel, and find the
promoted replica after the failover. Every load is answered (a 503 during the failover is retried, as any HTTP
client retries it), and no job runs twice.
"""

import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from broker import keys
from broker.connection import parse_redis_url
from modelfleet.client import Client
from tests.conftest import OPERATOR_KEY, REDIS_PASSWORD, Fleet, free_port, require_stories, wait_for
from tests.e2e.test_flower import FLOWER_PASSWORD, FLOWER_USER, start_flower
from tests.faults.conftest import node_ok

pytestmark = pytest.mark.timeout(120)

MASTER = "fleet-master"


@dataclass
class SentinelSet:
    """A master, one replica and `count` sentinels (quorum 1) on free ports, in `root`."""

    root: Path
    password: str = REDIS_PASSWORD
    count: int = 1
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def sentinel_names(self) -> list[str]:
        return ["sentinel"] + [f"sentinel{i}" for i in range(2, self.count + 1)]

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{self.ports[name]}" for name in self.sentinel_names)
        return f"redis+sentinel://:{self.password}@{hosts}/{MASTER}/0"

    def client(self) -> redis.Redis:
        return parse_redis_url(self.url).client(socket_timeout=5)

    def start(self) -> None:
        from modelfleet.up import redis_server_binary

        binary = redis_server_binary()
        self.ports = {name: free_port() for name in ("master", "replica", *self.sentinel_names)}
        auth = f"requirepass {self.password}\nmasterauth {self.password}\n"
        for name in ("master", "replica"):
            data = self.root / name
            data.mkdir(parents=True)
            conf = data / "redis.conf"
            follow = f"replicaof 127.0.0.1 {self.ports['master']}\n" if name == "replica" else ""
            conf.write_text(
                f'port {self.ports[name]}\nbind 127.0.0.1\ndir {data}\nsave ""\nappendonly no\n{auth}{follow}'
                f"logfile {data / 'redis.log'}\n"
            )
            self.procs[name] = subprocess.Popen([binary, str(conf)], stdout=subprocess.DEVNULL)
        for name in self.sentinel_names:
            data = self.root / name
            data.mkdir()
            conf = data / "sentinel.conf"  # the sentinel rewrites it: its own file, writable
            conf.write_text(
                f"port {self.ports[name]}\nbind 127.0.0.1\ndir {data}\nlogfile {data / 'sentinel.log'}\n"
                f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['master']} 1\n"
                f"sentinel auth-pass {MASTER} {self.password}\n"
                f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 10000\n"
            )
            self.procs[name] = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
        replica = redis.Redis(port=self.ports["replica"], password=self.password)

        def replicating() -> bool:
            try:
                return replica.info("replication").get("master_link_status") == "up"
            except redis.ConnectionError:
                return False

        wait_for(replicating, 15, "the replica to follow the master")
        wait_for(lambda: self.master_port() == self.ports["master"], 15, "the sentinel to know the master")
        # A sentinel learns of replicas from the master's INFO, which it asks for every 10 s: a master killed
        # before the sentinel has seen the replica leaves it nothing to promote (-failover-abort-no-good-slave).
        wait_for(self.replica_known, 25, "the sentinel to discover the replica")

    def _ask(self) -> redis.Redis:
        """The first sentinel still running."""
        name = next(n for n in self.sentinel_names if self.procs[n].poll() is None)
        return redis.Redis(port=self.ports[name])

    def replica_known(self) -> bool:
        try:
            replicas = self._ask().sentinel_slaves(MASTER)
        except redis.ConnectionError:
            return False
        return any(int(r["port"]) == self.ports["replica"] and not r.get("is_sdown") for r in replicas)

    def master_port(self) -> int | None:
        try:
            address = self._ask().sentinel_get_master_addr_by_name(MASTER)
        except redis.ConnectionError:
            return None
        return int(address[1]) if address else None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


@pytest.fixture
def sentinels(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[SentinelSet]:
    """The set; `count` sentinels if the test is parametrized indirectly with it (default 1)."""
    group = SentinelSet(tmp_path / "sentinel-set", count=int(getattr(request, "param", 1)))
    group.start()
    yield group
    group.stop()


def test_a_fleet_on_sentinel_survives_a_failover_during_a_stream_of_loads(
    sentinels: SentinelSet, models_dir: Path, tmp_path: Path
) -> None:
    require_stories()
    fleet = Fleet(sentinels, tmp_path)  # type: ignore[arg-type]  # url and client() are all the fleet uses
    try:
        worker = fleet.worker("sentry", models_dir)
        api = fleet.api()
        client = Client(api.url, OPERATOR_KEY, job_timeout=60)
        assert node_ok(client, worker)
        assert "**" in api.log() and REDIS_PASSWORD not in api.log()  # the sentinel URL is logged masked

        models = ["tiny-a", "tiny-b", "tiny-c", "org/nested", "stories260K"]
        answered: list[tuple[str, str, int, int]] = []  # (operation, model, status, attempts)
        failover_at: list[float] = []

        def stream() -> None:
            with api.client(timeout=60) as http:
                for round_ in range(3):
                    for model in models:
                        for operation in ("load", "unload"):
                            answered.append((operation, model, *_retrying(http, worker.fingerprint, operation, model)))
                            if len(answered) == 6 and round_ == 0:
                                failover_at.append(time.monotonic())
                                sentinels.procs["master"].send_signal(signal.SIGKILL)

        thread = threading.Thread(target=stream)
        started = time.monotonic()
        thread.start()
        thread.join(100)
        assert not thread.is_alive(), f"the stream of loads hung; answered so far: {answered}"
        assert failover_at, "the master was never killed"
        promoted = sentinels.master_port()
        print(
            f"\nSentinel failover during {len(answered)} loads and unloads: all answered in "
            f"{time.monotonic() - started:.1f}s; {sum(a[3] - 1 for a in answered)} retried; master now :{promoted}"
        )
        assert promoted == sentinels.ports["replica"], "the sentinel did not promote the replica"
        assert [a[2] for a in answered] == [200] * len(answered), answered

        # No job ran twice: a job the broker delivered again after the failover (kombu can restore a message whose
        # ack the old master had not passed on) was recognised and skipped.
        log = worker.log()
        received = Counter(re.findall(r"Task modelfleet\.\w+\[([0-9a-f]+)\] received", log))
        skipped = Counter(re.findall(r"job ([0-9a-f]+) was delivered again", log))
        ran = received - skipped
        print(f"  {sum(skipped.values())} redelivered job(s) skipped")
        assert received and set(ran.values()) == {1}, [j for j, n in ran.items() if n != 1]
        # And the fleet is whole on the new master.
        wait_for(lambda: node_ok(client, worker), 15, "the node to be listed on the new master")
        assert client.load(worker.fingerprint, "tiny-a").model_id == "tiny-a"
    finally:
        fleet.stop()


def _retrying(http: httpx.Client, fingerprint: str, operation: str, model: str) -> tuple[int, int]:
    """Send one operation, retrying what a client retries (a 503 while Redis fails over, a dropped connection);
    returns the final status and the attempts it took."""
    for attempt in range(1, 30):
        try:
            response = http.post(f"/api/v1/nodes/{fingerprint}/models/{operation}", json={"modelId": model})
        except httpx.TransportError:
            continue
        if response.status_code != 503:
            if (
                response.status_code == 404 and operation == "unload" and attempt > 1
            ):  # a retry of one that went through
                return 200, attempt
            return response.status_code, attempt
        threading.Event().wait(0.5)
    return 503, 30


@pytest.mark.parametrize("sentinels", [2], indirect=True)
def test_flower_on_a_sentinel_url_lists_the_node_and_its_jobs_before_and_after_a_failover(
    sentinels: SentinelSet, models_dir: Path, tmp_path: Path
) -> None:
    """Flower on two sentinels: the node and its jobs before the master is killed, and after the failover with
    the URL's first sentinel gone too (it ran on the old master's machine), which every path of Flower's must
    survive by asking the other sentinel."""
    fleet = Fleet(sentinels, tmp_path)  # type: ignore[arg-type]  # url and client() are all the fleet uses
    try:
        worker = fleet.worker("watched", models_dir)
        flower, url = start_flower(fleet)
        api = fleet.api()
        client = Client(api.url, OPERATOR_KEY, job_timeout=60)
        host = f"watched.{worker.fingerprint[:8]}@"
        with httpx.Client(base_url=url, auth=(FLOWER_USER, FLOWER_PASSWORD), timeout=10) as fl:

            def get(path: str, **params: str) -> Any:
                """Flower's JSON answer, or None while it cannot give one: right after a failover a request of
                Flower's may wait on a dead sentinel longer than this client waits; the test waits for it to
                recover, not for it to be quick."""
                try:
                    answer = fl.get(path, params=params)
                except httpx.TransportError:
                    return None
                return answer.json() if answer.status_code == 200 else None

            def listed() -> bool:
                # `refresh` asks the workers over the broker (Celery's inspect); `status` is what their
                # heartbeat events said: both paths go through the sentinel to the master.
                workers = get("/api/workers", refresh="true") or {}
                alive = get("/api/workers", status="true") or {}
                return any(h.startswith(host) for h in workers) and any(
                    h.startswith(host) and up for h, up in alive.items()
                )

            def succeeded(model: str) -> list[dict[str, Any]]:
                tasks = get("/api/tasks", taskname="modelfleet.load", state="SUCCESS") or {}
                return [
                    t for t in tasks.values() if f"'modelId': '{model}'" in t["kwargs"] and t["worker"].startswith(host)
                ]

            def queue_length() -> list[dict[str, Any]]:
                # Flower's broker API reads the queues' lengths from Redis itself, found through the sentinel.
                # Which queues there are it learns from the workers' answers to an inspect, which can miss its
                # one-second deadline on a busy machine: ask again until it has the node's queue.
                queues: list[dict[str, Any]] = (get("/api/queues/length") or {}).get("active_queues", [])
                mine = [q for q in queues if q["name"] == keys.node_queue(worker.fingerprint)]
                if not mine:
                    get("/api/workers", refresh="true")
                return mine

            wait_for(listed, 30, "Flower to list the node through the sentinel")
            assert client.load(worker.fingerprint, "tiny-a").model_id == "tiny-a"
            wait_for(lambda: succeeded("tiny-a"), 15, "Flower to show the load as SUCCESS")
            queue = {"name": keys.node_queue(worker.fingerprint), "messages": 0}
            assert wait_for(queue_length, 30, "Flower's broker API to read the node's queue") == [queue]
            assert fl.get("/broker").status_code == 200

            sentinels.procs["master"].send_signal(signal.SIGKILL)
            wait_for(lambda: sentinels.master_port() == sentinels.ports["replica"], 30, "the failover")
            wait_for(lambda: node_ok(client, worker), 30, "the node to be listed on the new master")
            sentinels.procs["sentinel"].send_signal(signal.SIGKILL)
            sentinels.procs["sentinel"].wait(10)
            with api.client(timeout=60) as http:
                assert _retrying(http, worker.fingerprint, "load", "tiny-b")[0] == 200
            wait_for(lambda: succeeded("tiny-b"), 30, "Flower to show the load after the failover")
            wait_for(listed, 30, "Flower to list the node after the failover")
            # the URL's first sentinel is gone: Flower asks the other
            assert wait_for(queue_length, 30, "Flower's broker API after the failover") == [queue]
        flower.stop()
        log = flower.log()
        assert "**" in log and REDIS_PASSWORD not in log and FLOWER_PASSWORD not in log
    finally:
        fleet.stop()
