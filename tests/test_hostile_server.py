"""The client and the CLI against a hostile server on loopback (``tests.hostile``).

Two levels.  The client alone: each attack ends in a typed error, within seconds, whose text
and repr carry neither the token nor a link's signature.  The real CLI in a subprocess: the
attacked app's windows fail with the documented exit code and a clear message, and the sentinel
shows nowhere a person or a file can see (stdout, stderr, the ledger's ``error_message``,
``status --json``); the other app's windows commit, and a clean run afterwards finishes all.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import time
from typing import TYPE_CHECKING

import anyio
import pytest

from backfill.client import FlurryClient, Secret, Timeouts
from backfill.errors import (
    BadDataError,
    IntegrityError,
    ServerError,
    TransportError,
    WindowError,
)
from backfill.models import DAY_MS, Window
from tests.enginekit import APPS, ROOT, write_config
from tests.hostile import SIGNATURE, TOKEN, serve

if TYPE_CHECKING:
    from pathlib import Path

VICTIM, BYSTANDER = APPS[0], APPS[1]
WINDOW = Window(app=VICTIM.name, start=1_767_225_600_000, end=1_767_225_600_000 + DAY_MS)
ENV = os.environ | {"FLURRY_TOKEN": TOKEN}
FAST = "max_attempts = 2\nbackoff_base_s = 0.01\nbackoff_cap_s = 0.05\nread_timeout_s = 2"


def _clean(text: str) -> None:
    assert TOKEN not in text, text
    assert SIGNATURE not in text, text
    assert "Bearer tok" not in text, text


async def _window_through(api: FlurryClient, tmp_path: Path) -> None:
    """Submit, poll until ready and download one window of the victim app."""
    request_id = await api.submit(WINDOW, api_key=VICTIM.api_key)
    ready = await api.status(request_id, window=WINDOW)
    assert not isinstance(ready, type(None))
    url = getattr(ready, "url", None)
    assert url is not None
    await api.download(url, tmp_path / "26.gz", window=WINDOW, request_id=request_id)


# -- the client alone ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("mode", "error", "words"),
    [
        ("echo-502", ServerError, "server error 502"),
        ("api-bad-status-line", TransportError, "POST http://127.0.0.1"),
        ("redirect-loop", TransportError, "TooManyRedirects"),
        ("bad-content-length", TransportError, "failed after 0 bytes"),
        ("download-bad-status-line", TransportError, "failed after 0 bytes"),
        ("file-link", ServerError, "not an http(s) link (file:///etc/passwd)"),
        ("invalid-link", ServerError, "the download link is malformed: http://[::1/x?…"),
    ],
)
async def test_an_attack_on_the_client_is_a_typed_error_without_a_secret(
    tmp_path: Path, mode: str, error: type[Exception], words: str
) -> None:
    async with (
        serve(VICTIM.api_key, mode) as hostile,
        FlurryClient(base_url=hostile.base, token=Secret(TOKEN)) as api,
    ):
        with pytest.raises(error) as caught:
            await _window_through(api, tmp_path)
    assert isinstance(caught.value, WindowError)
    assert words in str(caught.value)
    _clean(str(caught.value))
    _clean(repr(caught.value))
    _clean(repr(caught.value.args))
    assert not (tmp_path / "26.gz").exists(), "a failed download leaves no file"


async def test_an_endless_status_body_is_cut_at_the_cap(tmp_path: Path) -> None:
    async with (
        serve(VICTIM.api_key, "status-endless") as hostile,
        FlurryClient(base_url=hostile.base, token=Secret(TOKEN), max_body_bytes=256 << 10) as api,
    ):
        request_id = await api.submit(WINDOW, api_key=VICTIM.api_key)
        with pytest.raises(ServerError, match=r"over the 262,144-byte cap"):
            await api.status(request_id, window=WINDOW)
    # the server may have had some bytes buffered in the socket, never much more than the cap
    assert hostile.sent_bytes < 16 << 20


async def test_an_endless_download_is_refused_while_streaming_at_the_limit(
    tmp_path: Path,
) -> None:
    cap = 8 << 20
    began = time.monotonic()
    async with (
        serve(VICTIM.api_key, "endless-download") as hostile,
        FlurryClient(base_url=hostile.base, token=Secret(TOKEN), max_download_bytes=cap) as api,
    ):
        with pytest.raises(BadDataError, match=r"over the 8,388,608-byte compressed-size limit"):
            await _window_through(api, tmp_path)
    assert time.monotonic() - began < 30
    assert hostile.sent_bytes < cap + (16 << 20)
    assert not (tmp_path / "26.gz").exists(), "the capped body is removed"


async def test_a_trickling_download_is_a_stall_not_an_hour(tmp_path: Path) -> None:
    timeouts = Timeouts(read_s=5, stall_s=0.5, stall_bytes=1000)
    began = time.monotonic()
    async with (
        serve(VICTIM.api_key, "trickle") as hostile,
        FlurryClient(base_url=hostile.base, token=Secret(TOKEN), timeouts=timeouts) as api,
    ):
        with pytest.raises(TransportError, match=r"the download stalled: \d+ bytes in"):
            await _window_through(api, tmp_path)
    assert time.monotonic() - began < 10
    assert 0 < hostile.sent_bytes < 100


async def test_a_link_planted_where_the_download_goes_is_not_written_through(
    tmp_path: Path,
) -> None:
    outside = tmp_path / "outside.gz"
    outside.write_bytes(b"precious")
    (tmp_path / "dl").mkdir()
    (tmp_path / "dl" / "26.gz").symlink_to(outside)
    async with (
        serve(VICTIM.api_key) as hostile,
        FlurryClient(base_url=hostile.base, token=Secret(TOKEN)) as api,
    ):
        request_id = await api.submit(WINDOW, api_key=VICTIM.api_key)
        ready = await api.status(request_id, window=WINDOW)
        with pytest.raises(IntegrityError, match="26.gz: a symbolic link"):
            await api.download(
                getattr(ready, "url", ""), tmp_path / "dl" / "26.gz", window=WINDOW,
                request_id=request_id,
            )  # fmt: skip
    assert outside.read_bytes() == b"precious"


# -- the real CLI ----------------------------------------------------------------------------


async def _cli(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, env=ENV, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _ledger(tmp_path: Path) -> list[tuple[str, str, str | None]]:
    ledgers = [p for p in (tmp_path / "out").rglob("*.sqlite*") if p.suffix in (".sqlite", ".db")]
    ledgers = ledgers or [p for p in tmp_path.rglob("*.sqlite") if p.is_file()]
    assert ledgers, list(tmp_path.rglob("*"))
    with sqlite3.connect(ledgers[0]) as db:
        return list(db.execute("SELECT app, state, error_message FROM windows"))


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("mode", "code", "words"),
    [
        ("echo-502", 75, "server error 502"),
        ("api-bad-status-line", 75, "failed"),
        ("redirect-loop", 75, "TooManyRedirects"),
        ("bad-content-length", 75, "failed after 0 bytes"),
        ("invalid-link", 75, "the download link is malformed"),
        ("file-link", 75, "not an http(s) link (file:///etc/passwd)"),
        ("status-endless", 75, "-byte cap"),
    ],
)
async def test_a_hostile_server_fails_the_attacked_windows_and_leaks_no_secret(
    tmp_path: Path, mode: str, code: int | None, words: str
) -> None:
    async with serve(VICTIM.api_key, mode) as hostile:
        config = str(
            write_config(
                tmp_path, hostile.base, history_days=3, apps=(VICTIM, BYSTANDER), extra_api=FAST
            )
        )
        got, out, err = await _cli("run", "--config", config, "--log-format", "json")
        assert got != 0 and (code is None or got == code), (got, out, err)
        assert "Traceback" not in err
        assert words in out, out
        _, status, _ = await _cli("status", "--config", config, "--json")
        report = {r["app"]: r for r in json.loads(status)}
        assert report[VICTIM.name]["failures"], report
        assert report[BYSTANDER.name]["windows"]["failed"] == 0
        assert report[BYSTANDER.name]["windows"]["pending"] == 0
        rows = _ledger(tmp_path)
        for text in (out, err, status, *(str(m) for _, _, m in rows)):
            _clean(text)
        assert {s for a, s, _ in rows if a == BYSTANDER.name} == {"COMMITTED"}
        assert any(m and words in m for a, _, m in rows if a == VICTIM.name)

        hostile.mode = "good"  # the same config, the attack over: everything finishes
        got, out, err = await _cli("retry", "--config", config, "--quiet")
        assert got == 0, (out, err)
        assert {s for _, s, _ in _ledger(tmp_path)} == {"COMMITTED"}


_DOWNLOADER = """
import sys, anyio
from pathlib import Path
from backfill.client import FlurryClient, Secret
from backfill.errors import BadDataError
from backfill.models import Window

