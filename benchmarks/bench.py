"""``make bench``: every benchmark, one table, each figure against its baselines from the same run.

Runs ``convert.py`` (ours, Polars, DuckDB, the naive script, at 2 M rows, JSON and CSV; ours
and Polars ``--repeat`` times alternating, medians; the naive script at 2 M only, since it
holds everything in memory), the memory case (ours and Polars at 8 M rows: peak RSS, and its
growth from 2 M), ``windows.py`` (the same rows landed as 500 one-hour windows or as one
window, through ``commit.land`` with a SQLite ledger) and ``makespan.py`` (ours, the naive
one-at-a-time client, and the ``ceil(N / C) * T`` lower bound), then prints one table.  Ratios
are baseline / ours for times and memory (above 1: ours is better), many / one for the small
windows, ours / bound for makespan.  ``--quick`` runs small sizes once, for a smoke test;
``--before DIR`` adds an older ``backfill`` package (``git archive <commit> backfill | tar -x
-C DIR``) as one more baseline of the conversion.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import tempfile
from pathlib import Path
from typing import Any

import convert
import makespan
import windows

from backfill import logs
from backfill.simulator import serve

Row = tuple[str, str, str, str, str]
_GOAL = {"polars": " (goal >= 1.25x)"}


def _source(work: Path, rows: int, fmt: str) -> Path:
    source = work / f"bench-{rows}.{fmt}.gz"
    if not source.exists():
        convert.generate(source, rows, fmt)
    return source


def _convert_rows(
    rows: int, work: Path, repeat: int, engines: list[str]
) -> tuple[list[Row], dict[str, dict[str, Any]]]:
    """The table rows of one size; and ours and Polars' results per format (for memory)."""
    table: list[Row] = []
    kept: dict[str, dict[str, Any]] = {}
    for fmt in ("json", "csv"):
        results = convert.measure_all(engines, _source(work, rows, fmt), fmt, work, repeat)
        ours = results.pop("ours")
        kept[fmt] = {"ours": ours, "polars": results.get("polars", {})}
        name = f"convert {rows:,} rows {fmt.upper()}"
        for engine, result in results.items():
            base = "before" if engine.startswith("ours@") else engine
            if "error" in result or "error" in ours:
                problem = result.get("error") or ours.get("error")
                table.append((name, "seconds", "-", base, f"failed: {problem}"))
                continue
            for figure, key, shown in (
                ("seconds", "seconds", ".1f"),
                ("peak RSS MB", "peak_mb", ".0f"),
            ):
                mine, theirs = ours[key], result[key]
                goal = _GOAL.get(base, "") if key == "seconds" else ""
                ratio = f"{theirs / mine:.2f}x{goal}"
                table.append((name, figure, f"{mine:{shown}}", f"{base} {theirs:{shown}}", ratio))
    return table, kept


def _memory_rows(
    rows: int, work: Path, small: dict[str, dict[str, Any]], small_rows: int
) -> list[Row]:
    """Peak RSS at ``rows`` (ours and Polars, one run each), and its growth from ``small_rows``."""
    table: list[Row] = []
    for fmt in ("json", "csv"):
        results = convert.measure_all(["ours", "polars"], _source(work, rows, fmt), fmt, work)
        ours, theirs = results["ours"], results["polars"]
        name = f"memory {rows:,} rows {fmt.upper()}"
        if "error" in ours or "error" in theirs:
            table.append((name, "peak RSS MB", "-", "polars", "failed"))
            continue
        table.append(
            (name, "peak RSS MB", f"{ours['peak_mb']:.0f}", f"polars {theirs['peak_mb']:.0f}",
             f"{theirs['peak_mb'] / ours['peak_mb']:.2f}x (goal: ours <= 512)")
        )  # fmt: skip
        table.append(
            (name, "seconds", f"{ours['seconds']:.1f}", f"polars {theirs['seconds']:.1f}",
             f"{theirs['seconds'] / ours['seconds']:.2f}x")
        )  # fmt: skip
        before = small.get(fmt, {})
        if "peak_mb" in before.get("ours", {}) and "peak_mb" in before.get("polars", {}):
            grew = ours["peak_mb"] - before["ours"]["peak_mb"]
            their_growth = theirs["peak_mb"] - before["polars"]["peak_mb"]
            table.append(
                (name, f"RSS growth from {small_rows:,} MB", f"{grew:+.0f}",
                 f"polars {their_growth:+.0f}", "goal: ours within 32")
            )  # fmt: skip
    return table


def _windows_rows(work: Path, rows: int, count: int, repeat: int) -> list[Row]:
    table: list[Row] = []
    for fmt in ("json", "csv"):
        result = windows.compare(work, rows, count, fmt, repeat)
        many, one = result["many"], result["one"]
        name = f"land {count} windows of {rows // count:,} rows {fmt.upper()}"
        if "error" in many or "error" in one:
            table.append((name, "seconds", "-", "one window", "failed"))
            continue
        table.append(
            (name, "seconds", f"{many['seconds']:.1f}", f"one window {one['seconds']:.1f}",
             f"{many['seconds'] / one['seconds']:.2f}x of one (goal <= 1.5x)")
        )  # fmt: skip
        # Small windows convert in worker processes: their peak RSS is counted beside the run's.
        memory = f"{many['peak_mb']:.0f} + {many['processes_peak_mb']:.0f} in processes"
        table.append((name, "peak RSS MB", memory, f"one window {one['peak_mb']:.0f}", "-"))
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
    parser.add_argument("--rows", type=int, default=2_000_000, help="rows of the speed case")
    parser.add_argument("--memory-rows", type=int, default=8_000_000, help="0: no memory case")
    parser.add_argument("--windows", type=int, default=500, help="0: no small-windows case")
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours and Polars (median)")
    parser.add_argument("--quick", action="store_true", help="200 k rows, 50 windows, one run")
    parser.add_argument(
        "--before", type=Path, help="a folder holding an older backfill package: one more baseline"
    )
    parser.add_argument("--work", type=Path, default=convert.ROOT / "data" / "bench")
    args = parser.parse_args()
    if args.quick:
        args.rows, args.memory_rows, args.windows, args.repeat = 200_000, 800_000, 50, 1
    logs.configure(fmt="json", level="warning")
    args.work.mkdir(parents=True, exist_ok=True)
    engines = ["ours", "polars", "duckdb"] + (["naive"] if args.rows <= 2_000_000 else [])
    engines += [f"ours@{args.before.resolve()}"] if args.before else []
    _show(("benchmark", "figure", "ours", "baseline (same run)", "ratio"), rule=True)
    table, kept = _convert_rows(args.rows, args.work, args.repeat, engines)
    _show_all(table)
    if args.memory_rows:
        _show_all(_memory_rows(args.memory_rows, args.work, kept, args.rows))
    if args.windows:
        _show_all(_windows_rows(args.work, args.rows, args.windows, args.repeat))
    _show_all(asyncio.run(_makespan_rows(4, 2.0, 40)))


_WIDTHS = (36, 28, 7, 22, 30)


def _show(row: Row, *, rule: bool = False) -> None:
    """One row of the table, printed as soon as it is measured (a full run takes minutes)."""
    print("  ".join(cell.ljust(w) for cell, w in zip(row, _WIDTHS, strict=True)), flush=True)
    if rule:
        print("  ".join("-" * w for w in _WIDTHS), flush=True)


def _show_all(rows: list[Row]) -> None:
    for row in rows:
        _show(row)


if __name__ == "__main__":
    main()
