"""Hostile files: each fails its window with the line, field and value (or is set aside), never
with a library's traceback, through ``LocalStore.stage`` and through the real ``backfill convert``.
"""

from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds
import pytest

from backfill.errors import BadDataError
from backfill.schema import Limits, Stopped
from backfill.staging import stage
from backfill.store import LocalStore

if TYPE_CHECKING:
    from pathlib import Path

DAY = 86_400_000
START = 20_000 * DAY  # 2024-10-04
ROW: dict[str, Any] = {
    "sessionTimestamp": START + 5, "appVersion": "2.0.0", "sessionDuration": 84298,
    "eventOffset": 56909, "deviceIdentifiers": {"IDFV": "x"}, "deviceModel": "iPhone",
    "deviceSubModel": "i", "countryISO": "CA", "eventName": "open_menu",
    "eventParameters": {"a": "b"}, "userId": "u", "gender": "M", "birthYear": 2002,
    "latitude": None, "longitude": None, "sessionProperties": {"ab_group": "off"},
}  # fmt: skip
GOOD = (json.dumps(ROW) + "\n").encode() * 5
HEADER = ",".join(ROW).encode() + b"\n"


def row(**changes: Any) -> bytes:
    """ROW with ``changes`` (``...`` removes a key), as one JSON line."""
    item = {**ROW, **changes}
    return (json.dumps({k: v for k, v in item.items() if v is not ...}) + "\n").encode()


# (name, the file's bytes before gzip, the message); each bad row is line 6.
HOSTILE: list[tuple[str, bytes, str]] = [
    ("missing key", GOOD + row(eventName=...), "line 6: field 'eventName' is missing"),
    (
        "duplicate key",
        GOOD + row().replace(b'"userId": "u"', b'"userId": "u", "userId": "v"'),
        "line 6: key 'userId' appears twice",
    ),
    (
        "duplicate map key",
        GOOD + row().replace(b'{"a": "b"}', b'{"a": "1", "a": "2"}'),
        "line 6: field 'eventParameters' has the key 'a' twice",
    ),
    ("timestamp 2^62", GOOD + row(sessionTimestamp=2**62), "line 6: field 'sessionTimestamp' is not a plausible"),
    ("negative timestamp", GOOD + row(sessionTimestamp=-5), "line 6: field 'sessionTimestamp' is not a plausible"),
    ("timestamp in 2100", GOOD + row(sessionTimestamp=4_102_444_800_000), "not a plausible time"),
    ("boolean timestamp", GOOD + row(sessionTimestamp=True), "line 6: field 'sessionTimestamp' is not an integer: true"),
    ("string timestamp", GOOD + row(sessionTimestamp=str(START)), "'sessionTimestamp' is not an integer: \"1728"),
    ("fractional timestamp", GOOD + row(sessionTimestamp=START + 0.5), "'sessionTimestamp' is not an integer: 1728"),
    ("string duration", GOOD + row(sessionDuration="5"), "line 6: field 'sessionDuration' is not an integer: \"5\""),
    ("float offset", GOOD + row(eventOffset=5.0), "line 6: field 'eventOffset' is not an integer: 5.0"),
    ("string birth year", GOOD + row(birthYear="1999"), "line 6: field 'birthYear' is not an integer"),
    ("NaN latitude", GOOD + row().replace(b'"latitude": null', b'"latitude": NaN'), "line 6: not valid JSON"),
    ("invalid UTF-8", GOOD + row().replace(b'"u"', b'"\xff\xfe"'), "line 6: not valid UTF-8"),
    (
        "CSV repeated column",
        HEADER.replace(b"\n", b",eventName\n") + b"1,2\n",
        "the CSV header names a column twice: eventName",
    ),
    (
        "CSV without eventName",
        HEADER.replace(b",eventName", b"") + b"1\n",
        "the CSV header lacks the columns: eventName",
    ),
    (
        "CSV hex integer",
        HEADER + b"%d,1,0x10,1,,,,,,,,,,,,\n" % (START + 1),
        "field 'sessionDuration' is not an integer: \"0x10\"",
    ),
]  # fmt: skip
ROW_LEVEL = [h for h in HOSTILE if not h[0].startswith("CSV")]


