"""Round-trip latency of the node API against its baselines: `python bench/bench_roundtrip.py`.

Starts its own redis-server (with a password, as `modelfleet up` does), one worker and one API process the way
an operator starts them (`modelfleet worker`, `modelfleet api`), then measures from this process:

  redis PING       one Redis round trip: the floor of anything that goes through Redis
  celery list      `modelfleet.list` sent straight to the node's queue with Celery, reply awaited on the
                   reply channel: the job path without the API (no HTTP, no FastAPI, no event loop)
  GET /nodes       the registry read, which never reaches a worker
  GET .../models   the same list job as `celery list`, through the API
  load+unload      a tiny GGUF loaded and unloaded through the API (two jobs, real ctransformers)

and then a burst of concurrent list requests. Every process it starts is stopped on exit.
"""

import argparse
import asyncio
import json
import os
import platform
import secrets
import signal
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis

from bench.harness import Processes, fleet_env, modelfleet_command, ms, quantile, start_api, start_redis, wait_until
from broker import keys
from broker.celery_app import make_celery
from broker.operations import LIST
from broker.schemas import ListJob
from broker.settings import BrokerSettings
from workers.gguf_factory import write_tiny_llama
from workers.identity import fingerprint, load_or_create_node_key

OPERATOR_KEY = "bench-op-" + secrets.token_hex(16)
MODEL = "bench-tiny"


def timed(fn: Callable[[], object], iterations: int, warmup: int) -> list[float]:
    for _ in range(warmup):
        fn()
    samples = []
    for _ in range(iterations):
        started = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - started)
    return samples


class CeleryBaseline:
    """The list job exactly as the API sends it, with the reply read off the reply channel in this thread."""

    def __init__(self, url: str, fp: str) -> None:
        self.app = make_celery(BrokerSettings(redis_url=url))
        self.fp = fp
        self.client = redis.Redis.from_url(url)
        self.pubsub = self.client.pubsub(ignore_subscribe_messages=True)
        self.pubsub.subscribe(keys.replies_channel())

    def _send(self, deadline: float) -> str:
        job_id = uuid.uuid4().hex
        self.app.send_task(
            LIST.task,
            kwargs={"job": ListJob(deadline=deadline).wire()},
            queue=keys.node_queue(self.fp),
            task_id=job_id,
            expires=datetime.fromtimestamp(deadline, UTC),
            ignore_result=True,
        )
        return job_id

    def _replies(self, deadline: float) -> Iterator[str]:
        while time.time() < deadline:
            message = self.pubsub.get_message(timeout=1.0)
            if message and message["type"] == "message":
                yield json.loads(message["data"])["jobId"]
        raise RuntimeError("the node stopped replying")

    def round_trip(self) -> None:
        deadline = time.time() + 30
        job_id = self._send(deadline)
        for reply in self._replies(deadline):
            if reply == job_id:
                return

    def burst(self, count: int) -> tuple[list[float], float, list[str]]:
        """`count` jobs sent back to back from this thread; each one's time from its send to its reply."""
        deadline = time.time() + 60
        started = time.perf_counter()
        sent_at = {}
        for _ in range(count):
            sent_at[self._send(deadline)] = time.perf_counter()
        latencies = []
        for reply in self._replies(deadline):
            if reply in sent_at:
                latencies.append(time.perf_counter() - sent_at.pop(reply))
            if not sent_at:
                break
        return latencies, time.perf_counter() - started, []

    def close(self) -> None:
        self.pubsub.close()
        self.app.close()


