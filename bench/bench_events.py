"""Pool events to 1,000 SSE streams of one API process, against the same receivers reading Redis directly:
`python -m bench.bench_events`.

Starts its own redis-server and one `modelfleet api`. A round starts `--receivers` receiver processes (this module
with `--receiver`) holding `--streams` streams between them, each stream on its own connection; once every stream
has its start (the SSE snapshot, or the Redis SUBSCRIBE reply), this process publishes `--events` pool events at
`--rate` per second through `broker.events.EventBus` (the path a worker takes), event i carrying sequence number
i in its model id. A sample is one event's arrival on one stream: from just before its publish call (here) to the
read that completed it (in the receiver; both clocks are CLOCK_MONOTONIC). Each stream must get every sequence
number once, in order: what never came is lost, a second copy a duplicate, a number below one already seen out of
order.

  api     the streams are `GET /api/v1/events`, one per connection
  redis   the baseline: the same number of Redis connections SUBSCRIBEd to the events channel, the same
          receivers, the same parsing; everything the API adds is the difference

Rounds alternate api and redis (`--rounds` pairs, each pair in turn starting with the other), so drift in the
machine's load falls on both. The receivers speak HTTP/1.1 and RESP on raw asyncio sockets and pick the sequence
numbers out with one regex: an HTTP client per stream would cost more CPU than the API, and make the receivers,
not the API, what a 2-core machine measures. The CPU each process used during the rounds (API, Redis, every
receiver, this publisher) is reported apart. Every process it starts is stopped on exit.
"""

import argparse
import asyncio
import json
import os
import re
import resource
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import httpx
import psutil
import redis

from bench.figures import Figure, alternate, at_most, percentile
from bench.harness import Processes, fleet_env, start_api, start_redis, wait_until
from broker import keys
from broker.events import EventBus, model_event
from broker.schemas import ModelInfo, ModelState

