"""The life after the first backfill, against the simulator over loopback.

Each test backfills, changes what the API serves (late data, a lower too-large threshold, less
data, a stray row), runs the nightly job, and ends with the rows under ``events/`` equal to the
API's rows for the committed ranges, each once, and ``verify`` clean.
"""

from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Literal

import pytest

from backfill import audit
from backfill.models import DAY_MS, WindowRecord, WindowState
from backfill.simulator import AppProfile, Faults
from tests.enginekit import APPS, engine, engine_settings, landed, sim_settings, simulator, truth

if TYPE_CHECKING:
    from pathlib import Path

    from backfill.simulator import SimulatorSettings

S = WindowState
SMALL, MEDIUM = APPS[0], APPS[1]


def _grown(profile: AppProfile, from_ms: int, factor: float, too_large_rows: int = 0) -> AppProfile:
    return dataclasses.replace(profile, growth_from_day=from_ms // DAY_MS, growth_factor=factor,
                               too_large_rows=too_large_rows)  # fmt: skip


async def _backfill(base: str, root: Path, app: AppProfile = SMALL) -> tuple[int, int]:
    settings = engine_settings(base, root, history_days=60, apps=(app,), lookback_days=0)
    async with engine(settings) as run:
        start, end, _ = run.clamp(None, None)
        await run.plan(settings.apps, start, end)
        summary = await run.run(settings.apps)
    assert summary.failed == 0
    return start, end


async def _sync(
    base: str, root: Path, app: AppProfile = SMALL, **kwargs: object
) -> tuple[list[WindowRecord], list[audit.Problem]]:
    settings = engine_settings(base, root, history_days=60, apps=(app,))
    async with engine(settings, **kwargs) as run:
        await run.prepare_sync(settings.apps)
        await run.run(settings.apps)
        return await run.ledger.windows(), await audit.verify(run.ledger, run.store)


def _committed_truth(
    sim: SimulatorSettings, records: list[WindowRecord], app: AppProfile = SMALL
) -> list[str]:
    live = [r for r in records if r.committed_attempt is not None]
    return sorted(row for r in live for row in truth(sim, app.name, r.window.start, r.window.end))


async def test_a_grown_last_window_is_re_pulled_as_weeks_and_replaced_whole(tmp_path: Path) -> None:
    root = tmp_path / "out"
    async with simulator(sim_settings(apps=(SMALL,))) as (_, base):
        start, end = await _backfill(base, root)
    grown = sim_settings(apps=(_grown(SMALL, end - 10 * DAY_MS, 3.0, too_large_rows=300),))
    async with simulator(grown) as (served, base):
        records, problems = await _sync(base, root)
    refused = [c for c in served.calls if c.kind == "submit" and c.status == 400]
    assert refused, "the grown window was refused as too large"
    roots = [r for r in records if r.state is S.SPLIT]
    assert roots and all(r.committed_attempt is None for r in roots), "the old range is retired"
    assert all(r.state is S.COMMITTED for r in records if r.state is not S.SPLIT)
    assert problems == []
    assert landed(root, SMALL.name) == truth(grown, SMALL.name, start, end), "every row once"


async def test_the_oldest_window_failed_for_good_does_not_stop_late_data(tmp_path: Path) -> None:
    root = tmp_path / "out"
    sim = sim_settings(apps=(SMALL,))
    async with simulator(sim) as (_, base):
        settings = engine_settings(base, root, history_days=60, apps=(SMALL,), lookback_days=0)
        async with engine(settings) as run:
            start, end, _ = run.clamp(None, None)
            await run.plan(settings.apps, start, end)
            oldest = (await run.ledger.windows())[0]
            await run.ledger.advance(oldest, S.FAILED, error_class="RequestRejectedError",
                                     error_message="refused for good", retryable=False)  # fmt: skip
            await run.run(settings.apps)
    late = sim_settings(apps=(_grown(SMALL, end - 2 * DAY_MS, 2.0),))
    async with simulator(late) as (served, base):
        records, problems = await _sync(base, root)
    posts = [c for c in served.calls if c.kind == "submit" and c.status == 200]
    assert any(c.end_ms == end for c in posts), "the newest days were pulled again"
    assert next(r for r in records if r.id == oldest.id).state is S.FAILED
    assert problems == []
    assert landed(root, SMALL.name) == _committed_truth(late, records)
    assert landed(root, SMALL.name) != truth(sim, SMALL.name, oldest.window.end, end)


