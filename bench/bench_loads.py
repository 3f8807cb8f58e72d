"""Loading models: a 400 MB GGUF through the API against ctransformers' `from_pretrained`, and the worker's RSS
over many load/unload cycles. `python -m bench.bench_loads [--quick] [--cycles N]`: about 4.5 minutes on two
loaded cores, 3.5 of them the 1,000 cycles the goal names (`--quick`: 100 cycles and fewer rounds, ~1 minute).

It writes a 400 MB random-weight llama (`workers.gguf_factory.write_tiny_llama(pad_to_bytes=...)`), reads it
once so that the page cache is warm for both sides, and starts its own redis-server, one `modelfleet worker`
(no inference endpoint) and one `modelfleet api`, the way an operator starts them. This process is the HTTP
client; the baseline runs in a child process of its own.

  load      one sample of ours: `POST /api/v1/nodes/{fp}/models/load` of the file, from the request to the
            answer (HTTP, auth, the job through Redis, the worker's load, the reply), then an untimed unload.
            The answer comes once the file is mapped, as the baseline's `from_pretrained` returns once it is:
            neither has run the model yet. The node's one-token check follows its answer (a forward pass over
            every weight, some 80 ms here) and the unload waits for it, so the RSS cycles include it.
            One sample of the baseline: `ctransformers.AutoModelForCausalLM.from_pretrained(path,
            model_type="llama")` without `lib=`, timed inside a child process that has imported ctransformers
            and loaded the file twice before (so only the call is timed, none of its process start), then the
            model dropped. Rounds alternate which side goes first; the figure is the baseline's p50 over ours.
  RSS       the worker's resident memory (psutil), after warm-up cycles and again after `--cycles` load/unload
            cycles of the same file through the API, each answered 200 and in order; the figure is the growth.

CPU used by each process (this client, the baseline child, the API, the worker, Redis) is reported apart.
"""

import argparse
import gc
import platform
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import httpx
import psutil

from bench.figures import Figure, alternate, at_least, at_most, percentile, table, versus_ms
from bench.harness import Processes, fleet_env, modelfleet_command, start_api, start_redis, wait_until
from workers.identity import fingerprint, load_or_create_node_key

FILE_BYTES = 400_000_000
MODEL = "big"
KEY = "bench-op-" + secrets.token_hex(16)


def baseline_child(path: Path) -> None:
    """The baseline's process: for each line on stdin, one timed `from_pretrained` of `path`, its seconds out."""
    from ctransformers import AutoModelForCausalLM

    for _ in sys.stdin:
        started = time.perf_counter()
        model = AutoModelForCausalLM.from_pretrained(str(path), model_type="llama")
        elapsed = time.perf_counter() - started
        del model
        gc.collect()
        print(elapsed, flush=True)


class Baseline:
    """The child process running `baseline_child`, asked for one sample at a time."""

    def __init__(self, procs: Processes, path: Path) -> None:
        argv = [sys.executable, "-m", "bench.bench_loads", "--baseline-child", str(path)]
        self.proc = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        procs.started.append(("baseline", self.proc))  # stopped, and its CPU counted, with the others

    def load(self) -> float:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("load\n")
        self.proc.stdin.flush()
        answer = self.proc.stdout.readline()
        if not answer:
            raise RuntimeError(f"the baseline child exited with {self.proc.wait()}")
        return float(answer)


class Node:
    """The fleet's one node, driven over HTTP: load (timed) and unload, each answer checked."""

    def __init__(self, base: str, fp: str) -> None:
        self.http = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=120)
        self.fp = fp
        self.answered = 0
        self.worker_seconds: list[float] = []  # each load's own time in the worker (the file mapped)

    def call(self, operation: str) -> float:
        started = time.perf_counter()
        response = self.http.post(f"/api/v1/nodes/{self.fp}/models/{operation}", json={"modelId": MODEL})
        elapsed = time.perf_counter() - started
        answer = response.json()
        fresh = operation != "load" or answer.get("alreadyLoaded") is False  # a load that really loaded
        if response.status_code != 200 or answer.get("modelId") != MODEL or not fresh:
            raise RuntimeError(f"{operation} answered {response.status_code}: {response.text[:300]}")
        if operation == "load":
            self.worker_seconds.append(answer["loadSeconds"])
        self.answered += 1
        return elapsed

    def cycle(self) -> float:
        """One load (its seconds) and one unload."""
        elapsed = self.call("load")
        self.call("unload")
        return elapsed


