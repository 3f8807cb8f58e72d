"""What every benchmark reports to `python -m bench`: figures, each a ratio (or a bound) measured against a
baseline in the same run, with the goal it is held to.

A benchmark module exposes `figures(quick: bool) -> list[Figure]`; `quick` asks for fewer rounds (a smoke run).
Timing helpers: `alternate` runs ours and the baseline round by round, so drift in the machine's load falls on
both alike; `percentile` is the one percentile every row uses.
"""

import math
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True)
class Figure:
    """One row of the table: `name` is what was measured, `goal` the bound it must keep ("<= 1.3x", ">= 0.9x",
    "<= 50 ms"), `value` the measured figure in the goal's unit, `holds` whether it keeps the goal, `detail` the
    raw numbers behind it (both sides' p50 and p99, counts, CPU)."""

    name: str
    goal: str
    value: float
    unit: str
    holds: bool
    detail: str

    @property
    def verdict(self) -> str:
        if not self.goal:
            return "shown"  # a figure the issues ask to see, with no goal set for it
        return "holds" if self.holds else "short"


def percentile(samples: list[float], q: float) -> float:
    """The q-th percentile (0-100) by the nearest-rank method: a sample that was measured, never interpolated."""
    if not samples:
        return math.nan
    ordered = sorted(samples)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def shown(name: str, value: float, unit: str, detail: str) -> Figure:
    """A figure with no goal: reported, never short."""
    return Figure(name, "", value, unit, True, detail)


def at_most(name: str, value: float, bound: float, unit: str, detail: str) -> Figure:
    return Figure(name, f"<= {bound:g}{unit}", value, unit, value <= bound, detail)


def at_least(name: str, value: float, bound: float, unit: str, detail: str) -> Figure:
    return Figure(name, f">= {bound:g}{unit}", value, unit, value >= bound, detail)


def ratio_at_most(name: str, ours: list[float], baseline: list[float], bound: float, q: float = 50) -> Figure:
    """ours' q-th percentile over baseline's, which must be at most `bound`; samples in seconds."""
    value = percentile(ours, q) / percentile(baseline, q)
    return at_most(name, value, bound, "x", versus_ms(ours, baseline))


def versus_ms(ours: list[float], baseline: list[float]) -> str:
    def ms(samples: list[float], q: float) -> str:
        return f"{percentile(samples, q) * 1000:.2f}"

    return (
        f"p50 {ms(ours, 50)} vs {ms(baseline, 50)} ms, p99 {ms(ours, 99)} vs {ms(baseline, 99)} ms"
        f" ({len(ours)} vs {len(baseline)} samples)"
    )


def alternate(
    rounds: int, ours: Callable[[], list[float]], baseline: Callable[[], list[float]]
) -> tuple[list[float], list[float]]:
    """Run `ours` and `baseline` `rounds` times each, alternating which goes first, and pool their samples."""
    mine: list[float] = []
    theirs: list[float] = []
    for round_ in range(rounds):
        if round_ % 2:
            theirs += baseline()
            mine += ours()
        else:
            mine += ours()
            theirs += baseline()
    return mine, theirs


def rotate(rounds: int, sides: dict[str, Callable[[], list[float]]]) -> dict[str, list[float]]:
    """Run every side `rounds` times, each round starting one side further on (each side goes first, second...
    in turn), and pool each side's samples."""
    order = list(sides)
    pooled: dict[str, list[float]] = {side: [] for side in order}
    for round_ in range(rounds):
        start = round_ % len(order)
        for side in order[start:] + order[:start]:
            pooled[side] += sides[side]()
    return pooled


def table(figures: list[Figure]) -> str:
    """The figures as a Markdown table (what bench/README.md holds)."""
    lines = ["| figure | goal | now | verdict | detail |", "|---|---|---|---|---|"]
    for f in figures:
        lines.append(f"| {f.name} | {f.goal or '-'} | {f.value:.3g}{f.unit} | {f.verdict} | {f.detail} |")
    return "\n".join(lines)


def run_alone(figures: Callable[[bool], list[Figure]], description: str | None) -> int:
    """`python -m bench.NAME [--quick]`: one benchmark's figures as a table; exit status 1 if a goal is short."""
    import argparse
    import time

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--quick", action="store_true", help="fewer rounds: a smoke run, not figures to quote")
    args = parser.parse_args()
    started = time.monotonic()
    found = figures(args.quick)
    print(table(found))
    print(f"\n{time.monotonic() - started:.0f} s")
    return 0 if all(f.holds for f in found) else 1
