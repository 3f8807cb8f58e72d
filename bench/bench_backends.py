"""Load time, memory and tokens per second of each backend on the same file: ctransformers (baseline) vs llama.cpp.

    python bench/bench_backends.py [--rounds 10] [--tokens 128] [--model PATH]

Each measurement runs in a fresh child process (`--child BACKEND`), so memory figures start from the same state
and no backend's allocations are reused by the other; the two backends alternate within each pair of rounds
(ctransformers first, then llama.cpp first). A child loads the model (timed), reads how much its RSS grew,
generates greedily from "Once upon a time" through the backend-neutral `generate` (both backends give the same
tokens, so the work is the same), and reports decode tokens per second and its RSS growth after generating.
The table gives p50 and p99 per backend and the ratio of llama.cpp's p50 to ctransformers'.
"""

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"
BACKENDS = ("ctransformers", "llama-cpp")


def child(backend_name: str, path: Path, tokens: int, threads: int) -> None:
    import psutil

    from workers.gguf_info import read_gguf_info
    from workers.inference.backend import SamplingParams

    if backend_name == "ctransformers":
        from workers.backend import CTransformersLoader

        backend: object = CTransformersLoader(threads=threads)
    else:
        from workers.llama_backend import LlamaCppBackend

        backend = LlamaCppBackend(threads=threads)
    process = psutil.Process()
    estimate = backend.estimate_bytes(read_gguf_info(path), None)  # type: ignore[attr-defined]
    before = process.memory_info().rss
    started = time.perf_counter()
    model = backend.load(path, context_length=None, gpu_layers=None)  # type: ignore[attr-defined]
    load_ms = (time.perf_counter() - started) * 1000
    loaded = process.memory_info().rss - before
    ids = model.tokenize("Once upon a time", add_bos=True)
    produced: list[int] = []
    stream = model.generate(ids, SamplingParams(temperature=0.0), lambda: False)
    first = None
    for token in stream:
        if first is None:
            first = time.perf_counter()  # decode speed: from the first token on (prompt evaluation excluded)
        produced.append(token)
        if len(produced) == tokens:
            break
    stream.close()
    decode_s = time.perf_counter() - (first or time.perf_counter())
    text = b"".join(model.detokenize([t]) for t in produced).decode(errors="replace")
    result = {
        "load_ms": load_ms,
        "loaded_mb": loaded / 1e6,
        "used_mb": (process.memory_info().rss - before) / 1e6,
        "estimate_mb": estimate / 1e6,
        "tokens": len(produced),
        "tok_s": (len(produced) - 1) / decode_s if decode_s > 0 else 0.0,
        "text": text[:40],
    }
    print(json.dumps(result))


def run_child(backend: str, path: Path, tokens: int, threads: int) -> dict[str, float]:
    argv = [sys.executable, __file__, "--child", backend, "--model", str(path), "--tokens", str(tokens)]
    argv += ["--threads", str(threads)]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=300, check=True)
    result: dict[str, float] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--model", type=Path, default=SHARED)
    parser.add_argument("--child", choices=BACKENDS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.model, args.tokens, args.threads)
        return 0
    if not args.model.exists():
        print(f"no model at {args.model}", file=sys.stderr)
        return 2
    results: dict[str, list[dict[str, float]]] = {b: [] for b in BACKENDS}
    for i in range(args.rounds):
        order = BACKENDS if i % 2 == 0 else tuple(reversed(BACKENDS))
        for backend in order:
            results[backend].append(run_child(backend, args.model, args.tokens, args.threads))
    first = {b: results[b][0]["text"] for b in BACKENDS}
    print(f"{args.model.name}, {args.rounds} rounds, {args.tokens} tokens, {args.threads} threads")
    print(f"greedy text: {first}")
    print(f"{'metric':<26} {'ctransformers p50/p99':>24} {'llama.cpp p50/p99':>22} {'ratio p50':>10}")
    for key, label in [
        ("load_ms", "load (ms)"),
        ("loaded_mb", "RSS after load (MB)"),
        ("used_mb", "RSS after generating (MB)"),
        ("estimate_mb", "estimate (MB)"),
        ("tok_s", "decode (tokens/s)"),
    ]:
        ct = [r[key] for r in results["ctransformers"]]
        ll = [r[key] for r in results["llama-cpp"]]
        ratio = statistics.median(ll) / statistics.median(ct) if statistics.median(ct) else float("nan")
        print(
            f"{label:<26} {pct(ct, 0.5):>11.2f} /{pct(ct, 0.99):>10.2f} {pct(ll, 0.5):>10.2f} /{pct(ll, 0.99):>9.2f}"
            f" {ratio:>10.2f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