def start_fleet(procs: Processes, models: Path) -> tuple[Node, int]:
    """Redis, one worker serving `models`, one API: the node and the worker's pid."""
    env = fleet_env(start_redis(procs), MODELFLEET_OPERATOR_KEYS=KEY)
    state = procs.root / "state"
    fp = fingerprint(load_or_create_node_key(state))
    argv = [*modelfleet_command(), "worker", "--name", "bench-loads", "--models-dir", str(models)]
    # One thread per model, as README advises for a shared machine: two threads on an oversubscribed CPU made the
    # one-token check after each load take 1-2 s instead of tens of ms (spinning threads), and each unload waits
    # for it.
    argv += ["--state-dir", str(state), "--no-serve", "--threads", "1"]
    worker = procs.start("worker", argv, env)
    base, _ = start_api(procs, env)
    node = Node(base, fp)

    def online() -> bool:
        return any(n["fingerprint"] == fp and n["consuming"] for n in node.http.get("/api/v1/nodes").json()["data"])

    wait_until(online, procs, "the worker")
    return node, worker.pid


def cpu_since(procs: Processes, before: dict[str, float]) -> str:
    used = procs.cpu_seconds()
    return ", ".join(f"{name} {used[name] - before.get(name, 0.0):.1f}" for name in used) + " CPU s"


def rss_mb(pid: int) -> float:
    return psutil.Process(pid).memory_info().rss / 1e6


def measure(procs: Processes, quick: bool, cycles: int) -> list[Figure]:
    from workers.gguf_factory import write_tiny_llama

    models = procs.root / "models"
    models.mkdir()
    path = write_tiny_llama(models / f"{MODEL}.gguf", pad_to_bytes=FILE_BYTES)
    with open(path, "rb") as warm:  # the page cache holds the file for both sides from the start
        while warm.read(1 << 24):
            pass
    node, worker_pid = start_fleet(procs, models)
    baseline = Baseline(procs, path)
    for _ in range(2):  # both sides warm: the library loaded, the file mapped once, the connections open
        node.cycle()
        baseline.load()

    rounds, ours_each, baseline_each = (2, 3, 1) if quick else (6, 8, 2)
    before, node.worker_seconds = procs.cpu_seconds(), []
    ours, theirs = alternate(
        rounds,
        lambda: [node.cycle() for _ in range(ours_each)],
        lambda: [baseline.load() for _ in range(baseline_each)],
    )
    speedup = percentile(theirs, 50) / percentile(ours, 50)
    load = at_least(
        "load of a 400 MB GGUF through the API vs ctransformers from_pretrained (no lib=), p50",
        speedup,
        50,
        "x",
        f"{versus_ms(ours, theirs)}; of ours, p50 {percentile(node.worker_seconds, 50) * 1000:.2f} ms in the worker"
        f" (mapping the file: the one-token check runs after the answer, and the untimed unload waits for it);"
        f" {rounds} alternated rounds; {cpu_since(procs, before)}",
    )

    warm_up = 20 if quick else 50
    for _ in range(warm_up):
        node.cycle()
    gc_settled = rss_mb(worker_pid)
    before, started, answered = procs.cpu_seconds(), time.monotonic(), node.answered
    for _ in range(cycles):
        node.cycle()
    took = time.monotonic() - started
    growth = rss_mb(worker_pid) - gc_settled
    assert node.answered - answered == 2 * cycles  # every load and unload answered 200, one after the other
    rss = at_most(
        f"worker RSS growth over {cycles:,} load/unload cycles of the 400 MB GGUF",
        growth,
        5,
        " MB",
        f"{gc_settled:.1f} MB after {warm_up} warm-up cycles, {gc_settled + growth:.1f} MB after {cycles:,} more"
        f" ({took:.0f} s); {cpu_since(procs, before)}",
    )
    return [load, rss]


def figures(quick: bool, cycles: int | None = None) -> list[Figure]:
    """The two figures; `cycles` defaults to 1,000 (100 when `quick`)."""
    with tempfile.TemporaryDirectory(prefix="bench-loads-") as tmp:
        procs = Processes(Path(tmp))
        try:
            return measure(procs, quick, cycles or (100 if quick else 1000))
        finally:
            procs.stop_all()


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_loads", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and 100 cycles: a smoke run")
    parser.add_argument("--cycles", type=int, default=None, help="load/unload cycles for the RSS figure (1,000)")
    parser.add_argument("--baseline-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.baseline_child:
        baseline_child(args.baseline_child)
        return 0

    def stop(signum: int, _: Any) -> None:
        raise SystemExit(128 + signum)  # the `finally` in figures() stops every process

    signal.signal(signal.SIGTERM, stop)
    load = " ".join(f"{x:.1f}" for x in psutil.getloadavg())
    print(f"# {platform.python_version()}, {psutil.cpu_count()} CPUs, load average {load}", flush=True)
    mine = figures(args.quick, args.cycles)
    print(table(mine))
    return 0 if all(f.holds for f in mine) else 1


if __name__ == "__main__":
    sys.exit(main())
