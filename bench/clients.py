"""Benchmark clients in processes of their own: `Client` starts one (`python -m bench.clients`) and sends it
commands, one JSON line each; the process answers each with one JSON line of samples and the CPU time it spent.

A client process holds an HTTP client (one keep-alive connection for sequential requests) and a plain Celery
client with a subscription to the reply channel, so that the API's requests and the bare Celery jobs are sent
from the same kind of process, each side paying its own client's CPU, reported apart from the API's.

Commands (each answers `{"samples": [seconds...], "errors": [text...], "cpu": seconds, ...}`):

  get        `n` GETs of `path` one after the other (httpx); a sample is one request's time
  get_lean   the same with Python's `http.client` on one keep-alive connection: what the HTTP round trip
             costs with a client that does little besides it (as curl), to tell httpx's CPU from the API's
  list       `n` list jobs to node `fp` sent with Celery one after the other (`send_task` as a plain Celery
             client sends it), each awaited on the reply channel; a sample is one round trip
  get_burst  at wall time `at`, `n` GETs of `path` at once (one connection each); a sample is one answer's
             time since `at`
  list_burst at wall time `at`, `n` list jobs sent back to back, replies awaited; a sample is one reply's time
             since `at`

Replies are checked: a job answered twice (`duplicates`) or not at all (`lost`) is counted, not merged.
"""

import asyncio
import http.client
import json
import subprocess
import sys
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import httpx
import psutil
import redis

from broker import keys
from broker.celery_app import make_celery
from broker.operations import LIST
from broker.schemas import ListJob
from broker.settings import BrokerSettings


class Client:
    """One client process, started with the API's URL and key and the fleet's Redis URL."""

    def __init__(self, api_url: str, key: str, redis_url: str) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "bench.clients", api_url, key, redis_url],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def send(self, **command: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(command) + "\n")
        self.proc.stdin.flush()

    def answer(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"client process exited with {self.proc.wait()}")
        return dict(json.loads(line))

    def run(self, **command: Any) -> dict[str, Any]:
        self.send(**command)
        return self.answer()

    def close(self) -> None:
        if self.proc.poll() is None:
            assert self.proc.stdin is not None
            self.proc.stdin.close()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def merge(answers: list[dict[str, Any]]) -> dict[str, Any]:
    """Several clients' answers to one command as one: samples and errors pooled, counts and CPU summed."""
    return {
        "samples": [s for a in answers for s in a["samples"]],
        "errors": [e for a in answers for e in a["errors"]],
        "cpu": sum(a["cpu"] for a in answers),
        "lost": sum(a.get("lost", 0) for a in answers),
        "duplicates": sum(a.get("duplicates", 0) for a in answers),
    }


# The client process itself.


class _Celery:
    """A plain Celery client: `send_task` with Celery's defaults, replies read off the reply channel."""

    def __init__(self, redis_url: str) -> None:
        self.app = make_celery(BrokerSettings(redis_url=redis_url))
        self.pubsub = redis.Redis.from_url(redis_url).pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.replies_channel())
        self.pubsub.get_message(timeout=1.0)

    def send(self, fp: str, deadline: float) -> str:
        job_id = uuid.uuid4().hex
        self.app.send_task(
            LIST.task,
            kwargs={"job": ListJob(deadline=deadline).wire()},
            queue=keys.node_queue(fp),
            task_id=job_id,
            expires=datetime.fromtimestamp(deadline, UTC),
            ignore_result=True,
        )
        return job_id

    def await_replies(self, pending: dict[str, float], deadline: float) -> dict[str, Any]:
        """Wait for the reply of every job in `pending` (job id -> time its sample counts from)."""
        samples: list[float] = []
        answered: set[str] = set()
        duplicates = 0
        while pending and time.time() < deadline:
            message = self.pubsub.get_message(timeout=1.0)
            if not message or message["type"] != "message":
                continue
            reply = json.loads(message["data"])
            job_id = reply["jobId"]
            if job_id in answered:
                duplicates += 1
            elif job_id in pending:
                samples.append(time.perf_counter() - pending.pop(job_id))
                answered.add(job_id)
                if reply.get("error") is not None:
                    raise RuntimeError(f"the node answered an error: {reply['error']}")
        return {"samples": samples, "lost": len(pending), "duplicates": duplicates}

    def sequential(self, fp: str, n: int) -> dict[str, Any]:
        samples: list[float] = []
        lost = duplicates = 0
        for _ in range(n):
            deadline = time.time() + 30
            started = time.perf_counter()
            outcome = self.await_replies({self.send(fp, deadline): started}, deadline)
            samples += outcome["samples"]
            lost += outcome["lost"]
            duplicates += outcome["duplicates"]
        return {"samples": samples, "lost": lost, "duplicates": duplicates}

    def burst(self, fp: str, n: int, at: float) -> dict[str, Any]:
        deadline = at + 60
        origin = _wait_until(at)
        pending = {self.send(fp, deadline): origin for _ in range(n)}
        return self.await_replies(pending, deadline)


