"""Small-windows benchmark: the same rows landed as many one-hour windows, or as one window.

Theory of operation.  ``prepare`` writes ``windows`` gzip files of ``rows / windows`` rows each
(one simulated day's rows squeezed into each hour, sorted by session) and one file holding all
of them.  A child process then plans the windows in a real SQLite ``Ledger``, moves them to
DOWNLOADED (not timed), and lands every one as the engine does: the engine's pool
(``run_pool``, as many consumers as ``Engine.run`` starts) calls ``commit.land`` with the
run's conversions cap (``Budget.of``, the engine's default settings, or ``--conversions``), as
``Worker._land`` does: stage, publish, manifest, ledger commit; its store is the run's
(``open_store``), so small windows convert in worker processes.  The time of the landing loop,
the CPU seconds of the child and every process under it, the child's peak RSS and the sum of
its processes' are printed; ``many / one`` is the figure (the issue's goal: at most 1.5).
Usage::

    python benchmarks/windows.py --rows 2000000 --windows 500 --format json
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import resource
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import convert

HOUR_MS = 3_600_000
APP = "bench"


def prepare(work: Path, rows: int, windows: int, fmt: str) -> tuple[list[Path], Path]:
    """The window files and the one file with all their rows (made once, then reused)."""
    from isal import igzip

    folder = work / f"windows-{rows}-{windows}-{fmt}"
    files = [folder / f"w{i:05d}.{fmt}.gz" for i in range(windows)]
    whole = folder / f"all.{fmt}.gz"
    if whole.exists():
        return files, whole
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-rows // windows)
    pieces, head, header = convert.base_day(per, fmt)
    with igzip.open(whole, "wb", compresslevel=1) as everything:  # type: ignore[no-untyped-call]  # igzip.open is unannotated
        everything.write(header)
        for i, path in enumerate(files):
            start = convert.DAY0 + i * HOUR_MS
            text = b"".join(
                b"%s%d%s" % (head, start + off * HOUR_MS // convert.DAY_MS, rest)
                for off, rest in pieces[: min(per, rows - i * per)]
            )
            everything.write(text)
            with igzip.open(path, "wb", compresslevel=1) as one:  # type: ignore[no-untyped-call]  # igzip.open is unannotated
                one.write(header + text)
    return files, whole


async def _land_all(
    work: Path, sources: list[Path], hours: int, conversions: int | None
) -> dict[str, Any]:
    from backfill import commit
    from backfill.budget import Budget
    from backfill.config import Settings, replace_api
    from backfill.ledger import Ledger
    from backfill.models import WindowRecord, WindowState
    from backfill.objstore import open_store
    from backfill.pool import run_pool

    ledger = await Ledger.open(work / "ledger.sqlite")
    end = convert.DAY0 + hours * HOUR_MS
    size = HOUR_MS if len(sources) > 1 else 30 * convert.DAY_MS
    records = await ledger.add_windows(APP, convert.DAY0, end, size_ms=size)
    assert len(records) == len(sources), (len(records), len(sources))
    for i, record in enumerate(records):
        for state in (WindowState.SUBMITTED, WindowState.READY, WindowState.DOWNLOADED):
            record = await ledger.advance(record, state)
        records[i] = record
    settings = Settings()  # the engine's defaults
    if conversions is not None:
        settings = replace_api(settings, conversions_at_once=conversions)
    output = dataclasses.replace(settings.output, root=work / "out")
    settings = dataclasses.replace(settings, output=output)
    a = settings.api
    budget = Budget.of(settings, ledger, time.monotonic)  # as the engine makes it
    workers = a.max_in_flight + a.downloads_at_once + a.conversions_at_once  # as Engine.run
    store = open_store(settings)  # as the run makes it: small downloads convert in processes
    source_of = {r.id: s for r, s in zip(records, sources, strict=True)}
    landed: list[WindowRecord] = []

    async def handle(record: WindowRecord) -> list[WindowRecord]:  # Worker._land's call
        landed.append(await commit.land(ledger, store, record, source_of[record.id],
                                        min_share=settings.output.min_repull_share,
                                        conversions=budget.conversions))  # fmt: skip
        return []

    began, cpu_before = time.perf_counter(), _tree()[0]
    await run_pool(records, handle, workers=workers)
    seconds = time.perf_counter() - began
    await ledger.close()
    cpu_after, helpers_mb = _tree()  # before the conversion processes end
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {"rows": sum(r.rows or 0 for r in landed), "seconds": seconds,
            "cpu_s": round(cpu_after - cpu_before, 2),  # shared machine: less noisy than time
            "peak_mb": usage.ru_maxrss / 1024, "processes_peak_mb": helpers_mb,
            "conversions_at_once": a.conversions_at_once, "workers": workers}  # fmt: skip


def _tree() -> tuple[float, float]:
    """CPU seconds of this process and every process under it (the conversion processes and
    their fork server), and the sum of the others' peak RSS in MB, from ``/proc``."""
    tick = os.sysconf("SC_CLK_TCK")
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:  # ended meanwhile
            continue
        pid = int(stat.parent.name)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    mine, frontier = {os.getpid()}, [os.getpid()]
    while frontier:
        pid = frontier.pop()
        for child, parent in parents.items():
            if parent == pid and child not in mine:
                mine.add(child)
                frontier.append(child)
    peak_kb = 0
    for pid in mine - {os.getpid()}:
        with contextlib.suppress(OSError):
            status = Path(f"/proc/{pid}/status").read_text()
            peak_kb += int(next(x for x in status.splitlines() if x.startswith("VmHWM")).split()[1])
    return sum(cpu.get(pid, 0.0) for pid in mine), peak_kb / 1024


