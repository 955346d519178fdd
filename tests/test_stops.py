"""Ctrl-C in every phase of a run: a drain, exit 130 and the summary, and no submit after it.

Each test runs ``backfill run`` in a real subprocess against the simulator in another, waits for
a condition that shows the run is in one phase (a JSON log line, the simulator's call log), sends
SIGINT and checks: exit 130 within seconds, the summary on stdout, no traceback, not one submit in
the call log from the signal on (each set-up makes sure no POST is in flight at that moment, so
any submit after it was sent after the signal), and a second plain ``run`` that ends with the
output equal to the ground truth and ``verify`` clean.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import sys
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
import psycopg

from backfill import planner
from backfill.simulator import AppProfile, Faults, SimulatorSettings, ground_truth
from tests.enginekit import ROOT, landed, sim_settings, simulator_process, write_config
from tests.pgserver import database_for
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable
    from pathlib import Path

    from anyio.abc import Process

ENV = os.environ | {"FLURRY_TOKEN": TOKEN}
SMALL = AppProfile(
    name="small", api_key="SMALL00000000000APP1", sessions_per_day=4, events_per_session=2
)
# A day of BIG is ~15,000 rows: its conversion takes long enough (~0.5 s) to be caught under way.
BIG = AppProfile(
    name="big", api_key="BIG000000000000APP44", sessions_per_day=1_500, events_per_session=10
)
SERIAL_LAND = "conversions_at_once = 1"  # one window converts at a time; the rest wait
EXIT_INTERRUPTED = 130
STOP_BOUND_S = 5.0  # from the signal to the exit, on a loaded 2-core machine


@dataclass(slots=True)
class _Run:
    """A ``backfill run`` subprocess; its stderr JSON lines are read as they come."""

    process: Process
    calls: Path
    events: list[dict[str, Any]] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    stdout: list[str] = field(default_factory=list)
    calls_at_signal: int = -1  # call-log lines when the first signal was sent
    signalled_at: float = 0.0
    exited_after_s: float = 0.0

    def named(self, name: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == name]

    async def until(self, condition: Callable[[], bool]) -> None:
        """Wait until ``condition()`` holds (the readers fill ``events`` meanwhile)."""
        with anyio.fail_after(30):  # however slow the machine
            while not condition():  # noqa: ASYNC110 - another process writes what it reads
                await anyio.sleep(0.01)

    def interrupt(self) -> None:
        """SIGINT; the first one notes how long the call log was at that moment."""
        if self.calls_at_signal < 0:
            self.calls_at_signal = len(_calls(self.calls))
            self.signalled_at = time.monotonic()
        self.process.send_signal(signal.SIGINT)

    async def exit_code(self) -> int:
        with anyio.fail_after(30):
            code = await self.process.wait()
        self.exited_after_s = time.monotonic() - self.signalled_at
        return code


@contextlib.asynccontextmanager
async def _running(config: Path, calls: Path) -> AsyncIterator[_Run]:
    command = [sys.executable, "-m", "backfill.cli", "run", "--config", str(config),
               "--log-format", "json"]  # fmt: skip
    async with await anyio.open_process(command, cwd=ROOT, env=ENV) as process:
        run = _Run(process=process, calls=calls)

        async def read_stderr() -> None:
            assert process.stderr is not None
            pending = b""
            async for chunk in process.stderr:
                pending += chunk
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    text = line.decode()
                    run.stderr.append(text)
                    if text.startswith("{"):
                        run.events.append(json.loads(text))

        async def read_stdout() -> None:
            assert process.stdout is not None
            async for chunk in process.stdout:
                run.stdout.append(chunk.decode())

        async with anyio.create_task_group() as group:
            group.start_soon(read_stderr)
            group.start_soon(read_stdout)
            try:
                yield run
            except BaseException:  # a failed wait: do not leave the run going
                process.kill()
                raise
            finally:
                with anyio.fail_after(30):
                    await process.wait()


async def _cli(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, env=ENV, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _ledger(work: Path) -> list[tuple[str, int, int, str]]:
    """(app, start, end, state) of every live window (a split parent is not), read straight
    from the ledger's tables (SQLite, or PostgreSQL under ``BACKFILL_TEST_LEDGER=postgres``)."""
    sql = (
        "SELECT app, start_ms, end_ms, state FROM windows WHERE state != 'SPLIT' "
        "ORDER BY app, start_ms"
    )
    if os.environ.get("BACKFILL_TEST_LEDGER") == "postgres":
        with psycopg.connect(database_for(str(work / "out"))) as pg:
            return [(r[0], r[1], r[2], r[3]) for r in pg.execute(sql).fetchall()]
    db = sqlite3.connect(work / "out" / "_ledger.sqlite")
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def _all_submitted(run: _Run, work: Path) -> bool:
    """Every planned window was accepted: no POST can be sent or in flight any more."""
    submitted = len(run.named("window.submit.ok"))  # the plan is in the ledger before any
    return submitted > 0 and submitted == len(_ledger(work))


