"""Staging: the rows of one download → sorted zstd Parquet files under ``_staging/``.

Theory of operation.  ``stage()`` reads the download through ``decode.tables`` (streaming,
bounded, validated), cuts the rows into UTC-day partitions and streams each day, one flush
unit at a time, into an open zstd Parquet file sorted by ``sessionTimestamp`` (memory bounded
by the unit, not the day), on a background thread so that writing overlaps with parsing.
Rows that break the schema fail the window, or, with ``on_bad_rows="quarantine"``, go to the
attempt's ``_rejects/`` file.  Every staged file's footer is read back and its size and sha256
go into the (unpublished) manifest.  A failed stage leaves no staged file.
"""

from __future__ import annotations

import contextlib
import functools
import json
import os
import shutil
import threading
from dataclasses import dataclass, field
from typing import IO, TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from backfill import crashpoints, decode, threads
from backfill.errors import BadDataError, IntegrityError
from backfill.layout import day_partition, days, part_name
from backfill.manifest import Manifest, ManifestFile, sha256
from backfill.models import iso
from backfill.schema import MAPS, SCHEMA

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

    from backfill.layout import Layout
    from backfill.schema import Limits

__all__ = ["stage"]

# Dictionaries where values repeat (and map keys); statistics on every scalar column.  Both
# together cut Parquet encoding CPU by about 40% against the defaults, and the files shrink.
_DICTIONARY = [
    "appVersion", "deviceModel", "deviceSubModel", "countryISO", "eventName", "gender",
    *(f"{m}.key_value.key" for m in MAPS), "sessionProperties.key_value.value",
]  # fmt: skip
_STATISTICS = [f.name for f in SCHEMA if f.name not in MAPS]
_OPEN = 32  # part files open at once (a download that mixes many days)
_IDLE = 8  # blocks without a row of a day before its file is closed


def _label(start_ms: int, end_ms: int) -> str:
    """The window as messages name it (``Window.label``); an open bound (``convert`` scans a
    file against any instant) as ``..``."""

    def bound(ms: int) -> str:
        try:
            return iso(ms)
        except (ValueError, OverflowError, OSError):  # beyond the calendar: open
            return ".."

    return f"{bound(start_ms)}/{bound(end_ms)}"


def stage(
    layout: Layout,
    limits: Limits,
    on_bad_rows: Literal["fail", "quarantine"],
    *,
    app: str,
    window_id: int,
    attempt: int,
    start_ms: int,
    end_ms: int,
    source: Path,
    stop: Callable[[], bool] | threading.Event | None = None,
) -> Manifest:
    """Convert ``source`` into staged Parquet files; returns their (unpublished) manifest.

    Raises ``BadDataError`` for a corrupt, hostile or schema-breaking download (whatever a
    library raises on it included), and ``decode.Stopped`` soon after ``stop`` is set; nothing
    outside ``_staging/`` (and ``_rejects/``) is touched, and a failed stage leaves no staged
    files.
    """
    where: dict[str, str | None] = {"app": app, "window": _label(start_ms, end_ms)}
    stage_dir = layout.stage_dir(app, window_id, attempt)
    shutil.rmtree(stage_dir, ignore_errors=True)
    stage_dir.mkdir(parents=True)
    try:
        rejects = _Rejects(layout.rejects_path(app, window_id, attempt))
        quarantine = rejects.add if on_bad_rows == "quarantine" else None
        small = decode.small(source, limits)  # one thread for it all: no hop is worth it
        sink = _PartitionSink(limits, stage_dir, window_id, attempt, inline=small)
        window = (start_ms, end_ms) if end_ms > start_ms else None
        with decode.translate(where):
            rows = _convert(source, limits, where, quarantine, sink, rejects, window, stop)
        files = _verify_staged(stage_dir, sink.written)
    except BaseException:
        shutil.rmtree(stage_dir, ignore_errors=True)
        raise
    return Manifest(
        app=app,
        window_id=window_id,
        attempt=attempt,
        start_ms=start_ms,
        end_ms=end_ms,
        rows=rows,
        rejected=rejects.count,
        size=sum(f.size for f in files),
        files=tuple(files),
    )


def _convert(
    source: Path,
    limits: Limits,
    where: dict[str, str | None],
    quarantine: Callable[[int, str, str], None] | None,
    sink: _PartitionSink,
    rejects: _Rejects,
    window: tuple[int, int] | None,
    stop: Callable[[], bool] | threading.Event | None,
) -> int:
    """Pour the rows of ``source`` into ``sink``; returns how many there were."""
    rows = 0
    try:
        with decode.tables(source, limits, where, quarantine, stop, inline=sink.inline) as batches:
            for table in batches:
                kept = _inside(table, window, quarantine, where)
                rows += kept.num_rows
                sink.add(kept)
        sink.close()
    except BaseException:
        sink.abort()
        raise
    finally:
        rejects.close()
    return rows


