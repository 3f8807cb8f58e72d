"""The real-parts harness: a real redis-server on a free port, real worker and API processes started the
way an operator starts them (`modelfleet worker ...`, `modelfleet api ...`), and real GGUF files.

Every secret the suite uses is distinctive, so `tests/e2e/test_secrets.py` can grep every log for it.
"""

import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import redis

from broker import keys
from broker.registry import NodeRegistrar, parse_node
from broker.schemas import NodeInfo
from modelfleet.up import default_signals
from workers.gguf_factory import write_tiny_llama
from workers.identity import fingerprint, load_or_create_node_key

ROOT = Path(__file__).resolve().parents[1]
SHARED_MODELS = ROOT.parent / "shared" / "models"
STORIES = SHARED_MODELS / "stories260K.gguf"

REDIS_PASSWORD = "rpw-SECRET-" + secrets.token_hex(8)
OPERATOR_KEY = "opk-SECRET-" + secrets.token_hex(12)
READ_KEY = "rok-SECRET-" + secrets.token_hex(12)
NODE_TOKEN = "ntk-SECRET-" + secrets.token_hex(12)
ALL_SECRETS = (REDIS_PASSWORD, OPERATOR_KEY, READ_KEY, NODE_TOKEN)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for(condition: Callable[[], object], timeout: float = 20.0, what: str = "condition") -> object:
    """Poll `condition` until it returns something truthy; fail the test with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def modelfleet_command() -> list[str]:
    script = shutil.which("modelfleet")
    return [script] if script else [sys.executable, "-m", "modelfleet"]


@dataclass
class RedisServer:
    port: int
    password: str
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://:{self.password}@127.0.0.1:{self.port}/0"

    def client(self) -> redis.Redis:
        return redis.Redis.from_url(self.url)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    from modelfleet.up import redis_server_binary

    port = free_port()
    data = tmp_path_factory.mktemp("redis")
    conf = data / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\nrequirepass {REDIS_PASSWORD}\n'
        f"dir {data}\nlogfile {data / 'redis.log'}\n"
    )
    proc = subprocess.Popen(
        [redis_server_binary(), str(conf)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        preexec_fn=default_signals,
    )
    server = RedisServer(port, REDIS_PASSWORD, proc)
    client = server.client()

    def up() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_for(up, 10, "redis-server to answer")
    yield server
    proc.terminate()
    proc.wait(10)


@dataclass
class Proc:
    """A modelfleet process started as an operator would, its output in a log file."""

    name: str
    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None

    def start(self) -> "Proc":
        self.log_file = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self.popen = subprocess.Popen(
            self.argv,
            env=self.env,
            stdout=self.log_file,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            preexec_fn=default_signals,  # even when pytest runs with SIGINT ignored (nohup, a background job)
            cwd=self.log_path.parent,  # never beside a `.modelfleet/keys` that `up` left where pytest runs
        )
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen is not None and self.popen.poll() is None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def signal(self, sig: int) -> None:
        assert self.popen is not None
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        assert self.popen is not None
        return self.popen.wait(timeout)

    def stop(self, timeout: float = 15.0) -> None:
        if self.popen is None:
            return
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self.log_file.close()


@dataclass
class Worker(Proc):
    fingerprint: str = ""
    models_dir: Path = Path()
    redis: "RedisServer | None" = None

    @property
    def endpoint(self) -> str:
        """The inference endpoint this worker registered."""
        assert self.redis is not None
        node = parse_node(
            self.fingerprint, self.redis.client().hgetall(keys.node_info(self.fingerprint)), True, datetime.now(UTC)
        )
        assert node is not None and node.endpoint, "the worker registered no inference endpoint"
        return node.endpoint

    def inference(self, key: str | None = READ_KEY, timeout: float = 30.0) -> httpx.Client:
        """A client of the worker's inference endpoint, with `key` as its bearer."""
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.endpoint, headers=headers, timeout=timeout)


