"""Configuration: every bad file gets its exact message, exit 2, and nothing on disk."""

from __future__ import annotations

import os
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from backfill import config
from backfill.errors import ConfigError
from tests.enginekit import ROOT

if TYPE_CHECKING:
    from pathlib import Path

GOOD = """
[api]
base_url = "http://127.0.0.1:9/pulse/v1"
token_env = "FLURRY_TOKEN"
[windows]
max_days = 30
[output]
root = "{root}"
[[apps]]
name = "puzzle-quest"
api_key = "AAAA1111BBBB2222CCCC"
"""

# (what, the change to GOOD as (old, new) or a whole file, the exact message after the path)
BAD: list[tuple[str, tuple[str, str] | str, str]] = [
    ("not TOML", "this is [not toml", "not valid TOML"),
    (
        "unknown table",
        ("[windows]", "[window]"),
        "[window]: unknown table; did you mean [windows]?",
    ),
    (
        "unknown key with did-you-mean",
        ("max_days = 30", "max_day = 30"),
        "windows.max_day: unknown key; did you mean 'max_days'?",
    ),
    (
        "wrong type",
        ("max_days = 30", 'max_days = "thirty"'),
        "windows.max_days = 'thirty': expected an integer",
    ),
    (
        "max_days over 30",
        ("max_days = 30", "max_days = 31"),
        "windows.max_days = 31: expected a value between 1 and 30",
    ),
    (
        "max_days zero",
        ("max_days = 30", "max_days = 0"),
        "windows.max_days = 0: expected a value between 1 and 30",
    ),
    (
        "bad timezone",
        ("max_days = 30", 'timezone = "Mars/Olympus"'),
        "windows.timezone = 'Mars/Olympus': expected an IANA zone",
    ),
    (
        "bad format",
        ('token_env = "FLURRY_TOKEN"', 'token_env = "FLURRY_TOKEN"\nformat = "XML"'),
        'api.format = \'XML\': expected "JSON" or "CSV"',
    ),
    (
        "no token source",
        ('token_env = "FLURRY_TOKEN"', ""),
        "api: expected exactly one of token_env or token_file",
    ),
    (
        "two token sources",
        ('token_env = "FLURRY_TOKEN"', 'token_env = "FLURRY_TOKEN"\ntoken_file = "/x"'),
        "api: expected exactly one of token_env or token_file",
    ),
    (
        "token on the command line is not a key",
        ('token_env = "FLURRY_TOKEN"', 'token = "abc"'),
        "api.token: unknown key; did you mean 'token_env'?",
    ),
    (
        "bad base url",
        ('base_url = "http://127.0.0.1:9/pulse/v1"', 'base_url = "ftp://x"'),
        "api.base_url = 'ftp://x': expected an http:// or https:// URL",
    ),
    (
        "negative in flight",
        ('token_env = "FLURRY_TOKEN"', 'token_env = "FLURRY_TOKEN"\nmax_in_flight = 0'),
        "api.max_in_flight = 0: expected a value at least 1",
    ),
    (
        "malformed api key",
        ('api_key = "AAAA1111BBBB2222CCCC"', 'api_key = "short"'),
        "apps[0].api_key = 'short': expected 20 characters of A-Z and 0-9",
    ),
    (
        "duplicate app name",
        (
            'api_key = "AAAA1111BBBB2222CCCC"',
            'api_key = "AAAA1111BBBB2222CCCC"\n[[apps]]\nname = "puzzle-quest"\napi_key = "BBBB1111BBBB2222CCCC"',
        ),
        "apps[1].name = 'puzzle-quest': expected a name not already used by apps[0]",
    ),
    (
        "duplicate api key",
        (
            'api_key = "AAAA1111BBBB2222CCCC"',
            'api_key = "AAAA1111BBBB2222CCCC"\n[[apps]]\nname = "other"\napi_key = "AAAA1111BBBB2222CCCC"',
        ),
        "apps[1].api_key = 'AAAA1111BBBB2222CCCC': expected a key not already used by apps[0]",
    ),
    (
        "no apps",
        ('[[apps]]\nname = "puzzle-quest"\napi_key = "AAAA1111BBBB2222CCCC"', ""),
        "apps = missing: expected at least one [[apps]] table",
    ),
    (
        "app without a key",
        ('api_key = "AAAA1111BBBB2222CCCC"', ""),
        "apps[0].api_key = missing: expected a value",
    ),
    (
        "filter with a comma",
        (
            'api_key = "AAAA1111BBBB2222CCCC"',
            'api_key = "AAAA1111BBBB2222CCCC"\nevent_ids = ["1,2"]',
        ),
        "apps[0].event_ids = ['1,2']: expected non-empty values without commas",
    ),
    (
        "bad on_bad_rows",
        ('root = "{root}"', 'root = "{root}"\non_bad_rows = "ignore"'),
        'output.on_bad_rows = \'ignore\': expected "fail" or "quarantine"',
    ),
    (
        "unknown URI scheme",
        ('root = "{root}"', 'root = "abfs://lake/flurry"'),
        "output.root = 'abfs://lake/flurry': expected a local folder, or s3://BUCKET/PREFIX",
    ),
    (
        "object-store root without a ledger",
        ('root = "{root}"', 'root = "s3://lake/flurry"'),
        "output.root = 's3://lake/flurry': an object-store root cannot hold the ledger; add one "
        "to the config: [ledger] url = 'postgresql://HOST/DB' (shared by many workers) or a "
        "local file, [ledger] path = '/var/lib/backfill/ledger.sqlite'",
    ),
    (
        "a ledger path and url both",
        ("[[apps]]", '[ledger]\npath = "l.sqlite"\nurl = "postgresql://db/x"\n[[apps]]'),
        "ledger: expected one of path (SQLite) or url (PostgreSQL), not both",
    ),
    (
        "a ledger url of another database, its password masked",
        ("[[apps]]", '[ledger]\nurl = "mysql://me:hunter2@db/x"\n[[apps]]'),
        "ledger.url = 'mysql://me:***@db/x': expected a postgresql:// URL",
    ),
    (
        "a password variable without a url",
        ("[[apps]]", '[ledger]\npassword_env = "PGPW"\n[[apps]]'),
        "ledger.password_env: only for a PostgreSQL ledger.url",
    ),
    (
        "a lease under a second",
        ("[[apps]]", '[ledger]\nurl = "postgresql://db/x"\nlease_s = 0.5\n[[apps]]'),
        "ledger.lease_s = 0.5: expected a value at least 1.0",
    ),
]