async def test_a_re_pull_with_far_fewer_rows_is_held_and_the_old_rows_stay(tmp_path: Path) -> None:
    root = tmp_path / "out"
    sim = sim_settings(apps=(MEDIUM,))
    async with simulator(sim) as (_, base):
        start, end = await _backfill(base, root, MEDIUM)
    shrunk = sim_settings(apps=(_grown(MEDIUM, end - 25 * DAY_MS, 0.1),))
    async with simulator(shrunk) as (_, base):
        records, problems = await _sync(base, root, MEDIUM)
    held = [r for r in records if r.state is S.FAILED]
    assert held and all(r.error_class == "ShrinkError" for r in held)
    assert "rows where the attempt it replaces has" in (held[0].error_message or "")
    assert problems == []
    assert landed(root, MEDIUM.name) == truth(sim, MEDIUM.name, start, end), "the old rows stay"
    async with simulator(shrunk) as (_, base):
        async with engine(engine_settings(base, root, history_days=60, apps=(MEDIUM,)),
                          accept_shrink=True) as run:  # fmt: skip
            for record in await run.ledger.windows(states=[S.FAILED]):
                await run.ledger.retry(record)
            await run.run(run.settings.apps)
            records, problems = (
                await run.ledger.windows(),
                await audit.verify(run.ledger, run.store),
            )
    assert problems == [] and all(r.state is not S.FAILED for r in records)
    assert landed(root, MEDIUM.name) == _committed_truth(shrunk, records, MEDIUM)


@pytest.mark.parametrize("mode", ["fail", "quarantine"])
async def test_a_row_outside_its_window_never_lands(
    tmp_path: Path, mode: Literal["fail", "quarantine"]
) -> None:
    root = tmp_path / "out"
    sim = sim_settings(apps=(SMALL,), faults=Faults(stray_row=1.0))
    async with simulator(sim) as (_, base):
        settings = engine_settings(base, root, history_days=20, apps=(SMALL,))
        settings = dataclasses.replace(
            settings, output=dataclasses.replace(settings.output, on_bad_rows=mode)
        )
        async with engine(settings) as run:
            start, end, _ = run.clamp(None, None)
            await run.plan(settings.apps, start, end)
            summary = await run.run(settings.apps)
            records = await run.ledger.windows()
            problems = await audit.verify(run.ledger, run.store)
    if mode == "fail":
        assert summary.committed == 0 and summary.failed == len(records)
        assert all("outside the requested window" in (r.error_message or "") for r in records)
        assert landed(root, SMALL.name) == []
    else:
        assert summary.failed == 0
        assert landed(root, SMALL.name) == truth(sim, SMALL.name, start, end)
    assert problems == []


async def test_an_empty_download_never_commits_an_empty_window(tmp_path: Path) -> None:
    root = tmp_path / "out"
    empty = sim_settings(apps=(SMALL,), faults=Faults(empty_download=1.0))
    async with simulator(empty) as (_, base):
        settings = engine_settings(base, root, history_days=10, apps=(SMALL,), max_attempts=2)
        async with engine(settings) as run:
            start, end, _ = run.clamp(None, None)
            await run.plan(settings.apps, start, end)
            summary = await run.run(settings.apps)
            records = await run.ledger.windows()
    assert summary.committed == 0 and summary.failed == len(records)
    assert all(r.retryable and "empty" in (r.error_message or "") for r in records)
    assert landed(root, SMALL.name) == []
    healthy = sim_settings(apps=(SMALL,))
    async with simulator(healthy) as (_, base):
        async with engine(engine_settings(base, root, history_days=10, apps=(SMALL,))) as run:
            await run.requeue_failed(run.settings.apps)
            await run.run(run.settings.apps)
            assert await audit.verify(run.ledger, run.store) == []
    assert landed(root, SMALL.name) == truth(healthy, SMALL.name, start, end)
