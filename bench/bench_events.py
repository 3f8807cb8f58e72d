"""Pool-event delivery to many SSE clients of one API process: `python bench/bench_events.py`.

Starts its own redis-server and one `modelfleet api`, opens N `GET /api/v1/events` streams from this process
(raw asyncio sockets: an HTTP client per stream would cost more CPU than the API), publishes pool events through
`broker.events.EventBus` (the path a worker takes) from a thread at a steady rate, and measures each event's
delivery latency: from just before its publish call to its arrival on each client. The baseline, in the same
process, is one plain Redis pub/sub subscriber on the events channel: the floor of any relay.

Rows: the baseline, then 1, 100 and 1,000 SSE clients (`--clients`). Columns: deliveries, events lost
(expected deliveries that never arrived; must be 0), p50 / p99 latency, p50 as a multiple of the baseline's,
and the CPU time the API process and this one used per event. Every process it starts is stopped on exit.
"""

import argparse
import asyncio
import platform
import re
import resource
import secrets
import signal
import sys
import tempfile
import threading
import time
from contextlib import ExitStack
from pathlib import Path

import psutil
import redis
import redis.asyncio as aioredis

from bench.harness import Processes, fleet_env, ms, quantile, start_api, start_redis
from broker import keys
from broker.events import EventBus, model_event
from broker.schemas import ModelInfo, ModelState

EVENT_ID = re.compile(rb"\nid: ([0-9]+-[0-9]+)\n")
READ_KEY = "bench-read-" + secrets.token_hex(16)
NODE = "b" * 32
MODEL = ModelInfo(id="bench", path="/models/bench.gguf", healthy=True, state=ModelState.LOADED, size_bytes=1 << 20)


class Publisher:
    """Publishes `count` events at `rate` per second from its own thread; remembers when each one left."""

    def __init__(self, url: str, count: int, rate: float) -> None:
        self.bus = EventBus(redis.Redis.from_url(url))
        self.count, self.interval = count, 1.0 / rate
        self.sent: dict[str, float] = {}

    def run(self) -> None:
        started = time.perf_counter()
        for i in range(self.count):
            time.sleep(max(0.0, started + i * self.interval - time.perf_counter()))
            event = model_event("model-loaded", NODE, MODEL.model_copy(update={"id": f"bench-{i}"}))
            at = time.perf_counter()
            event_id = self.bus.publish(event)
            assert event_id is not None
            self.sent[event_id] = at

    def in_thread(self) -> threading.Thread:
        thread = threading.Thread(target=self.run, name="publisher")
        thread.start()
        return thread


class SseClient:
    """One event stream on a raw socket: the arrival time of every `distributed-pool-changed` id it reads."""

    def __init__(self) -> None:
        self.received: dict[str, float] = {}
        self.ready = asyncio.Event()
        self.error: str | None = None

    async def run(self, port: int, stop: asyncio.Event) -> None:
        try:
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError as exc:
            self.error = f"connect: {exc}"
            self.ready.set()
            return
        writer.write(f"GET /api/v1/events HTTP/1.1\r\nHost: bench\r\nAuthorization: Bearer {READ_KEY}\r\n\r\n".encode())
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            if not head.startswith(b"HTTP/1.1 200"):
                self.error = head.split(b"\r\n", 1)[0].decode()
                return
            reading = asyncio.ensure_future(self._read(reader))
            stopping = asyncio.ensure_future(stop.wait())
            await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
            reading.cancel()
            stopping.cancel()
        except (OSError, asyncio.IncompleteReadError) as exc:
            self.error = type(exc).__name__
        finally:
            self.ready.set()
            writer.close()

    async def _read(self, reader: asyncio.StreamReader) -> None:
        # Read big chunks and pick the `id:` lines out with one regex: per-line reads of 1,000 streams would make
        # this process, not the API, the bottleneck. The first id is the snapshot's.
        buffer = b""
        while True:
            data = await reader.read(1 << 16)
            if not data:
                self.error = "closed by the API"
                return
            at = time.perf_counter()
            buffer += data
            end = buffer.rfind(b"\n\n")
            if end < 0:
                continue
            for match in EVENT_ID.finditer(buffer, 0, end + 2):
                if self.ready.is_set():
                    self.received[match[1].decode()] = at
                else:
                    self.ready.set()  # the snapshot's id: not an event of this round
            buffer = buffer[end + 2 :]


async def redis_baseline(url: str, ready: asyncio.Event, stop: asyncio.Event, received: dict[str, float]) -> None:
    client = aioredis.Redis.from_url(url)
    pubsub = client.pubsub(ignore_subscribe_messages=True)
    await pubsub.subscribe(keys.events_channel())
    ready.set()
    while not stop.is_set():
        message = await pubsub.get_message(timeout=0.2)
        if message is not None:
            received[message["data"].split(b"\n", 1)[0].decode()] = time.perf_counter()
    await pubsub.aclose()
    await client.aclose()


class Row:
    def __init__(self, name: str, latencies: list[float], lost: int, cpu: tuple[float, float], events: int) -> None:
        self.name, self.latencies, self.lost = name, latencies, lost
        self.api_cpu, self.bench_cpu = (c / events for c in cpu)


