"""The life of the data after its backfill, through the real CLI against the real simulator.

Recorded settings (a changed filter or a rename is refused), ``refresh`` (all, by range,
``--damaged``), ``forget``, and ``convert`` into a managed root.  Each test ends with the output
equal to the simulator's ground truth and ``verify`` clean.
"""

from __future__ import annotations

import gzip
import json
import sqlite3
import time
from typing import TYPE_CHECKING, Any

import pytest

from backfill.simulator import ground_truth
from backfill.simulator.data import encode_json
from tests.enginekit import APPS, DAY, landed, sim_settings, simulator_process, write_config
from tests.test_cli_runs import _calls, cli

if TYPE_CHECKING:
    from pathlib import Path

SMALL, MEDIUM = APPS[0], APPS[1]


def _submits(calls: Path) -> list[dict[str, Any]]:
    return [c for c in _calls(calls) if c["kind"] == "submit" and c["status"] == 200]


def _live(root: Path, app: str) -> list[tuple[int, int, str]]:
    """(start, end, state) of ``app``'s windows whose files are live, from the ledger."""
    db = sqlite3.connect(root / "_ledger.sqlite")
    try:
        return db.execute(
            "SELECT start_ms, end_ms, state FROM windows WHERE app = ? "
            "AND committed_attempt IS NOT NULL ORDER BY start_ms",
            (app,),
        ).fetchall()
    finally:
        db.close()


def _truth(app: str, start: int, end: int, **filters: Any) -> list[str]:
    key = next(a.api_key for a in APPS if a.name == app)
    rows = ground_truth(sim_settings(), key, start, end, **filters)
    return sorted(json.dumps(r, sort_keys=True) for r in rows)


def _exact(root: Path, app: str, **filters: Any) -> None:
    """The app's output is exactly the truth of its committed range, each row once."""
    live = _live(root, app)
    assert live and all(state == "COMMITTED" for _, _, state in live)
    assert all(a[1] == b[0] for a, b in zip(live, live[1:], strict=False)), "no gap, no overlap"
    assert landed(root, app) == _truth(app, live[0][0], live[-1][1], **filters)


def _with_filter(config: Path, app: Any, line: str) -> None:
    text = config.read_text()
    anchor = f'api_key = "{app.api_key}"\n'
    config.write_text(text.replace(anchor, anchor + line + "\n"))


@pytest.mark.timeout(300)
async def test_a_changed_filter_is_refused_until_refresh_pulls_every_window_with_it(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=40, apps=(SMALL, MEDIUM))
        code, _, err = await cli("run", "--config", str(config), "--quiet")
        assert code == 0, err
        _with_filter(config, SMALL, 'app_versions = ["1.0.0", "2.0.0"]')
        before = len(_calls(calls))
        for command in ("run", "sync"):
            code, _, err = await cli(command, "--config", str(config), "--quiet")
            assert code == 2, err
            assert "app 'small'" in err and "app_versions: was (none)" in err
            assert "the config now says 1.0.0,2.0.0" in err
            assert "backfill refresh --app small" in err and "restore the old value" in err
        assert len(_calls(calls)) == before, "nothing was submitted"

        code, out_text, err = await cli(
            "plan", "--config", str(config), "--refresh", "--app", "small", "--json"
        )
        assert code == 0, err
        shown = json.loads(out_text)
        assert len(shown) == len(_live(out, "small")) and {r["state"] for r in shown} == {"REFRESH"}
        submitted = len(_submits(calls))
        code, _, err = await cli("refresh", "--config", str(config), "--app", "small", "--quiet")
        assert code == 0, err
        refreshed = _submits(calls)[submitted:]
        assert {c["api_key"] for c in refreshed} == {SMALL.api_key}, "only small is pulled again"
        _exact(out, "small", app_versions=["1.0.0", "2.0.0"])
        assert landed(out, "small") != _truth("small", *_span(out, "small")), "the filter bites"
        _exact(out, "medium")
        code, _, err = await cli("sync", "--config", str(config), "--quiet")
        assert code == 0, err
        code, _, err = await cli("verify", "--config", str(config))
        assert code == 0, err
        _exact(out, "small", app_versions=["1.0.0", "2.0.0"])


def _span(root: Path, app: str) -> tuple[int, int]:
    live = _live(root, app)
    return live[0][0], live[-1][1]


