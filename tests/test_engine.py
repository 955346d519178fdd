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
    assert end - start >= 729 * 86_400_000
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
