"""`python -m bench`: every benchmark's figures in one table with a verdict; exit status 1 if a goal is short.

`python -m bench --quick` is a smoke run (fewer rounds); `--only NAME` runs the named benchmarks.
"""

import argparse
import importlib
import platform
import sys
import time
from datetime import UTC, datetime

import psutil

from bench.figures import Figure, table

BENCHMARKS = ("bench_roundtrip", "bench_status", "bench_events", "bench_inference", "bench_loads")


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run, not figures to quote")
    parser.add_argument("--only", nargs="*", default=list(BENCHMARKS), choices=BENCHMARKS, metavar="NAME")
    args = parser.parse_args()
    started = time.monotonic()
    print(
        f"# {datetime.now(UTC):%Y-%m-%d %H:%M} UTC, {platform.python_implementation()} {platform.python_version()},"
        f" {psutil.cpu_count()} CPUs, load average {' '.join(f'{x:.1f}' for x in psutil.getloadavg())}",
        flush=True,
    )
    figures: list[Figure] = []
    for name in args.only:
        module = importlib.import_module(f"bench.{name}")
        began = time.monotonic()
        print(f"# {name} ...", flush=True)
        mine = module.figures(quick=args.quick)
        print(f"# {name}: {time.monotonic() - began:.0f} s", flush=True)
        print(table(mine), flush=True)
        figures += mine
    print(f"\n# all benchmarks: {time.monotonic() - started:.0f} s\n")
    print(table(figures))
    return 0 if all(f.holds for f in figures) else 1


if __name__ == "__main__":
    sys.exit(main())
