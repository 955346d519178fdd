"""The crash sweep: SIGKILL a real ``backfill run`` at its k-th I/O step, for every k.

The steps are the ``crashpoints`` the code names: each submit (before it is sent, and after
Flurry accepted it but before the ledger knows), each status poll, each download chunk, each
decoded block, each Parquet file written and fsynced, the manifest, each publish rename, each
ledger move and split.  A clean run first counts them; then for every k a fresh run is killed at
step k and run again to the end, and its output must equal the ground truth, verify must pass,
and no file may be left over.  Small downloads convert in a worker process (``convertpool``),
whose steps are hit in the run when it returns; the backfill's sweep runs again with them on
the run's threads.  Slow (minutes): ``make test-crash``, which CI runs too.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import json
import os
import shutil
import signal
import sys
import time
from collections import Counter
from typing import TYPE_CHECKING

import anyio
import pytest

from backfill import planner
from backfill.models import DAY_MS, HOUR_MS
from backfill.simulator import AppProfile
from tests.enginekit import ROOT, landed, sim_settings, simulator_process, truth, write_config
from tests.pgserver import copy_database
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from pathlib import Path

SMALL = AppProfile(
    name="small", api_key="SMALL00000000000APP1", sessions_per_day=4, events_per_session=2
)
SPLITS = AppProfile(
    name="large",
    api_key="LARGE0000000000APP33",
    sessions_per_day=30,
    events_per_session=3,
    too_large_rows=150,
)
APPS = (SMALL, SPLITS)
SERIAL = "max_in_flight = 1\ndownloads_at_once = 1\nconversions_at_once = 1"  # one order of steps
ENV = os.environ | {"FLURRY_TOKEN": TOKEN}


async def _sweep_range(margin_s: float = 15 * 60) -> tuple[int, int]:
    """The range (start, end) every run of a sweep plans, with ``history_days=4``, as of now.

    A UTC midnight due within ``margin_s`` is waited out first (a sweep takes about 5
    minutes): every run plans its range from the clock, and the ground truth is this range.
    """
    left = DAY_MS / 1000 - time.time() % (DAY_MS / 1000)
    if left < margin_s:
        await anyio.sleep(left + 5)
    now = int(time.time() * 1000)
    start = max(planner.floor_midnight(now - 4 * DAY_MS, dt.UTC), planner.horizon_start(now))
    return start, planner.range_end(now, 24 * HOUR_MS)


def _still_the_same_day(end: int) -> None:
    """Fail plainly, not with a diff of rows, if the runs planned a later range than the truth."""
    assert planner.range_end(int(time.time() * 1000), 24 * HOUR_MS) == end, (
        "the sweep crossed a UTC midnight: its runs planned another range than the ground truth's"
    )


async def _backfill(work: Path, *args: str, env: dict[str, str] | None = None) -> int:
    done = await anyio.run_process([sys.executable, "-m", "backfill.cli", *args, "--config", str(work / "backfill.toml")],
                                   cwd=ROOT, env=env or ENV, check=False)  # fmt: skip
    return done.returncode


# Small downloads convert in a worker process by default; the backfill's sweep runs again with
# them on the run's threads, on SQLite (the ledger plays no part in where a conversion runs).
_WHERE = ["processes"] if os.environ.get("BACKFILL_TEST_LEDGER") == "postgres" else [
    "processes", "threads"]  # fmt: skip


@pytest.mark.crash
@pytest.mark.timeout(1800)
@pytest.mark.parametrize("where", _WHERE)
async def test_a_kill_at_every_io_step_ends_exactly_right(tmp_path: Path, where: str) -> None:
    serial = SERIAL + ("\nconversion_processes = false" if where == "threads" else "")
    sim = sim_settings(apps=APPS)
    start, end = await _sweep_range()
    async with simulator_process(sim, tmp_path) as (base, _):
        counting = tmp_path / "count"
        counting.mkdir()
        write_config(counting, base, history_days=4, extra_api=serial, apps=APPS, lookback_days=0)
        counts_file = counting / "counts.json"
        assert (
            await _backfill(
                counting, "run", "--quiet", env=ENV | {"BACKFILL_CRASH_COUNTS": str(counts_file)}
            )
            == 0
        )
        steps: Counter[str] = Counter(json.loads(counts_file.read_text()))
        total = sum(steps.values())
        results: dict[int, str] = {}
        limiter = anyio.CapacityLimiter(2)

        async def sweep(k: int) -> None:
            async with limiter:
                work = tmp_path / f"k{k}"
                work.mkdir()
                write_config(
                    work, base, history_days=4, extra_api=serial, apps=APPS, lookback_days=0
                )
                killed = await _backfill(
                    work, "run", "--quiet", env=ENV | {"BACKFILL_CRASH_AT": str(k)}
                )
                finished = await _backfill(work, "run", "--quiet")
                verified = await _backfill(work, "verify")
                problems = []
                if killed != -signal.SIGKILL:
                    problems.append(f"not killed ({killed})")
                if finished != 0 or verified != 0:
                    problems.append(f"rerun {finished}, verify {verified}")
                problems += [
                    f"{app.name} differs from the ground truth"
                    for app in APPS
                    if landed(work / "out", app.name) != expected[app.name]
                ]
                leftovers = [
                    *(p for p in (work / "out").glob("_staging/**/*") if p.is_file()),
                    *(work / "out").glob("_downloads/*/*"),
                ]
                if leftovers:
                    problems.append(f"left over: {leftovers[:3]}")
                results[k] = "; ".join(problems) or "ok"

        expected = {app.name: truth(sim, app.name, start, end) for app in APPS}
        assert all(expected.values()), "the sweep needs rows to land"
        for app in APPS:
            assert landed(counting / "out", app.name) == expected[app.name]
        async with anyio.create_task_group() as group:
            for k in range(1, total + 1):
                group.start_soon(sweep, k)
    _still_the_same_day(end)
    bad = {k: r for k, r in results.items() if r != "ok"}
    print(
        f"\ncrash sweep: {total} steps ({dict(sorted(steps.items()))}); {total - len(bad)} ended exactly right"
    )
    assert len(results) == total and steps["client.download.chunk"] and steps["ledger.split"]
    assert bad == {}


def _nightly_apps(end: int) -> tuple[AppProfile, ...]:
    """The same apps the night after: the last two days grew, and both are refused sooner."""
    day = (end - 2 * DAY_MS) // DAY_MS
    return (
        dataclasses.replace(SMALL, too_large_rows=40, growth_from_day=day, growth_factor=3.0),
        dataclasses.replace(SPLITS, growth_from_day=day, growth_factor=3.0),
    )


@pytest.mark.crash
@pytest.mark.timeout(1800)
async def test_a_kill_at_every_step_of_a_nightly_sync_with_splits_ends_exactly_right(
    tmp_path: Path,
) -> None:
    """Backfill, then the API's recent data grows past its too-large threshold, then ``sync``:
    the committed windows it pulls again are refused and split, and their children replace
    them whole.  Every step of that sync, the swap included, is a kill point."""
    start, end = await _sweep_range()
    template = tmp_path / "template"
    template.mkdir()
    async with simulator_process(sim_settings(apps=APPS), template) as (base, _):
        write_config(template, base, history_days=4, extra_api=SERIAL, apps=APPS, lookback_days=0)
        assert await _backfill(template, "run", "--quiet") == 0
    night = sim_settings(apps=_nightly_apps(end))
    expected = {app.name: truth(night, app.name, start, end) for app in APPS}
    async with simulator_process(night, tmp_path) as (base, calls):

        def copy(name: str) -> Path:
            work = tmp_path / name
            shutil.copytree(template / "out", work / "out")
            if os.environ.get("BACKFILL_TEST_LEDGER") == "postgres":  # the ledger goes too
                copy_database(str(template / "out"), str(work / "out"))
            write_config(work, base, history_days=4, extra_api=SERIAL, apps=APPS)
            return work

        counting = copy("count")
        counts_file = counting / "counts.json"
        env = ENV | {"BACKFILL_CRASH_COUNTS": str(counts_file)}
        assert await _backfill(counting, "sync", "--quiet", env=env) == 0
        assert all(landed(counting / "out", a.name) == expected[a.name] for a in APPS)
        refused = [json.loads(line) for line in calls.read_text().splitlines()]
        assert any(c["kind"] == "submit" and c["status"] == 400 for c in refused), "splits"
        steps: Counter[str] = Counter(json.loads(counts_file.read_text()))
        total = sum(steps.values())
        results: dict[int, str] = {}
        limiter = anyio.CapacityLimiter(2)

        async def sweep(k: int) -> None:
            async with limiter:
                work = copy(f"k{k}")
                killed = await _backfill(
                    work, "sync", "--quiet", env=ENV | {"BACKFILL_CRASH_AT": str(k)}
                )
                finished = await _backfill(work, "sync", "--quiet")
                verified = await _backfill(work, "verify")
                problems = [f"not killed ({killed})"] if killed != -signal.SIGKILL else []
                if finished != 0 or verified != 0:
                    problems.append(f"rerun {finished}, verify {verified}")
                problems += [f"{a.name} differs from the ground truth" for a in APPS
                             if landed(work / "out", a.name) != expected[a.name]]  # fmt: skip
                results[k] = "; ".join(problems) or "ok"

        async with anyio.create_task_group() as group:
            for k in range(1, total + 1):
                group.start_soon(sweep, k)
    _still_the_same_day(end)
    bad = {k: r for k, r in results.items() if r != "ok"}
    print(f"\nnightly crash sweep: {total} steps ({dict(sorted(steps.items()))}); "
          f"{total - len(bad)} ended exactly right")  # fmt: skip
    assert len(results) == total and steps["ledger.split"]
    assert bad == {}
