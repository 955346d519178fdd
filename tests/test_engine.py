"""The engine end to end against the simulator over loopback: output equals the ground truth."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from backfill.models import WindowState
from backfill.simulator import Faults
from tests.enginekit import APPS, engine, engine_settings, landed, sim_settings, simulator, truth

if TYPE_CHECKING:
    from pathlib import Path

S = WindowState


@pytest.mark.timeout(300)
@pytest.mark.parametrize("fmt", ["JSON", "CSV"])
async def test_a_two_year_run_of_three_apps_equals_the_ground_truth(
    tmp_path: Path, fmt: str
) -> None:
    sim = sim_settings()
    async with simulator(sim) as (served, base):
        settings = engine_settings(base, tmp_path / "out", fmt=fmt)
        async with engine(settings) as run:
            start, end, _ = run.clamp(None, None)
            await run.plan(settings.apps, start, end)
            summary = await run.run(settings.apps)
            records = await run.ledger.windows()
    assert summary.failed == 0 and not summary.interrupted
    assert end - start >= 728 * 86_400_000
    for app in APPS:
        assert landed(tmp_path / "out", app.name) == truth(sim, app.name, start, end), app.name
    leaves = [r for r in records if r.state is not S.SPLIT]
    assert all(r.state is S.COMMITTED for r in leaves)
    large = sorted((r for r in leaves if r.window.app == "large"), key=lambda r: r.window.start)
    lengths = {r.window.length // 86_400_000 for r in large}
    assert 7 in lengths and 1 in lengths, "the large app was split to weeks and days"
    assert summary.split > 0
    posts = [c for c in served.calls if c.kind == "submit" and c.status == 400]
    assert posts, "the simulator refused some windows as too large"
    # Once the size is learned, later windows of the large app are planned at it: far fewer
    # refusals than windows.
    assert len(posts) < len(large) / 4


@pytest.mark.timeout(300)
async def test_every_fault_at_once_still_lands_exactly_the_truth_and_retry_finishes(
    tmp_path: Path,
) -> None:
    faults = Faults(failure=0.15, server_error=0.1, rate_limit_burst=0.1, cut_download=0.2,
                    expired_link=0.15, expired_results=0.1, too_large_at_poll=0.5, multi_member=0.3,
                    slow_download=0.1)  # fmt: skip
    noisy = sim_settings(faults=faults, slow_chunk_delay_s=0.005)
    async with simulator(noisy) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=150, max_attempts=6)
        async with engine(settings) as run:
            start, end, _ = run.clamp(None, None)
            await run.plan(settings.apps, start, end)
            first = await run.run(settings.apps)
            failed = await run.ledger.windows(states=[S.FAILED])
    assert all(r.error_message and r.error_class for r in failed), "a FAILED window says why"
    assert first.calls["resumed"] > 0 and first.calls["rate_limited"] > 0
    for app in APPS:  # whatever is committed is exact; nothing is silently missing
        committed = landed(tmp_path / "out", app.name)
        assert set(committed) <= set(truth(noisy, app.name, start, end))
    quiet = sim_settings()  # the same data, no faults
    async with simulator(quiet) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=150)
        async with engine(settings) as run:
            await run.requeue_failed(settings.apps)
            second = await run.run(settings.apps)
            records = await run.ledger.windows()
    assert second.failed == 0
    assert all(r.state in (S.COMMITTED, S.SPLIT) for r in records)
    for app in APPS:
        assert landed(tmp_path / "out", app.name) == truth(quiet, app.name, start, end), app.name


async def test_sync_pulls_only_the_lookback_before_the_newest_rows_and_the_gaps(
    tmp_path: Path,
) -> None:
    sim = sim_settings()
    day = 86_400_000
    async with simulator(sim) as (served, base):
        settings = engine_settings(base, tmp_path / "out", history_days=60)
        async with engine(settings) as run:
            full_start, full_end = run.full_range()
            await run.plan(settings.apps, full_start, full_end - 10 * day)
            await run.run(settings.apps)
            marks = {a.name: await run.ledger.newest_committed_end(a.name) for a in settings.apps}
            assert all(m == full_end - 10 * day for m in marks.values())
            served.calls.clear()

            async def sync() -> None:
                await run.prepare_sync(settings.apps)
                await run.run(settings.apps)

            await sync()
            posts = [c for c in served.calls if c.kind == "submit" and c.status == 200]
            lookback = full_end - 13 * day
            assert posts and all(c.end_ms is not None and c.end_ms > lookback for c in posts)
            assert {
                a.name: await run.ledger.newest_committed_end(a.name) for a in settings.apps
            } == dict.fromkeys(marks, full_end)
            served.calls.clear()
            await sync()  # the same day again: only the lookback is pulled again
            again = [c for c in served.calls if c.kind == "submit" and c.status == 200]
            assert again and all(
                c.end_ms is not None and c.end_ms > full_end - 3 * day for c in again
            )
    for app in APPS:
        assert landed(tmp_path / "out", app.name) == truth(sim, app.name, full_start, full_end)
