"""What an operator lives with, in real subprocesses against the simulator: a run takes what it
was asked, `retry` takes what it says, a held ledger has its own exit code (and `--wait`), and a
relative root means the same folder from any working directory."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import anyio
import pytest

from backfill import config
from backfill.ledger import Ledger
from backfill.models import Window, WindowState
from tests.enginekit import APPS, DAY, ROOT, sim_settings, simulator_process, write_config
from tests.simkit import TOKEN

ENV = os.environ | {"FLURRY_TOKEN": TOKEN}
S = WindowState
TODAY = int(time.time() * 1000) // DAY * DAY


async def cli(*args: str, cwd: str | Path = ROOT) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=cwd, env=ENV, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _submits(path: Path) -> list[dict[str, Any]]:
    """The windows the simulator accepted a POST for."""
    lines = path.read_text().splitlines() if path.exists() else []
    calls = [json.loads(line) for line in lines]
    return [c for c in calls if c["kind"] == "submit" and c["status"] == 200]


async def _ledger_windows(path: Path, app: str) -> dict[tuple[int, int], S]:
    ledger = await Ledger.open(path)
    try:
        return {(r.window.start, r.window.end): r.state for r in await ledger.windows(apps=[app])}
    finally:
        await ledger.close()


@pytest.mark.timeout(120)
async def test_a_run_with_a_range_leaves_a_leftover_outside_it_alone(tmp_path: Path) -> None:
    small = APPS[0]
    leftover = (TODAY - 20 * DAY, TODAY - 19 * DAY)
    ledger_path = tmp_path / "out" / "_ledger.sqlite"
    ledger_path.parent.mkdir()
    ledger = await Ledger.open(ledger_path)
    await ledger.add_windows(small.name, *leftover, size_ms=DAY)  # a PENDING left by an old run
    await ledger.close()
    start, end = TODAY - 10 * DAY, TODAY - 8 * DAY
    async with simulator_process(sim_settings(apps=(small,)), tmp_path) as (base, calls):
        path = str(write_config(tmp_path, base, history_days=60, apps=(small,)))
        iso = [time.strftime("%Y-%m-%d", time.gmtime(ms / 1000)) for ms in (start, end)]
        code, out, err = await cli(
            "run", "--config", path, "--quiet", "--start", iso[0], "--end", iso[1]
        )
        submitted = [(c["start_ms"], c["end_ms"]) for c in _submits(calls)]
    assert code == 0, err
    assert submitted and all(s < end and e > start for s, e in submitted), submitted
    assert leftover[0] not in [s for s, _ in submitted], "the leftover was not submitted"
    windows = await _ledger_windows(ledger_path, small.name)
    assert windows[leftover] is S.PENDING
    assert {w: s for w, s in windows.items() if w != leftover} == dict.fromkeys(
        [w for w in windows if w != leftover], S.COMMITTED
    )


@pytest.mark.timeout(120)
async def test_retry_says_what_it_takes_and_takes_exactly_that(tmp_path: Path) -> None:
    small = APPS[0]
    ledger_path = tmp_path / "out" / "_ledger.sqlite"
    ledger_path.parent.mkdir()
    ledger = await Ledger.open(ledger_path)
    days = await ledger.add_windows(small.name, TODAY - 30 * DAY, TODAY - 8 * DAY, size_ms=DAY)
    failed = days[:22]
    for record in failed:
        await ledger.advance(record, S.FAILED, error_class="BadDataError",
                             error_message="corrupt gzip", retryable=False)  # fmt: skip
    leftover = await ledger.add_windows(small.name, TODAY - 40 * DAY, TODAY - 39 * DAY, size_ms=DAY)
    await ledger.close()
    async with simulator_process(sim_settings(apps=(small,)), tmp_path) as (base, calls):
        path = str(write_config(tmp_path, base, history_days=60, apps=(small,)))
        code, out, err = await cli("retry", "--config", path, "--quiet")
        submitted = sorted((c["start_ms"], c["end_ms"]) for c in _submits(calls))
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "retrying 22 failed windows:"
    assert lines[1:21] == [f"  {small.name} {r.window.label}" for r in failed[:20]]
    assert lines[21] == "  and 2 more"
    assert submitted == [(r.window.start, r.window.end) for r in failed]
    windows = await _ledger_windows(ledger_path, small.name)
    assert windows[(leftover[0].window.start, leftover[0].window.end)] is S.PENDING
    assert all(windows[(r.window.start, r.window.end)] is S.COMMITTED for r in failed)


_HOLDER = """
import fcntl, os, sys
path = sys.argv[1]
os.makedirs(os.path.dirname(path), exist_ok=True)
handle = open(path, "a+")
fcntl.flock(handle, fcntl.LOCK_EX)
handle.seek(0); handle.truncate(); handle.write(str(os.getpid())); handle.flush()
print("held", flush=True)
sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.timeout(120)
async def test_a_held_ledger_exits_6_naming_the_pid_and_wait_queues_behind_it(
    tmp_path: Path,
) -> None:
    lock = tmp_path / "out" / "_ledger.sqlite.lock"
    async with simulator_process(sim_settings(apps=APPS[:1]), tmp_path) as (base, calls):
        path = str(write_config(tmp_path, base, history_days=5, apps=APPS[:1]))
        holder_cmd = [sys.executable, "-c", _HOLDER, str(lock)]
        async with await anyio.open_process(holder_cmd) as holder:
            assert holder.stdout is not None and holder.stdin is not None
            assert (await holder.stdout.receive()).decode().strip() == "held"
            code, _, err = await cli("sync", "--config", path, "--quiet")
            assert code == 6, err
            assert f"another backfill run (pid {holder.pid})" in err
            assert "Traceback" not in err and _submits(calls) == []
            code, _, err = await cli("sync", "--config", path, "--quiet", "--wait", "0.3")
            assert code == 6 and f"(pid {holder.pid}) still holds" in err, err

            log = tmp_path / "waiting.err"
            command = [sys.executable, "-m", "backfill.cli", "sync", "--config", path, "--quiet",
                       "--wait"]  # fmt: skip
            with log.open("wb") as sink:
                async with await anyio.open_process(
                    command, cwd=ROOT, env=ENV, stderr=sink
                ) as waiting:
                    with anyio.fail_after(30):
                        while f"waiting for pid {holder.pid}" not in log.read_text():  # noqa: ASYNC110 - another process writes it
                            await anyio.sleep(0.05)
                    assert waiting.returncode is None and _submits(calls) == []
                    await holder.stdin.aclose()  # the first run ends: its lock goes with it
                    await holder.wait()
                    with anyio.fail_after(60):
                        assert await waiting.wait() == 0, log.read_text()
        assert _submits(calls), "once the ledger was free, the sync ran"
    assert log.read_text().count("waiting for pid") == 1