def _write(tmp_path: Path, change: tuple[str, str] | str) -> Path:
    text = GOOD if isinstance(change, tuple) else change
    if isinstance(change, tuple):
        assert change[0] in text, change
        text = text.replace(change[0], change[1])
    path = tmp_path / "backfill.toml"
    path.write_text(text.replace("{root}", str(tmp_path / "out")))
    return path


@pytest.mark.parametrize(("what", "change", "message"), BAD, ids=[b[0] for b in BAD])
def test_a_bad_config_is_refused_with_its_exact_message(
    tmp_path: Path, what: str, change: tuple[str, str] | str, message: str
) -> None:
    path = _write(tmp_path, change)
    with pytest.raises(ConfigError) as caught:
        config.load(path)
    assert str(caught.value).startswith(f"{path}: ")
    assert message in str(caught.value)


@pytest.mark.parametrize(
    ("what", "change", "message"),
    BAD[:6] + BAD[13:16] + BAD[-1:],
    ids=[b[0] for b in BAD[:6] + BAD[13:16] + BAD[-1:]],
)
async def test_the_cli_exits_2_and_creates_nothing(
    tmp_path: Path, what: str, change: tuple[str, str] | str, message: str
) -> None:
    path = _write(tmp_path, change)
    done = await anyio.run_process([sys.executable, "-m", "backfill.cli", "run", "--config", str(path)], cwd=ROOT,
                                   env=os.environ | {"FLURRY_TOKEN": "t"}, check=False)  # fmt: skip
    err = done.stderr.decode()
    assert done.returncode == 2
    assert message in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["backfill.toml"], "nothing created on disk"


def test_the_token_comes_from_the_environment_or_a_file_only(tmp_path: Path) -> None:
    settings = config.load(_write(tmp_path, ("", "")))
    assert config.read_token(settings, {"FLURRY_TOKEN": " tok \n"}) == "tok"
    with pytest.raises(
        ConfigError, match="the environment variable FLURRY_TOKEN is not set or empty"
    ):
        config.read_token(settings, {})
    token_file = tmp_path / "token"
    from_file = config.load(
        _write(tmp_path, ('token_env = "FLURRY_TOKEN"', f'token_file = "{token_file}"'))
    )
    with pytest.raises(ConfigError, match="cannot read it"):
        config.read_token(from_file, {})
    token_file.write_text("filetoken\n")
    assert config.read_token(from_file, {}) == "filetoken"


def test_history_beyond_two_years_is_clamped_with_a_warning(tmp_path: Path) -> None:
    settings = config.load(_write(tmp_path, ("max_days = 30", "history_days = 1000")))
    assert settings.windows.history_days == 730
    assert any("clamped to 730" in w for w in settings.warnings)


def test_an_unwritable_output_root_is_refused(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("x")
    settings = config.load(_write(tmp_path, ('root = "{root}"', f'root = "{blocker}/out"')))
    with pytest.raises(ConfigError, match="output.root = .*: not writable"):
        config.check_writable(settings)


async def test_bad_dates_and_unknown_apps_exit_2(tmp_path: Path) -> None:
    path = _write(tmp_path, ("", ""))
    for args, message in (
        (["--start", "2026-13-01"], "is not an ISO date or datetime"),
        (["--start", "2026-02-01", "--end", "2026-01-01"], "--end must be after --start"),
        (["--app", "nope"], "--app 'nope': not an app of"),
    ):
        done = await anyio.run_process([sys.executable, "-m", "backfill.cli", "run", "--config", str(path), *args],
                                       cwd=ROOT, env=os.environ | {"FLURRY_TOKEN": "t"}, check=False)  # fmt: skip
        assert done.returncode == 2, args
        assert message in done.stderr.decode()
    assert not await anyio.Path(tmp_path / "out").exists()
