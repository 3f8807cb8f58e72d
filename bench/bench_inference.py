"""Prompts through the head against ctransformers called in-process: `python -m bench.bench_inference`.

Starts its own redis-server, two workers serving stories260K on their inference endpoints and one API process,
the way an operator starts them (`modelfleet worker --serve-port 0`, `modelfleet api`), then:

  single stream   a client process alternates pairs: the same greedy continuation of the same prompt generated
                  in-process (`workers.backend.CTransformersLoader`, the very backend the nodes run, same
                  threads), then through the head (`POST /v1/completions`, `stream: true`, httpx), or the other
                  way round; per request the time to the first token and the tokens per second
  32 streams      32 concurrent streamed requests through the head, spread over the 2 nodes, from 4 client
                  processes of 8 streams each: the fleet's aggregate tokens per second against one in-process
                  generation's, measured in the same run

Every process it starts is stopped on exit.
"""

import argparse
import asyncio
import json
import multiprocessing
import os
import platform
import secrets
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

from bench.figures import Figure, at_least, at_most, percentile, shown
from bench.figures import table as figures_table
from bench.harness import Processes, fleet_env, modelfleet_command, ms, start_api, start_redis, wait_until
from workers.gguf_factory import write_endless_model
from workers.identity import fingerprint, load_or_create_node_key

ROOT = Path(__file__).resolve().parents[1]
STORIES = ROOT.parent / "shared" / "models" / "stories260K.gguf"
MODEL = "stories260K"
# A model whose tokens cost what a small real model's do (about 7 ms each on one thread here): what the head's
# per-token overhead amounts to for a model people serve, where stories260K (0.15 ms a token) magnifies it.
SMALL = "llama33m"
PROMPT = "Once upon a time"
# The client processes inherit the key and the node token from the orchestrator's environment.
KEY = os.environ.setdefault("BENCH_INFERENCE_KEY", "bench-op-" + secrets.token_hex(16))
NODE_TOKEN = os.environ.setdefault("BENCH_INFERENCE_NODE_TOKEN", "bench-node-" + secrets.token_hex(16))
THREADS = 1


# The client side, run in processes of their own (`--client ...`).


Sample = tuple[float, float, int, float, str]
"""One generation as its caller saw it: (time to first token, tokens per second after the first token, tokens,
tokens per second from the request to the last token, the text that came first)."""


def rates(started: float, first_at: float, ended: float, n: int, first_text: str) -> Sample:
    if n < 2 or not started < first_at < ended:
        raise RuntimeError(f"not a measurable answer: {n} tokens, first at {first_at}, last at {ended}")
    return first_at - started, (n - 1) / (ended - first_at), n, n / (ended - started), first_text


def in_process(model: object, tokens: int) -> Sample:
    """One greedy generation in this process, detokenized token by token as a node does."""
    from workers.inference.backend import SamplingParams

    started = time.perf_counter()
    ids = model.tokenize(PROMPT, add_bos=True)  # type: ignore[attr-defined]
    first_at, n, first_text = 0.0, 0, ""
    for token in model.generate(ids, SamplingParams(temperature=0), lambda: False):  # type: ignore[attr-defined]
        text = model.detokenize([token])  # type: ignore[attr-defined]
        n += 1
        if n == 1:
            first_at = time.perf_counter()
            first_text = text.decode(errors="replace")
        if n >= tokens:
            break
    return rates(started, first_at, time.perf_counter(), n, first_text)