def stage_file(root: Path, payload: bytes, quarantine: bool = False, **limits: Any) -> Any:
    source = root / "download.gz"
    source.write_bytes(gzip.compress(payload))
    store = LocalStore(
        root / "out", on_bad_rows="quarantine" if quarantine else "fail", limits=Limits(**limits)
    )
    return store.stage(
        app="quest", window_id=1, attempt=0, start_ms=START, end_ms=START + DAY, source=source
    )


@pytest.mark.parametrize(("what", "payload", "message"), HOSTILE, ids=[h[0] for h in HOSTILE])
def test_a_hostile_file_fails_its_window_with_line_field_and_value(
    tmp_path: Path, what: str, payload: bytes, message: str
) -> None:
    with pytest.raises(BadDataError) as caught:
        stage_file(tmp_path, payload)
    assert message in caught.value.message
    assert caught.value.app == "quest"
    assert not [p for p in (tmp_path / "out").rglob("*") if p.is_file()]


@pytest.mark.parametrize(("what", "payload", "message"), ROW_LEVEL, ids=[h[0] for h in ROW_LEVEL])
def test_with_quarantine_the_hostile_row_is_set_aside_and_counted(
    tmp_path: Path, what: str, payload: bytes, message: str
) -> None:
    manifest = stage_file(tmp_path, payload, quarantine=True)
    assert (manifest.rows, manifest.rejected) == (5, 1)
    rejects = (tmp_path / "out" / "_rejects" / "quest" / "1.0.ndjson").read_text().splitlines()
    assert [json.loads(r)["line"] for r in rejects] == [6]
    assert message in json.loads(rejects[0])["reason"]


def test_map_values_that_are_not_strings_are_kept_as_their_json_text(tmp_path: Path) -> None:
    values = {"n": 1, "f": 1.50, "b": True, "o": {"c": [1, 2]}, "z": None, "s": "text"}
    manifest = stage_file(tmp_path, GOOD + row(eventParameters=values))
    assert manifest.rows == 6
    table = ds.dataset(tmp_path / "out" / "_staging", format="parquet").to_table()
    got = [dict(r) for r in table.column("eventParameters").to_pylist() if len(r) > 1]
    assert got == [{"n": "1", "f": "1.5", "b": "true", "o": '{"c":[1,2]}', "z": None, "s": "text"}]


def _bomb(path: Path, gigabytes: float, head: bytes = b"") -> int:
    """Write a gzip of ``head`` and then ``gigabytes`` of newlines and spaces; its size.

    One member of 64 MiB of blank space, written again and again: a valid multi-member gzip.
    """
    member = gzip.compress((b"\n" * 1023 + b" ") * (1 << 16), compresslevel=9)
    with path.open("wb") as out:
        out.write(gzip.compress(head))
        for _ in range(int(gigabytes * 16)):
            out.write(member)
    return path.stat().st_size