async def main() -> None:
    window = Window(app="small", start=int(sys.argv[3]), end=int(sys.argv[4]))
    async with FlurryClient(base_url="http://unused.invalid", token=Secret("t" * 8),
                            max_download_bytes=256 << 20) as api:
        try:
            await api.download(sys.argv[1], Path(sys.argv[2]), window=window, request_id="1")
            print("downloaded")
        except BadDataError as exc:
            print(exc.message)

anyio.run(main)
status = Path("/proc/self/status").read_text()
print(int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) // 1024)
"""


async def test_an_endless_download_ends_at_its_cap_in_bounded_memory(tmp_path: Path) -> None:
    async with (
        serve(VICTIM.api_key, "endless-download") as hostile,
        FlurryClient(base_url=hostile.base, token=Secret(TOKEN)) as api,
    ):
        request_id = await api.submit(WINDOW, api_key=VICTIM.api_key)
        ready = await api.status(request_id, window=WINDOW)
        url = getattr(ready, "url", "")
        began = time.monotonic()
        done = await anyio.run_process(
            [sys.executable, "-c", _DOWNLOADER, url, str(tmp_path / "26.gz"),
             str(WINDOW.start), str(WINDOW.end)], cwd=ROOT, check=False,
        )  # fmt: skip
        seconds = time.monotonic() - began
    outcome, peak = done.stdout.decode().splitlines()[-2:]
    assert "compressed-size limit" in outcome, done.stderr.decode()[-500:]
    assert int(peak) < 512, f"peak RSS {peak} MB for a 256 MiB cap"
    assert seconds < 60 and not (tmp_path / "26.gz").exists()
