"""``backfill check``, the preflight of the running commands, and a refused app key.

Through the real CLI in subprocesses against the simulator in a subprocess: the probe tells a
good token, a refused one and an unreachable API apart in seconds; a run whose token is good
fails the app whose ``api_key`` the API refuses (one POST of it, no more), names it, and lands
the other apps whole.
"""

from __future__ import annotations

import json
import socket
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import pytest

from backfill.simulator import AppProfile, ground_truth
from tests.enginekit import APPS, landed, sim_settings, simulator_process, write_config
from tests.test_cli_runs import ENV, _calls, cli

if TYPE_CHECKING:
    from pathlib import Path

SMALL, MEDIUM = APPS[0], APPS[1]
TYPO = AppProfile(name="typo", api_key="SMALL00000000000APPX")  # one character off SMALL's


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
    return port


def _lines(out: str) -> dict[str, str]:
    """``check``'s report: the text after each ``name:``."""
    return {k: v.strip() for k, _, v in (line.partition(":") for line in out.splitlines())}


def _windows(root: Path) -> list[tuple[str, str, str | None]]:
    """(app, state, error) of every window in the ledger under ``root`` (none: no ledger)."""
    if not (root / "_ledger.sqlite").exists():
        return []
    db = sqlite3.connect(root / "_ledger.sqlite")
    try:
        return db.execute("SELECT app, state, error_message FROM windows").fetchall()
    finally:
        db.close()


def _exact(root: Path, app: Any) -> None:
    """Every window of ``app`` COMMITTED, without gap, and its rows exactly the truth."""
    db = sqlite3.connect(root / "_ledger.sqlite")
    try:
        live = db.execute(
            "SELECT start_ms, end_ms, state FROM windows WHERE app = ? "
            "AND committed_attempt IS NOT NULL ORDER BY start_ms",
            (app.name,),
        ).fetchall()
    finally:
        db.close()
    assert live and all(state == "COMMITTED" for _, _, state in live)
    assert all(a[1] == b[0] for a, b in zip(live, live[1:], strict=False)), "no gap, no overlap"
    rows = ground_truth(sim_settings(), app.api_key, live[0][0], live[-1][1])
    assert landed(root, app.name) == sorted(json.dumps(r, sort_keys=True) for r in rows)


async def test_check_passes_every_check_and_changes_nothing_at_the_api(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=10)
        code, out, err = await cli("check", "--config", str(config))
    assert code == 0, out + err
    report = _lines(out)
    assert set(report) == {"config", "root", "ledger", "token"}
    assert all(text.startswith("ok") for text in report.values()), out
    assert "$FLURRY_TOKEN" in report["token"] and base in report["token"]
    assert "none yet" in report["ledger"]
    assert [(c["kind"], c["status"]) for c in _calls(calls)] == [("status", 404)], "one probe"
    assert _windows(tmp_path / "out") == []


async def test_check_opens_an_existing_ledger(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(), tmp_path) as (base, _):
        config = write_config(tmp_path, base, history_days=5, apps=(SMALL,))
        code, _, err = await cli("run", "--config", str(config), "--quiet")
        assert code == 0, err
        code, out, err = await cli("check", "--config", str(config))
    assert code == 0, out + err
    assert (
        _lines(out)["ledger"]
        == f"ok: {tmp_path / 'out' / '_ledger.sqlite'} (opens; schema current)"
    )


async def test_check_with_a_refused_token_exits_3_naming_where_the_token_comes_from(
    tmp_path: Path,
) -> None:
    async with simulator_process(sim_settings(), tmp_path) as (base, _):
        config = write_config(tmp_path, base, history_days=10)
        code, out, _ = await cli(
            "check", "--config", str(config), env=ENV | {"FLURRY_TOKEN": "not-the-token"}
        )
    assert code == 3
    token = _lines(out)["token"]
    assert token.startswith("FAILED") and "refused" in token
    assert "$FLURRY_TOKEN ([api].token_env)" in token and "not-the-token" not in out
    assert _lines(out)["root"].startswith("ok")


async def test_check_against_an_unreachable_api_exits_75_in_seconds(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api"
    config = write_config(tmp_path, url, history_days=10)
    began = time.monotonic()
    code, out, _ = await cli("check", "--config", str(config))
    assert time.monotonic() - began < 10
    assert code == 75
    token = _lines(out)["token"]
    assert token.startswith("FAILED") and f"the API at {url} is unreachable (3 tries)" in token


async def test_check_with_an_unwritable_root_exits_2(tmp_path: Path) -> None:
    async with simulator_process(sim_settings(), tmp_path) as (base, _):
        config = write_config(tmp_path, base, history_days=10)
        (tmp_path / "out").write_text("a file where the root should be")
        code, out, _ = await cli("check", "--config", str(config))
    assert code == 2
    report = _lines(out)
    assert report["root"].startswith("FAILED") and "not writable" in report["root"]
    assert report["token"].startswith("ok"), "the other checks still run"


async def test_check_with_a_broken_config_exits_2(tmp_path: Path) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text("[api\n")
    code, out, _ = await cli("check", "--config", str(config))
    assert code == 2
    assert _lines(out)["config"].startswith("FAILED") and str(config) in out


@pytest.mark.timeout(300)
async def test_a_refused_app_key_fails_that_app_alone_after_one_post(tmp_path: Path) -> None:
    root = tmp_path / "out"
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=40, apps=(SMALL, TYPO, MEDIUM))
        code, out, err = await cli("run", "--config", str(config), "--quiet")
        log = _calls(calls)
    assert code == 4, out + err
    _exact(root, SMALL)
    _exact(root, MEDIUM)
    typo = [(state, error) for app, state, error in _windows(root) if app == "typo"]
    assert len(typo) > 1 and all(state == "FAILED" for state, _ in typo)
    assert all("the API refused the key of app 'typo' (401)" in (error or "") for _, error in typo)
    assert "failed:  typo" in out and "refused the key of app 'typo'" in out
    posts = [c for c in log if c["kind"] == "submit" and c["api_key"] == TYPO.api_key]
    assert [c["status"] for c in posts] == [401], "one POST with the bad key, no more"
    assert all(c["status"] != 401 for c in log if c["api_key"] != TYPO.api_key)


async def test_sync_against_an_unreachable_api_exits_75_in_seconds_and_plans_nothing(
    tmp_path: Path,
) -> None:
    url = f"http://127.0.0.1:{_closed_port()}/api"
    config = write_config(tmp_path, url, history_days=10)
    began = time.monotonic()
    code, out, err = await cli("sync", "--config", str(config), "--quiet")
    assert time.monotonic() - began < 10
    assert code == 75
    assert f"the API at {url} is unreachable" in err and "nothing was submitted" in err
    assert "Traceback" not in err and out == ""
    assert _windows(tmp_path / "out") == [], "nothing planned, nothing left FAILED"
