"""Engines sharing one PostgreSQL ledger, in one process: work shared, budget shared, takeover.

Each engine has its own ``PgLedger`` (its own worker id and connection pool), as separate
processes would; the simulator runs over loopback.  The processes-and-signals version of these
is ``test_workers.py``.
"""

from __future__ import annotations

import dataclasses
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from backfill.client import FlurryClient, Secret
from backfill.config import LedgerSettings
from backfill.engine import Engine
from backfill.ledger_pg import PgLedger
from backfill.models import WindowState
from backfill.store import LocalStore
from tests.enginekit import APPS, engine_settings, landed, sim_settings, simulator, truth
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from backfill.config import Settings
    from backfill.engine import Summary

S = WindowState


async def _worker(settings: Settings, url: str, name: str, *, plan: bool = True) -> Summary:
    """One engine on its own PgLedger: plan the range (concurrently with the others), run it."""
    ledger = await PgLedger.open(url, worker=name)
    try:
        async with FlurryClient(base_url=settings.api.base_url, token=Secret(TOKEN)) as api:
            store = LocalStore(Path(str(settings.output.root)))
            engine = Engine(settings=settings, ledger=ledger, store=store, api=api)
            start, end, _ = engine.clamp(None, None)
            if plan:
                await engine.plan(settings.apps, start, end)
            return await engine.run(settings.apps)
    finally:
        await ledger.close()


def _shared(settings: Settings, url: str, lease_s: float = 30.0) -> Settings:
    ledger = LedgerSettings(url=url, lease_s=lease_s)
    return dataclasses.replace(settings, ledger=ledger)


@pytest.mark.timeout(300)
async def test_three_engines_share_one_plan_each_window_once_within_one_cap(
    tmp_path: Path, pg_url: str
) -> None:
    cap = 3
    sim = sim_settings(max_processing=cap, latency_base_s=0.05)
    async with simulator(sim) as (served, base):
        settings = _shared(engine_settings(base, tmp_path / "out", history_days=240,
                                           max_in_flight=cap), pg_url)  # fmt: skip
        summaries: list[Summary] = []

        async def one(name: str) -> None:
            summaries.append(await _worker(settings, pg_url, name))

        async with anyio.create_task_group() as group:
            for name in ("w1", "w2", "w3"):
                group.start_soon(one, name)
        ledger = await PgLedger.open(pg_url, worker="checker")
        records = await ledger.windows()
        await ledger.close()
    start = min(r.window.start for r in records)
    end = max(r.window.end for r in records)
    for app in APPS:
        assert landed(tmp_path / "out", app.name) == truth(sim, app.name, start, end), app.name
    assert all(r.state in (S.COMMITTED, S.SPLIT) for r in records)
    assert sum(s.committed for s in summaries) == sum(r.state is S.COMMITTED for r in records)
    assert sum(1 for s in summaries if s.committed) >= 2, "the work was shared"
    accepted = Counter((c.api_key, c.start_ms, c.end_ms) for c in served.calls
                       if c.kind == "submit" and c.status == 200)  # fmt: skip
    assert max(accepted.values()) == 1, "no window was submitted by two workers"
    assert not [c for c in served.calls if c.status == 429], "the shared cap was exceeded"


@pytest.mark.timeout(300)
async def test_a_dead_workers_windows_are_taken_over_when_its_lease_runs_out(
    tmp_path: Path, pg_url: str
) -> None:
    sim = sim_settings()
    async with simulator(sim) as (served, base):
        settings = _shared(engine_settings(base, tmp_path / "out", history_days=60), pg_url,
                           lease_s=1.0)  # fmt: skip
        # A worker that plans, claims everything and dies before doing anything.
        dead = await PgLedger.open(pg_url, worker="dead")
        no_api: Any = None  # planning makes no call
        engine = Engine(settings=settings, ledger=dead, store=LocalStore(tmp_path / "out"),
                        api=no_api)  # fmt: skip
        start, end, _ = engine.clamp(None, None)
        await engine.plan(settings.apps, start, end)
        held = await dead.claim_next([a.name for a in APPS], lease_ms=1000, limit=1000)
        await dead.close()
        assert held
        summary = await _worker(settings, pg_url, "taker", plan=False)
        ledger = await PgLedger.open(pg_url, worker="checker")
        records = {r.id: r for r in await ledger.windows()}
        await ledger.close()
    assert summary.failed == 0
    for app in APPS:
        assert landed(tmp_path / "out", app.name) == truth(sim, app.name, start, end), app.name
    taken = [records[r.id] for r in held]
    assert all(r.attempt >= 1 for r in taken if r.state is S.COMMITTED), "taken over: new attempt"
    assert served.calls
