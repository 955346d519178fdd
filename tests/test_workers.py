"""Many workers, one PostgreSQL ledger, output on S3: exact, within one budget, and safe when
workers die or hang.

Four real ``backfill run`` processes share one plan of 100 apps (120 days by default; two years
with ``BACKFILL_TEST_WORKERS_DAYS=730``), against the simulator in its own process, a throwaway PostgreSQL cluster and moto's S3 server on loopback.
Two are SIGKILLed mid-run and one is SIGSTOPped past its lease, then resumed.  The others take
the dead workers' windows over; the resumed one finds its windows taken and commits nothing
stale.  At the end the rows on S3 are exactly the simulator's, each once, ``verify`` is clean,
and the simulator never refused a submit for being over its processing cap: the cap the
workers share through the ledger was never exceeded.
"""

from __future__ import annotations

import json
import os
import re
import signal
import sys
import time
from typing import TYPE_CHECKING

import anyio
import pyarrow.dataset as ds
import pytest

from backfill.simulator import AppProfile, ground_truth
from tests.enginekit import (
    ROOT,
    canonical,
    matching,
    planned_ranges,
    sim_settings,
    simulator_process,
)
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from pathlib import Path

    from anyio.abc import Process

    from tests.s3server import S3Root

APPS = tuple(
    AppProfile(name=f"app{i:03d}", api_key=f"APP{i:017d}", sessions_per_day=2,
               events_per_session=1)
    for i in range(100)
)  # fmt: skip
CAP = 8  # requests processing at the simulator at once, shared by all workers
LEASE_S = 3.0
# Two years (730) is 2,500 windows: about half an hour on a shared 2-core machine, so the
# suite's default is 120 days (500 windows); BACKFILL_TEST_WORKERS_DAYS=730 runs the full span.
HISTORY_DAYS = int(os.environ.get("BACKFILL_TEST_WORKERS_DAYS", "120"))


def _config(work: Path, base: str, pg_url: str, s3: S3Root) -> Path:
    lines = [
        "[api]",
        f'base_url = "{base}"',
        'token_env = "FLURRY_TOKEN"',
        f"max_in_flight = {CAP}",
        "calls_per_minute = 100000",
        "poll_initial_s = 0.05",
        "poll_min_s = 0.02",
        "poll_max_s = 0.3",
        "conversions_at_once = 1",
        "[windows]",
        f"history_days = {HISTORY_DAYS}",
        "lag_hours = 24",
        "[output]",
        f'root = "{s3.uri}"',
        f'endpoint_url = "{s3.endpoint_url}"',
        'region = "us-east-1"',
        f'staging = "{work / "staging"}"',
        "[ledger]",
        f'url = "{pg_url}"',
        f"lease_s = {LEASE_S}",
    ]
    for app in APPS:
        lines += ["[[apps]]", f'name = "{app.name}"', f'api_key = "{app.api_key}"']
    path = work / "backfill.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def _log_lines(path: Path) -> list[dict[str, object]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


async def _until_calls(log: Path, calls: int) -> None:
    with anyio.fail_after(120):
        # The simulator's call log is a file another process writes: poll it.
        while len(_log_lines(log)) < calls:  # noqa: ASYNC110  # no event to await
            await anyio.sleep(0.1)


def _landed(s3: S3Root, app: str) -> list[str]:
    base = s3.uri.removeprefix("s3://") + f"/events/app={app}"
    table = ds.dataset(base, filesystem=s3.filesystem(), format="parquet").to_table()
    return canonical(table.to_pylist())


@pytest.mark.timeout(1800)
async def test_four_workers_kills_and_a_pause_past_the_lease_land_exactly_once(
    tmp_path: Path, pg_url: str, s3_root: S3Root
) -> None:
    sim = sim_settings(apps=APPS, max_processing=CAP, latency_base_s=0.05,
                       too_large_phrasings=("canonical",))  # fmt: skip
    env = os.environ | s3_root.env | {"FLURRY_TOKEN": TOKEN}
    began = int(time.time() * 1000)  # the workers plan by their clock's day: from here on
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = _config(tmp_path, base, pg_url, s3_root)
        command = [sys.executable, "-m", "backfill.cli", "run", "--config", str(config)]
        workers: list[Process] = []
        logs = [tmp_path / f"worker{i}.log" for i in range(4)]
        for log in logs:
            with log.open("wb") as handle:  # the child keeps its own copy of the descriptor
                workers.append(await anyio.open_process(command, cwd=ROOT, env=env,
                                                        stdout=handle, stderr=handle))  # fmt: skip
        await _until_calls(calls, 6 * len(APPS))
        workers[0].send_signal(signal.SIGKILL)
        workers[1].send_signal(signal.SIGKILL)
        workers[2].send_signal(signal.SIGSTOP)
        await anyio.sleep(LEASE_S * 3)  # past its lease: the others take its windows over
        workers[2].send_signal(signal.SIGCONT)
        with anyio.fail_after(1500):
            codes = [await w.wait() for w in workers]
        assert codes[:2] == [-signal.SIGKILL, -signal.SIGKILL]
        assert codes[2:] == [0, 0], [log.read_text()[-3000:] for log in logs[2:]]
        verify = await anyio.run_process([*command[:3], "verify", "--config", str(config)],
                                          cwd=ROOT, env=env, check=False)  # fmt: skip
        assert verify.returncode == 0, verify.stdout.decode()[-3000:]
        status = await anyio.run_process([*command[:3], "status", "--config", str(config)],
                                          cwd=ROOT, env=env, check=False)  # fmt: skip
        shown = status.stdout.decode()
        assert status.returncode == 0 and "workers:" in shown, shown
        assert not re.search(r" [1-9][0-9]* windows?$", shown, re.M), "no lease left held"

    resumed = logs[2].read_text()
    assert "window.turn.stale" in resumed, "the paused worker's windows were taken over"
    submits = [c for c in _log_lines(calls) if c.get("kind") == "submit"]
    assert submits and not [c for c in submits if c.get("status") == 429], "over the shared cap"
    ranges = planned_ranges(began, HISTORY_DAYS)
    for app in APPS:
        truths = [sorted(json.dumps(r, sort_keys=True)
                         for r in ground_truth(sim, app.api_key, start, end))
                  for start, end in ranges]  # fmt: skip
        got = _landed(s3_root, app.name)
        assert got == matching(got, truths), app.name
