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

import httpx
import pytest
import redis

from broker.connection import parse_redis_url
from modelfleet.client import Client
from tests.conftest import OPERATOR_KEY, REDIS_PASSWORD, Fleet, free_port, require_stories, wait_for
from tests.faults.conftest import node_ok

pytestmark = pytest.mark.timeout(120)

MASTER = "fleet-master"


@dataclass
class SentinelSet:
    """A master, one replica and one sentinel (quorum 1) on free ports, in `root`."""

    root: Path
    password: str = REDIS_PASSWORD
    ports: dict[str, int] = field(default_factory=dict)
    procs: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    @property
    def url(self) -> str:
        return f"redis+sentinel://:{self.password}@127.0.0.1:{self.ports['sentinel']}/{MASTER}/0"

    def client(self) -> redis.Redis:
        return parse_redis_url(self.url).client(socket_timeout=5)

    def start(self) -> None:
        from modelfleet.up import redis_server_binary

        binary = redis_server_binary()
        self.ports = {name: free_port() for name in ("master", "replica", "sentinel")}
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
        data = self.root / "sentinel"
        data.mkdir()
        conf = data / "sentinel.conf"  # the sentinel rewrites it: its own file, writable
        conf.write_text(
            f"port {self.ports['sentinel']}\nbind 127.0.0.1\ndir {data}\nlogfile {data / 'sentinel.log'}\n"
            f"sentinel monitor {MASTER} 127.0.0.1 {self.ports['master']} 1\n"
            f"sentinel auth-pass {MASTER} {self.password}\n"
            f"sentinel down-after-milliseconds {MASTER} 1000\nsentinel failover-timeout {MASTER} 10000\n"
        )
        self.procs["sentinel"] = subprocess.Popen([binary, str(conf), "--sentinel"], stdout=subprocess.DEVNULL)
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

    def replica_known(self) -> bool:
        try:
            replicas = redis.Redis(port=self.ports["sentinel"]).sentinel_slaves(MASTER)
        except redis.ConnectionError:
            return False
        return any(int(r["port"]) == self.ports["replica"] and not r.get("is_sdown") for r in replicas)

    def master_port(self) -> int | None:
        try:
            address = redis.Redis(port=self.ports["sentinel"]).sentinel_get_master_addr_by_name(MASTER)
        except redis.ConnectionError:
            return None
        return int(address[1]) if address else None

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
                proc.wait(10)


@pytest.fixture
def sentinels(tmp_path: Path) -> Iterator[SentinelSet]:
    group = SentinelSet(tmp_path / "sentinel-set")
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
