"""Fleet status over 16 nodes against one node's list: `python -m bench.bench_status`.

Starts its own redis-server, 16 real nodes (`modelfleet worker --concurrency 2 --no-serve`: the fewest threads a
node takes, each with a models directory of two tiny GGUF files, one of them loaded) and one `modelfleet api`,
then alternates, round by round, from one client process (`bench.clients`) on one keep-alive connection:

  status   `GET /v1/models/status`: every node's files, models and memory (checked: 16 nodes, all online,
           16 models loaded)
  list     `GET /api/v1/nodes/{fp}/models` of one node: a job to that node and its reply

The figure is the ratio of their p50s (p99s in the detail). 16 workers fit a 2-core machine: idle, each takes
about 100 MB and a heartbeat's CPU every 2 seconds; the start-up (16 interpreters importing Celery) is most of
this benchmark's time. Every process it starts is stopped on exit.
"""

import secrets
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import psutil
import redis

from bench.clients import Client
from bench.figures import Figure, alternate, ratio_at_most, run_alone
from bench.harness import Processes, fleet_env, modelfleet_command, start_api, start_redis, wait_until
from broker import keys
from workers.gguf_factory import write_tiny_llama
from workers.identity import fingerprint, load_or_create_node_key

KEY = "bench-op-" + secrets.token_hex(16)
NODES = 16


def start_nodes(procs: Processes, root: Path, env: dict[str, str], count: int) -> list[str]:
    source = root / "source.gguf"
    write_tiny_llama(source)
    fingerprints = []
    for i in range(count):
        models = root / f"models-{i}"
        models.mkdir()
        for name in (f"node{i}-a", "shared"):
            (models / f"{name}.gguf").write_bytes(source.read_bytes())
        state = root / f"state-{i}"
        fingerprints.append(fingerprint(load_or_create_node_key(state)))
        argv = [*modelfleet_command(), "worker", "--name", f"n{i}", "--models-dir", str(models)]
        procs.start(f"worker-{i}", [*argv, "--state-dir", str(state), "--concurrency", "2", "--no-serve"], env)
    store = redis.Redis.from_url(env["MODELFLEET_REDIS_URL"])

    def ready() -> bool:
        return all(
            store.exists(keys.node_alive(fp)) and store.hexists(keys.node_info(fp), "files") for fp in fingerprints
        )

    wait_until(ready, procs, f"{count} nodes", timeout=240)
    return fingerprints


def figures(quick: bool) -> list[Figure]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-")))
        procs = Processes(root)
        stack.callback(procs.stop_all)
        redis_url = start_redis(procs)
        env = fleet_env(redis_url, MODELFLEET_OPERATOR_KEYS=KEY)
        started = time.monotonic()
        nodes = start_nodes(procs, root, env, NODES)
        startup = time.monotonic() - started
        api_url, _ = start_api(procs, env)
        client = Client(api_url, KEY, redis_url)
        stack.callback(client.close)
        with httpx.Client(base_url=api_url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as http:
            for fp in nodes:
                http.post(f"/api/v1/nodes/{fp}/models/load", json={"modelId": "shared"}).raise_for_status()
        rss = sum(psutil.Process(p.pid).memory_info().rss for name, p in procs.started if name.startswith("worker"))

        status_path, list_path = "/v1/models/status", f"/api/v1/nodes/{nodes[0]}/models"
        client.run(op="get", path=status_path, n=10)
        client.run(op="get", path=list_path, n=10)
        per_round = 30 if quick else 100
        checked: list[str] = []

        def status() -> list[float]:
            answer = client.run(op="get", path=status_path, n=per_round)
            last = answer["last"] or {}
            states = last.get("nodes", {})
            if answer["errors"] or len(states) != NODES or not all(s["online"] for s in states.values()):
                raise RuntimeError(f"status is wrong: {answer['errors'][:1]} {len(states)} nodes")
            loaded = sum(1 for s in states.values() for m in s.get("models", []) if m["state"] == "loaded")
            checked.append(f"{len(states)} nodes online, {loaded} models loaded")
            return list(answer["samples"])

        def one_list() -> list[float]:
            answer = client.run(op="get", path=list_path, n=per_round)
            if answer["errors"]:
                raise RuntimeError(f"list failed: {answer['errors'][0]}")
            return list(answer["samples"])

        cpu_before = procs.cpu_seconds()
        mine, theirs = alternate(3 if quick else 8, status, one_list)
        api_cpu = procs.cpu_seconds()["api"] - cpu_before["api"]
        procs.check_alive()
    figure = ratio_at_most(f"GET /v1/models/status over {NODES} nodes / one node's list, p50", mine, theirs, 2.0)
    detail = (
        f"{figure.detail}; {checked[-1]}; API CPU {api_cpu / (len(mine) + len(theirs)) * 1000:.2f} ms per request"
        f" (both kinds); {NODES} workers: {rss / 2**20:.0f} MB RSS together, started in {startup:.0f} s"
    )
    return [Figure(figure.name, figure.goal, figure.value, figure.unit, figure.holds, detail)]


if __name__ == "__main__":
    sys.exit(run_alone(figures, __doc__.splitlines()[0] if __doc__ else None))
