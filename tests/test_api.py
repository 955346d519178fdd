"""``backfill.api`` from a worker thread and from a running event loop, stopped and cancelled.

Each test runs the API in this process against the simulator in a subprocess: from a plain
``threading.Thread`` (no signal handler may be installed there), stopped by a ``threading.Event``,
and awaited in the test's own loop, cancelled mid-run.  A stopped or cancelled run leaves only
consistent states in the ledger and committed rows exactly; the next run finishes exact.
"""

from __future__ import annotations

import json
import sqlite3
import sys
import threading
import time
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from backfill import api, planner
from backfill.errors import ConfigError
from backfill.simulator import AppProfile
from tests.enginekit import ROOT, landed, sim_settings, simulator_process, truth, write_config
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

SMALL = AppProfile(
    name="small", api_key="SMALL00000000000APP1", sessions_per_day=4, events_per_session=2
)
_CONSISTENT = {"PENDING", "SUBMITTED", "READY", "DOWNLOADED", "COMMITTED"}


def _calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _states(work: Path) -> list[str]:
    db = sqlite3.connect(work / "out" / "_ledger.sqlite")
    try:
        rows = db.execute("SELECT state FROM windows WHERE state != 'SPLIT'").fetchall()
    finally:
        db.close()
    return [r[0] for r in rows]


async def _until(condition: Callable[[], bool], timeout_s: float = 60.0) -> None:
    with anyio.fail_after(timeout_s):
        while not condition():  # noqa: ASYNC110 - another process or thread changes it
            await anyio.sleep(0.02)


async def _exact(work: Path, config: Path, days: int) -> None:
    """Every row of the horizon landed once, and ``verify`` finds nothing."""
    start, end = planner.full_range(int(time.time() * 1000), history_days=days, lag_hours=24)
    assert landed(work / "out", "small") == truth(sim_settings(apps=(SMALL,)), "small", start, end)
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", "verify", "--config", str(config)],
        cwd=ROOT, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout.decode()


async def test_run_from_a_worker_thread_with_a_token_argument(tmp_path: Path) -> None:
    """``api.run`` in a plain thread: no signal handler, typed result, the rows exact."""
    sim = sim_settings(apps=(SMALL,))
    async with simulator_process(sim, tmp_path) as (base, _):
        config = write_config(tmp_path, base, history_days=6, apps=(SMALL,))
        box: list[Any] = []

        def work() -> None:
            try:
                box.append(api.run(config, token=TOKEN))  # FLURRY_TOKEN is not set here
            except BaseException as exc:  # the assertion below shows it
                box.append(exc)

        thread = threading.Thread(target=work, name="orchestrator-task")
        thread.start()
        await _until(lambda: not thread.is_alive())
        [result] = box
        assert isinstance(result, api.RunResult), result
        assert result.exit_code == 0 and result.ok and not result.interrupted
        assert result.committed > 0 and result.failed == 0 and not result.failures
        assert result.rows == len(landed(tmp_path / "out", "small")) > 0
        assert [a.app for a in result.apps] == ["small"] and result.apps[0].rows == result.rows
        assert result.calls["submit"] >= result.committed
        assert json.loads(json.dumps(result.to_json()))["exit_code"] == 0
        await _exact(tmp_path, config, days=6)

        status = await anyio.to_thread.run_sync(api.status, config)
        [app] = status.apps
        assert app.app == "small" and app.committed == result.committed and app.failed == 0
        plan = await api.plan_async(config)
        assert plan.windows and plan.to_submit == 0
        assert {w.state for w in plan.windows} == {"COMMITTED"}


async def test_a_stop_event_set_from_another_thread_stops_gently(tmp_path: Path) -> None:
    """``stop=`` set while requests process at Flurry: exit 130, ids kept; the next run exact."""
    sim = sim_settings(apps=(SMALL,), latency_base_s=1.5)
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=4, apps=(SMALL,),
                              extra_api="max_in_flight = 2")  # fmt: skip
        stop = threading.Event()
        box: list[Any] = []
        thread = threading.Thread(
            target=lambda: box.append(api.run(config, token=TOKEN, stop=stop))
        )
        thread.start()
        await _until(lambda: any(c.get("outcome") == "Acknowledged" for c in _calls(calls)))
        submitted = len([c for c in _calls(calls) if c["kind"] == "submit"])
        stop.set()
        await _until(lambda: not thread.is_alive(), timeout_s=15)
        [result] = box
        assert result.interrupted and result.exit_code == 130
        assert set(_states(tmp_path)) <= _CONSISTENT and "SUBMITTED" in _states(tmp_path)
        assert len([c for c in _calls(calls) if c["kind"] == "submit"]) == submitted

        again = await api.run_async(config, token=TOKEN)
        assert again.exit_code == 0, again
        await _exact(tmp_path, config, days=4)


async def test_cancelling_run_async_stops_gently_and_the_next_run_is_exact(
    tmp_path: Path,
) -> None:
    """A cancelled scope around ``await api.run_async``: the run drains, the ledger and lock
    are released, the cancellation goes on; the next run finishes exact."""
    sim = sim_settings(apps=(SMALL,), latency_base_s=1.5)
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=4, apps=(SMALL,),
                              extra_api="max_in_flight = 2")  # fmt: skip
        box: list[api.RunResult] = []
        reached: list[bool] = []

        async def task() -> None:
            box.append(await api.run_async(config, token=TOKEN))
            reached.append(True)

        began = time.monotonic()
        async with anyio.create_task_group() as group:
            group.start_soon(task)
            await _until(lambda: any(c.get("outcome") == "Acknowledged" for c in _calls(calls)))
            group.cancel_scope.cancel()
        assert time.monotonic() - began < 30
        assert not box and not reached, "the cancellation went on to the caller"
        states = _states(tmp_path)
        assert set(states) <= _CONSISTENT and "SUBMITTED" in states
        assert "COMMITTED" not in states or landed(tmp_path / "out", "small")

        again = await api.run_async(config, token=TOKEN)  # the lock was released
        assert again.exit_code == 0 and not again.interrupted
        await _exact(tmp_path, config, days=4)


async def test_api_errors_are_typed_and_nothing_runs(tmp_path: Path) -> None:
    config = write_config(tmp_path, "http://127.0.0.1:9", history_days=4, apps=(SMALL,))
    with pytest.raises(ConfigError, match="'nope'"):
        await api.run_async(config, apps=["nope"], token=TOKEN)
    with pytest.raises(ConfigError, match="end must be after start"):
        await api.run_async(config, start="2026-02-01", end="2026-01-01", token=TOKEN)
    assert (await api.status_async(config)).apps == ()
    assert not (tmp_path / "out").exists()
