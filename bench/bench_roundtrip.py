"""A node's model list through the API against the bare Celery round trip: `python -m bench.bench_roundtrip`.

Starts its own redis-server (with a password, as `modelfleet up` does), one `modelfleet worker` and one
`modelfleet api`, and client processes of its own (`bench.clients`), then measures:

  list, one at a time  `GET /api/v1/nodes/{fp}/models` from one client process on one keep-alive connection,
                       against the same list job sent straight to the node's queue with a plain Celery client
                       (`send_task` with Celery's defaults, as any Celery client sends it) and its reply read
                       off the reply channel, from another client process. The goal's client is httpx; the
                       same GETs from Python's `http.client` are measured in the same rounds and shown beside
                       it, to tell the API's share from httpx's own CPU (0.5-0.9 ms a request here). Rounds
                       rotate which side goes first; each figure is the ratio of the p50s (p99s in the detail).
  500 at once          500 `GET .../models` at one instant from 4 client processes (125 connections each)
                       against 500 bare Celery list jobs sent at that instant from 4 client processes (125 each,
                       back to back); a sample is one answer's time since the instant. The figure is the ratio
                       of the p99s.

Both sides reach the same worker, whose replies both read the same way (the reply channel). The API sends its
jobs with `api.sender.TaskSender` (Celery's message, one pipelined round trip on its asyncio client), the
baseline as a plain Celery client does (two writes, a Redis client object built for each): that difference is
the API's, and is part of what this measures. Every process it starts is stopped on exit.
"""

import secrets
import signal
import sys
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

import redis

from bench.clients import Client, merge
from bench.figures import Figure, alternate, ratio_at_most, rotate, run_alone, shown
from bench.harness import Processes, fleet_env, modelfleet_command, start_api, start_redis, wait_until
from broker import keys
from workers.gguf_factory import write_tiny_llama
from workers.identity import fingerprint, load_or_create_node_key

KEY = "bench-op-" + secrets.token_hex(16)
BURST_CLIENTS = 4


class Fleet:
    """Redis, one worker, one API and the client processes, all stopped when the stack unwinds."""

    def __init__(self, stack: ExitStack, burst_clients: int) -> None:
        root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-")))
        self.procs = Processes(root)
        stack.callback(self.procs.stop_all)
        self.redis_url = start_redis(self.procs)
        models = root / "models"
        models.mkdir()
        write_tiny_llama(models / "bench-tiny.gguf")
        state = root / "state"
        self.fp = fingerprint(load_or_create_node_key(state))
        env = fleet_env(self.redis_url, MODELFLEET_OPERATOR_KEYS=KEY)
        argv = [*modelfleet_command(), "worker", "--name", "bench", "--models-dir", str(models)]
        self.procs.start("worker", [*argv, "--state-dir", str(state), "--no-serve"], env)
        store = redis.Redis.from_url(self.redis_url)
        wait_until(
            lambda: store.exists(keys.node_alive(self.fp)) and " ready." in self.procs.log("worker"),
            self.procs,
            "the worker",
        )
        self.api_url, _ = start_api(self.procs, env)
        self.clients = [Client(self.api_url, KEY, self.redis_url) for _ in range(max(2, burst_clients))]
        for client in self.clients:
            stack.callback(client.close)
        self.path = f"/api/v1/nodes/{self.fp}/models"

    def cpu(self) -> dict[str, float]:
        return self.procs.cpu_seconds()


def _checked(answer: dict) -> dict:  # type: ignore[type-arg]
    if answer["errors"]:
        raise RuntimeError(f"{len(answer['errors'])} requests failed, e.g. {answer['errors'][0]}")
    return answer