@dataclass
class Api(Proc):
    url: str = ""

    def client(self, key: str | None = OPERATOR_KEY, timeout: float = 30.0) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.url, headers=headers, timeout=timeout)


@dataclass
class Fleet:
    """Starts workers and API processes against the test Redis, and stops them all at teardown."""

    redis: RedisServer
    root: Path
    procs: list[Proc] = field(default_factory=list)

    def env(self, **extra: str) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
        env |= {
            "MODELFLEET_REDIS_URL": self.redis.url,
            "MODELFLEET_OPERATOR_KEYS": OPERATOR_KEY,
            "MODELFLEET_API_KEYS": READ_KEY,
            "MODELFLEET_NODE_TOKEN": NODE_TOKEN,
            "PYTHONUNBUFFERED": "1",
        }
        return env | extra

    def worker(
        self, name: str, models_dir: Path, *args: str, wait: bool = True, state_dir: Path | None = None, **env: str
    ) -> Worker:
        state = state_dir or self.root / "state" / name
        fp = fingerprint(load_or_create_node_key(state))
        if "--serve-port" not in args and "--no-serve" not in args:
            args = ("--serve-port", "0", *args)  # many nodes on one machine: each its own free port
        argv = [
            *modelfleet_command(),
            "worker",
            "--name",
            name,
            "--models-dir",
            str(models_dir),
            "--state-dir",
            str(state),
            *args,
        ]
        proc = Worker(
            name,
            argv,
            self.env(**env),
            self.root / f"worker-{name}.log",
            fingerprint=fp,
            models_dir=models_dir,
            redis=self.redis,
        )
        self.procs.append(proc.start())
        if wait:
            self.wait_online(proc)
        return proc

    def wait_online(self, worker: Worker, timeout: float = 30.0) -> None:
        client = self.redis.client()

        def ready() -> bool:
            if not worker.alive():
                raise AssertionError(f"worker {worker.name} exited:\n{worker.log()[-3000:]}")
            # Online as this process (not a previous one with the same fingerprint), its Celery consumer taking jobs.
            fields = client.hgetall(keys.node_info(worker.fingerprint))
            alive = bool(client.exists(keys.node_alive(worker.fingerprint)))
            node = parse_node(worker.fingerprint, fields, alive, datetime.now(UTC))
            return node is not None and node.pid == worker.pid and node.consuming

        wait_for(ready, timeout, f"worker {worker.name} to come online")

    def api(self, *args: str, wait: bool = True, port: int | None = None, **env: str) -> Api:
        port = port or free_port()
        argv = [*modelfleet_command(), "api", "--host", "127.0.0.1", "--port", str(port), *args]
        proc = Api(f"api-{port}", argv, self.env(**env), self.root / f"api-{port}.log", url=f"http://127.0.0.1:{port}")
        self.procs.append(proc.start())
        if wait:

            def healthy() -> bool:
                if not proc.alive():
                    raise AssertionError(f"API exited:\n{proc.log()[-3000:]}")
                try:
                    return httpx.get(proc.url + "/healthz", timeout=1).status_code == 200
                except httpx.HTTPError:
                    return False

            wait_for(healthy, 30, "the API to answer /healthz")
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            proc.stop()

    def logs(self) -> dict[str, str]:
        return {p.log_path.name: p.log() for p in self.procs}


@pytest.fixture
def fleet(redis_server: RedisServer, tmp_path: Path) -> Iterator[Fleet]:
    """A fresh fleet for one test: its Redis is emptied first, its processes stopped after."""
    redis_server.client().flushall()
    f = Fleet(redis_server, tmp_path)
    yield f
    f.stop()


