"""Helpers for running the engine against the simulator in-process, and checking its output."""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds

from backfill import ledgers, planner
from backfill.client import FlurryClient, Secret
from backfill.config import (
    POLICY_KEYS,
    ApiSettings,
    AppSettings,
    LedgerSettings,
    OutputSettings,
    Settings,
    WindowSettings,
)
from backfill.engine import Engine
from backfill.models import DAY_MS, HOUR_MS
from backfill.objstore import open_store
from backfill.policy import Policy
from backfill.simulator import AppProfile, SimulatorSettings, ground_truth, serve
from tests.pgserver import database_for
from tests.s3server import REGION, S3Root, new_root
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from collections.abc import AsyncIterator

    from backfill.simulator import Simulator

DAY = 86_400_000
APPS = (
    AppProfile(name="small", api_key="SMALL00000000000APP1", sessions_per_day=4, events_per_session=2),
    AppProfile(name="medium", api_key="MEDIUM000000000APP22", sessions_per_day=10, events_per_session=3),
    AppProfile(name="large", api_key="LARGE0000000000APP33", sessions_per_day=30, events_per_session=3,
               spike_every_days=20, spike_factor=6, too_large_rows=900),
)  # fmt: skip


def sim_settings(**changes: Any) -> SimulatorSettings:
    base: dict[str, Any] = {
        "token": TOKEN,
        "seed": 5,
        "apps": APPS,
        "latency_base_s": 0.0,
        "latency_per_krow_s": 0.0,
        "max_processing": 100,
        "retry_after_s": 0,
        "refill_per_minute": 60_000,
        "too_large_phrasings": ("canonical", "days", "adverb", "article", "iso", "millis"),
    }
    return SimulatorSettings(**(base | changes))


def engine_settings(
    base_url: str,
    root: Path,
    *,
    history_days: int = 730,
    fmt: str = "JSON",
    apps: tuple[AppProfile, ...] = APPS,
    ledger: Path | None = None,
    lookback_days: int = 3,
    **api: Any,
) -> Settings:
    api_fields: dict[str, Any] = {
        "base_url": base_url,
        "token_env": "FLURRY_TOKEN",
        "format": fmt,
        "max_in_flight": 4,
        "calls_per_minute": 100_000,
        "poll_initial_s": 0.01,
        "poll_min_s": 0.005,
        "poll_max_s": 0.5,
        "max_attempts": 12,
        "backoff_base_s": 0.01,
        "backoff_cap_s": 0.2,
    }
    fields = api_fields | api
    numbers = {k: fields.pop(k) for k in POLICY_KEYS if k in fields}
    return Settings(
        api=ApiSettings(**fields),
        policy=Policy(**numbers),
        windows=WindowSettings(
            history_days=history_days, lag_hours=24, lookback_days=lookback_days
        ),
        output=_output(root),
        ledger=_ledger(root, ledger),
        apps=tuple(AppSettings(name=a.name, api_key=a.api_key) for a in apps),
    )


# BACKFILL_TEST_STORE=s3: every output root these helpers build is a bucket on the loopback S3
# server instead (one per local root, so runs on one root share it), its ledger and staging
# in the local folder.  ``landed`` reads it back from there.
_S3_ROOTS: dict[Path, S3Root] = {}


def _on_s3() -> bool:
    return os.environ.get("BACKFILL_TEST_STORE") == "s3"


def _output(root: Path) -> OutputSettings:
    if not _on_s3():
        return OutputSettings(root=root)
    s3 = _S3_ROOTS.get(root) or _S3_ROOTS.setdefault(root, new_root())
    return OutputSettings(root=s3.uri, endpoint_url=s3.endpoint_url, region=REGION,
                          staging=root / "_staging_local")  # fmt: skip


# BACKFILL_TEST_LEDGER=postgres: every ledger these helpers build is a database of a throwaway
# PostgreSQL cluster instead (one per output root, so runs on one root share it), with a short
# lease so that a run after a killed one takes its windows over in seconds.
def _on_postgres() -> bool:
    return os.environ.get("BACKFILL_TEST_LEDGER") == "postgres"


def _ledger(root: Path, path: Path | None) -> LedgerSettings:
    if _on_postgres():
        return LedgerSettings(url=database_for(str(root)), lease_s=PG_LEASE_S)
    return LedgerSettings(path=path if path or not _on_s3() else root / "_ledger.sqlite")


PG_LEASE_S = 2.0


def ledger_lines(work: Path) -> list[str]:
    """The ``[ledger]`` table of a CLI config for ``work`` (none: the default SQLite file)."""
    if not _on_postgres():
        return []
    return ["[ledger]", f'url = "{database_for(str(work / "out"))}"', f"lease_s = {PG_LEASE_S}"]


@contextlib.asynccontextmanager
async def engine(settings: Settings, **kwargs: Any) -> AsyncIterator[Engine]:
    async with (
        ledgers.opened(settings) as ledger,
        FlurryClient(base_url=settings.api.base_url, token=Secret(TOKEN)) as api,
    ):
        yield Engine(settings=settings, ledger=ledger, store=open_store(settings), api=api,
                     **kwargs)  # fmt: skip