def child(work: Path, sources: list[Path], hours: int, conversions: int | None) -> None:
    import anyio

    import backfill.store  # noqa: F401  # imports are not part of the measurement

    print(json.dumps(anyio.run(_land_all, work, sources, hours, conversions)))


def measure(
    sources: list[Path], hours: int, work: Path, conversions: int | None = None
) -> dict[str, Any]:
    """Land ``sources`` (one window each) in a child process; its time, rows and peak RSS."""
    out = work / "land"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    listing = out / "sources.txt"
    listing.write_text("\n".join(str(s) for s in sources))
    command = [sys.executable, __file__, "--child", str(out), str(listing), str(hours),
               str(conversions or 0)]  # fmt: skip
    try:
        return convert.run_child(command, f"{convert.ROOT}:{Path(__file__).parent}")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def compare(
    work: Path, rows: int, windows: int, fmt: str, repeat: int = 1, conversions: int | None = None
) -> dict[str, dict[str, Any]]:
    """Many windows and one window, alternating ``repeat`` times; the medians."""
    files, whole = prepare(work, rows, windows, fmt)
    runs: dict[str, list[dict[str, Any]]] = {"many": [], "one": []}
    for _ in range(max(1, repeat)):
        runs["many"].append(measure(files, windows, work, conversions))
        runs["one"].append(measure([whole], windows, work, conversions))
    return {name: convert.median(results) for name, results in runs.items()}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, default=2_000_000)
    parser.add_argument("--windows", type=int, default=500)
    parser.add_argument("--format", default="json", choices=["json", "csv"])
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--work", type=Path, default=convert.ROOT / "data" / "bench")
    parser.add_argument(
        "--conversions",
        type=int,
        default=None,
        help="[api] conversions_at_once (default: the engine's default)",
    )
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        work, listing, hours, conversions = args.child
        sources = [Path(line) for line in Path(listing).read_text().splitlines()]
        child(Path(work), sources, int(hours), int(conversions) or None)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    result = compare(args.work, args.rows, args.windows, args.format, args.repeat, args.conversions)
    many, one = result["many"], result["one"]
    for name, r in result.items():
        print(name, r)
    if "error" not in many and "error" not in one:
        print(f"concurrency: conversions_at_once = {many['conversions_at_once']}, "
              f"{many['workers']} windows landing at once (the engine's pool)")  # fmt: skip
        print(f"many / one: {many['seconds'] / one['seconds']:.2f}x (goal: at most 1.5x)")


if __name__ == "__main__":
    main()