@pytest.fixture(scope="module")
def module_fleet(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    """One fleet shared by a module's tests (they must not depend on each other's models)."""
    redis_server.client().flushall()
    f = Fleet(redis_server, tmp_path_factory.mktemp("fleet"))
    yield f
    f.stop()


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A models directory with generated tiny llamas, a non-GGUF file, and the real stories260K model."""
    from workers.gguf_factory import write_not_gguf

    root = tmp_path_factory.mktemp("models")
    for seed, name in enumerate(("tiny-a", "tiny-b", "tiny-c")):
        write_tiny_llama(root / f"{name}.gguf", seed=seed)
    (root / "org").mkdir()
    write_tiny_llama(root / "org" / "nested.gguf")
    write_not_gguf(root / "broken.gguf")
    outside = tmp_path_factory.mktemp("outside")
    write_tiny_llama(outside / "secret.gguf")
    (root / "escape.gguf").symlink_to(outside / "secret.gguf")
    # A symlink to itself: its resolve() raised RuntimeError, which killed the node's heartbeat thread.
    (root / "loop.gguf").symlink_to(root / "loop.gguf")
    if STORIES.exists():
        shutil.copy(STORIES, root / "stories260K.gguf")  # a symlink would resolve outside the models dir
    return root


# Freezing a node: SIGSTOP stops its heartbeat too, so a frozen node stays online only for its heartbeat TTL.
# Tests that need it online while frozen start it with MODELFLEET_HEARTBEAT_TTL=FREEZE_TTL.
FREEZE_TTL = 15


def node_json(client: httpx.Client, worker: Worker) -> dict[str, Any]:
    response = client.get(f"/api/v1/nodes/{worker.fingerprint}")
    assert response.status_code == 200, response.text
    return response.json()  # type: ignore[no-any-return]


def queued(fleet: Fleet, worker: Worker) -> int:
    """How many jobs wait in the node's queue."""
    return int(fleet.redis.client().llen(keys.node_queue(worker.fingerprint)))


def _blocked_on_redis(fleet: Fleet, worker: Worker) -> bool:
    """Whether one of the worker's connections is blocked in Redis (its consumer's BRPOP)."""
    ports = {
        c.laddr.port
        for c in psutil.Process(worker.pid).net_connections("tcp")
        if c.raddr and c.raddr.port == fleet.redis.port
    }
    clients = fleet.redis.client().client_list()
    return any("b" in c["flags"] and int(c["addr"].rsplit(":", 1)[1]) in ports for c in clients)


def park(fleet: Fleet, worker: Worker, ttl: float = FREEZE_TTL) -> None:
    """Freeze the worker just after a heartbeat, once no BRPOP of its is pending: jobs sent now stay queued.

    The worker stays online for its heartbeat TTL minus the time it takes to park.
    """
    alive = keys.node_alive(worker.fingerprint)
    client = fleet.redis.client()
    wait_for(lambda: client.pttl(alive) > ttl * 1000 - 500, 5, "a fresh heartbeat")
    worker.signal(signal.SIGSTOP)
    wait_for(lambda: not _blocked_on_redis(fleet, worker), 5, "the frozen worker's BRPOP to time out")


def thaw(worker: Worker) -> None:
    if worker.alive():
        worker.signal(signal.SIGCONT)


def node_info(fp: str | None = None, name: str = "n1", **fields: Any) -> NodeInfo:
    """A node's registration as a worker would write it, for tests that need one without a worker."""
    fp = fp or secrets.token_hex(16)
    base: dict[str, Any] = {
        "fingerprint": fp,
        "name": name,
        "hostname": "h",
        "models_dir": "/models",
        "version": "0",
        "boot_id": uuid.uuid4().hex,
        "pid": 1,
        "started_at": datetime.now(UTC),
        "queue": keys.node_queue(fp),
    }
    return NodeInfo(**(base | fields))


def register_gone_node(fleet: "Fleet", name: str = "ghost") -> NodeInfo:
    """A node that registered once and is gone: listed, never online."""
    info = node_info(name=name, hostname="elsewhere")
    registrar = NodeRegistrar(fleet.redis.client(), info, interval=1, ttl=3)
    registrar.claim()
    registrar.release()
    return info


def require_stories() -> Path:
    if not STORIES.exists():
        pytest.skip(f"the real model is not at {STORIES} (../shared/models is absent)")
    return STORIES