async def measure(
    name: str, url: str, port: int | None, clients: int, args: argparse.Namespace, api: psutil.Process | None
) -> Row:
    """One round: connect, wait for every snapshot, publish, drain, and count what arrived."""
    stop = asyncio.Event()
    sinks: list[dict[str, float]]
    if port is None:
        baseline: dict[str, float] = {}
        ready = asyncio.Event()
        tasks = [asyncio.create_task(redis_baseline(url, ready, stop, baseline))]
        await ready.wait()
        sinks = [baseline]
    else:
        streams = [SseClient() for _ in range(clients)]
        opening = time.perf_counter()
        tasks = []
        for batch in range(0, clients, 100):  # connect in batches: no thundering herd on the accept queue
            tasks += [asyncio.create_task(s.run(port, stop)) for s in streams[batch : batch + 100]]
            await asyncio.gather(*(s.ready.wait() for s in streams[batch : batch + 100]))
        failed = [s.error for s in streams if s.error]
        if failed:
            raise RuntimeError(f"{len(failed)} of {clients} streams failed to open: {failed[0]}")
        sinks = [s.received for s in streams]
        print(f"  {clients} streams open in {time.perf_counter() - opening:.1f}s", flush=True)
    me = psutil.Process()
    cpu_before = (sum(api.cpu_times()[:2]) if api else 0.0, sum(me.cpu_times()[:2]))
    publisher = Publisher(url, args.events, args.rate)
    thread = publisher.in_thread()
    while thread.is_alive():
        await asyncio.sleep(0.05)
    expected = len(publisher.sent) * len(sinks)
    deadline = time.monotonic() + args.drain
    while sum(len(s) for s in sinks) < expected and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    cpu = ((sum(api.cpu_times()[:2]) - cpu_before[0]) if api else 0.0, sum(me.cpu_times()[:2]) - cpu_before[1])
    if port is not None:
        ended = [s.error for s in streams if s.error]
        if ended:
            print(f"  {len(ended)} streams ended early: {sorted(set(ended))[:3]}", flush=True)
    stop.set()
    await asyncio.gather(*tasks, return_exceptions=True)
    latencies = [at - publisher.sent[i] for sink in sinks for i, at in sink.items() if i in publisher.sent]
    return Row(name, latencies, expected - len(latencies), cpu, args.events)


def report(rows: list[Row]) -> None:
    floor = quantile(rows[0].latencies, 50)
    print(
        f"\n{'receiver':<22}{'deliveries':>11}{'lost':>6}{'p50 ms':>10}{'p99 ms':>10}{'x redis':>9}"
        f"{'CPU ms/event: API':>19}{'bench':>7}"
    )
    for row in rows:
        p50, p99 = quantile(row.latencies, 50), quantile(row.latencies, 99)
        api = f"{row.api_cpu * 1000:.2f}" if row.api_cpu else "-"
        print(
            f"{row.name:<22}{len(row.latencies):>11}{row.lost:>6}{ms(p50):>10}{ms(p99):>10}{p50 / floor:>9.1f}"
            f"{api:>19}{row.bench_cpu * 1000:>7.2f}"
        )


def run(args: argparse.Namespace, stack: ExitStack) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    needed = 2 * max(args.clients) + 256  # the API (which inherits it) holds one socket per client, as do we
    if soft < needed:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(needed, hard), hard))
    root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mf-bench-events-")))
    procs = Processes(root)
    stack.callback(procs.stop_all)
    started = time.perf_counter()
    url = start_redis(procs)
    env = fleet_env(url, MODELFLEET_API_KEYS=READ_KEY, MODELFLEET_OPERATOR_KEYS="bench-op-" + secrets.token_hex(16))
    base, api_proc = start_api(procs, env)
    port = int(base.rsplit(":", 1)[1])
    api = psutil.Process(api_proc.pid)
    print(
        f"processes up in {time.perf_counter() - started:.1f}s; {args.events} events at {args.rate:g}/s per round",
        flush=True,
    )

    async def rounds() -> list[Row]:
        rows = [await measure("redis pub/sub (1)", url, None, 1, args, None)]
        for count in args.clients:
            rows.append(await measure(f"SSE x {count}", url, port, count, args, api))
            print(f"  {rows[-1].name}: done", flush=True)
            procs.check_alive()
        return rows

    rows = asyncio.run(rounds())
    report(rows)
    store = redis.Redis.from_url(url)
    print(
        f"\n{psutil.cpu_count()} CPUs, Python {platform.python_version()}, "
        f"redis {store.info('server')['redis_version']}; total {time.perf_counter() - started:.1f}s"
    )
    return 1 if any(row.lost for row in rows) else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 100, 1000], help="SSE clients per round")
    parser.add_argument("--events", type=int, default=200, help="events published per round")
    parser.add_argument("--rate", type=float, default=20.0, help="events per second")
    parser.add_argument("--drain", type=float, default=30.0, help="seconds to wait for stragglers")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    try:
        with ExitStack() as stack:
            return run(args, stack)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