_CHILD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from backfill.errors import BadDataError
    from backfill.store import LocalStore
    began = time.monotonic()
    try:
        LocalStore(Path(sys.argv[2])).stage(app="quest", window_id=1, attempt=0,
                                            start_ms=0, end_ms=0, source=Path(sys.argv[1]))
        outcome = "staged"
    except BadDataError as exc:
        outcome = exc.message
    # VmHWM, not ru_maxrss: the latter keeps the forking parent's size across exec.
    status = Path("/proc/self/status").read_text()
    peak = int(next(l for l in status.splitlines() if l.startswith("VmHWM:")).split()[1]) // 1024
    print(f"{peak} {time.monotonic() - began:.1f} {outcome}")
    """
)


@pytest.mark.parametrize("head", [b"", GOOD], ids=["only-whitespace", "rows-then-whitespace"])
def test_a_whitespace_bomb_fails_within_seconds_in_bounded_memory(
    tmp_path: Path, head: bytes
) -> None:
    source = tmp_path / "bomb.gz"
    _bomb(source, 3.0, head)  # ~3 MB of gzip: 3 GiB inflated, past the 250x budget
    done = subprocess.run(
        [sys.executable, "-c", _CHILD, str(source), str(tmp_path / "out")],
        capture_output=True, text=True, timeout=120, check=True,
    )  # fmt: skip
    peak_mb, seconds, outcome = done.stdout.split(" ", 2)
    assert "refused as a bomb" in outcome
    assert int(peak_mb) < 512, f"peak RSS {peak_mb} MB"
    assert float(seconds) < 30, f"{seconds} s"


def test_a_stop_ends_a_stage_within_a_second(tmp_path: Path) -> None:
    source = tmp_path / "bomb.gz"
    _bomb(source, 2.0, GOOD)
    store = LocalStore(tmp_path / "out", limits=Limits(max_ratio=10_000.0))
    stop = threading.Event()
    timer = threading.Timer(0.5, stop.set)
    timer.start()
    began = time.monotonic()
    with pytest.raises(Stopped):
        stage(
            store.layout, store.limits, "fail", app="quest", window_id=1, attempt=0,
            start_ms=0, end_ms=0, source=source, stop=stop,
        )  # fmt: skip
    assert time.monotonic() - began < 3.0
    assert not list((tmp_path / "out").rglob("*.parquet"))


def _convert(tmp_path: Path, payload: bytes, *extra: str) -> subprocess.CompletedProcess[str]:
    source = tmp_path / "rawdata.json.gz"
    source.write_bytes(gzip.compress(payload))
    return subprocess.run(
        [sys.executable, "-m", "backfill.cli", "convert", str(source), "--app", "quest",
         "--out", str(tmp_path / "out"), *extra],
        capture_output=True, text=True, timeout=120, env={**os.environ, "NO_COLOR": "1"},
    )  # fmt: skip


CLI_CASES = [h for h in HOSTILE if h[0] in ("missing key", "duplicate map key", "timestamp 2^62", "boolean timestamp", "CSV repeated column")]  # fmt: skip


@pytest.mark.parametrize(("what", "payload", "message"), CLI_CASES, ids=[h[0] for h in CLI_CASES])
def test_convert_exits_4_with_the_message(
    tmp_path: Path, what: str, payload: bytes, message: str
) -> None:
    done = _convert(tmp_path, payload)
    assert done.returncode == 4, done.stderr
    assert message in done.stderr and "Traceback" not in done.stderr
    assert not list((tmp_path / "out").rglob("*.parquet"))
    if what.startswith("CSV"):
        return
    kept = _convert(tmp_path, payload, "--on-bad-rows", "quarantine")
    assert kept.returncode == 0, kept.stderr
    assert "converted 5 rows" in kept.stdout and "1 rows set aside" in kept.stdout
    assert len(list((tmp_path / "out").rglob("*.parquet"))) == 1


def test_ctrl_c_during_convert_of_a_bomb_exits_130_within_seconds_keeping_nothing(
    tmp_path: Path,
) -> None:
    source = tmp_path / "bomb.gz"
    _bomb(source, 21.0, GOOD)  # ~22 MB of gzip: about 12 s of inflating before the budget
    out = tmp_path / "out"
    child = subprocess.Popen(
        [sys.executable, "-m", "backfill.cli", "convert", str(source), "--app", "quest",
         "--out", str(out)],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while not (out / "_staging").exists() and time.monotonic() < deadline:  # converting now
        time.sleep(0.01)
    child.send_signal(signal.SIGINT)
    began = time.monotonic()
    _, err = child.communicate(timeout=30)
    assert child.returncode == 130, err
    assert time.monotonic() - began < 5, "the conversion gave up within seconds"
    assert "interrupted" in err and "Traceback" not in err
    assert not [p for p in out.rglob("*") if p.is_file()], "nothing kept"
