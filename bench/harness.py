"""What the benchmarks share: their own redis-server on a free port, child processes started the way an operator
starts them (`python -m modelfleet ...`) with their output in files, and percentiles.

Run one benchmark as `python -m bench.NAME` from the checkout, all of them as `python -m bench`.
"""

import os
import secrets
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import psutil
import redis

from modelfleet.up import redis_server_binary


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def modelfleet_command() -> list[str]:
    return [sys.executable, "-m", "modelfleet"]


class Processes:
    """Children started with their output in files; stopped newest first (Redis, started first, last)."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.started: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(self.root / f"{name}.log", "wb") as out:
            proc = subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        self.started.append((name, proc))
        return proc

    def cpu_seconds(self) -> dict[str, float]:
        """User+system CPU time used so far by each child, and by this process (the benchmark's client)."""
        used = {"bench": sum(psutil.Process().cpu_times()[:2])}
        for name, proc in self.started:
            used[name] = sum(psutil.Process(proc.pid).cpu_times()[:2])
        return used

    def log(self, name: str) -> str:
        return (self.root / f"{name}.log").read_text(errors="replace")

    def check_alive(self) -> None:
        for name, proc in self.started:
            if proc.poll() is not None:
                raise RuntimeError(f"{name} exited with {proc.returncode}:\n{self.log(name)[-3000:]}")

    def stop_all(self) -> None:
        for _, proc in reversed(self.started):
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(15)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


def wait_until(condition: Callable[[], object], procs: Processes, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        procs.check_alive()
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")
        time.sleep(0.05)


def start_redis(procs: Processes) -> str:
    port, password = free_port(), secrets.token_urlsafe(24)
    conf = procs.root / "redis.conf"
    conf.write_text(
        f'port {port}\nbind 127.0.0.1\nsave ""\nappendonly no\nrequirepass {password}\ndir {procs.root}\n'
        "loglevel warning\n"
    )
    procs.start("redis", [redis_server_binary(), str(conf)])
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    client = redis.Redis.from_url(url)

    def answers() -> bool:
        try:
            return bool(client.ping())
        except redis.ConnectionError:
            return False

    wait_until(answers, procs, "redis-server")
    return url


def quantile(samples: list[float], q: int) -> float:
    """The q-th percentile (inclusive method), in seconds."""
    return statistics.quantiles(samples, n=100, method="inclusive")[q - 1]


def start_api(procs: Processes, env: dict[str, str]) -> tuple[str, subprocess.Popen[bytes]]:
    """`modelfleet api` on a free port, once it answers /healthz: its base URL and process."""
    port = free_port()
    proc = procs.start("api", [*modelfleet_command(), "api", "--host", "127.0.0.1", "--port", str(port)], env)
    base = f"http://127.0.0.1:{port}"

    def healthy() -> bool:
        try:
            return httpx.get(f"{base}/healthz", timeout=1).status_code == 200
        except httpx.HTTPError:
            return False

    wait_until(healthy, procs, "the API")
    return base, proc


def fleet_env(redis_url: str, **extra: str) -> dict[str, str]:
    """This environment without any MODELFLEET_ setting of the caller's, pointed at `redis_url`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MODELFLEET_")}
    return env | {"MODELFLEET_REDIS_URL": redis_url, "PYTHONUNBUFFERED": "1"} | extra


def ms(seconds: float) -> str:
    return f"{seconds * 1000:8.2f}"