@pytest.mark.timeout(300)
async def test_a_rename_is_refused_and_forget_drops_the_old_name_only(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = write_config(tmp_path, base, history_days=12, apps=(SMALL, MEDIUM))
        code, _, err = await cli("run", "--config", str(config), "--quiet")
        assert code == 0, err
        config.write_text(config.read_text().replace('name = "small"', 'name = "tiny"'))
        before = len(_calls(calls))
        code, _, err = await cli("run", "--config", str(config), "--quiet")
        assert code == 2, err
        assert "app 'tiny'" in err and "recorded in the ledger for the app 'small'" in err
        assert "backfill forget --app small" in err
        assert len(_calls(calls)) == before, "nothing was submitted"

        files = sorted(out.rglob("*"))
        code, text, err = await cli("forget", "--config", str(config), "--app", "small")
        assert code == 2, err
        assert "would delete" in text and "rows" in text and "bytes" in text
        assert sorted(out.rglob("*")) == files, "nothing deleted without --yes"
        medium = landed(out, "medium")
        code, text, err = await cli("forget", "--config", str(config), "--app", "small", "--yes")
        assert code == 0, err
        assert "forgot small" in text
        assert not (out / "events" / "app=small").exists()
        assert not (out / "_manifests" / "small").exists()
        db = sqlite3.connect(out / "_ledger.sqlite")
        left = db.execute("SELECT count(*) FROM windows WHERE app = 'small'").fetchone()[0]
        settings = db.execute("SELECT count(*) FROM app_settings WHERE app = 'small'").fetchone()[0]
        db.close()
        assert (left, settings) == (0, 0)
        assert landed(out, "medium") == medium, "the other app is untouched"

        code, _, err = await cli("run", "--config", str(config), "--quiet")
        assert code == 0, err
        code, _, err = await cli("verify", "--config", str(config))
        assert code == 0, err
        live = _live(out, "tiny")
        assert landed(out, "tiny") == _truth("small", live[0][0], live[-1][1])
        _exact(out, "medium")


@pytest.mark.timeout(300)
async def test_refresh_damaged_pulls_exactly_the_damaged_window_again(tmp_path: Path) -> None:
    out = tmp_path / "out"
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = str(write_config(tmp_path, base, history_days=40, apps=(SMALL,)))
        code, _, err = await cli("run", "--config", config, "--quiet")
        assert code == 0, err
        victim = sorted((out / "events").rglob("*.parquet"))[3]
        window_id = int(victim.name.split("-")[1])
        victim.unlink()
        code, _, _ = await cli("verify", "--config", config)
        assert code == 5
        code, text, err = await cli(
            "plan", "--config", config, "--refresh", "--damaged", "--app", "small", "--json"
        )
        assert code == 0, err
        (shown,) = json.loads(text)
        assert shown["state"] == "REFRESH"
        before = len(_submits(calls))
        code, _, err = await cli("refresh", "--config", config, "--app", "small", "--damaged")
        assert code == 0, err
        again = _submits(calls)[before:]
        db = sqlite3.connect(out / "_ledger.sqlite")
        start, end = db.execute(
            "SELECT start_ms, end_ms FROM windows WHERE id = ?", (window_id,)
        ).fetchone()
        db.close()
        assert again and all(start <= c["start_ms"] and c["end_ms"] <= end for c in again)
        code, text, err = await cli("verify", "--config", config)
        assert code == 0, text + err
        _exact(out, "small")


def _today() -> int:
    return int(time.time() * 1000) // DAY * DAY


@pytest.mark.timeout(300)
async def test_convert_into_a_managed_root_is_kept_and_replace_replaces_by_range(
    tmp_path: Path,
) -> None:
    out = tmp_path / "out"
    today = _today()
    first = (today - 15 * DAY, today - 12 * DAY)
    source = tmp_path / "rawdata.json.gz"
    source.write_bytes(
        gzip.compress(encode_json(ground_truth(sim_settings(), SMALL.api_key, *first)))
    )
    async with simulator_process(sim_settings(), tmp_path) as (base, calls):
        config = str(write_config(tmp_path, base, history_days=20, apps=(SMALL,)))
        code, text, err = await cli("convert", str(source), "--app", "small", "--config", config)
        assert code == 0, err
        assert "COMMITTED in the ledger" in text
        assert [(a, b) for a, b, _ in _live(out, "small")] == [first]
        code, _, err = await cli("run", "--config", config, "--quiet")
        assert code == 0, err
        assert not [
            c for c in _submits(calls) if c["start_ms"] < first[1] and c["end_ms"] > first[0]
        ]
        code, text, err = await cli("verify", "--config", config)
        assert code == 0, text + err
        _exact(out, "small")

        middle = (today - 14 * DAY, today - 13 * DAY)
        source.write_bytes(
            gzip.compress(encode_json(ground_truth(sim_settings(), SMALL.api_key, *middle)))
        )
        code, _, err = await cli("convert", str(source), "--app", "small", "--config", config)
        assert code == 2
        assert "overlaps committed windows of small" in err and "--replace" in err
        code, text, err = await cli(
            "convert", str(source), "--app", "small", "--config", config, "--replace"
        )
        assert code == 0, err
        assert "replaced 1 window" in text
        code, text, err = await cli("verify", "--config", config)
        assert code == 0, text + err
        before = len(_submits(calls))
        code, _, err = await cli("run", "--config", config, "--quiet")
        assert code == 0, err
        pulled = sorted((c["start_ms"], c["end_ms"]) for c in _submits(calls)[before:])
        assert pulled == [(first[0], middle[0]), (middle[1], first[1])], "only the parts outside"
        code, text, err = await cli("verify", "--config", config)
        assert code == 0, text + err
        _exact(out, "small")
