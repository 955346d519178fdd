"""A small download converts on the caller's thread alone: the same rows, files, rejects and
failures as through the shared threads, with no thread hop (a nightly day of small windows)."""

from __future__ import annotations

import contextlib
import gzip
import threading
from typing import TYPE_CHECKING, Any

import pyarrow.dataset as ds
import pytest

from backfill import decode, parsers, staging, threads
from backfill.errors import BadDataError
from backfill.schema import Limits, Stopped
from backfill.simulator import ground_truth
from backfill.simulator.data import encode_csv, encode_json
from backfill.store import LocalStore
from tests.simkit import SMALL, settings

if TYPE_CHECKING:
    from pathlib import Path

DAY = 86_400_000
START = 20_000 * DAY  # 2024-10-04
INLINE = Limits()  # 4 MiB blocks: a download of up to 512 KB is small
THREADED = Limits(block_bytes=16 << 10)  # the same download, not small: blocks on the threads


def _rows() -> list[dict[str, Any]]:
    return ground_truth(settings(), SMALL.api_key, START, START + 3 * DAY)


def _source(tmp_path: Path, text: bytes) -> Path:
    path = tmp_path / "download.gz"
    path.write_bytes(gzip.compress(text))
    return path


def _land(root: Path, source: Path, limits: Limits, **kw: Any) -> tuple[LocalStore, Any]:
    store = LocalStore(root, limits=limits, **kw)
    manifest = store.stage(
        app="quest", window_id=1, attempt=0, start_ms=START, end_ms=START + 3 * DAY, source=source
    )
    store.publish(manifest)
    return store, manifest


def _landed(store: LocalStore) -> list[dict[str, Any]]:
    table = ds.dataset(store.root / "events", format="parquet", partitioning="hive").to_table()
    rows: list[dict[str, Any]] = table.sort_by(
        [("sessionTimestamp", "ascending"), ("eventOffset", "ascending")]
    ).to_pylist()
    return rows


@pytest.mark.parametrize("fmt", ["json", "csv"])
def test_a_small_download_lands_what_the_threads_land(tmp_path: Path, fmt: str) -> None:
    rows = _rows()
    source = _source(tmp_path, encode_json(rows) if fmt == "json" else encode_csv(rows))
    assert decode.small(source, INLINE) and not decode.small(source, THREADED)
    inline, one = _land(tmp_path / "inline", source, INLINE)
    threaded, other = _land(tmp_path / "threaded", source, THREADED)
    assert one.rows == other.rows == len(rows)
    assert [f.partition for f in one.files] == [f.partition for f in other.files]
    assert _landed(inline) == _landed(threaded)


def test_a_small_download_is_parsed_and_written_on_the_callers_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: set[int] = set()

    def spy(cls: type, name: str) -> None:
        original = getattr(cls, name)

        def wrapped(self: object, *args: Any) -> Any:
            seen.add(threading.get_ident())
            return original(self, *args)

        monkeypatch.setattr(cls, name, wrapped)

    spy(parsers._Parser, "parse")
    spy(staging._DayFiles, "write")
    source = _source(tmp_path, encode_json(_rows()))
    _land(tmp_path / "inline", source, INLINE)
    assert seen == {threading.get_ident()}
    seen.clear()
    _land(tmp_path / "threaded", source, THREADED)
    assert threading.get_ident() not in seen and seen


def test_quarantine_on_a_small_download_names_the_same_lines(tmp_path: Path) -> None:
    lines = encode_json(_rows()).splitlines()
    bad = [b'{"sessionTimestamp": "soon"}', b"not json at all"]
    source = _source(tmp_path, b"\n".join(lines[:10] + bad + lines[10:]) + b"\n")
    got = []
    for name, limits in (("inline", INLINE), ("threaded", THREADED)):
        store, manifest = _land(tmp_path / name, source, limits, on_bad_rows="quarantine")
        assert (manifest.rows, manifest.rejected) == (len(lines), 2)
        rejects = (store.root / "_rejects" / "quest" / "1.0.ndjson").read_text().splitlines()
        got.append((rejects, _landed(store)))
    assert got[0] == got[1]
    assert '"line": 11' in got[0][0][0] and '"line": 12' in got[0][0][1]


def test_a_bad_row_fails_a_small_download_and_leaves_nothing(tmp_path: Path) -> None:
    lines = encode_json(_rows()).splitlines()
    source = _source(tmp_path, b"\n".join([*lines[:5], b'{"sessionTimestamp": true}', *lines[5:]]))
    with pytest.raises(BadDataError, match="line 6"):
        _land(tmp_path / "out", source, INLINE)
    assert not list((tmp_path / "out").rglob("*.parquet"))


def test_a_stop_ends_a_small_download_with_nothing_staged(tmp_path: Path) -> None:
    source = _source(tmp_path, encode_json(_rows()))
    store = LocalStore(tmp_path / "out")
    stop = threading.Event()
    stop.set()
    with pytest.raises(Stopped):
        staging.stage(
            store.layout, store.limits, "fail", app="quest", window_id=1, attempt=0,
            start_ms=0, end_ms=0, source=source, stop=stop,
        )  # fmt: skip
    assert not list((tmp_path / "out").rglob("*.parquet"))


@pytest.mark.parametrize("inline", [True, False], ids=["inline", "threaded"])
def test_serial_jobs_stop_at_the_first_error_but_clean_ups_run(inline: bool) -> None:
    serial = threads.Serial("write-test", depth=1, inline=inline)
    ran: list[int] = []

    def boom() -> None:
        raise ValueError("disk on fire")

    serial.submit(lambda: ran.append(1))
    with contextlib.suppress(ValueError):  # inline: raised here; threaded: at a later call
        serial.submit(boom)
    with contextlib.suppress(ValueError):
        serial.submit(lambda: ran.append(2))  # after the error: skipped
    serial.submit(lambda: ran.append(3), always=True)
    with pytest.raises(ValueError, match="disk on fire"):
        serial.close()
    assert ran == [1, 3]
