"""The partition sink streams each day into open Parquet files, a flush unit at a time.

Tables of ``SCHEMA`` go straight into ``staging._PartitionSink`` (as ``stage`` feeds it
block by block), with small ``Limits`` so that a unit is a few hundred rows; what comes out
is read back with pyarrow: one sorted file per day where the download allows it, row groups
of at most a unit, every file sorted, nothing left after an abort.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from backfill import crashpoints
from backfill.schema import SCHEMA, Limits
from backfill.staging import _PartitionSink

if TYPE_CHECKING:
    from pathlib import Path

DAY = 86_400_000
START = 20_000 * DAY  # 2024-10-04


def rows(stamps: list[int] | np.ndarray) -> pa.Table:
    """A table of ``SCHEMA`` whose sessions start at ``stamps`` (ms); other columns filled."""
    n = len(stamps)
    ts = pa.array(np.asarray(stamps, dtype=np.int64)).cast(SCHEMA.field("sessionTimestamp").type)
    columns = {f.name: pa.nulls(n, f.type) for f in SCHEMA}
    columns["sessionTimestamp"] = columns["eventTimestamp"] = ts
    columns["userId"] = pa.array([f"user-{i % 97}-{'x' * 40}" for i in range(n)])
    columns["eventParameters"] = pa.array([[("k", str(i))] for i in range(n)], SCHEMA.field(
        "eventParameters").type)  # fmt: skip
    return pa.table(columns, schema=SCHEMA)


def day(d: int, lo: int, hi: int, step: int = 1000) -> list[int]:
    """Stamps of day ``d`` from ``lo`` to ``hi`` seconds into it."""
    return [START + d * DAY + s * 1000 for s in range(lo, hi, max(1, step // 1000))]


def sink(tmp_path: Path, **limits: int) -> _PartitionSink:
    return _PartitionSink(Limits(**limits), tmp_path / "stage", 7, 1)


def staged(tmp_path: Path) -> list[Path]:
    return sorted((tmp_path / "stage").rglob("*.parquet"))


def stamps_of(path: Path) -> np.ndarray:
    column = pq.read_table(path, columns=["sessionTimestamp"]).column(0)
    return np.asarray(column.cast(pa.int64()).to_numpy(), dtype=np.int64)


def assert_sorted_files(out: _PartitionSink) -> None:
    for path, count, partition in out.written:
        stamps = stamps_of(path)
        assert len(stamps) == count
        assert (np.diff(stamps) >= 0).all(), f"{path} is not sorted"
        assert path.parent.name == partition
        meta = pq.read_metadata(path)
        assert meta.schema.to_arrow_schema().equals(SCHEMA)
        first = meta.row_group(0).column(0)
        assert first.compression == "ZSTD"
        assert first.statistics is not None and first.statistics.has_min_max


def test_a_day_bigger_than_the_flush_unit_is_one_sorted_file_of_several_row_groups(
    tmp_path: Path,
) -> None:
    out = sink(tmp_path, row_group_rows=500)
    sent = 0
    for block in range(12):  # 12 blocks of 200 rows, all day 0, in order: 2400 rows
        out.add(rows(day(0, block * 200, block * 200 + 200)))
        sent += 200
        assert out.buffered <= rows(day(0, 0, 700)).nbytes  # never much more than a unit
    out.add(rows(day(1, 0, 10)))
    out.close()
    assert_sorted_files(out)
    day0 = [(p, n) for p, n, part in out.written if part == "dt=2024-10-04"]
    assert len(day0) == 1 and day0[0][1] == sent
    meta = pq.read_metadata(day0[0][0])
    assert meta.num_row_groups >= 4
    assert all(meta.row_group(i).num_rows <= 2 * 500 for i in range(meta.num_row_groups))
    # Row groups cover disjoint, increasing time ranges: a reader prunes them by time.
    bounds = [meta.row_group(i).column(0).statistics for i in range(meta.num_row_groups)]
    assert all(a.max <= b.min for a, b in zip(bounds, bounds[1:], strict=False))
    assert len(staged(tmp_path)) == 2


def test_a_piece_earlier_than_its_days_open_file_starts_a_new_part(tmp_path: Path) -> None:
    out = sink(tmp_path, row_group_rows=100)
    out.add(rows(day(0, 1000, 1300)))  # 300 rows: written, the file stays open
    out.add(rows(day(0, 1300, 1400)))  # later rows: appended to the same file
    out.add(rows(day(0, 0, 150)[::-1]))  # earlier rows, unsorted: a new part, sorted
    out.add(rows(day(0, 2000, 2100)))  # later than that part: appended to it
    out.close()
    assert_sorted_files(out)
    assert [(n, part) for _, n, part in out.written] == [
        (400, "dt=2024-10-04"),
        (250, "dt=2024-10-04"),
    ]
    assert len({p.name for p, _, _ in out.written}) == 2


def test_a_download_that_alternates_days_stays_within_the_buffer_cap(tmp_path: Path) -> None:
    block = rows(day(0, 0, 100))
    cap = 3 * block.nbytes
    out = sink(tmp_path, buffer_bytes=cap)
    total = 0
    for i in range(40):  # days 0..3 in turn, each block later than that day's last
        d, k = i % 4, i // 4
        out.add(rows(day(d, k * 100, k * 100 + 100)))
        total += 100
        assert out.buffered <= cap
    out.close()
    assert_sorted_files(out)
    assert sum(n for _, n, _ in out.written) == total
    assert len({part for _, _, part in out.written}) == 4
    # Sorted within each day: flushes append to the day's open file, one file per day.
    assert len(out.written) == 4


def test_a_download_mixing_more_days_than_files_may_be_open_still_lands_every_row(
    tmp_path: Path,
) -> None:
    out = sink(tmp_path, buffer_bytes=1)  # every block is flushed at once
    for k in range(3):
        for d in range(40):
            out.add(rows(day(d, k * 10, k * 10 + 10)))
    out.close()
    assert_sorted_files(out)
    assert sum(n for _, n, _ in out.written) == 1200
    assert len({part for _, _, part in out.written}) == 40


def test_an_abort_leaves_no_staged_file_and_closes_open_ones(tmp_path: Path) -> None:
    out = sink(tmp_path, row_group_rows=50)
    out.add(rows(day(0, 0, 200)))  # written, its file open
    out.add(rows(day(1, 0, 200)))
    out.add(rows(day(2, 0, 200)))  # day 0 is finished: a complete file
    out.add(rows(day(3, 0, 20)))
    out.abort()
    assert not staged(tmp_path)
    assert not out.files.open


def test_a_failing_write_fails_the_sink_and_the_abort_still_cleans_up(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = sink(tmp_path, row_group_rows=50)
    out.add(rows(day(0, 0, 100)))
    calls = {"n": 0}
    real = out.files.write

    def failing(d: int, tables: list[pa.Table], final: bool) -> None:
        calls["n"] += 1
        if calls["n"] >= 2:
            raise OSError("disk full")
        real(d, tables, final)

    monkeypatch.setattr(out.files, "write", failing)
    with pytest.raises(OSError, match="disk full"):
        for k in range(1, 10):
            out.add(rows(day(0, k * 100, k * 100 + 100)))
        out.close()
    out.abort()
    assert not staged(tmp_path)


def test_each_finished_file_hits_the_stage_crashpoint_once(tmp_path: Path) -> None:
    before = crashpoints.counts()["writer.stage"]
    out = sink(tmp_path, row_group_rows=50)
    for d in range(3):
        out.add(rows(day(d, 0, 120)))
    out.close()
    assert crashpoints.counts()["writer.stage"] - before == len(out.written) == 3