def _truth(sim: SimulatorSettings, app: AppProfile, start: int, end: int) -> list[str]:
    rows = ground_truth(sim, app.api_key, start, end)
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def _assert_stopped(run: _Run, code: int) -> None:
    """Exit 130 soon after the signal, the summary, no traceback, no submit after the signal."""
    out, err = "".join(run.stdout), "\n".join(run.stderr)
    assert code == EXIT_INTERRUPTED, err
    assert run.exited_after_s < STOP_BOUND_S, f"exit {run.exited_after_s:.1f} s after SIGINT"
    assert "windows:" in out and "interrupted:" in out, out
    assert "Traceback" not in err and "ExceptionGroup" not in err, err
    assert run.named("run.stop.requested"), "the first signal asks for a gentle stop"
    late = [c for c in _calls(run.calls)[run.calls_at_signal :] if c["kind"] == "submit"]
    assert late == [], f"submitted after the signal: {late}"


async def _assert_resumes_exactly(
    work: Path, config: Path, sim: SimulatorSettings, apps: tuple[AppProfile, ...], days: int
) -> None:
    """A second plain run ends with every row once and ``verify`` clean."""
    code, _, err = await _cli("run", "--config", str(config), "--quiet")
    assert code == 0, err
    start, end = planner.full_range(int(time.time() * 1000), history_days=days, lag_hours=24)
    for app in apps:
        assert landed(work / "out", app.name) == _truth(sim, app, start, end), app.name
    code, out, _ = await _cli("verify", "--config", str(config))
    assert code == 0, out


def _committed_exactly(work: Path, sim: SimulatorSettings, app: AppProfile) -> None:
    """What is visible is exactly the committed windows' rows; nothing is half-written."""
    windows = [w for w in _ledger(work) if w[0] == app.name]
    assert {w[3] for w in windows} <= {"PENDING", "SUBMITTED", "READY", "DOWNLOADED", "COMMITTED"}
    expected = sorted(
        row for _, lo, hi, state in windows if state == "COMMITTED"
        for row in _truth(sim, app, lo, hi)
    )  # fmt: skip
    assert landed(work / "out", app.name) == expected
    assert not [p for p in (work / "out" / "_staging").rglob("*") if p.is_file()]


async def test_sigint_during_a_backoff(tmp_path: Path) -> None:
    """Every POST is answered 429 with a 30 s Retry-After: the stop ends the wait at once."""
    # One slot: at most one POST at a time, and the one that was answered 429 closed the gate
    # (in the same step that logged its retry wait), so none can be in flight at the signal.
    sim = sim_settings(apps=(SMALL,), retry_after_s=30, faults=Faults(rate_limit_burst=1.0))
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=5, apps=(SMALL,),
                              extra_api="max_in_flight = 1")  # fmt: skip
        async with _running(config, calls) as run:
            await run.until(lambda: any(e["delay_s"] >= 30 for e in run.named("window.retry.wait")))
            run.interrupt()
            code = await run.exit_code()
        _assert_stopped(run, code)
        assert run.exited_after_s < 30, "the backoff did not run out"
        assert [c["status"] for c in _calls(calls) if c["kind"] == "submit"] == [429]
    assert {w[3] for w in _ledger(tmp_path)} == {"PENDING"}
    sim = sim_settings(apps=(SMALL,))  # the same data, no longer refused
    async with simulator_process(sim, tmp_path) as (base, _):
        config = write_config(tmp_path, base, history_days=5, apps=(SMALL,))
        await _assert_resumes_exactly(tmp_path, config, sim, (SMALL,), days=5)