def _wait_until(at: float) -> float:
    """Sleep until wall time `at`; the perf_counter reading that corresponds to it."""
    time.sleep(max(0.0, at - time.time()))
    return time.perf_counter() - max(0.0, time.time() - at)


def _sequential_gets(http: httpx.Client, path: str, n: int) -> dict[str, Any]:
    samples, errors = [], []
    for _ in range(n):
        started = time.perf_counter()
        response = http.get(path)
        if response.status_code == 200:
            samples.append(time.perf_counter() - started)
        else:
            errors.append(f"HTTP {response.status_code}: {response.text[:200]}")
    return {"samples": samples, "errors": errors, "last": response.json() if response.status_code == 200 else None}


def _sequential_gets_lean(api_url: str, key: str, path: str, n: int) -> dict[str, Any]:
    url = httpx.URL(api_url)
    connection = http.client.HTTPConnection(url.host, url.port, timeout=60)
    headers = {"Authorization": f"Bearer {key}"}
    samples, errors = [], []
    try:
        for _ in range(n):
            started = time.perf_counter()
            connection.request("GET", path, headers=headers)
            response = connection.getresponse()
            body = response.read()
            if response.status == 200:
                samples.append(time.perf_counter() - started)
            else:
                errors.append(f"HTTP {response.status}: {body[:200]!r}")
    finally:
        connection.close()
    return {"samples": samples, "errors": errors}


def _burst_gets(api_url: str, key: str, path: str, n: int, at: float) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        limits = httpx.Limits(max_connections=n, max_keepalive_connections=n)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(base_url=api_url, headers=headers, limits=limits, timeout=60) as client:

            async def one(origin: float) -> float | str:
                try:
                    response = await client.get(path)
                except httpx.HTTPError as exc:
                    return f"{type(exc).__name__}: {exc}"
                if response.status_code != 200:
                    return f"HTTP {response.status_code}: {response.text[:200]}"
                return time.perf_counter() - origin

            await asyncio.sleep(max(0.0, at - time.time()))
            origin = time.perf_counter() - max(0.0, time.time() - at)
            outcomes = await asyncio.gather(*(one(origin) for _ in range(n)))
        return {
            "samples": [o for o in outcomes if isinstance(o, float)],
            "errors": [o for o in outcomes if isinstance(o, str)],
        }

    return asyncio.run(run())


def main() -> None:
    api_url, key, redis_url = sys.argv[1:4]
    http = httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {key}"}, timeout=60)
    celery = _Celery(redis_url)
    me = psutil.Process()
    for line in sys.stdin:
        command = json.loads(line)
        cpu = sum(me.cpu_times()[:2])
        op = command["op"]
        if op == "get":
            answer = _sequential_gets(http, command["path"], command["n"])
        elif op == "get_lean":
            answer = _sequential_gets_lean(api_url, key, command["path"], command["n"])
        elif op == "list":
            answer = celery.sequential(command["fp"], command["n"])
        elif op == "get_burst":
            answer = _burst_gets(api_url, key, command["path"], command["n"], command["at"])
        elif op == "list_burst":
            answer = celery.burst(command["fp"], command["n"], command["at"])
        else:
            raise ValueError(f"unknown command {op!r}")
        answer = {"errors": [], **answer, "cpu": sum(me.cpu_times()[:2]) - cpu}
        sys.stdout.write(json.dumps(answer) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
