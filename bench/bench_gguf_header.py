"""How long reading a model's GGUF header takes: gguf.GGUFReader (baseline) vs modelfleet's streaming reader.

    python bench/bench_gguf_header.py

Both run in this process on the same files; the table gives medians and the ratio to the baseline's median.
The vocabulary size drives the cost: a real llama has 32k tokens, stored as an array of strings.
"""

import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import gguf

from workers.gguf_factory import write_tiny_llama
from workers.gguf_header import read_header

SHARED = Path(__file__).resolve().parents[2] / "shared" / "models" / "stories260K.gguf"


def median_ms(fn: Callable[[], object], runs: int) -> float:
    times = []
    for _ in range(runs):
        started = time.perf_counter()
        fn()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times)


def main() -> int:
    with tempfile.TemporaryDirectory() as tmp:
        files = {
            "tiny, 512 tokens": write_tiny_llama(Path(tmp) / "v512.gguf"),
            "tiny, 32k tokens": write_tiny_llama(Path(tmp) / "v32k.gguf", n_vocab=32000),
            "100 MB, 512 tokens": write_tiny_llama(Path(tmp) / "big.gguf", pad_to_bytes=100 * 1024 * 1024),
        }
        if SHARED.exists():
            files["stories260K (real)"] = SHARED
        print(f"{'file':<22} {'GGUFReader ms':>14} {'read_header ms':>15} {'ratio':>8}")
        for name, path in files.items():
            baseline = median_ms(lambda p=path: gguf.GGUFReader(p), 5)
            ours = median_ms(lambda p=path: read_header(p), 21)
            print(f"{name:<22} {baseline:>14.2f} {ours:>15.2f} {ours / baseline:>8.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