def _inside(
    table: pa.Table,
    window: tuple[int, int] | None,
    quarantine: Callable[[int, str, str], None] | None,
    where: dict[str, str | None],
) -> pa.Table:
    """The rows whose session starts in ``window``; the others fail it, or are set aside.

    A row outside the window it was asked for may be a neighbour window's row too: landing it
    would count it twice.
    """
    if window is None or not table.num_rows:
        return table
    stamps = pc.cast(table.column("sessionTimestamp"), pa.int64())
    outside = pc.fill_null(
        pc.or_(pc.less(stamps, window[0]), pc.greater_equal(stamps, window[1])), True
    )
    if not pc.any(outside).as_py():
        return table
    bad = table.filter(outside)
    first = bad.column("sessionTimestamp").cast(pa.int64())[0].as_py()
    span = f"[{iso(window[0])}, {iso(window[1])})"
    reason = f"sessionTimestamp {first} lies outside the requested window {span}"
    if quarantine is None:
        raise BadDataError(f"a row's {reason}", **where)
    # Timestamps as integers: a datetime may not hold every value a row can carry.
    stamps_as_ints = [f.name for f in SCHEMA if pa.types.is_timestamp(f.type)]
    for name in stamps_as_ints:
        bad = bad.set_column(
            bad.schema.get_field_index(name), name, bad.column(name).cast(pa.int64())
        )
    for row in bad.to_pylist():
        stamp = row["sessionTimestamp"]
        quarantine(0, json.dumps(row, default=str), f"sessionTimestamp {stamp} outside {span}")
    return table.filter(pc.invert(outside))


def _verify_staged(stage_dir: Path, written: list[tuple[Path, int, str]]) -> list[ManifestFile]:
    """Read each staged file's footer back; its manifest entry, or ``IntegrityError``."""
    files = []
    for path, rows, partition in written:
        footer = pq.read_metadata(path)
        if footer.num_rows != rows or not footer.schema.to_arrow_schema().equals(SCHEMA):
            raise IntegrityError(f"staged file {path} reads back wrong ({footer.num_rows} rows)")
        relative = path.relative_to(stage_dir)
        files.append(
            ManifestFile(
                path=str(relative),
                size=path.stat().st_size,
                sha256=sha256(path),
                rows=rows,
                partition=partition,
            )
        )
    return files


class _Rejects:
    """The quarantine file of one attempt: one JSON line per rejected row."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.count = 0
        self._handle: IO[str] | None = None
        self._lock = threading.Lock()

    def add(self, line: int, text: str, reason: str) -> None:
        with self._lock:
            self._add(line, text, reason)

    def _add(self, line: int, text: str, reason: str) -> None:
        if self._handle is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._handle = self.path.open("w", encoding="utf-8")
        self._handle.write(
            json.dumps({"line": line, "reason": reason, "raw": text}, ensure_ascii=False) + "\n"
        )
        self.count += 1

    def close(self) -> None:
        if self._handle is not None:
            self._handle.flush()
            os.fsync(self._handle.fileno())
            self._handle.close()


@dataclass(slots=True)
class _Partition:
    """One UTC day's rows not yet handed to the writer (the parsing thread's side)."""

    day: int
    tables: list[pa.Table] = field(default_factory=list)
    nbytes: int = 0
    rows: int = 0
    touched: int = 0


class _PartitionSink:
    """Cuts rows into UTC days and streams each day into sorted zstd Parquet files.

    A day's rows are buffered until they make one flush unit (``row_group_rows`` rows or
    ``file_bytes`` Arrow bytes), then handed to the background thread, which appends them to
    the day's open file as a row group: memory is bounded by the unit, not by the day.  A day
    the last two blocks did not touch is most likely complete (downloads come sorted by
    session): its rest is written; after ``_IDLE`` blocks its file is closed.  Past
    ``buffer_bytes`` in all, the least recently touched day is flushed early.
    """

    def __init__(
        self, limits: Limits, stage_dir: Path, window_id: int, attempt: int, *, inline: bool = False
    ) -> None:
        self.inline = inline  # on the caller's thread: the download is small (decode.small)
        self.background = threads.Serial("write", depth=1, inline=inline)
        self.limits = limits
        self.files = _DayFiles(limits, stage_dir, window_id, attempt)
        self.partitions: dict[int, _Partition] = {}
        self.buffered = self.tick = 0
        self.written = self.files.written  # (path, rows, partition) of each finished file

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.tick += 1
        self._buffer(table)
        rows, size = self.limits.row_group_rows, self.limits.file_bytes
        for part in list(self.partitions.values()):
            idle = self.tick - part.touched
            if idle > _IDLE:
                self._flush(part, final=True)
            elif part.tables and (idle > 1 or part.rows >= rows or part.nbytes >= size):
                self._flush(part, final=False)
        while self.buffered > self.limits.buffer_bytes:
            full = (p for p in self.partitions.values() if p.tables)
            self._flush(min(full, key=lambda p: (p.touched, -p.nbytes)), final=False)

    def _buffer(self, table: pa.Table) -> None:
        """Cut ``table`` into runs of one UTC day and append each to its day's buffer."""
        day_of = days(table.column("sessionTimestamp").cast(pa.int64()).to_numpy())
        if len(day_of) > 1 and not (np.diff(day_of) >= 0).all():
            order = np.argsort(day_of, kind="stable")
            table, day_of = table.take(pa.array(order)), day_of[order]
        bounds = np.flatnonzero(np.diff(day_of)) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)), np.concatenate((bounds, [len(day_of)])), strict=True
        ):
            day = int(day_of[lo])
            part = self.partitions.setdefault(day, _Partition(day))
            piece = table.slice(int(lo), int(hi - lo))
            part.tables.append(piece)
            part.nbytes += piece.nbytes
            part.rows += piece.num_rows
            part.touched = self.tick
            self.buffered += piece.nbytes

    def close(self) -> None:
        try:
            for part in sorted(self.partitions.values(), key=lambda p: p.day):
                self._flush(part, final=True)
        finally:
            self.background.close()

    def abort(self) -> None:
        """Stop without writing what is buffered (the stage failed); open files are closed and
        removed on the background thread, which alone touches them."""
        self.partitions.clear()
        self.buffered = 0
        with contextlib.suppress(BaseException):
            self.background.submit(self.files.discard, always=True)
        with contextlib.suppress(BaseException):
            self.background.close()

    def _flush(self, part: _Partition, *, final: bool) -> None:
        """Hand ``part``'s rows to the writer; ``final``: the day's file is closed after them."""
        tables, part.tables = part.tables, []
        self.buffered -= part.nbytes
        part.nbytes = part.rows = 0
        if final:
            del self.partitions[part.day]
        if tables or final:
            self.background.submit(functools.partial(self.files.write, part.day, tables, final))