# The receiver processes inherit the key from the coordinator's environment.
READ_KEY = os.environ.setdefault("BENCH_EVENTS_KEY", "bench-read-" + secrets.token_hex(16))
NODE = "b" * 32
MODEL = ModelInfo(id="bench", path="/models/bench.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1 << 20)
OPEN_BATCH = 50
"""Connections a receiver opens at once: no thundering herd on the API's accept queue."""


# The receiver side, in processes of their own (`--receiver KIND`).


def seq_pattern(round_: int) -> "re.Pattern[bytes]":
    """The sequence number in an event's model id (`r<round>-<seq>`), as it appears in the SSE data line and in
    the pub/sub message alike; the closing quote makes a match cut by a read boundary wait for the next read."""
    return re.compile(rb'"modelId":"r%d-(\d+)"' % round_)


@dataclass
class Stream:
    """What one stream received: sequence numbers in arrival order and when each arrived (ns)."""

    seqs: list[int] = field(default_factory=list)
    at: list[int] = field(default_factory=list)
    started: asyncio.Event = field(default_factory=asyncio.Event)
    error: str | None = None


def _resp(*parts: str) -> bytes:
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


async def _open(kind: str, target: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter, bytes]:
    """Connect and ask for the events; returns the connection and what was read past the start."""
    url = urlsplit(target)
    reader, writer = await asyncio.open_connection(url.hostname, url.port)
    if kind == "api":
        writer.write(f"GET /api/v1/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {READ_KEY}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200"):
            raise RuntimeError(head.split(b"\r\n", 1)[0].decode())
        await reader.readuntil(b"\n\n")  # the snapshot: the stream is registered with the relay
        return reader, writer, b""
    writer.write(_resp("AUTH", url.password or "") + _resp("SUBSCRIBE", keys.events_channel()))
    rest = await reader.readuntil(b":1\r\n")  # +OK, then the subscribe reply ending in the subscription count
    if not rest.startswith(b"+OK"):
        raise RuntimeError(rest[:80].decode(errors="replace"))
    return reader, writer, b""


async def _follow(stream: Stream, kind: str, target: str, pattern: "re.Pattern[bytes]", last: int) -> None:
    try:
        reader, writer, buffer = await _open(kind, target)
    except (OSError, RuntimeError, asyncio.IncompleteReadError) as exc:
        stream.error = f"open: {exc!r}"
        stream.started.set()
        return
    stream.started.set()
    try:
        while True:
            data = await reader.read(1 << 16)
            if not data:
                stream.error = "closed by the server"
                return
            at = time.perf_counter_ns()
            buffer += data
            end = 0
            for match in pattern.finditer(buffer):
                seq = int(match[1])
                stream.seqs.append(seq)
                stream.at.append(at)
                end = match.end()
                if seq == last:
                    return
            # Keep a tail that may hold a match cut short by this read, and never what was already counted.
            buffer = buffer[max(end, len(buffer) - 64) :]
    except (OSError, asyncio.IncompleteReadError) as exc:
        stream.error = repr(exc)
    finally:
        writer.close()


def receiver(kind: str, target: str, streams: int, round_: int, count: int, out: Path) -> None:
    """Hold `streams` streams, print `ready` once each has started, follow them until each has the last
    sequence number (or SIGUSR1/SIGTERM says the drain is over), then write what arrived to `out`."""

    async def run() -> dict[str, object]:
        pattern = seq_pattern(round_)
        held = [Stream() for _ in range(streams)]
        tasks = []
        for start in range(0, streams, OPEN_BATCH):
            batch = held[start : start + OPEN_BATCH]
            tasks += [asyncio.create_task(_follow(s, kind, target, pattern, count - 1)) for s in batch]
            await asyncio.gather(*(s.started.wait() for s in batch))
        failed = [s.error for s in held if s.error]
        if failed:
            print(f"{len(failed)} of {streams} streams failed to open: {failed[0]}", flush=True)
            raise SystemExit(1)
        cpu_before = time.process_time()
        print("ready", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGUSR1, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        following = asyncio.ensure_future(asyncio.gather(*tasks))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait({following, stopping}, return_when=asyncio.FIRST_COMPLETED)
        cpu = time.process_time() - cpu_before
        for task in (*tasks, stopping):
            task.cancel()
        await asyncio.gather(following, stopping, return_exceptions=True)
        return {
            "cpu": cpu,
            "seqs": [s.seqs for s in held],
            "at": [s.at for s in held],
            "errors": [s.error for s in held if s.error],
        }

    out.write_text(json.dumps(asyncio.run(run())))


# The coordinator side.


@dataclass
class Round:
    """One round's deliveries, checked per stream, and the CPU each process used during it."""

    kind: str
    latencies: list[float]
    lost: int
    duplicates: int
    out_of_order: int
    cpu: dict[str, float]
    errors: list[str]
    seconds: float

    def line(self) -> str:
        cpu = ", ".join(f"{name} {seconds:.2f}" for name, seconds in self.cpu.items())
        return (
            f"  {self.kind:<5} {len(self.latencies):>7} deliveries in {self.seconds:4.1f} s: p50"
            f" {percentile(self.latencies, 50) * 1000:7.2f} ms, p99 {percentile(self.latencies, 99) * 1000:7.2f}"
            f" ms; lost {self.lost}, duplicates {self.duplicates}, out of order {self.out_of_order};"
            f" CPU s: {cpu}" + (f"; errors: {self.errors[:3]}" if self.errors else "")
        )


def check(seqs: list[int], at: list[int], sent: list[int]) -> tuple[list[float], int, int, int]:
    """One stream's latencies (s) and its lost, duplicate and out-of-order counts against `sent` (ns by seq)."""
    latencies, seen, highest, duplicates, disorder = [], set(), -1, 0, 0
    for seq, arrived in zip(seqs, at, strict=True):
        if seq in seen or seq >= len(sent):
            duplicates += 1
            continue
        seen.add(seq)
        if seq < highest:
            disorder += 1
        highest = max(highest, seq)
        latencies.append((arrived - sent[seq]) / 1e9)
    return latencies, len(sent) - len(seen), duplicates, disorder


class Bench:
    """Redis, the API and the publisher, and the rounds run against them."""

    def __init__(self, args: argparse.Namespace, stack: ExitStack) -> None:
        self.args = args
        self.root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-events-")))
        self.procs = Processes(self.root)
        stack.callback(self.procs.stop_all)
        self.redis_url = start_redis(self.procs)
        env = fleet_env(
            self.redis_url,
            MODELFLEET_API_KEYS=READ_KEY,
            MODELFLEET_OPERATOR_KEYS="bench-op-" + secrets.token_hex(16),
        )
        self.api_url, api = start_api(self.procs, env)
        self.api = psutil.Process(api.pid)
        self.redis = psutil.Process(self.procs.started[0][1].pid)
        self.bus = EventBus(redis.Redis.from_url(self.redis_url))
        self.rounds = 0
        self.log: list[Round] = []

    def sse_clients(self) -> int:
        body = httpx.get(f"{self.api_url}/metrics", headers={"Authorization": f"Bearer {READ_KEY}"}).text
        match = re.search(r"^modelfleet_sse_clients ([0-9.e+]+)$", body, re.M)
        return int(float(match[1])) if match else -1

    def publish(self, round_: int, count: int) -> list[int]:
        """`count` events at the rate, from this thread; when each one's publish call started (ns)."""
        sent, interval = [], 1e9 / self.args.rate
        events = [
            model_event("model-loaded", NODE, MODEL.model_copy(update={"id": f"r{round_}-{i}"})) for i in range(count)
        ]
        began = time.perf_counter_ns()
        for i, event in enumerate(events):
            time.sleep(max(0, began + i * interval - time.perf_counter_ns()) / 1e9)
            sent.append(time.perf_counter_ns())
            if self.bus.publish(event) is None:
                raise RuntimeError("the publish script published nothing")
        return sent

    def round(self, kind: str) -> list[float]:
        args, self.rounds = self.args, self.rounds + 1
        round_, count = self.rounds, args.events
        if kind == "api":  # the last round's streams are gone: this round pays nothing for them
            wait_until(lambda: self.sse_clients() == 0, self.procs, "the API to forget the last round's streams")
        target = self.api_url if kind == "api" else self.redis_url
        shares = [args.streams // args.receivers + (i < args.streams % args.receivers) for i in range(args.receivers)]
        children = []
        for i, share in enumerate(shares):
            out = self.root / f"round{round_}-{i}.json"
            argv = [sys.executable, "-m", "bench.bench_events", "--receiver", kind, "--target", target]
            argv += ["--share", str(share), "--round", str(round_), "--events", str(count), "--out", str(out)]
            proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, env=os.environ)
            children.append((proc, out))
        try:
            for proc, _ in children:
                assert proc.stdout is not None
                said = proc.stdout.readline().decode().strip()
                if said != "ready":
                    raise RuntimeError(f"a {kind} receiver ended before its streams opened: {said or proc.wait()}")
            time.sleep(args.settle)
            cpu_before = self.cpu()
            started = time.perf_counter()
            sent = self.publish(round_, count)
            deadline = time.monotonic() + args.drain
            for proc, _ in children:
                try:
                    proc.wait(max(0.0, deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    proc.send_signal(signal.SIGUSR1)  # the drain is over: report what arrived
            for proc, _ in children:
                if proc.wait(30):
                    raise RuntimeError(f"a {kind} receiver exited with {proc.returncode}")
            seconds = time.perf_counter() - started
            cpu = {name: after - cpu_before[name] for name, after in self.cpu().items()}
        finally:
            for proc, _ in children:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait()
        latencies: list[float] = []
        lost = duplicates = disorder = 0
        errors: list[str] = []
        for i, (_, out) in enumerate(children):
            got = json.loads(out.read_text())
            cpu[f"receiver{i + 1}"] = got["cpu"]
            errors += got["errors"]
            for seqs, at in zip(got["seqs"], got["at"], strict=True):
                stream_latencies, stream_lost, stream_dups, stream_disorder = check(seqs, at, sent)
                latencies += stream_latencies
                lost, duplicates, disorder = lost + stream_lost, duplicates + stream_dups, disorder + stream_disorder
        self.procs.check_alive()
        result = Round(kind, latencies, lost, duplicates, disorder, cpu, errors, seconds)
        self.log.append(result)
        print(result.line(), flush=True)
        return latencies

    def cpu(self) -> dict[str, float]:
        return {
            "api": sum(self.api.cpu_times()[:2]),
            "redis": sum(self.redis.cpu_times()[:2]),
            "publisher": time.process_time(),
        }


def summary(rounds: list[Round], kind: str) -> Iterator[tuple[str, float]]:
    mine = [r for r in rounds if r.kind == kind]
    for name in mine[0].cpu:
        yield name, sum(r.cpu[name] for r in mine) / sum(r.seconds for r in mine)


def run(args: argparse.Namespace) -> list[Figure]:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = args.streams + 512  # the API (which inherits it) holds one socket per stream
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    with ExitStack() as stack:
        bench = Bench(args, stack)
        print(
            f"{args.streams} streams over {args.receivers} receiver processes, {args.events} events at"
            f" {args.rate:g}/s per round, {args.rounds} pairs of rounds (api, redis)",
            flush=True,
        )
        ours, baseline = alternate(args.rounds, lambda: bench.round("api"), lambda: bench.round("redis"))
    api = [r for r in bench.log if r.kind == "api"]
    lost = sum(r.lost for r in api)
    wrong = sum(r.duplicates + r.out_of_order for r in api)
    base_wrong = sum(r.lost + r.duplicates + r.out_of_order for r in bench.log if r.kind == "redis")

    def cores(kind: str) -> str:
        return ", ".join(f"{name} {share:.2f}" for name, share in summary(bench.log, kind))

    def ms(samples: list[float], q: float) -> str:
        return f"{percentile(samples, q) * 1000:.1f}"

    streams = f"{args.streams:,} SSE streams"
    return [
        at_most(
            f"{streams}, p99 publish-to-receipt",
            percentile(ours, 99) * 1000,
            50,
            " ms",
            f"p50 {ms(ours, 50)} ms, p99 {ms(ours, 99)} ms vs Redis direct p50 {ms(baseline, 50)} ms, p99"
            f" {ms(baseline, 99)} ms ({len(ours):,} vs {len(baseline):,} deliveries); CPU cores busy, api rounds:"
            f" {cores('api')}; redis rounds: {cores('redis')}",
        ),
        at_most(
            f"{streams}, events lost",
            lost,
            0,
            "",
            f"{len(api)} rounds of {args.events} events; duplicated or out of order {wrong};"
            f" baseline lost, duplicated or out of order {base_wrong}",
        ),
    ]


def options(argv: list[str] | None = None, quick: bool = False) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.bench_events", description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=1000, help="SSE streams (and Redis subscribers) per round")
    parser.add_argument("--receivers", type=int, default=4, help="receiver processes holding them")
    parser.add_argument("--events", type=int, default=100 if quick else 200, help="events published per round")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--rounds", type=int, default=1 if quick else 3, help="pairs of rounds (api, redis)")
    parser.add_argument(
        "--settle", type=float, default=2.0, help="seconds between the last stream opening and the first event"
    )
    parser.add_argument("--drain", type=float, default=10.0, help="seconds to wait for stragglers")
    parser.add_argument("--receiver", choices=("api", "redis"), help=argparse.SUPPRESS)
    parser.add_argument("--target", help=argparse.SUPPRESS)
    parser.add_argument("--share", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--round", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def figures(quick: bool) -> list[Figure]:
    return run(options([], quick=quick))


def main() -> int:
    args = options()
    if args.receiver:
        receiver(args.receiver, args.target, args.share, args.round, args.events, args.out)
        return 0
    from bench.figures import table

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    started = time.perf_counter()
    try:
        result = run(args)
    except KeyboardInterrupt:
        return 130
    print(f"\n{table(result)}\n\ntotal {time.perf_counter() - started:.0f} s", flush=True)
    return 0 if all(f.holds for f in result) else 1


if __name__ == "__main__":
    sys.exit(main())