def sequential(fleet: Fleet, rounds: int, per_round: int) -> list[Figure]:
    api_client, celery_client = fleet.clients[0], fleet.clients[1]
    api_client.run(op="get", path=fleet.path, n=20)  # warm-up, every side
    api_client.run(op="get_lean", path=fleet.path, n=20)
    celery_client.run(op="list", fp=fleet.fp, n=20)
    cpu = {side: 0.0 for side in ("httpx", "http.client", "celery")}
    api_cpu = {side: 0.0 for side in ("httpx", "http.client")}
    lost = duplicates = 0

    def through_api(op: str, side: str) -> list[float]:
        before = fleet.cpu()["api"]
        answer = _checked(api_client.run(op=op, path=fleet.path, n=per_round))
        api_cpu[side] += fleet.cpu()["api"] - before
        cpu[side] += answer["cpu"]
        return list(answer["samples"])

    def baseline() -> list[float]:
        nonlocal lost, duplicates
        answer = celery_client.run(op="list", fp=fleet.fp, n=per_round)
        cpu["celery"] += answer["cpu"]
        lost += answer["lost"]
        duplicates += answer["duplicates"]
        return list(answer["samples"])

    sides = {
        "httpx": lambda: through_api("get", "httpx"),
        "http.client": lambda: through_api("get_lean", "http.client"),
        "celery": baseline,
    }
    samples = rotate(rounds, sides)
    theirs = samples["celery"]
    celery = f"Celery client {cpu['celery'] * 1000 / len(theirs):.2f} ms"
    found = []
    for side, name in (
        ("httpx", "GET /api/v1/nodes/{fp}/models / bare Celery list, p50"),
        ("http.client", "the same GET from Python's http.client (one keep-alive connection) / bare Celery list, p50"),
    ):
        mine = samples[side]
        figure = ratio_at_most(name, mine, theirs, 1.3)
        per = f"CPU per request: API {api_cpu[side] * 1000 / len(mine):.2f} ms, its client"
        per += f" {cpu[side] * 1000 / len(mine):.2f} ms; {celery}"
        detail = f"{figure.detail}; {per}; Celery replies lost {lost}, duplicated {duplicates}"
        if side == "httpx":
            found.append(Figure(figure.name, figure.goal, figure.value, figure.unit, figure.holds and not lost, detail))
        else:
            found.append(shown(figure.name, figure.value, figure.unit, detail))
    return found


def burst(fleet: Fleet, rounds: int, size: int) -> Figure:
    clients = fleet.clients[:BURST_CLIENTS]
    each = size // len(clients)
    cpu = {"api": 0.0, "api clients": 0.0, "celery clients": 0.0}
    lost = duplicates = 0

    def fire(op: str, **command: object) -> dict:  # type: ignore[type-arg]
        at = time.time() + 1.0  # every client is waiting by then
        for client in clients:
            client.send(op=op, n=each, at=at, **command)
        return merge([client.answer() for client in clients])

    def ours() -> list[float]:
        before = fleet.cpu()["api"]
        answer = _checked(fire("get_burst", path=fleet.path))
        cpu["api"] += fleet.cpu()["api"] - before
        cpu["api clients"] += answer["cpu"]
        return list(answer["samples"])

    def baseline() -> list[float]:
        nonlocal lost, duplicates
        answer = fire("list_burst", fp=fleet.fp)
        cpu["celery clients"] += answer["cpu"]
        lost += answer["lost"]
        duplicates += answer["duplicates"]
        return list(answer["samples"])

    mine, theirs = alternate(rounds, ours, baseline)
    name = f"{size} concurrent lists, one API process / bare Celery burst of {size}, p99"
    figure = ratio_at_most(name, mine, theirs, 3.0, q=99)
    bursts = rounds
    per = (
        f"CPU per burst: API {cpu['api'] / bursts:.2f} s, API clients {cpu['api clients'] / bursts:.2f} s, "
        f"Celery clients {cpu['celery clients'] / bursts:.2f} s"
    )
    complete = len(mine) == len(theirs) == rounds * each * len(clients)
    detail = f"{figure.detail}; {per}; {len(clients)} client processes; lost {lost}, duplicated {duplicates}"
    return Figure(figure.name, figure.goal, figure.value, figure.unit, figure.holds and complete and not lost, detail)


def figures(quick: bool) -> list[Figure]:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with ExitStack() as stack:
        fleet = Fleet(stack, BURST_CLIENTS)
        found = sequential(fleet, rounds=3 if quick else 9, per_round=50 if quick else 150)
        found.append(burst(fleet, rounds=2 if quick else 4, size=500))
        fleet.procs.check_alive()
    return found


if __name__ == "__main__":
    sys.exit(run_alone(figures, __doc__.splitlines()[0] if __doc__ else None))
