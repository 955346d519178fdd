"""Scale benchmark: 1, 2 and 4 workers on one plan, one PostgreSQL ledger.

Each worker is a real ``backfill run`` process; all share one PostgreSQL ledger (a throwaway
cluster this script starts) and one output root, against the simulator in its own process.

- **API-bound**: the simulator lets C requests process at once and takes T seconds for each;
  N one-day windows cannot finish sooner than ``ceil(N / C) * T``, however many workers share
  the token.  The figure is the makespan against that bound: more workers must not do worse
  (nor exceed the cap: the 429s are counted).
- **Conversion-bound**: large apps, requests ready at once: the work is converting downloads,
  which more workers spread over the machine's cores.  The figure is the makespan against one
  worker's, from the same run.

Usage::

    python benchmarks/scale.py                # both cases, 1, 2 and 4 workers
    python benchmarks/scale.py --quick        # smaller, for a smoke run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from backfill.simulator import AppProfile, SimulatorSettings  # noqa: E402
from tests.pgserver import PgServer, _start, _stop  # noqa: E402
from tests.simkit import to_toml  # noqa: E402

TOKEN = "scale-benchmark-token"


@dataclass(frozen=True)
class Case:
    name: str
    apps: tuple[AppProfile, ...]
    days: int  # history: one-day windows per app
    cap: int  # requests processing at once (the simulator's and the workers' shared cap)
    seconds: float  # each request's processing time
    conversions: int  # conversions at once per worker


def _apps(count: int, sessions: int, events: int) -> tuple[AppProfile, ...]:
    return tuple(
        AppProfile(name=f"s{i:02d}", api_key=f"SCALE{i:015d}", sessions_per_day=sessions,
                   events_per_session=events)
        for i in range(count)
    )  # fmt: skip


def cases(quick: bool) -> list[Case]:
    api_days, cpu_days = (6, 4) if quick else (12, 8)
    return [
        Case("API-bound", _apps(4, 4, 2), api_days, cap=4, seconds=1.0, conversions=1),
        Case("conversion-bound", _apps(4, 3000, 6), cpu_days, cap=16, seconds=0.0,
             conversions=1),
    ]  # fmt: skip


def _simulator(case: Case, work: Path) -> tuple[subprocess.Popen[bytes], str, Path]:
    sim = SimulatorSettings(token=TOKEN, seed=7, apps=case.apps, max_processing=case.cap,
                            latency_base_s=case.seconds, latency_per_krow_s=0.0,
                            retry_after_s=1)  # fmt: skip
    config, calls = work / "simulator.toml", work / "calls.jsonl"
    config.write_text(to_toml(sim))
    command = [sys.executable, "-m", "backfill.cli", "simulate", "--config", str(config),
               "--port", "0", "--log-file", str(calls)]  # fmt: skip
    process = subprocess.Popen(command, cwd=ROOT, stdout=subprocess.PIPE)
    assert process.stdout is not None
    base = process.stdout.readline().decode().split()[-1]
    return process, base, calls


def _config(case: Case, work: Path, base: str, url: str) -> Path:
    lines = [
        "[api]", f'base_url = "{base}"', 'token_env = "FLURRY_TOKEN"',
        f"max_in_flight = {case.cap}", "calls_per_minute = 100000",
        "poll_initial_s = 0.05", "poll_min_s = 0.05", "poll_max_s = 0.2",
        f"conversions_at_once = {case.conversions}",
        "[windows]", f"history_days = {case.days}", "lag_hours = 24", "max_days = 1",
        "[output]", f'root = "{work / "out"}"',
        "[ledger]", f'url = "{url}"', "lease_s = 30",
    ]  # fmt: skip
    for app in case.apps:
        lines += ["[[apps]]", f'name = "{app.name}"', f'api_key = "{app.api_key}"']
    path = work / "backfill.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def makespan(case: Case, workers: int, server: PgServer, work: Path) -> dict[str, float]:
    """Seconds from the first worker's start to the last one's end, and what the API saw."""
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sim, base, calls = _simulator(case, work)
    try:
        config = _config(case, work, base, server.url(server.create_database()))
        env = os.environ | {"FLURRY_TOKEN": TOKEN}
        command = [sys.executable, "-m", "backfill.cli", "run", "--config", str(config), "--quiet"]
        began = time.perf_counter()
        runs = [subprocess.Popen(command, cwd=ROOT, env=env, stdout=subprocess.DEVNULL,
                                 stderr=subprocess.PIPE) for _ in range(workers)]  # fmt: skip
        failed = [run.communicate()[1].decode()[-500:] for run in runs if run.wait() != 0]
        wall = time.perf_counter() - began
        if failed:
            raise SystemExit(f"{case.name}, {workers} workers: a worker failed: {failed[0]}")
    finally:
        sim.terminate()
        sim.wait()
    log = [json.loads(line) for line in calls.read_text().splitlines()]
    submits = [c for c in log if c["kind"] == "submit" and c["status"] == 200]
    return {
        "seconds": wall,
        "windows": float(len(submits)),
        "rate_limited": float(sum(1 for c in log if c["status"] == 429)),
    }


def run(quick: bool, counts: list[int]) -> list[tuple[str, str, str, str]]:
    """Every case at every worker count; rows of (case, workers, figure, against)."""
    base = Path(tempfile.mkdtemp(prefix="backfill-scale-pg-"))
    rows = []
    try:
        server = _start(base)
        for case in cases(quick):
            results = {n: makespan(case, n, server, base / "work") for n in counts}
            one = results[counts[0]]["seconds"]
            for n, got in results.items():
                windows = int(got["windows"])
                if case.seconds:
                    bound = math.ceil(windows / case.cap) * case.seconds
                    shape = f"ceil({windows}/{case.cap})*{case.seconds:g}"
                    against = f"bound {bound:.1f} s ({shape}): x{got['seconds'] / bound:.2f}"
                else:
                    against = f"1 worker {one:.1f} s: x{got['seconds'] / one:.2f}"
                limited = int(got["rate_limited"])
                figure = f"{got['seconds']:.1f} s, {windows} windows, {limited} x 429"
                rows.append((case.name, str(n), figure, against))
    finally:
        _stop(base)
        shutil.rmtree(base, ignore_errors=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller cases (a smoke run)")
    parser.add_argument("--workers", default="1,2,4", help="worker counts (default 1,2,4)")
    args = parser.parse_args()
    rows = run(args.quick, [int(n) for n in args.workers.split(",")])
    print(f"{'case':18} {'workers':>7}  {'makespan':34} against")
    for case, n, figure, against in rows:
        print(f"{case:18} {n:>7}  {figure:34} {against}")


if __name__ == "__main__":
    main()
