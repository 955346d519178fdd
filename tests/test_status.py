"""``backfill status`` against a ledger built by hand: its calendar, JSON and ``--check``."""

from __future__ import annotations

import datetime as dt
import json
import sys
from typing import TYPE_CHECKING

import anyio

from backfill import calendar
from backfill.calendar import Day
from backfill.ledger import Ledger
from backfill.models import DAY_MS, HOUR_MS, WindowRecord
from backfill.models import WindowState as S

if TYPE_CHECKING:
    from pathlib import Path

ROOT = __file__.rsplit("/tests/", 1)[0]


def ms(day: str) -> int:
    return calendar.day_ms(dt.date.fromisoformat(day))


async def cli(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def _commit(ledger: Ledger, record: WindowRecord) -> WindowRecord:
    for state in (S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED):
        record = await ledger.advance(record, state, request_id=f"r{record.id}")
    return await ledger.advance(record, S.COMMITTED, rows=10, bytes=100)


async def _fail(ledger: Ledger, record: WindowRecord, *, retryable: bool, times: int = 1) -> None:
    for n in range(times):
        if n:
            record = await ledger.retry(record)
        record = await ledger.advance(
            record,
            S.FAILED,
            error_class="RequestRejectedError" if not retryable else "TransientError",
            error_message="Flurry said Failure" if not retryable else f"HTTP 503 (#{n + 1})",
            retryable=retryable,
        )


async def _build(root: Path) -> Path:
    """alpha: committed, failed (one not retryable, one worn out, one retryable), in flight,
    never asked, pending, committed again; beta: days alternately committed and failed;
    gamma: nothing.  No committed window has its files: as if deleted, every one."""
    ledger = await Ledger.open(root / "_ledger.sqlite")
    first = await ledger.add_windows("alpha", ms("2026-01-28"), ms("2026-02-10"), size_ms=DAY_MS)
    second = await ledger.add_windows("alpha", ms("2026-02-15"), ms("2026-03-03"), size_ms=DAY_MS)
    assert len(first) == 13 and len(second) == 16
    for record in first[:9]:  # 2026-01-28 .. 2026-02-05
        await _commit(ledger, record)
    await _fail(ledger, first[9], retryable=False)  # 02-06
    await _fail(ledger, first[10], retryable=True)  # 02-07
    await _fail(ledger, first[11], retryable=True, times=2)  # 02-08: heal_runs = 2, worn out
    await ledger.advance(first[12], S.SUBMITTED, request_id="flying")  # 02-09
    for record in second[6:]:  # 02-21 .. 03-02; 02-15 .. 02-20 stay PENDING
        await _commit(ledger, record)
    beta = await ledger.add_windows("beta", ms("2026-01-01"), ms("2026-01-31"), size_ms=DAY_MS)
    for i, record in enumerate(beta):
        if i % 2:
            await _fail(ledger, record, retryable=True)
        else:
            await _commit(ledger, record)
    await ledger.close()
    config = root.parent / "backfill.toml"
    apps = {"alpha": "A", "beta": "B", "gamma": "C"}
    config.write_text(
        '[api]\nbase_url = "http://127.0.0.1:9/pulse/v1"\ntoken_env = "FLURRY_TOKEN"\n'
        f'[windows]\nheal_runs = 2\n[output]\nroot = "{root}"\n'
        + "".join(f'[[apps]]\nname = "{n}"\napi_key = "{k * 20}"\n' for n, k in apps.items())
    )
    return config


ALPHA_CALENDAR = [
    {"month": "2026-01", "days": " " * 27 + "####"},
    {"month": "2026-02", "days": "#####xxx.-----......########"},
    {"month": "2026-03", "days": "##" + " " * 29},
]


async def test_status_json_carries_every_day_the_gaps_and_the_failures(tmp_path: Path) -> None:
    config = await _build(tmp_path / "out")
    code, out, err = await cli("status", "--config", str(config), "--json")
    assert code == 0, err
    report = {r["app"]: r for r in json.loads(out)}
    alpha, beta, gamma = report["alpha"], report["beta"], report["gamma"]
    assert alpha["calendar"] == ALPHA_CALENDAR
    assert alpha["span"] == {"first": "2026-01-28", "last": "2026-03-02", "days": 34}
    assert alpha["committed_days"] == 19 and alpha["rows"] == 190
    assert (alpha["first_day"], alpha["last_day"]) == ("2026-01-28", "2026-03-02")
    assert alpha["windows"] == {"committed": 19, "failed": 3, "pending": 7, "split": 0}
    assert alpha["gaps"] == [{"first": "2026-02-06", "last": "2026-02-20", "days": 15}]
    assert [(f["window"][:10], f["retryable"], f["failures"], f["needs_person"])
            for f in alpha["failures"]] == [
        ("2026-02-06", False, 1, True),
        ("2026-02-07", True, 1, False),
        ("2026-02-08", True, 2, True),
    ]  # fmt: skip
    assert alpha["failures"][0]["error"] == "Flurry said Failure"
    assert alpha["failures"][2]["error"] == "HTTP 503 (#2)"
    assert beta["calendar"] == [{"month": "2026-01", "days": "#x" * 15 + " "}]
    assert beta["committed_days"] == 15 and len(beta["failures"]) == 15
    assert beta["gaps"] == [
        {"first": f"2026-01-{d:02}", "last": f"2026-01-{d:02}", "days": 1} for d in range(2, 31, 2)
    ]
    assert not any(f["needs_person"] for f in beta["failures"])
    assert gamma["calendar"] == [] and gamma["span"] is None and gamma["committed_days"] == 0


async def test_status_draws_the_calendar_and_cuts_long_lists(tmp_path: Path) -> None:
    config = await _build(tmp_path / "out")
    code, out, err = await cli("status", "--config", str(config))
    assert code == 0, err
    lines = out.splitlines()
    head = lines.index("alpha: 19 of 34 days have rows (2026-01-28 .. 2026-03-02)")
    assert lines[head + 1 : head + 5] == [
        "           1   5    10   15   20   25   30",
        "  2026-01  " + " " * 27 + "####",
        "  2026-02  #####xxx.-----......########",
        "  2026-03  ##",
    ]
    assert lines[head + 5 : head + 11] == [
        "  gaps: 15 days without rows, in 1 stretch",
        "    2026-02-06 .. 2026-02-20 (15 days)",
        "  failed windows: 3, 2 of them need a person",
        "    2026-02-06T00:00:00Z/2026-02-07T00:00:00Z: Flurry said Failure  "
        "[needs a person: not retryable; `backfill retry`]",
        "    2026-02-07T00:00:00Z/2026-02-08T00:00:00Z: HTTP 503 (#1)  "
        "[retryable, failed 1 time; the next run or sync takes it back]",
        "    2026-02-08T00:00:00Z/2026-02-09T00:00:00Z: HTTP 503 (#2)  "
        "[needs a person: failed 2 times; `backfill retry`]",
    ]
    assert any(line.startswith("alpha ") and line.endswith("  19 of 34") for line in lines)
    beta = lines.index("beta: 15 of 30 days have rows (2026-01-01 .. 2026-01-30)")
    assert lines[beta + 2] == "  2026-01  " + "#x" * 15
    assert lines[beta + 3] == "  gaps: 15 days without rows, in 15 stretches"
    assert lines[beta + 4 : beta + 14] == [f"    2026-01-{d:02} (1 day)" for d in range(2, 21, 2)]
    assert lines[beta + 14] == "    and 5 more (--all lists them)"
    assert lines.count("    and 5 more (--all lists them)") == 2  # the gaps and the failures
    assert "gamma: nothing planned yet" in lines
    assert lines[-1] == calendar.LEGEND

    code, out, _ = await cli("status", "--config", str(config), "--all")
    assert code == 0 and "more (--all" not in out
    assert all(f"    2026-01-{d:02} (1 day)" in out.splitlines() for d in range(2, 31, 2))
    assert out.count("[retryable, failed 1 time;") == 16  # beta's 15 and alpha's one


async def test_status_check_exits_4_only_when_a_window_needs_a_person(tmp_path: Path) -> None:
    config = await _build(tmp_path / "out")
    code, out, err = await cli("status", "--config", str(config), "--check")
    assert code == 4
    assert "2 FAILED windows need a person" in err and "alpha: 19 of 34" in out
    code, out, err = await cli("status", "--config", str(config), "--check", "--json")
    assert code == 4 and json.loads(out)[0]["app"] == "alpha"
    code, _, err = await cli("status", "--config", str(config), "--check", "--app", "beta")
    assert code == 0, err  # beta's failures are all retryable: the next night takes them
    code, _, _ = await cli("status", "--config", str(config))
    assert code == 0, "without --check, status only looks"
    # status reads the ledger only (alpha's 2026-02-03, window 7, is '#' above); the files
    # that are gone are verify's to find.
    code, out, _ = await cli("verify", "--config", str(config))
    assert (
        code == 5
        and "_manifests/alpha/7.0.json: the manifest of a committed window is missing" in out
    )
    code, out, _ = await cli("status", "--help")
    assert "--check" in out and "exit 4" in out


def test_a_day_counts_only_its_part_inside_the_span() -> None:
    d0 = ms("2026-05-01")
    ranges = [
        (d0 + 6 * HOUR_MS, d0 + DAY_MS + 6 * HOUR_MS, Day.COMMITTED),
        (d0 + DAY_MS + 6 * HOUR_MS, d0 + 2 * DAY_MS, Day.PENDING),
        (d0 + 3 * DAY_MS, d0 + 3 * DAY_MS + HOUR_MS, Day.FAILED),
        (d0 + 3 * DAY_MS + HOUR_MS, d0 + 4 * DAY_MS - HOUR_MS, Day.COMMITTED),
    ]
    days = calendar.day_states(ranges, d0 + 6 * HOUR_MS, d0 + 4 * DAY_MS - HOUR_MS)
    assert "".join(days.values()) == "#.-x"
    assert calendar.months(days) == [("2026-05", "#.-x" + " " * 27)]
    assert calendar.runs(days, lambda d: d is not Day.COMMITTED) == [
        (dt.date(2026, 5, 2), dt.date(2026, 5, 4))
    ]
