"""Scenarios: each ends with exactly the ground truth, and a second run changes nothing."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import textwrap
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from backfill import audit
from backfill.commit import land
from backfill.errors import StaleAttemptError, StorageError
from backfill.models import WindowState
from backfill.objstore import open_store
from backfill.simulator import Faults
from tests.enginekit import APPS, engine, engine_settings, landed, sim_settings, simulator, truth

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

    from anyio.abc import Process

    from backfill.config import Settings
    from backfill.simulator import Simulator

S = WindowState
SMALL, MEDIUM, LARGE = APPS


async def _run(settings: Settings, *, requeue_failed: bool = False) -> tuple[Any, list[Any]]:
    async with engine(settings) as run:
        start, end, _ = run.clamp(None, None)
        await run.plan(settings.apps, start, end)
        if requeue_failed:
            await run.requeue_failed(settings.apps)
        summary = await run.run(settings.apps)
        return summary, await run.ledger.windows()


async def _exact_and_stable(settings: Settings, sim: Any, apps: tuple[Any, ...]) -> None:
    """The output equals the ground truth, verify finds nothing, and a second run is a no-op."""
    async with engine(settings) as run:
        start, end, _ = run.clamp(None, None)
        for app in apps:
            assert landed(settings.output.root, app.name) == truth(sim, app.name, start, end), (
                app.name
            )
        assert await audit.verify(run.ledger, run.store) == []
        before = {a.name: landed(settings.output.root, a.name) for a in apps}
        await run.plan(settings.apps, start, end)
        again = await run.run(settings.apps)
    assert (again.calls["submit"], again.calls["status"], again.committed) == (0, 0, 0)
    assert {a.name: landed(settings.output.root, a.name) for a in apps} == before


@pytest.mark.parametrize("skew_hours", [20, -20])
async def test_clock_skew_between_the_machine_and_the_api(tmp_path: Path, skew_hours: int) -> None:
    sim = sim_settings(clock_skew_s=skew_hours * 3600.0)
    async with simulator(sim) as (_, base):
        settings = engine_settings(base, tmp_path / "out", apps=(SMALL,))
        summary, _ = await _run(settings)
        assert summary.failed == 0, summary.failures
        await _exact_and_stable(settings, sim, (SMALL,))


async def test_an_api_answering_html_instead_of_json(tmp_path: Path) -> None:
    sim = sim_settings(faults=Faults(html_ok=0.3))
    async with simulator(sim) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=90)
        summary, _ = await _run(settings)
        assert summary.failed == 0, summary.failures
        await _exact_and_stable(settings, sim, APPS)


async def test_a_download_host_that_sends_content_encoding_gzip(tmp_path: Path) -> None:
    sim = sim_settings(content_encoding="gzip")
    async with simulator(sim) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=60)
        summary, _ = await _run(settings)
        assert summary.failed == 0
        await _exact_and_stable(settings, sim, APPS)


async def test_a_request_that_never_finishes_is_resubmitted_a_bounded_number_of_times(
    tmp_path: Path,
) -> None:
    stuck = sim_settings(faults=Faults(stuck=1.0))
    async with simulator(stuck) as (served, base):
        settings = engine_settings(  # no day windows near now: one window to watch
            base, tmp_path / "out", history_days=20, apps=(SMALL,), request_timeout_s=0.3,
            lookback_days=0,
        )  # fmt: skip
        summary, records = await _run(settings)
        posts = [c for c in served.calls if c.kind == "submit" and c.status == 200]
    assert summary.failed == 1 and all(r.state is S.FAILED and r.retryable for r in records)
    assert "did not finish" in (records[0].error_message or "")
    assert len(posts) == 4, "the first request and three resubmits, then FAILED"
    healthy = sim_settings()
    async with simulator(healthy) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=20, apps=(SMALL,))
        summary, _ = await _run(settings, requeue_failed=True)
        assert summary.failed == 0
        await _exact_and_stable(settings, healthy, (SMALL,))


async def test_data_that_changes_between_two_attempts_lands_once_from_the_newer(
    tmp_path: Path,
) -> None:
    old = sim_settings()
    async with simulator(old) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=20, apps=(MEDIUM,))
        await _run(settings)
    new = sim_settings(seed=old.seed + 1)  # Flurry's data for the window changed
    async with simulator(new) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=20, apps=(MEDIUM,))
        async with engine(settings) as run:
            start, end, _ = run.clamp(None, None)
            assert await run.requeue_committed(settings.apps[0], start, end) >= 1
            summary = await run.run(settings.apps)
        assert summary.committed >= 1
        await _exact_and_stable(settings, new, (MEDIUM,))
    assert landed(tmp_path / "out", MEDIUM.name) != truth(old, MEDIUM.name, start, end)


async def _release_once_the_run_waited(holder: Process, served: Simulator, began: float) -> None:
    """Let the holder commit once the run has been held up 1 s without reaching the API."""
    assert holder.stdin is not None
    while anyio.current_time() - began < 1.0:  # the wait is what is measured
        assert served.calls == [], "the run got past the locked ledger"
        await anyio.sleep(0.05)
    await holder.stdin.send(b"release\n")


@pytest.mark.skipif(
    os.environ.get("BACKFILL_TEST_LEDGER") == "postgres",
    reason="the SQLite file's lock: a PostgreSQL ledger has none (test_claims, test_workers)",
)
async def test_the_ledger_locked_by_another_process_makes_the_run_wait(tmp_path: Path) -> None:
    sim = sim_settings()
    async with simulator(sim) as (served, base):
        settings = engine_settings(base, tmp_path / "out", history_days=30, apps=(SMALL, MEDIUM))
        async with engine(settings):
            pass  # create the ledger
        holder = textwrap.dedent(
            f"""
            import sqlite3, sys
            db = sqlite3.connect({str(settings.ledger_path)!r}, isolation_level=None)
            db.execute("BEGIN EXCLUSIVE")
            print("locked", flush=True)
            sys.stdin.readline()  # held until the test has seen the run wait
            db.execute("COMMIT")
            """
        )
        async with await anyio.open_process([sys.executable, "-c", holder]) as process:
            assert process.stdout is not None
            assert (await process.stdout.receive()).strip() == b"locked"
            began = anyio.current_time()
            async with anyio.create_task_group() as tg:
                tg.start_soon(_release_once_the_run_waited, process, served, began)
                summary, _ = await _run(settings)
                waited = anyio.current_time() - began  # the run's own time, not the helper's
        assert summary.failed == 0 and waited >= 1.0, (
            "the run waited for the lock instead of failing"
        )
        await _exact_and_stable(settings, sim, (SMALL, MEDIUM))


@contextlib.contextmanager
def _tmpfs(path: Path, size: str) -> Iterator[None]:
    path.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], check=True)
    try:
        yield
    finally:
        subprocess.run(["umount", "-l", str(path)], check=False)


async def test_a_full_disk_during_staging_stops_cleanly_and_a_rerun_finishes(
    tmp_path: Path,
) -> None:
    sim = sim_settings()
    out = tmp_path / "out"
    with _tmpfs(out, "600k"):
        async with simulator(sim) as (_, base):
            settings = engine_settings(
                base, out, history_days=120, ledger=tmp_path / "ledger.sqlite"
            )
            with pytest.raises(StorageError, match="cannot write under"):
                await _run(settings)
            async with engine(settings) as run:  # nothing half-written, nothing committed lost
                assert await audit.verify(run.ledger, run.store) == [] or not list(
                    out.rglob("*.parquet")
                )
                committed = [r for r in await run.ledger.windows() if r.state is S.COMMITTED]
            await anyio.run_process(["mount", "-o", "remount,size=64m", str(out)])  # space freed
            summary, _ = await _run(settings)
            assert summary.failed == 0
            assert summary.committed + len(committed) >= len(APPS)
            await _exact_and_stable(settings, sim, APPS)


async def test_a_stale_worker_cannot_commit_a_superseded_attempt(tmp_path: Path) -> None:
    sim = sim_settings()
    async with simulator(sim) as (_, base):
        settings = engine_settings(base, tmp_path / "out", history_days=10, apps=(SMALL,))
        await _run(settings)
        async with engine(settings) as run:
            committed = [r for r in await run.ledger.windows() if r.state is S.COMMITTED]
            record = committed[0]
            stale = await run.ledger.retry(record)  # a re-pull is claimed: attempt 1 ...
            for state in (S.SUBMITTED, S.READY, S.DOWNLOADED):
                stale = await run.ledger.advance(stale, state)
            await run.ledger.retry(stale)  # ... and superseded by attempt 2 before it commits
            source = tmp_path / "download.gz"
            source.write_bytes(b"")  # an empty window: staging succeeds, the commit must not
            with pytest.raises(StaleAttemptError):
                await land(run.ledger, open_store(settings), stale, source)
            await run.run(settings.apps)  # recovery sweeps the stale staging; attempt 2 lands
        await _exact_and_stable(settings, sim, (SMALL,))
