"""Fault-suite harness: a redis-server of the test's own, which the test kills, restarts and flushes under a
real fleet (workers and API processes started as an operator starts them), and an SSE follower that records
exactly what a watcher sees."""

import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import redis

from broker import keys
from modelfleet.client import Client
from modelfleet.sse import StreamEvent
from tests.conftest import REDIS_PASSWORD, Fleet, Worker, free_port, wait_for


@dataclass
class OwnRedis:
    """A redis-server the test owns: `kill` (SIGKILL) or `stop` (SIGTERM: saves if persistent), then `start`."""

    port: int
    password: str
    data: Path
    persistent: bool
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url, socket_timeout=5)

    def start(self) -> None:
        from modelfleet.up import redis_server_binary

        persistence = "appendonly yes\nappendfsync always\n" if self.persistent else 'save ""\nappendonly no\n'
        conf = self.data / "redis.conf"
        conf.write_text(
            f"port {self.port}\nbind 127.0.0.1\nrequirepass {self.password}\ndir {self.data}\n{persistence}"
            f"logfile {self.data / 'redis.log'}\n"
        )
        self.proc = subprocess.Popen([redis_server_binary(), str(conf)], stdout=subprocess.DEVNULL)
        client = self.client()

        def up() -> bool:
            try:
                return bool(client.ping())
            except (redis.ConnectionError, redis.BusyLoadingError):
                return False

        wait_for(up, 10, "redis-server to answer")

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)


@pytest.fixture
def own_redis(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[OwnRedis]:
    """A fresh redis-server; persistent (AOF, fsync always) if the test is parametrized with `persistent`."""
    persistent = bool(getattr(request, "param", False))
    data = tmp_path / "redis"
    data.mkdir()
    server = OwnRedis(free_port(), REDIS_PASSWORD, data, persistent)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def own_fleet(own_redis: OwnRedis, tmp_path: Path) -> Iterator[Fleet]:
    fleet = Fleet(own_redis, tmp_path)  # type: ignore[arg-type]  # the same url/client/port/password interface
    yield fleet
    fleet.stop()


@dataclass
class Follower:
    """Follows `GET /api/v1/events` in a thread with the Python client (reconnecting after the last id), and
    keeps every snapshot and event it receives, in order."""

    client: Client
    seen: list[StreamEvent] = field(default_factory=list)
    errors: list[BaseException] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)

    def start(self) -> "Follower":
        threading.Thread(target=self._run, daemon=True).start()
        wait_for(lambda: self.snapshots, 15, "the follower's first snapshot")
        return self

    def _run(self) -> None:
        try:
            for event in self.client.events():
                self.seen.append(event)
                if self._stop.is_set():
                    return
        except BaseException as exc:
            self.errors.append(exc)

    def stop(self) -> None:
        self._stop.set()
        self.client.close()

    @property
    def snapshots(self) -> list[StreamEvent]:
        return [e for e in self.seen if e.kind == "snapshot"]

    def check_no_gap(self, client: redis.Redis) -> int:
        """Every event after the follower's last snapshot is in the stream exactly once and in order, and every
        stream entry after that snapshot reached the follower: nothing missed, nothing twice. Returns how many
        events that covered."""
        assert not self.errors, self.errors
        last = max(i for i, e in enumerate(self.seen) if e.kind == "snapshot")
        since = self.seen[last].id or "0-0"
        received = [e.id for e in self.seen[last + 1 :] if e.kind != "snapshot"]
        entries = client.xrange(keys.events_stream(), min=f"({since}")
        stored = [raw_id.decode() for raw_id, _ in entries]
        assert received == stored, f"follower got {received}, the stream after {since} holds {stored}"
        all_ids = [e.id for e in self.seen if e.kind != "snapshot"]
        assert len(all_ids) == len(set(all_ids)), "an event reached the follower twice"
        return len(received)


def node_ok(client: Client, worker: Worker) -> bool:
    """The node is listed, online as this very process, with its consumer taking jobs."""
    try:
        node = client.node(worker.fingerprint)
    except Exception:
        return False
    return bool(node.online and node.consuming and node.pid == worker.pid)


def stopwatch() -> "Iterator[float]":
    started = time.monotonic()
    while True:
        yield time.monotonic() - started


def pushes(client: redis.Redis) -> int:
    """How many LPUSHes Redis has served: kombu publishes each job with one."""
    return int(client.info("commandstats").get("cmdstat_lpush", {}).get("calls", 0))


def hand_to_frozen(fleet: Fleet, worker: Worker, send: Callable[[str], object], models: list[str]) -> str:
    """Send a job (`send(model)`, in a thread) while the worker is SIGSTOPped during its consumer's BRPOP, so
    that Redis hands the job to the frozen process: it leaves the queue, and cannot start until the process runs
    again. Returns the model whose job the frozen process holds (its BRPOP may time out first: then the next
    model is tried after letting the worker run that one)."""
    from tests.conftest import _blocked_on_redis

    client = fleet.redis.client()
    for model in models:
        wait_for(lambda: _blocked_on_redis(fleet, worker), 10, "the worker's BRPOP")
        worker.signal(signal.SIGSTOP)
        if not _blocked_on_redis(fleet, worker):
            worker.signal(signal.SIGCONT)  # its BRPOP timed out just as it froze
            continue
        before = pushes(client)
        threading.Thread(target=send, args=(model,), daemon=True).start()
        wait_for(lambda: pushes(client) > before, 10, "the API to queue the job")  # noqa: B023
        if client.llen(keys.node_queue(worker.fingerprint)) == 0:
            return model
        worker.signal(signal.SIGCONT)  # the BRPOP had timed out: the worker runs this one now
    raise AssertionError("could not hand a job to the frozen worker")


def freeze_mid_job(fleet: Fleet, worker: Worker, send: Callable[[str], object], models: list[str]) -> str:
    """Send a job (`send(model)`, in a thread) and SIGSTOP the worker the moment it has started it (its start
    record appears in Redis), before its reply is stored: a job caught running. Returns its model (a job that
    finished before the freeze landed is answered normally, and the next model is tried)."""
    client = fleet.redis.client()
    for model in models:
        before = set(client.scan_iter(keys.started("*")))
        threading.Thread(target=send, args=(model,), daemon=True).start()
        deadline = time.monotonic() + 10
        started: list[bytes] = []
        while not started and time.monotonic() < deadline:
            started = [k for k in client.scan_iter(keys.started("*")) if k not in before]
        worker.signal(signal.SIGSTOP)
        assert started, "the job never started"
        job_id = started[0].decode().rsplit(":", 1)[1]
        if not client.exists(keys.reply(job_id)):
            return model
        worker.signal(signal.SIGCONT)
    raise AssertionError("every job finished before the worker could be frozen")


def restart_worker(fleet: Fleet, worker: Worker) -> Worker:
    """The same node again (name, state dir), as systemd or compose `restart:` would start it."""
    state_dir = Path(worker.argv[worker.argv.index("--state-dir") + 1])
    return fleet.worker(worker.name, worker.models_dir, wait=False, state_dir=state_dir)
