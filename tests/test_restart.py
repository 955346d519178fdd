"""Kill a real ``backfill run`` with SIGKILL at seeded moments; the next run finishes the job."""

from __future__ import annotations

import json
import os
import random
import signal
import sys
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from backfill import config
from tests.enginekit import (
    APPS,
    ROOT,
    landed,
    matching,
    planned_ranges,
    sim_settings,
    simulator_process,
    truth,
    write_config,
)
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import Process

HISTORY_DAYS = 90


def _calls(log: Path) -> int:
    """How many calls the simulator has logged so far (one JSON line each)."""
    return log.read_bytes().count(b"\n") if log.exists() else 0


async def _work_started(process: Process, log: Path, calls: int) -> None:
    """Return once the simulator has logged ``calls`` calls in all, or the run has ended."""
    with anyio.fail_after(60):
        # The signal is a file another process writes: there is no event to await, so poll it.
        while process.returncode is None and _calls(log) < calls:  # noqa: ASYNC110  # see above
            await anyio.sleep(0.02)


@pytest.mark.timeout(420)
async def test_ten_kills_then_a_clean_run_lands_exactly_the_truth_without_resubmitting(
    tmp_path: Path,
) -> None:
    sim = sim_settings(latency_base_s=0.4, latency_per_krow_s=0.2)  # requests take real time
    env = os.environ | {"FLURRY_TOKEN": TOKEN}
    rng = random.Random(20261126)
    kills = 0
    starts: list[int] = []  # where each run's calls begin in the simulator's log
    began = int(time.time() * 1000)  # the runs plan by their clock's day: from here on
    async with simulator_process(sim, tmp_path) as (base, calls_path):
        config_path = write_config(tmp_path, base, history_days=HISTORY_DAYS)
        command = [
            sys.executable,
            "-m",
            "backfill.cli",
            "run",
            "--config",
            str(config_path),
            "--quiet",
        ]
        for _ in range(10):
            seen = _calls(calls_path)
            starts.append(seen)
            async with await anyio.open_process(command, cwd=ROOT, env=env) as process:
                # Kill at a seeded moment of real work: once this run's k-th call reached the API.
                await _work_started(process, calls_path, seen + rng.randint(1, 12))
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                    kills += 1
                code = await process.wait()
                assert code in (0, -signal.SIGKILL), code
        starts.append(_calls(calls_path))
        done = await anyio.run_process(command, cwd=ROOT, env=env, check=False)
        assert done.returncode == 0, done.stderr.decode()
        verified = await anyio.run_process([sys.executable, "-m", "backfill.cli", "verify", "--config", str(config_path)],
                                           cwd=ROOT, env=env, check=False)  # fmt: skip
        assert verified.returncode == 0, verified.stdout.decode()
    assert kills >= 8, "the runs must really be killed mid-way"
    ranges = planned_ranges(began, HISTORY_DAYS)
    for app in APPS:
        got = landed(tmp_path / "out", app.name)
        truths = [truth(sim, app.name, start, end) for start, end in ranges]
        assert got == matching(got, truths), app.name

    # Re-attach, not resubmit: once a request of a window was seen processing, the window is
    # never POSTed again unless that request was seen finished.
    calls = [json.loads(line) for line in calls_path.read_text().splitlines()]
    processing: dict[tuple[str, int, int], set[str]] = {}
    resubmitted_while_processing = []
    for call in calls:
        key = (call["api_key"], call["start_ms"], call["end_ms"])
        if call["kind"] == "submit" and call["status"] == 200:
            if processing.get(key):
                resubmitted_while_processing.append((key, sorted(processing[key])))
        elif call["kind"] == "status" and call["status"] == 200:
            pending = processing.setdefault(key, set())
            if call["outcome"] == "Acknowledged":
                pending.add(call["request_id"])
            else:
                pending.discard(call["request_id"])
    assert resubmitted_while_processing == []
    # A kill can lose only the requests whose POST was answered but whose id had not reached
    # the ledger: never polled by any run, at most max_in_flight at once, none in the last run.
    run_of = [max(i for i, start in enumerate(starts) if start <= at) for at in range(len(calls))]
    polled = {c["request_id"] for c in calls if c["kind"] == "status"}
    lost_by_run = [0] * len(starts)
    for at, call in enumerate(calls):
        if call["kind"] == "submit" and call["status"] == 200 and call["request_id"] not in polled:
            lost_by_run[run_of[at]] += 1
    assert lost_by_run[-1] == 0, lost_by_run
    assert max(lost_by_run) <= config.load(config_path).api.max_in_flight, lost_by_run
    # Any other new request for a window follows a kill that lost the landing of its last one
    # (a kill in DOWNLOADED or STAGED): never in the run that last touched that request.
    last_run: dict[str, int] = {}
    latest: dict[tuple[str, int, int], str] = {}
    for at, call in enumerate(calls):
        key = (call["api_key"], call["start_ms"], call["end_ms"])
        if call["kind"] == "submit" and call["status"] == 200:
            before = latest.get(key)
            if before is not None and before in polled:
                assert last_run[before] < run_of[at], (key, before, call["request_id"])
            latest[key] = call["request_id"]
        if call.get("request_id") is not None:
            last_run[call["request_id"]] = run_of[at]
