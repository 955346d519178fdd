"""Makespan benchmark: how close the engine gets to the API's own limit.

The simulator lets C requests process at once and takes T seconds for each; N one-day windows
of a small app cannot finish sooner than ``ceil(N / C) * T``.  This script runs the engine
against it and, in the same process, a naive baseline shaped like the public Flurry scripts
(one window at a time, a fixed poll interval), and prints wall time against that lower bound,
API calls per window by kind, and the 429s each caused.  Usage::

    python benchmarks/makespan.py --cap 4 --seconds 2 --windows 40
"""

from __future__ import annotations

import argparse
import asyncio
import math
import shutil
import tempfile
import time
from pathlib import Path

from backfill import logs
from backfill.client import FlurryClient, Secret
from backfill.config import ApiSettings, AppSettings, OutputSettings, Settings, WindowSettings
from backfill.engine import Engine
from backfill.ledger import Ledger
from backfill.models import DAY_MS, Window
from backfill.policy import Policy
from backfill.protocol import Processing
from backfill.simulator import AppProfile, SimulatorSettings, serve
from backfill.store import LocalStore

TOKEN = "makespan-benchmark-token"
APP = AppProfile(
    name="bench", api_key="BENCH000000000000APP", sessions_per_day=6, events_per_session=2
)


def _simulator(cap: int, seconds: float) -> SimulatorSettings:
    return SimulatorSettings(
        token=TOKEN,
        seed=3,
        apps=(APP,),
        max_processing=cap,
        latency_base_s=seconds,
        latency_per_krow_s=0.0,
        retry_after_s=1,
    )


def _range(windows: int) -> tuple[int, int]:
    end = (int(time.time() * 1000) // DAY_MS - 2) * DAY_MS
    return end - windows * DAY_MS, end


async def ours(base: str, root: Path, cap: int, windows: int, seconds: float) -> float:
    settings = Settings(
        api=ApiSettings(
            base_url=base,
            token_env="X",
            max_in_flight=cap,
            calls_per_minute=100_000,
            conversions_at_once=2,
            downloads_at_once=cap,
        ),
        policy=Policy(poll_initial_s=seconds / 4, poll_min_s=0.05, poll_max_s=seconds),
        windows=WindowSettings(max_days=1),
        output=OutputSettings(root=root),
        apps=(AppSettings(name=APP.name, api_key=APP.api_key),),
    )
    ledger = await Ledger.open(settings.ledger_path)
    began = time.perf_counter()
    async with FlurryClient(base_url=base, token=Secret(TOKEN)) as api:
        engine = Engine(settings=settings, ledger=ledger, store=LocalStore(root), api=api)
        start, end = _range(windows)
        await engine.plan(settings.apps, start, end)
        summary = await engine.run(settings.apps)
    await ledger.close()
    assert summary.committed == windows and summary.failed == 0, summary
    return time.perf_counter() - began


async def naive(base: str, root: Path, windows: int, seconds: float) -> float:
    """One window at a time: submit, poll every ``interval``, download, convert."""
    writer = LocalStore(root)
    began = time.perf_counter()
    start, _ = _range(windows)
    async with FlurryClient(base_url=base, token=Secret(TOKEN)) as api:
        for i in range(windows):
            window = Window(app=APP.name, start=start + i * DAY_MS, end=start + (i + 1) * DAY_MS)
            request_id = await api.submit(window, api_key=APP.api_key)
            # The public scripts' shape: a fixed sleep between polls.
            while isinstance(answer := await api.status(request_id, window=window), Processing):  # noqa: ASYNC110 - the baseline polls on purpose
                await asyncio.sleep(seconds / 4)
            target = root / f"{i}.gz"
            await api.download(answer.url, target, window=window, request_id=request_id)
            manifest = await asyncio.to_thread(
                writer.stage,
                app=APP.name,
                window_id=i,
                attempt=0,
                start_ms=window.start,
                end_ms=window.end,
                source=target,
            )
            await asyncio.to_thread(writer.publish, manifest)
    return time.perf_counter() - began


async def measure(args: argparse.Namespace) -> None:
    lower = math.ceil(args.windows / args.cap) * args.seconds
    rows = []
    for name in ("ours", "naive"):
        work = Path(tempfile.mkdtemp(prefix=f"makespan-{name}-"))
        try:
            async with serve(_simulator(args.cap, args.seconds)) as (sim, base):
                if name == "ours":
                    wall = await ours(
                        base, work, args.in_flight or args.cap, args.windows, args.seconds
                    )
                else:
                    wall = await naive(base, work, args.windows, args.seconds)
                by_kind = {
                    k: sum(1 for c in sim.calls if c.kind == k)
                    for k in ("submit", "status", "download")
                }
                refused = sum(1 for c in sim.calls if c.status == 429)
                rows.append((name, wall, by_kind, refused))
        finally:
            shutil.rmtree(work, ignore_errors=True)
    print(
        f"our max_in_flight={args.in_flight or args.cap}, "
        f"cap C={args.cap}, processing T={args.seconds:g} s, windows N={args.windows}: "
        f"lower bound ceil(N/C)*T = {lower:.1f} s"
    )
    print(
        f"{'':6} {'wall s':>7} {'vs bound':>9} {'submit/w':>9} {'status/w':>9} "
        f"{'download/w':>11} {'429s':>5}"
    )
    for name, wall, by_kind, limited in rows:
        n = args.windows
        print(
            f"{name:6} {wall:>7.1f} {wall / lower:>8.2f}x {by_kind['submit'] / n:>9.2f} "
            f"{by_kind['status'] / n:>9.2f} {by_kind['download'] / n:>11.2f} {limited:>5}"
        )
    ours_wall, naive_wall = rows[0][1], rows[1][1]
    print(f"naive / ours wall time: {naive_wall / ours_wall:.1f}x")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--cap", type=int, default=4, help="requests processing at once (C)")
    parser.add_argument(
        "--seconds", type=float, default=2.0, help="processing time per request (T)"
    )
    parser.add_argument("--windows", type=int, default=40, help="one-day windows to fetch (N)")
    parser.add_argument(
        "--in-flight",
        type=int,
        default=0,
        help="our configured max_in_flight (default: C); above C shows the 429 handling",
    )
    args = parser.parse_args()
    logs.configure(fmt="json", level="warning")
    asyncio.run(measure(args))


if __name__ == "__main__":
    main()
