"""The command line, run as a real subprocess."""

from __future__ import annotations

import gzip
import sys
from typing import TYPE_CHECKING

import anyio
import pyarrow.dataset as ds

from backfill.simulator import ground_truth
from backfill.simulator.data import encode_csv
from tests.simkit import SMALL, settings

if TYPE_CHECKING:
    from pathlib import Path

ROOT = __file__.rsplit("/tests/", 1)[0]
DAY = 86_400_000


async def backfill(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


async def test_help_lists_the_commands_and_exit_codes() -> None:
    code, out, _ = await backfill("--help")
    assert code == 0
    assert "simulate" in out and "convert" in out
    assert "130" in out and "transient failures exhausted" in out


async def test_convert_lands_a_hand_downloaded_file_once_however_often_it_runs(
    tmp_path: Path,
) -> None:
    rows = ground_truth(settings(), SMALL.api_key, 20_000 * DAY, 20_003 * DAY)
    source = tmp_path / "rawdata.csv.gz"
    source.write_bytes(gzip.compress(encode_csv(rows)))
    for _ in range(2):
        code, out, err = await backfill(
            "convert", str(source), "--app", "pocket notes", "--out", str(tmp_path / "out")
        )
        assert code == 0, err
        assert f"converted {len(rows)} rows" in out
    table = ds.dataset(
        tmp_path / "out" / "events", format="parquet", partitioning="hive"
    ).to_table()
    assert table.num_rows == len(rows)
    assert set(table.column("app").to_pylist()) == {"pocket notes"}, "readers decode the value"
    assert (tmp_path / "out" / "events" / "app=pocket%20notes").is_dir()


async def test_convert_refuses_a_corrupt_file_with_exit_4(tmp_path: Path) -> None:
    source = tmp_path / "broken.json.gz"
    source.write_bytes(gzip.compress(b'{"sessionTimestamp": 1}\n' * 1000)[:-20])
    code, _, err = await backfill(
        "convert", str(source), "--app", "a", "--out", str(tmp_path / "out")
    )
    assert code == 4
    assert "truncated gzip" in err and "Traceback" not in err
    assert not list((tmp_path / "out").rglob("*.parquet"))
    code, _, err = await backfill(
        "convert", str(tmp_path / "missing.gz"), "--app", "a", "--out", str(tmp_path / "out")
    )
    assert code == 2 and "no such file" in err


def test_every_command_of_the_parser_has_a_handler() -> None:
    from backfill.cli import HANDLERS
    from backfill.cli.parser import COMMANDS, build

    assert sorted(c.name for c in COMMANDS) == sorted(HANDLERS)
    required = {
        "convert": ["f", "--app", "a", "--out", "o"],
        "refresh": ["--app", "a"],
        "forget": ["--app", "a"],
    }
    for command in COMMANDS:
        args = [command.name, *required.get(command.name, [])]
        assert build().parse_args(args).command == command.name


async def test_every_new_command_has_help_with_an_example_and_the_exit_codes() -> None:
    for name in ("refresh", "forget", "convert", "plan"):
        code, out, _ = await backfill(name, "--help")
        assert code == 0
        assert "example:" in out and f"backfill {name}" in out
        assert "exit codes:" in out and "130" in out


async def test_convert_of_the_same_file_under_another_app_keeps_the_first(tmp_path: Path) -> None:
    rows = ground_truth(settings(), SMALL.api_key, 20_000 * DAY, 20_002 * DAY)
    source = tmp_path / "rawdata.csv.gz"
    source.write_bytes(gzip.compress(encode_csv(rows)))
    out = tmp_path / "out"
    for app in ("first", "second"):
        code, _, err = await backfill("convert", str(source), "--app", app, "--out", str(out))
        assert code == 0, err
    for app in ("first", "second"):
        table = ds.dataset(out / "events" / f"app={app}", format="parquet").to_table()
        assert table.num_rows == len(rows), app


async def test_verify_without_a_ledger_exits_2_not_5(tmp_path: Path) -> None:
    config = tmp_path / "backfill.toml"
    config.write_text(
        f'[api]\ntoken_env = "FLURRY_TOKEN"\n[output]\nroot = "{tmp_path / "out"}"\n'
        '[[apps]]\nname = "a"\napi_key = "AAAAAAAAAAAAAAAAAAAA"\n'
    )
    code, _, err = await backfill("verify", "--config", str(config))
    assert code == 2
    assert "no ledger to verify against" in err and "Traceback" not in err


async def test_a_ledger_row_in_a_state_this_version_does_not_know_is_exit_5(tmp_path: Path) -> None:
    import sqlite3

    from backfill.ledger import Ledger

    config = tmp_path / "backfill.toml"
    config.write_text(
        '[api]\nbase_url = "http://127.0.0.1:9/pulse/v1"\ntoken_env = "FLURRY_TOKEN"\n'
        f'[output]\nroot = "{tmp_path / "out"}"\n'
        '[[apps]]\nname = "a"\napi_key = "AAAAAAAAAAAAAAAAAAAA"\n'
    )
    ledger = await Ledger.open(tmp_path / "out" / "_ledger.sqlite")
    await ledger.add_windows("a", 20_000 * DAY, 20_001 * DAY, size_ms=DAY)
    await ledger.close()
    db = sqlite3.connect(tmp_path / "out" / "_ledger.sqlite")
    db.execute("UPDATE windows SET state = 'ARCHIVED'")
    db.commit()
    db.close()
    code, _, err = await backfill("status", "--config", str(config))
    assert code == 5 and "'ARCHIVED', which this backfill does not know" in err
    assert "Traceback" not in err


async def test_a_printing_command_piped_into_head_ends_quietly(tmp_path: Path) -> None:
    config = tmp_path / "backfill.toml"
    apps = "".join(f'[[apps]]\nname = "a{i}"\napi_key = "{chr(65 + i) * 20}"\n' for i in range(3))
    config.write_text(
        '[api]\ntoken_env = "FLURRY_TOKEN"\n[windows]\nmax_days = 1\n'
        f'[output]\nroot = "{tmp_path / "out"}"\n{apps}'
    )  # two years of one-day windows of three apps: far more than a pipe holds
    script = f'{sys.executable} -m backfill plan --json --config {config} | head -1; exit "${{PIPESTATUS[0]}}"'
    done = await anyio.run_process(["bash", "-c", script], cwd=ROOT, check=False)
    assert done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().strip() == "["
    assert done.stderr.decode() == ""