async def test_sigint_while_polling(tmp_path: Path) -> None:
    """Both slots hold requests processing at Flurry: the stop ends the polls, keeps the ids."""
    sim = sim_settings(apps=(SMALL,), latency_base_s=1.5)
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=4, apps=(SMALL,),
                              extra_api="max_in_flight = 2")  # fmt: skip

        def polling() -> bool:  # every slot taken (no POST can go) and a status answered
            processing = [c for c in _calls(calls) if c.get("outcome") == "Acknowledged"]
            return len(run.named("window.submit.ok")) == 2 and bool(processing)

        async with _running(config, calls) as run:
            await run.until(polling)
            run.interrupt()
            code = await run.exit_code()
        _assert_stopped(run, code)
        assert not run.named("window.poll.ready"), "stopped while the requests were processing"
        queued = len(_ledger(tmp_path))
        assert queued > 2, "windows were still waiting for a slot"
        states = [w[3] for w in _ledger(tmp_path)]
        assert states.count("SUBMITTED") == 2 and states.count("PENDING") == queued - 2
        posted = len(_calls(calls))  # the calls so far (an index into the log, not a count)
        await _assert_resumes_exactly(tmp_path, config, sim, (SMALL,), days=4)
        again = [c for c in _calls(calls)[posted:] if c["kind"] == "submit"]
        assert len(again) == queued - 2, (
            "the requests left processing were picked up, not sent again"
        )


async def test_sigint_during_a_download(tmp_path: Path) -> None:
    """Every download trickles for 2.4 s: the stop abandons them and removes the partial files."""
    sim = sim_settings(apps=(SMALL,), faults=Faults(slow_download=1.0), slow_chunk_delay_s=0.3)
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=5, apps=(SMALL,))

        def downloading() -> bool:  # every window submitted (no POST can go), a download begun
            began = any(c["kind"] == "download" for c in _calls(calls))
            return _all_submitted(run, tmp_path) and began

        async with _running(config, calls) as run:
            await run.until(downloading)
            run.interrupt()
            code = await run.exit_code()
        _assert_stopped(run, code)
        assert not run.named("window.download.ok"), "stopped while every download was under way"
        assert not [p for p in (tmp_path / "out" / "_downloads").rglob("*") if p.is_file()]
        assert {w[3] for w in _ledger(tmp_path)} <= {"SUBMITTED", "READY"}
        await _assert_resumes_exactly(tmp_path, config, sim, (SMALL,), days=5)


async def test_sigint_during_a_conversion(tmp_path: Path) -> None:
    """The window converting at the signal lands whole in the drain; nothing is half-written."""
    sim = sim_settings(apps=(BIG,))
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=3, apps=(BIG,), extra_api=SERIAL_LAND)

        def converting() -> bool:  # every window submitted (no POST can go), one downloaded
            return _all_submitted(run, tmp_path) and bool(run.named("window.download.ok"))

        async with _running(config, calls) as run:
            await run.until(converting)
            run.interrupt()
            code = await run.exit_code()
        _assert_stopped(run, code)
        names = [e["event"] for e in run.events]
        first = run.named("window.download.ok")[0]["window"]
        commit = [i for i, e in enumerate(run.events)
                  if e["event"] == "window.commit.ok" and e["window"] == first]  # fmt: skip
        assert commit and commit[0] > names.index("run.stop.requested"), (
            "the conversion under way at the signal finished during the drain"
        )
        _committed_exactly(tmp_path, sim, BIG)
        code, out, _ = await _cli("verify", "--config", str(config))
        assert code == 0, out
        await _assert_resumes_exactly(tmp_path, config, sim, (BIG,), days=3)


async def test_a_second_sigint_stops_the_drain_at_once(tmp_path: Path) -> None:
    """Downloads wait for the one conversion slot; a second SIGINT leaves them DOWNLOADED.

    A gentle drain lands every downloaded window (the hint says "finishing conversions"); the
    second signal cuts it: only the conversion already in its thread finishes, whole.
    """
    sim = sim_settings(apps=(BIG,))
    async with simulator_process(sim, tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=4, apps=(BIG,), extra_api=SERIAL_LAND)

        def queued_to_land() -> bool:  # all submitted (no POST can go), one landing, one waiting
            unlanded = len(run.named("window.download.ok")) - len(run.named("window.commit.ok"))
            return _all_submitted(run, tmp_path) and unlanded >= 2

        async with _running(config, calls) as run:
            await run.until(queued_to_land)
            run.interrupt()
            await run.until(lambda: bool(run.named("run.stop.requested")))
            run.interrupt()
            code = await run.exit_code()
        _assert_stopped(run, code)
        assert run.named("run.stop.now")
        states = [w[3] for w in _ledger(tmp_path)]
        assert "DOWNLOADED" in states, "the drain was cut: downloaded windows were left to land"
        _committed_exactly(tmp_path, sim, BIG)
        await _assert_resumes_exactly(tmp_path, config, sim, (BIG,), days=4)