@contextlib.asynccontextmanager
async def simulator(sim: SimulatorSettings) -> AsyncIterator[tuple[Simulator, str]]:
    async with serve(sim) as served:
        yield served


def landed(root: Path | str, app: str) -> list[str]:
    """The rows landed for ``app``, each as a canonical JSON string, sorted (read from the
    bucket for an S3 root, or a local root that ``BACKFILL_TEST_STORE=s3`` put on one)."""
    s3 = next((r for r in _S3_ROOTS.values() if r.uri == root), None)
    s3 = _S3_ROOTS.get(root) if isinstance(root, Path) else s3
    if s3 is not None or isinstance(root, str):
        assert s3 is not None, f"{root}: not a bucket these helpers made"
        fs = s3.filesystem()
        key = f"{s3.uri.removeprefix('s3://')}/events/app={app}"
        if not s3.keys(f"events/app={app}"):
            return []
        table = ds.dataset(key, format="parquet", filesystem=fs).to_table()
    else:
        path = root / "events" / f"app={app}"
        if not path.exists():
            return []
        table = ds.dataset(path, format="parquet").to_table()
    return canonical(table.to_pylist())


def canonical(rows: list[dict[str, Any]]) -> list[str]:
    """Landed rows as canonical JSON strings (the simulator's ground truth's shape), sorted."""
    out = []
    for row in rows:
        row["sessionTimestamp"] = int(row["sessionTimestamp"].timestamp() * 1000)
        del row["eventTimestamp"]
        for name in ("deviceIdentifiers", "eventParameters", "sessionProperties"):
            row[name] = dict(row[name]) if row[name] is not None else None
        out.append(json.dumps(row, sort_keys=True))
    return sorted(out)


def planned_ranges(began_ms: int, history_days: int) -> list[tuple[int, int]]:
    """The ranges runs started since ``began_ms`` may have planned (``history_days`` back, to
    yesterday's end): one, or two when a UTC midnight fell since then, for the plan follows the
    day of its clock.  A test asserts its rows are exactly one of them."""
    ranges: list[tuple[int, int]] = []
    for now in (began_ms, int(time.time() * 1000)):
        start = max(planner.floor_midnight(now - history_days * DAY_MS, dt.UTC),
                    planner.horizon_start(now))  # fmt: skip
        span = (start, planner.range_end(now, 24 * HOUR_MS))
        if span not in ranges:
            ranges.append(span)
    return ranges


def matching(got: list[str], truths: list[list[str]]) -> list[str]:
    """The truth ``got`` equals, if any; else the last one (so the assertion shows the diff)."""
    return next((t for t in truths if t == got), truths[-1])


def truth(sim: SimulatorSettings, app: str, start: int, end: int) -> list[str]:
    api_key = next(a.api_key for a in APPS if a.name == app)
    return sorted(json.dumps(r, sort_keys=True) for r in ground_truth(sim, api_key, start, end))


@contextlib.asynccontextmanager
async def simulator_process(sim: SimulatorSettings, work: Path) -> AsyncIterator[tuple[str, Path]]:
    """The simulator in a real subprocess (it outlives killed runs); yields its URL and call log."""
    import sys

    import anyio

    from tests.simkit import to_toml

    config = work / "simulator.toml"
    config.write_text(to_toml(sim))
    calls = work / "calls.jsonl"
    command = [
        sys.executable,
        "-m",
        "backfill.cli",
        "simulate",
        "--config",
        str(config),
        "--port",
        "0",
        "--log-file",
        str(calls),
    ]
    async with await anyio.open_process(command, cwd=ROOT) as process:
        assert process.stdout is not None
        first = (await process.stdout.receive()).decode().splitlines()[0]
        base = first.rsplit(" ", 1)[-1]
        try:
            yield base, calls
        finally:
            process.terminate()
            await process.wait()


ROOT = __file__.rsplit("/tests/", 1)[0]


def write_config(
    work: Path,
    base: str,
    *,
    history_days: int,
    extra_api: str = "",
    apps: tuple[AppProfile, ...] = APPS,
    lookback_days: int = 3,
) -> Path:
    """A real config file for the CLI, its token in $FLURRY_TOKEN."""
    api = {
        "base_url": f'"{base}"',
        "token_env": '"FLURRY_TOKEN"',
        "max_in_flight": "4",
        "calls_per_minute": "100000",
        "poll_initial_s": "0.05",
        "poll_min_s": "0.02",
        "poll_max_s": "0.5",
        "conversions_at_once": "2",
    }
    for line in extra_api.splitlines():  # extra lines override the defaults above
        if "=" in line:
            key, value = (part.strip() for part in line.split("=", 1))
            api[key] = value
    lines = [
        "[api]",
        *(f"{k} = {v}" for k, v in api.items()),
        "[windows]",
        f"history_days = {history_days}",
        "lag_hours = 24",
        f"lookback_days = {lookback_days}",
        "[output]",
        f'root = "{work / "out"}"',
        *ledger_lines(work),
    ]
    lines += [
        line
        for app in apps
        for line in ("[[apps]]", f'name = "{app.name}"', f'api_key = "{app.api_key}"')
    ]
    path = work / "backfill.toml"
    path.write_text("\n".join(lines) + "\n")
    return path