def over_http(client: httpx.Client, model: str, tokens: int) -> Sample:
    """The same generation over HTTP (through the head, or straight to a node), streamed. The tokens are the
    answer's usage (an event may carry several, and a token whose bytes end mid-character has no text event of
    its own); the last token arrives with the usage, in the stream's last write. A node writes the first token
    alone (its generation waits for that write), so the tokens after the first are the usage's count less one."""
    body = {"model": model, "prompt": PROMPT, "stream": True, "temperature": 0, "max_tokens": tokens}
    body["stream_options"] = {"include_usage": True}
    started = time.perf_counter()
    first_at, ended, n, first_text = 0.0, 0.0, 0, ""
    with client.stream("POST", "/v1/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            if not first_at and '"text":""' not in line and '"choices":[]' not in line:
                first_at = time.perf_counter()
                first_text = json.loads(line[6:])["choices"][0]["text"]
            if '"usage":{' in line:
                ended = time.perf_counter()
                n = json.loads(line[6:])["usage"]["completion_tokens"]
    return rates(started, first_at, ended, n, first_text)


def client_single(url: str, node_url: str, pairs: int, tokens: int, out: Path, name: str, path: Path) -> None:
    from workers.backend import CTransformersLoader

    model = CTransformersLoader(threads=THREADS).load(path, context_length=None, gpu_layers=None)
    kinds = ("in-process", "head", "node")
    results: dict[str, list[Sample]] = {kind: [] for kind in kinds}
    with (
        httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as head,
        httpx.Client(base_url=node_url, headers={"Authorization": f"Bearer {NODE_TOKEN}"}, timeout=60) as node,
    ):
        run = {"in-process": lambda: in_process(model, tokens), "head": lambda: over_http(head, name, tokens)}
        run["node"] = lambda: over_http(node, name, tokens)
        for _ in range(3):  # warm every path (connections, caches)
            for kind in kinds:
                run[kind]()
        for i in range(pairs):
            for kind in kinds[i % 3 :] + kinds[: i % 3]:  # each path goes first, second and third in turn
                results[kind].append(run[kind]())
    # "Tokens after the first" is the usage less one: true only if the first event carried the first token
    # alone, which is the in-process first token's text (greedy: the same every time).
    alone = {sample[4] for sample in results["in-process"]}
    for kind in ("head", "node"):
        firsts = {sample[4] for sample in results[kind]}
        if firsts != alone:
            raise RuntimeError(f"the first event {kind} carried {firsts!r}, not the first token alone {alone!r}")
    out.write_text(json.dumps(results))


def client_concurrent(urls: str, streams: int, tokens: int, start_at: float, out: Path) -> None:
    """`streams` concurrent streams to the head, or (several comma-separated URLs) spread over the nodes."""
    targets = urls.split(",")
    key = KEY if len(targets) == 1 else NODE_TOKEN

    async def run() -> list[tuple[float, float, int, str]]:
        limits = httpx.Limits(max_connections=streams)
        headers = {"Authorization": f"Bearer {key}"}
        async with httpx.AsyncClient(headers=headers, timeout=120, limits=limits) as client:

            async def one(i: int) -> tuple[float, float, int, str]:
                body = {"model": MODEL, "prompt": PROMPT, "stream": True, "temperature": 0, "max_tokens": tokens}
                body["stream_options"] = {"include_usage": True}
                started = time.perf_counter()
                n, first = 0, 0.0
                url = targets[i % len(targets)] + "/v1/completions"
                async with client.stream("POST", url, json=body) as response:
                    response.raise_for_status()
                    async for line in response.aiter_lines():  # an event may carry several tokens: usage counts
                        if not first and line.startswith("data: {") and '"text":""' not in line:
                            first = time.perf_counter() - started
                        if '"usage":{' in line:
                            n = json.loads(line[6:])["usage"]["completion_tokens"]
                    return time.time(), first, n, response.headers.get("x-modelfleet-node", targets[i % len(targets)])

            await asyncio.sleep(max(0.0, start_at - time.time()))  # every process starts at once
            return await asyncio.gather(*(one(i) for i in range(streams)))

    out.write_text(json.dumps(asyncio.run(run())))


# The orchestrator.


def start_fleet(procs: Processes) -> tuple[str, list[str]]:
    redis_url = start_redis(procs)
    env = fleet_env(redis_url, MODELFLEET_OPERATOR_KEYS=KEY, MODELFLEET_NODE_TOKEN=NODE_TOKEN)
    models = procs.root / "models"
    models.mkdir()
    shutil.copy(STORIES, models / STORIES.name)
    write_endless_model(models / f"{SMALL}.gguf")
    fingerprints = []
    for name in ("bench-a", "bench-b"):
        state = procs.root / "state" / name
        fingerprints.append(fingerprint(load_or_create_node_key(state)))
        argv = [*modelfleet_command(), "worker", "--name", name, "--models-dir", str(models), "--state-dir", str(state)]
        argv += ["--serve-port", "0", "--threads", str(THREADS), "--max-queue", "64", "--concurrency", "4"]
        procs.start(name, argv, env)
    base, _ = start_api(procs, env)
    client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {KEY}"}, timeout=60)

    def online() -> bool:
        nodes = client.get("/api/v1/nodes").json()["data"]
        return sum(n["online"] and n["consuming"] for n in nodes) == 2

    wait_until(online, procs, "both workers")
    for fp in fingerprints:
        for name in (MODEL, SMALL):
            client.post("/v1/models/load", json={"model_name": name, "node": fp}).raise_for_status()

    def served() -> bool:
        entries = client.get("/v1/models").json()["data"]
        return sum(e["id"] in (MODEL, SMALL) and len(e["loaded_on"]) == 2 for e in entries) == 2

    wait_until(served, procs, "both replicas")
    endpoints = [n["endpoint"] for n in client.get("/api/v1/nodes").json()["data"]]
    return base, endpoints


def run_client(args: list[str]) -> None:
    subprocess.run([sys.executable, "-m", "bench.bench_inference", "--client", *args], check=True, cwd=ROOT)


def concurrent(root: Path, urls: str, streams: int, tokens: int) -> tuple[list[tuple], float]:
    """`streams` streams from 4 client processes, started together: their results and the wall time."""
    per_process = max(1, streams // 4)
    start_at = time.time() + 2.0
    outs = [root / f"concurrent-{i}.json" for i in range(4)]
    argv = ["concurrent", urls, str(per_process), str(tokens), str(start_at)]
    clients = [multiprocessing.Process(target=run_client, args=([*argv, str(o)],)) for o in outs]
    for c in clients:
        c.start()
    for c in clients:
        c.join()
    done = [tuple(r) for o in outs for r in json.loads(o.read_text())]
    return done, max(r[0] for r in done) - start_at


def table(rows: list[list[str]]) -> None:
    for row in rows:
        print("| " + " | ".join(row) + " |")


@dataclass
class Measured:
    """What one run measured: per path, per alternated triple, a `Sample`; per concurrent round and target, the
    streams' results, the wall time and the API's CPU seconds."""

    single: dict[str, list[list[float]]]
    small: dict[str, list[list[float]]]
    """The same alternated triples with SMALL."""
    rounds: list[dict[str, tuple[list[tuple], float, float]]]


def measure(pairs: int, tokens: int, streams: int, rounds: int) -> Measured:
    root = Path(tempfile.mkdtemp(prefix="bench-inference-"))
    procs = Processes(root)
    try:
        base, endpoints = start_fleet(procs)
        out = root / "single.json"
        run_client(["single", base, endpoints[0], str(pairs), str(tokens), str(out), MODEL, str(STORIES)])
        single = json.loads(out.read_text())
        small_pairs, small_tokens = max(4, pairs // 3), 64
        argv = [str(small_pairs), str(small_tokens), str(out), SMALL, str(root / "models" / f"{SMALL}.gguf")]
        run_client(["single", base, endpoints[0], *argv])
        small = json.loads(out.read_text())
        for paths in (single, small):
            assert len({r[2] for kind in paths.values() for r in kind}) == 1, "every path must generate the same"
        measured = Measured(single, small, [])
        for _ in range(rounds):
            round_: dict[str, tuple[list[tuple], float, float]] = {}
            targets = [("head", base), ("nodes direct", ",".join(endpoints))]
            for target, urls in targets if len(measured.rounds) % 2 == 0 else targets[::-1]:
                api_cpu = procs.cpu_seconds()["api"]
                done, elapsed = concurrent(root, urls, streams, tokens)
                round_[target] = (done, elapsed, procs.cpu_seconds()["api"] - api_cpu)
            measured.rounds.append(round_)
        return measured
    finally:
        procs.stop_all()
        shutil.rmtree(root, ignore_errors=True)


def aggregate(done: list[tuple], elapsed: float) -> float:
    return sum(r[2] for r in done) / elapsed


def figures(quick: bool = False) -> list[Figure]:
    if not STORIES.exists():
        raise RuntimeError(f"stories260K is not at {STORIES}")
    return figures_of(measure(pairs=8 if quick else 30, tokens=200, streams=32, rounds=1 if quick else 2))


def figures_of(m: Measured) -> list[Figure]:
    """The tokens-per-second goals are on the rate after the first token, as the head's own histogram
    (`modelfleet_inference_tokens_per_second`) and serving benchmarks count it: the time to the first token is a
    goal of its own, measured on the same requests. The rate from the request on is shown beside it."""
    inproc, head = m.single["in-process"], m.single["head"]
    ratios = [h[1] / i[1] for h, i in zip(head, inproc, strict=True)]
    whole = [h[3] / i[3] for h, i in zip(head, inproc, strict=True)]
    extra = [h[0] - i[0] for h, i in zip(head, inproc, strict=True)]
    head_rate = [aggregate(*r["head"][:2]) for r in m.rounds]
    direct_rate = [aggregate(*r["nodes direct"][:2]) for r in m.rounds]
    api_cpu = ", ".join(f"{r['head'][2]:.2f}" for r in m.rounds)

    def rate(samples: list[list[float]], index: int = 1) -> str:
        return f"{percentile([s[index] for s in samples], 50):.0f}"

    def ttft(samples: list[list[float]]) -> str:
        return f"{percentile([s[0] for s in samples], 50) * 1000:.2f}"

    def listed(values: list[float]) -> str:
        return ", ".join(f"{x:.0f}" for x in values)

    small = [h[1] / i[1] for h, i in zip(m.small["head"], m.small["in-process"], strict=True)]
    return [
        at_least(
            f"{SMALL} (7 ms a token) tokens/s after the first through the head / in-process ctransformers, p50 of"
            " alternated pairs",
            percentile(small, 50),
            0.9,
            "x",
            f"{rate(m.small['head'])} vs {rate(m.small['in-process'])} tok/s p50; p1 of the ratio"
            f" {percentile(small, 1):.2f}; node direct {rate(m.small['node'])} tok/s ({len(small)} pairs, 64 tokens)",
        ),
        at_least(
            "stories260K tokens/s after the first through the head / in-process ctransformers, p50 of alternated pairs",
            percentile(ratios, 50),
            0.9,
            "x",
            f"{rate(head)} vs {rate(inproc)} tok/s p50; p1 of the ratio {percentile(ratios, 1):.2f}; node direct"
            f" {rate(m.single['node'])} tok/s ({len(ratios)} pairs, 200 tokens)",
        ),
        shown(
            "stories260K tokens/s from the request on (first token included) through the head / in-process, p50",
            percentile(whole, 50),
            "x",
            f"{rate(head, 3)} vs {rate(inproc, 3)} tok/s p50; node direct {rate(m.single['node'], 3)} tok/s; the"
            " time to the first token (below) is most of the difference",
        ),
        at_most(
            "time to first token through the head minus in-process, p50",
            percentile(extra, 50) * 1000,
            5,
            " ms",
            f"p99 {percentile(extra, 99) * 1000:.1f} ms; TTFT p50 head {ttft(head)}, node direct"
            f" {ttft(m.single['node'])}, in-process {ttft(inproc)} ms",
        ),
        shown(
            "32 streams over 2 nodes: aggregate tokens/s through the head / straight to the nodes",
            statistics.median(h / d for h, d in zip(head_rate, direct_rate, strict=True)),
            "x",
            f"head {listed(head_rate)} vs direct {listed(direct_rate)} tok/s per round; API CPU {api_cpu} s a round",
        ),
    ]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--pairs", type=int, default=30)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--client", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        kind, *rest = args.client
        if kind == "single":
            client_single(rest[0], rest[1], int(rest[2]), int(rest[3]), Path(rest[4]), rest[5], Path(rest[6]))
        else:
            client_concurrent(rest[0], int(rest[1]), int(rest[2]), float(rest[3]), Path(rest[4]))
        return 0
    if not STORIES.exists():
        print(f"stories260K is not at {STORIES}", file=sys.stderr)
        return 2
    m = measure(args.pairs, args.tokens, args.streams, args.rounds)
    print(f"# {platform.python_version()}, {os.cpu_count()} CPUs, {THREADS} thread per model, {args.tokens} tokens")
    for model, paths in ((MODEL, m.single), (SMALL, m.small)):
        inproc = paths["in-process"]
        print(f"\n## {model}: one stream, {len(inproc)} alternated triples\n")
        print(
            "| path | TTFT p50 ms | TTFT p99 ms | tok/s after the first p50 | p1 (slowest) | / in-process p50"
            " | tok/s from the request p50 | / in-process p50 |"
        )
        print("|---|---|---|---|---|---|---|---|")
        for name, samples in paths.items():
            ttft = [s[0] for s in samples]
            rate = [s[1] for s in samples]
            ratio = percentile([s[1] / i[1] for s, i in zip(samples, inproc, strict=True)], 50)
            whole = percentile([s[3] / i[3] for s, i in zip(samples, inproc, strict=True)], 50)
            cells = [name, ms(percentile(ttft, 50)), ms(percentile(ttft, 99)), f"{percentile(rate, 50):.0f}"]
            cells += [f"{percentile(rate, 1):.0f}", f"{ratio:.3f}", f"{percentile([s[3] for s in samples], 50):.0f}"]
            table([[*cells, f"{whole:.3f}"]])
    inproc = m.single["in-process"]
    one = percentile([s[3] for s in inproc], 50)  # the aggregate counts every token over the wall time
    print(f"\n## {args.streams} concurrent streams over 2 nodes, from 4 client processes, alternated rounds\n")
    print(
        "| target | round | streams per node | tok/s aggregate | x one in-process stream | TTFT p50 ms | TTFT p99 ms |"
        " API CPU s |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for number, round_ in enumerate(m.rounds, 1):
        for target, (done, elapsed, api_cpu) in round_.items():
            by_node: dict[str, int] = {}
            for r in done:
                by_node[r[3]] = by_node.get(r[3], 0) + 1
            ttft = [r[1] for r in done]
            rate = aggregate(done, elapsed)
            cells = [target, str(number), str(sorted(by_node.values())), f"{rate:.0f}", f"{rate / one:.2f}"]
            table([[*cells, ms(percentile(ttft, 50)), ms(percentile(ttft, 99)), f"{api_cpu:.2f}"]])
    print()
    print(figures_table(figures_of(m)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