async def burst(base_url: str, path: str, concurrency: int) -> tuple[list[float], float, list[str]]:
    """`concurrency` GETs at once on a fresh client: the latencies of the ones that succeeded, the wall time,
    and what went wrong with the others."""
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    headers = {"Authorization": f"Bearer {OPERATOR_KEY}"}
    async with httpx.AsyncClient(base_url=base_url, headers=headers, limits=limits, timeout=60) as client:

        async def one() -> float | str:
            started = time.perf_counter()
            try:
                response = await client.get(path)
            except httpx.HTTPError as exc:
                return f"{type(exc).__name__}: {exc}"
            if response.status_code != 200:
                return f"HTTP {response.status_code}: {response.text[:200]}"
            return time.perf_counter() - started

        started = time.perf_counter()
        outcomes = await asyncio.gather(*(one() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    return [o for o in outcomes if isinstance(o, float)], wall, [o for o in outcomes if isinstance(o, str)]


def report(rows: list[tuple[str, list[float]]]) -> None:
    medians = {name: statistics.median(samples) for name, samples in rows}
    ping, celery = medians["redis PING"], medians["celery list"]
    print(f"\n{'operation':<22}{'n':>5}{'median ms':>11}{'p90 ms':>10}{'x PING':>9}{'x celery':>10}")
    for name, samples in rows:
        med, p90 = medians[name], quantile(samples, 90)
        print(f"{name:<22}{len(samples):>5}{ms(med):>11}{ms(p90):>10}{med / ping:>9.1f}{med / celery:>10.2f}")


def run(args: argparse.Namespace, stack: ExitStack) -> None:
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-")))
    procs = Processes(root)
    stack.callback(procs.stop_all)
    started = time.perf_counter()

    url = start_redis(procs)
    models = root / "models"
    models.mkdir()
    write_tiny_llama(models / f"{MODEL}.gguf")
    state = root / "state"
    fp = fingerprint(load_or_create_node_key(state))
    env = fleet_env(url, MODELFLEET_OPERATOR_KEYS=OPERATOR_KEY)
    procs.start(
        "worker",
        [*modelfleet_command(), "worker", "--name", "bench", "--models-dir", str(models), "--state-dir", str(state)],
        env,
    )
    store = redis.Redis.from_url(url)
    wait_until(lambda: store.exists(keys.node_alive(fp)) and " ready." in procs.log("worker"), procs, "the worker")
    base, _ = start_api(procs, env)
    print(f"processes up in {time.perf_counter() - started:.1f}s", flush=True)

    n, warm = args.iterations, args.warmup
    api = stack.enter_context(
        httpx.Client(base_url=base, headers={"Authorization": f"Bearer {OPERATOR_KEY}"}, timeout=60)
    )
    celery = CeleryBaseline(url, fp)
    stack.callback(celery.close)
    node_models = f"/api/v1/nodes/{fp}/models"

    def ok(response: httpx.Response) -> None:
        if response.status_code != 200:
            raise RuntimeError(f"{response.request.method} {response.request.url.path}: {response.text}")

    def load_unload() -> None:
        ok(api.post(f"{node_models}/load", json={"modelId": MODEL}))
        ok(api.post(f"{node_models}/unload", json={"modelId": MODEL}))

    rows = [
        ("redis PING", timed(store.ping, n, warm)),
        ("celery list", timed(celery.round_trip, n, warm)),
        ("GET /nodes", timed(lambda: ok(api.get("/api/v1/nodes")), n, warm)),
        ("GET .../models", timed(lambda: ok(api.get(node_models)), n, warm)),
        ("load+unload", timed(load_unload, args.load_iterations, 3)),
    ]
    report(rows)

    print(f"\n{args.concurrent} at once (API: fresh connections per burst; celery: sent back to back, one thread)")
    print(
        f"{'burst':<22}{'ok':>5}{'failed':>8}{'wall ms':>10}{'median ms':>11}{'p99 ms':>10}{'req/s':>8}"
        "   CPU ms: bench/api/worker/redis"
    )
    bursts = [("celery list", lambda: celery.burst(args.concurrent))] * args.bursts
    bursts += [("GET .../models", lambda: asyncio.run(burst(base, node_models, args.concurrent)))] * args.bursts
    for name, run_burst in bursts:
        cpu_before = procs.cpu_seconds()
        latencies, wall, errors = run_burst()
        cpu = {k: (v - cpu_before[k]) * 1000 for k, v in procs.cpu_seconds().items()}
        cpu_text = "/".join(f"{cpu[k]:.0f}" for k in ("bench", "api", "worker", "redis"))
        med = ms(statistics.median(latencies)) if latencies else "-"
        p99 = ms(quantile(latencies, 99)) if len(latencies) > 1 else "-"
        rate = len(latencies) / wall
        counts = f"{len(latencies):>5}{len(errors):>8}"
        print(f"{name:<22}{counts}{wall * 1000:>10.0f}{med:>11}{p99:>10}{rate:>8.0f}   {cpu_text}")
        for error in sorted(set(errors))[:3]:
            print(f"    {errors.count(error)} x {error}")
    procs.check_alive()
    print(
        f"\n{os.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"redis {store.info('server')['redis_version']}; total {time.perf_counter() - started:.1f}s"
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=300, help="timed round trips per operation")
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--load-iterations", type=int, default=40, help="timed load+unload pairs")
    parser.add_argument("--concurrent", type=int, default=200)
    parser.add_argument("--bursts", type=int, default=3)
    args = parser.parse_args()
    # SIGTERM (a CI timeout, say) unwinds like Ctrl-C, so the ExitStack below still stops the children.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with ExitStack() as stack:
            run(args, stack)
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
