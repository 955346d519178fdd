"""``make bench``: every benchmark, one table, each figure against its baseline from the same run.

Runs ``convert.py`` (ours, DuckDB, the naive script; 2 M and 8 M rows, JSON and CSV; the naive
script at 2 M only, since it holds everything in memory) and ``makespan.py`` (ours, the naive
one-at-a-time client, and the ``ceil(N / C) * T`` lower bound), then prints one table.  Ratios
are baseline / ours for times and memory (above 1: ours is better), ours / bound for makespan.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import tempfile
from pathlib import Path

import convert
import makespan

from backfill import logs
from backfill.simulator import serve


def _convert_rows(sizes: list[int], work: Path) -> list[tuple[str, str, str, str, str]]:
    table = []
    for rows in sizes:
        for fmt in ("json", "csv"):
            source = work / f"bench-{rows}.{fmt}.gz"
            if not source.exists():
                convert.generate(source, rows, fmt)
            ours = convert.measure("ours", source, fmt, work)
            baselines = {"duckdb": convert.measure("duckdb", source, fmt, work)}
            if rows <= 2_000_000:
                baselines["naive"] = convert.measure("naive", source, fmt, work)
            name = f"convert {rows:,} rows {fmt.upper()}"
            for base, result in baselines.items():
                if "error" in result or "error" in ours:
                    table.append((name, "seconds", "-", base, "failed"))
                    continue
                for figure, key, shown in (
                    ("seconds", "seconds", ".1f"),
                    ("peak RSS MB", "peak_mb", ".0f"),
                ):
                    mine, theirs = ours[key], result[key]
                    ratio = f"{theirs / mine:.2f}x"
                    table.append(
                        (name, figure, f"{mine:{shown}}", f"{base} {theirs:{shown}}", ratio)
                    )
    return table


async def _makespan_rows(
    cap: int, seconds: float, windows: int
) -> list[tuple[str, str, str, str, str]]:
    lower = math.ceil(windows / cap) * seconds
    figures = {}
    for name in ("ours", "naive"):
        work = Path(tempfile.mkdtemp(prefix=f"makespan-{name}-"))
        try:
            async with serve(makespan._simulator(cap, seconds)) as (sim, base):
                if name == "ours":
                    wall = await makespan.ours(base, work, cap, windows, seconds)
                else:
                    wall = await makespan.naive(base, work, windows, seconds)
                polls = sum(1 for c in sim.calls if c.kind == "status") / windows
                refused = sum(1 for c in sim.calls if c.status == 429)
                figures[name] = (wall, polls, refused)
        finally:
            shutil.rmtree(work, ignore_errors=True)
    (wall, polls, refused), (naive_wall, naive_polls, _) = figures["ours"], figures["naive"]
    name = f"makespan C={cap} T={seconds:g}s N={windows}"
    return [
        (name, "wall s", f"{wall:.1f}", f"bound {lower:.1f}", f"{wall / lower:.2f}x of bound"),
        (name, "wall s", f"{wall:.1f}", f"naive {naive_wall:.1f}", f"{naive_wall / wall:.2f}x"),
        (
            name,
            "status polls / window",
            f"{polls:.2f}",
            f"naive {naive_polls:.2f}",
            f"{naive_polls / polls:.2f}x",
        ),
        (name, "429s caused", str(refused), "naive 0", "-"),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 8_000_000])
    parser.add_argument("--work", type=Path, default=convert.ROOT / "data" / "bench")
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    args.work.mkdir(parents=True, exist_ok=True)
    table = _convert_rows(args.rows, args.work)
    table += asyncio.run(_makespan_rows(4, 2.0, 40))
    widths = [max(len(row[i]) for row in table) for i in range(5)]
    heads = ("benchmark", "figure", "ours", "baseline (same run)", "ratio")
    widths = [max(w, len(h)) for w, h in zip(widths, heads, strict=True)]
    print("  ".join(h.ljust(w) for h, w in zip(heads, widths, strict=True)))
    print("  ".join("-" * w for w in widths))
    for row in table:
        print("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)))


if __name__ == "__main__":
    main()