@dataclass(slots=True)
class _File:
    """One open part file of a day (the background thread's side)."""

    path: Path
    partition: str
    handle: IO[bytes]
    writer: pq.ParquetWriter
    rows: int = 0
    last: int = 0  # the greatest sessionTimestamp written so far (ms)
    used: int = 0


class _DayFiles:
    """The open Parquet file of each day, touched only by the background thread's jobs.

    Rows come in sorted runs; a run that starts before the end of what the day's open file
    holds closes that file and starts the next part, so every file stays sorted.  At most
    ``_OPEN`` files are open at once (the least recently written one is closed first).
    """

    def __init__(self, limits: Limits, stage_dir: Path, window_id: int, attempt: int) -> None:
        self.limits, self.stage_dir = limits, stage_dir
        self.window_id, self.attempt = window_id, attempt
        self.open: dict[int, _File] = {}
        self.seq = self.uses = 0
        self.written: list[tuple[Path, int, str]] = []

    def write(self, day: int, tables: list[pa.Table], final: bool) -> None:
        """Append ``tables`` (one day's rows) as a row group, sorted; ``final``: close it."""
        if tables:
            table = pa.concat_tables(tables)  # no copy: the chunks are kept
            stamps = table.column("sessionTimestamp").cast(pa.int64()).to_numpy()
            if len(stamps) > 1 and not (np.diff(stamps) >= 0).all():
                order = np.argsort(stamps, kind="stable")
                table, stamps = table.take(pa.array(order)), stamps[order]
            file = self.open.get(day)
            if file is not None and stamps[0] < file.last:
                self.finish(day)
                file = None
            if file is None:
                file = self._start(day)
            file.writer.write_table(table, row_group_size=2 * self.limits.row_group_rows)
            file.rows += table.num_rows
            file.last = int(stamps[-1])
            self.uses += 1
            file.used = self.uses
        if final and day in self.open:
            self.finish(day)

    def _start(self, day: int) -> _File:
        if len(self.open) >= _OPEN:
            self.finish(min(self.open, key=lambda d: self.open[d].used))
        partition = day_partition(day)
        directory = self.stage_dir / partition
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / part_name(self.window_id, self.attempt, self.seq)
        self.seq += 1
        handle = path.open("wb")
        try:
            options = {"use_dictionary": _DICTIONARY, "write_statistics": _STATISTICS}
            writer = pq.ParquetWriter(handle, SCHEMA, compression="zstd", **options)
        except BaseException:
            handle.close()
            raise
        self.open[day] = file = _File(path, partition, handle, writer)
        return file

    def finish(self, day: int) -> None:
        """Close ``day``'s file: footer, fsync; then it counts."""
        file = self.open.pop(day)
        try:
            file.writer.close()
            file.handle.flush()
            os.fsync(file.handle.fileno())
        finally:
            file.handle.close()
        crashpoints.hit("writer.stage")
        self.written.append((file.path, file.rows, file.partition))

    def discard(self) -> None:
        """Close and remove every file, open or finished (the stage failed)."""
        for file in self.open.values():
            with contextlib.suppress(BaseException):
                file.writer.close()
            file.handle.close()
            file.path.unlink(missing_ok=True)
        for path, _, _ in self.written:
            path.unlink(missing_ok=True)
        self.open.clear()
        self.written.clear()
