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
    began = int(time.time() * 1000)  # the runs plan by their clock's day: from here on
    async with simulator_process(sim, tmp_path) as (base, calls_path):
        config = write_config(tmp_path, base, history_days=HISTORY_DAYS)
        command = [sys.executable, "-m", "backfill.cli", "run", "--config", str(config), "--quiet"]
        for _ in range(10):
            seen = _calls(calls_path)
            async with await anyio.open_process(command, cwd=ROOT, env=env) as process:
                # Kill at a seeded moment of real work: once this run's k-th call reached the API.
                await _work_started(process, calls_path, seen + rng.randint(1, 12))
                if process.returncode is None:
                    process.send_signal(signal.SIGKILL)
                    kills += 1
                code = await process.wait()
                assert code in (0, -signal.SIGKILL), code
        done = await anyio.run_process(command, cwd=ROOT, env=env, check=False)
        assert done.returncode == 0, done.stderr.decode()
        verified = await anyio.run_process([sys.executable, "-m", "backfill.cli", "verify", "--config", str(config)],
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
    windows: dict[str, tuple[str, int, int]] = {}
    processing: dict[tuple[str, int, int], set[str]] = {}
    resubmitted_while_processing = []
    for call in calls:
        key = (call["api_key"], call["start_ms"], call["end_ms"])
        if call["kind"] == "submit" and call["status"] == 200:
            if processing.get(key):
                resubmitted_while_processing.append((key, sorted(processing[key])))
            windows[call["request_id"]] = key
        elif call["kind"] == "status" and call["status"] == 200:
            pending = processing.setdefault(key, set())
            if call["outcome"] == "Acknowledged":
                pending.add(call["request_id"])
            else:
                pending.discard(call["request_id"])
    assert resubmitted_while_processing == []
    # A kill can lose at most the request whose id had not reached the ledger yet.
    accepted = [c for c in calls if c["kind"] == "submit" and c["status"] == 200]
    assert len(accepted) <= len(set(windows.values())) + kills
