"""The CLI in real subprocesses against the simulator in a real subprocess: exit codes and JSON."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
from typing import TYPE_CHECKING, Any

import anyio
import pytest

from backfill.simulator import Faults
from tests.enginekit import ROOT, sim_settings, simulator_process, write_config
from tests.simkit import TOKEN

if TYPE_CHECKING:
    from pathlib import Path

ENV = os.environ | {"FLURRY_TOKEN": TOKEN}


async def cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, env=env or ENV, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _calls(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(300)
async def test_plan_run_status_verify_and_a_tampered_file(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = str(write_config(tmp_path, base, history_days=40))
        code, out, err = await cli("plan", "--config", config, "--json")
        assert code == 0, err
        planned = json.loads(out)
        assert planned and {p["state"] for p in planned} == {"NEW"}
        assert set(planned[0]) == {"app", "start", "end", "state"} and planned[0]["start"].endswith(
            "Z"
        )
        assert _calls(calls) == [], "plan makes no API call"
        assert not (tmp_path / "out").exists(), "plan writes nothing"

        code, out, err = await cli("run", "--config", config, "--log-format", "json")
        assert code == 0, err
        assert "committed" in out and "failed" in out
        events = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
        commits = [e for e in events if e["event"] == "window.commit.ok"]
        assert commits and all(
            {"app", "window", "attempt", "request_id"} <= set(e) for e in commits
        )

        code, out, _ = await cli("status", "--config", config, "--json")
        report = {r["app"]: r for r in json.loads(out)}
        assert code == 0 and set(report) == {"small", "medium", "large"}
        assert all(
            r["windows"]["failed"] == 0 and r["windows"]["pending"] == 0 and r["rows"] > 0
            for r in report.values()
        )
        code, out, _ = await cli("plan", "--config", config, "--json")
        assert {p["state"] for p in json.loads(out)} == {"COMMITTED"}

        code, out, _ = await cli("verify", "--config", config)
        assert code == 0 and "verified" in out
        victim = sorted((tmp_path / "out" / "events").rglob("*.parquet"))[0]
        victim.write_bytes(victim.read_bytes()[:-10])
        code, out, err = await cli("verify", "--config", config)
        assert code == 5
        assert str(victim) in out


async def test_a_refused_token_exits_3_without_a_traceback(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(), tmp_path) as (base, _):
        config = str(write_config(tmp_path, base, history_days=10))
        code, _, err = await cli(
            "run", "--config", config, "--quiet", env=ENV | {"FLURRY_TOKEN": "not-the-token"}
        )
    assert code == 3
    assert "refused the token" in err and "Traceback" not in err


@pytest.mark.parametrize(
    ("faults", "code", "reason"),
    [
        (Faults(corrupt_download=1.0), 4, "corrupt gzip"),
        (Faults(failure=1.0), 4, "Failure 2 times"),  # repeated Failure: a person decides
    ],
    ids=["corrupt-downloads-fail-windows", "flurry-failures-wait-for-a-person"],
)
async def test_failed_windows_exit_4_and_exhausted_retries_exit_75(
    tmp_path: Path, faults: Faults, code: int, reason: str
) -> None:
    async with simulator_process(sim_settings(faults=faults), tmp_path) as (base, _):
        config = str(
            write_config(tmp_path, base, history_days=10, extra_api="backoff_base_s = 0.01")
        )
        got, out, err = await cli("run", "--config", config, "--quiet")
        assert got == code, err
        assert reason in out
        _, out, _ = await cli("status", "--config", config, "--json")
    failures = [f for r in json.loads(out) for f in r["failures"]]
    assert failures and all(reason in f["error"] for f in failures)


@pytest.mark.timeout(120)
async def test_sigint_drains_exits_130_and_the_next_run_resumes(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(latency_base_s=3.0), tmp_path) as (base, calls):
        config = str(write_config(tmp_path, base, history_days=30, lookback_days=0))
        command = [sys.executable, "-m", "backfill.cli", "run", "--config", config, "--quiet"]
        async with await anyio.open_process(command, cwd=ROOT, env=ENV) as process:
            with anyio.fail_after(60):  # however slow the machine: interrupt once requests are out
                while not any(c["kind"] == "submit" and c["status"] == 200 for c in _calls(calls)):  # noqa: ASYNC110 - another process writes it
                    await anyio.sleep(0.1)
            await anyio.sleep(0.5)  # their ids reach the ledger; each takes 3 s at Flurry
            process.send_signal(signal.SIGINT)
            with anyio.fail_after(30):
                assert await process.wait() == 130
            assert process.stdout is not None
            out = (await process.stdout.receive()).decode()
        assert "interrupted" in out
        ledger = sqlite3.connect(tmp_path / "out" / "_ledger.sqlite")
        waiting = ledger.execute(
            "SELECT count(*) FROM windows WHERE state = 'SUBMITTED' AND request_id IS NOT NULL"
        ).fetchone()[0]
        assert waiting > 0, "requests still processing at Flurry keep their ids"
        ledger.close()
        posts_before = sum(1 for c in _calls(calls) if c["kind"] == "submit" and c["status"] == 200)
        code, _, err = await cli("run", "--config", config, "--quiet")
        assert code == 0, err
        windows = {
            (c["api_key"], c["start_ms"])
            for c in _calls(calls)
            if c["kind"] == "submit" and c["status"] == 200
        }
        posts_after = sum(1 for c in _calls(calls) if c["kind"] == "submit" and c["status"] == 200)
        assert posts_after - posts_before == len(windows) - posts_before, (
            "no window was submitted twice"
        )


async def test_a_second_run_on_the_same_ledger_refuses_clearly(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(latency_base_s=2.0), tmp_path) as (base, _):
        config = str(write_config(tmp_path, base, history_days=30))
        command = [sys.executable, "-m", "backfill.cli", "run", "--config", config, "--quiet"]
        lock = anyio.Path(tmp_path / "out" / "_ledger.sqlite.lock")

        async def held() -> bool:
            return await lock.exists() and bool((await lock.read_text()).strip())

        async with await anyio.open_process(command, cwd=ROOT, env=ENV) as first:
            with anyio.fail_after(60):  # wait until the first run holds the ledger
                while not await held():  # noqa: ASYNC110 - another process writes it
                    await anyio.sleep(0.1)
            code, _, err = await cli("run", "--config", config, "--quiet")
            first.send_signal(signal.SIGKILL)
            await first.wait()
    assert code == 6  # another run holds the ledger: its own code, not an integrity problem
    assert "another backfill run" in err and f"pid {first.pid}" in err


@pytest.mark.timeout(300)
async def test_the_token_appears_nowhere_even_with_every_fault_on(tmp_path: Path) -> None:
    sentinel = "SENTINEL-TOKEN-5f1c9e"
    faults = Faults(failure=0.2, server_error=0.2, rate_limit_burst=0.2, cut_download=0.3, slow_download=0.1,
                    multi_member=0.2, expired_link=0.3, expired_results=0.2, too_large_at_poll=0.5,
                    corrupt_download=0.1)  # fmt: skip
    async with simulator_process(
        sim_settings(token=sentinel, faults=faults, slow_chunk_delay_s=0.001), tmp_path
    ) as (base, _):
        config = str(
            write_config(
                tmp_path, base, history_days=45, extra_api="backoff_base_s = 0.01\nmax_attempts = 3"
            )
        )
        env = ENV | {"FLURRY_TOKEN": sentinel}
        outputs = []
        for args in (
            ["run", "--log-format", "json"],
            ["retry", "--log-format", "console"],
            ["status", "--json"],
            ["verify"],
        ):
            code, out, err = await cli(args[0], "--config", config, *args[1:], env=env)
            outputs += [out, err]
        code, out, err = await cli(
            "run", "--config", config, env=ENV | {"FLURRY_TOKEN": "wrong-" + sentinel[::-1]}
        )
        outputs += [out, err]
        code, out, err = await cli("--help")
        outputs.append(out)
    assert not any(sentinel in text for text in outputs)
    for path in (tmp_path / "out").rglob("*"):
        if path.is_file():
            assert sentinel.encode() not in path.read_bytes(), path


async def test_progress_lines_off_a_terminal_count_windows_per_app(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(latency_base_s=0.3), tmp_path) as (base, _):
        config = str(write_config(tmp_path, base, history_days=40))
        code, _, err = await cli(
            "run", "--config", config, "--log-format", "json", "--progress-interval", "0.3"
        )
    assert code == 0, err
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    progress = [e for e in lines if e["event"] == "run.progress"]
    assert progress, "periodic progress lines when stderr is not a terminal"
    last = progress[-1]
    assert (
        set(last["windows"]) <= {"small", "medium", "large"}
        and "eta_s" in last
        and "processing" in last
    )
    assert all("/" in v for v in last["windows"].values())


async def test_a_failed_night_heals_on_the_next_and_stops_healing_after_heal_runs(
    tmp_path: Path,
) -> None:
    fast = "backoff_base_s = 0.01\nmax_attempts = 1"
    # Every call answers 5xx (an unreachable API never gets this far: the preflight exits 75
    # before planning, tests/test_check.py); the probe's 5xx proves nothing, so the run goes on.
    broken = sim_settings(faults=Faults(server_error=1.0))
    async with simulator_process(broken, tmp_path) as (dead, _):
        config = str(write_config(tmp_path, dead, history_days=5, extra_api=fast))
        code, _, _ = await cli("sync", "--config", config, "--quiet")
    assert code == 75, "a failed night is transient: safe to re-run"
    ledger = sqlite3.connect(tmp_path / "out" / "_ledger.sqlite")
    failed = ledger.execute("SELECT count(*) FROM windows WHERE state = 'FAILED'").fetchone()[0]
    assert failed > 0
    async with simulator_process(sim_settings(), tmp_path) as (base, _):
        write_config(tmp_path, base, history_days=5, extra_api=fast)
        code, _, err = await cli("sync", "--config", config, "--quiet")
        assert code == 0, err
        assert f"taking back {failed} failed window" in err
        states = {s for (s,) in ledger.execute("SELECT state FROM windows WHERE state != 'SPLIT'")}
        assert states == {"COMMITTED"}
        # A window that keeps failing is taken back heal_runs times, then waits for a person.
        # (The API is up: against an unreachable one the preflight would exit 75 first.)
        ledger.execute(
            "UPDATE windows SET state = 'FAILED', retryable = 1, failures = 3 WHERE id = 1"
        )
        ledger.commit()
        code, _, err = await cli("sync", "--config", config, "--quiet")
        assert code == 4 and "taking back" not in err, "after 3 failed runs it stays FAILED"
    ledger.close()