@pytest.mark.timeout(120)
async def test_a_relative_root_is_the_same_folder_from_crons_working_directory(
    tmp_path: Path,
) -> None:
    small = APPS[0]
    etc, home = tmp_path / "etc", tmp_path / "home" / "backfill"  # ../lake differs from each
    etc.mkdir()
    home.mkdir(parents=True)
    (etc / "token").write_text(TOKEN + "\n")
    async with simulator_process(sim_settings(apps=(small,)), tmp_path) as (base, calls):
        written = write_config(tmp_path, base, history_days=20, apps=(small,), lookback_days=0)
        text = written.read_text().replace(f'root = "{tmp_path / "out"}"', 'root = "../lake"')
        text = text.replace('token_env = "FLURRY_TOKEN"', 'token_file = "token"')
        path = etc / "backfill.toml"
        path.write_text(text)
        code, out, err = await cli("run", "--config", str(path), "--quiet", cwd=etc)
        assert code == 0, err
        first = len(_submits(calls))
        assert first > 0 and (tmp_path / "lake" / "_ledger.sqlite").exists()
        code, out, err = await cli("sync", "--config", str(path), "--quiet", cwd=home)
        assert code == 0, err
        assert len(_submits(calls)) == first, "the nightly sync found the ledger: no re-pull"
    assert _folders(home.parent) == ["backfill"] and _folders(home) == [], "nothing under cron's"
    assert _folders(tmp_path) == ["etc", "home", "lake"]


def _folders(path: Path) -> list[str]:
    return sorted(p.name for p in path.iterdir() if p.is_dir())


def test_config_paths_are_relative_to_the_config_file(tmp_path: Path) -> None:
    folder = tmp_path / "conf"
    folder.mkdir()
    app = f'[[apps]]\nname = "a"\napi_key = "{APPS[0].api_key}"\n'
    path = folder / "b.toml"
    path.write_text(
        '[api]\ntoken_file = "secrets/token"\n[output]\nroot = "../lake"\n'
        'metrics_file = "metrics/backfill.prom"\n'
        f'[ledger]\npath = "state/l.sqlite"\n{app}'
    )
    settings = config.load(path)
    assert settings.output.root == folder / "../lake"
    assert settings.output.metrics_file == folder / "metrics/backfill.prom"
    assert settings.ledger_path == folder / "state/l.sqlite"
    assert settings.api.token_file == folder / "secrets/token"
    path.write_text(f'[api]\ntoken_file = "/run/token"\n[output]\nroot = "/srv/lake"\n{app}')
    settings = config.load(path)
    assert settings.output.root == Path("/srv/lake") and settings.ledger.path is None
    assert settings.ledger_path == Path("/srv/lake/_ledger.sqlite")
    assert str(settings.api.token_file) == "/run/token"
    assert settings.output.metrics_file is None
    path.write_text(f'[api]\ntoken_env = "T"\n{app}')
    assert config.load(path).output.root == folder / "data/flurry"  # the default, too


def test_a_bad_data_message_names_the_window_in_iso_dates(tmp_path: Path) -> None:
    from backfill.errors import BadDataError
    from backfill.layout import Layout
    from backfill.schema import Limits
    from backfill.staging import stage

    source = tmp_path / "download.gz"
    source.write_bytes(b"\x1f\x8b not gzip at all")
    window = Window(app="a", start=TODAY - DAY, end=TODAY)
    with pytest.raises(BadDataError) as caught:
        stage(Layout(root=tmp_path / "out"), Limits(), "fail", app="a", window_id=1, attempt=1,
              start_ms=window.start, end_ms=window.end, source=source)  # fmt: skip
    assert f"window={window.label}" in str(caught.value)
    assert str(window.start) not in str(caught.value)
