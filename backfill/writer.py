"""The writer: Arrow tables of one window → hive-partitioned Parquet, committed atomically.

Theory of operation.  ``stage()`` reads the download through ``decode.tables`` (streaming,
bounded, validated), cuts the rows into UTC-day partitions, buffers them, and writes each
partition as zstd Parquet sorted by ``sessionTimestamp`` under ``_staging/``, on a background
thread so that writing overlaps with parsing.  Rows that break the schema fail the window, or,
with ``on_bad_rows="quarantine"``, go to ``_rejects/``.  Every staged file's footer is read back
and its size and sha256 go into the manifest.

``publish()`` writes the manifest to ``_manifests/`` (the intent record), then moves each file
into ``events/`` (fsync the file, rename, fsync the directory).  Only then may the ledger say
COMMITTED.  ``finish()`` completes an interrupted publish from its manifest; ``remove()`` takes an
attempt's files out; ``sweep()`` deletes whatever belongs to no live attempt.  No reader ever sees
a file without its footer: files appear in ``events/`` only by rename, and every path is checked
to stay under the output root.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import queue
import re
import shutil
import threading
from dataclasses import asdict, dataclass, field
from typing import IO, TYPE_CHECKING, Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from backfill import crashpoints, decode
from backfill.decode import FIELDS, MAPS, SCHEMA, Limits
from backfill.errors import IntegrityError

if TYPE_CHECKING:
    from collections.abc import Callable
    from pathlib import Path

__all__ = [
    "FIELDS",
    "SCHEMA",
    "Limits",
    "Manifest",
    "ManifestFile",
    "Writer",
    "partition_value",
]

_DAY_MS = 86_400_000
# Dictionaries where values repeat (and map keys); statistics on every scalar column.  Both
# together cut Parquet encoding CPU by about 40% against the defaults, and the files shrink.
_DICTIONARY = [
    "appVersion", "deviceModel", "deviceSubModel", "countryISO", "eventName", "gender",
    *(f"{m}.key_value.key" for m in MAPS), "sessionProperties.key_value.value",
]  # fmt: skip
_STATISTICS = [f.name for f in SCHEMA if f.name not in MAPS]


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestFile:
    path: str  # relative to the app's partition directory
    size: int
    sha256: str
    rows: int
    partition: str  # dt=YYYY-MM-DD


@dataclass(frozen=True, slots=True, kw_only=True)
class Manifest:
    """What one attempt of one window landed: the record ``verify`` checks against."""

    app: str
    window_id: int
    attempt: int
    start_ms: int
    end_ms: int
    rows: int
    rejected: int
    size: int
    files: tuple[ManifestFile, ...] = ()

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, raw: bytes) -> Manifest:
        document = json.loads(raw)
        document["files"] = tuple(ManifestFile(**f) for f in document["files"])
        return cls(**document)


_SAFE = re.compile(r"[A-Za-z0-9_.\-]")


def partition_value(name: str) -> str:
    """``name`` as a safe hive partition value: percent-encoded, never hidden, never ``..``."""
    if not name:
        raise ValueError("an app name must not be empty")
    encoded = "".join(
        c if _SAFE.fullmatch(c) else "".join(f"%{b:02X}" for b in c.encode()) for c in name
    )
    if encoded[0] in "._":  # hidden to Spark, Hive and Trino, and '.'/'..' are path tricks
        encoded = f"%{ord(encoded[0]):02X}{encoded[1:]}"
    return encoded


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- writing -------------------------------------------------------------------------------


@dataclass(slots=True)
class _Partition:
    day: int
    tables: list[pa.Table] = field(default_factory=list)
    nbytes: int = 0
    touched: int = 0


class Writer:
    """Stages, publishes and recovers window output under one root directory."""

    def __init__(
        self,
        root: Path,
        *,
        limits: Limits | None = None,
        on_bad_rows: Literal["fail", "quarantine"] = "fail",
    ) -> None:
        self.root = root
        self.limits = limits or Limits()
        self.on_bad_rows = on_bad_rows
        self.events = root / "events"
        self.manifests_dir = root / "_manifests"
        self.staging = root / "_staging"
        self.rejects = root / "_rejects"
        self.downloads = root / "_downloads"

    # -- paths -------------------------------------------------------------------------

    def _inside(self, path: Path) -> Path:
        resolved = path.resolve()
        if not resolved.is_relative_to(self.root.resolve()):
            raise IntegrityError(f"refusing to touch {path}: outside the output root {self.root}")
        return path

    def _stage_dir(self, app: str, window_id: int, attempt: int) -> Path:
        return self._inside(self.staging / partition_value(app) / f"{window_id}.{attempt}")

    def download_path(self, app: str, window_id: int, attempt: int) -> Path:
        """Where a window's download lands before it is converted."""
        return self._inside(self.downloads / partition_value(app) / f"{window_id}.{attempt}.gz")

    def manifest_path(self, app: str, window_id: int, attempt: int) -> Path:
        return self._inside(
            self.manifests_dir / partition_value(app) / f"{window_id}.{attempt}.json"
        )

    # -- stage -------------------------------------------------------------------------

    def stage(
        self, *, app: str, window_id: int, attempt: int, start_ms: int, end_ms: int, source: Path
    ) -> Manifest:
        """Convert ``source`` into staged Parquet files; returns their (unpublished) manifest.

        Raises ``BadDataError`` for a corrupt, hostile or schema-breaking download; nothing
        outside ``_staging/`` is touched, and a failed stage leaves no staged files.
        """
        where: dict[str, str | None] = {"app": app, "window": f"{start_ms}/{end_ms}"}
        stage_dir = self._stage_dir(app, window_id, attempt)
        shutil.rmtree(stage_dir, ignore_errors=True)
        stage_dir.mkdir(parents=True)
        try:
            return self._stage(app, window_id, attempt, start_ms, end_ms, source, stage_dir, where)
        except BaseException:
            shutil.rmtree(stage_dir, ignore_errors=True)
            raise

    def _stage(
        self,
        app: str,
        window_id: int,
        attempt: int,
        start_ms: int,
        end_ms: int,
        source: Path,
        stage_dir: Path,
        where: dict[str, str | None],
    ) -> Manifest:
        rejects = _Rejects(
            self.rejects / partition_value(app) / f"{window_id}.{attempt}.ndjson", self
        )
        quarantine = rejects.add if self.on_bad_rows == "quarantine" else None
        sink = _PartitionSink(self, stage_dir, window_id, attempt)
        rows = 0
        try:
            with decode.tables(source, self.limits, where, quarantine) as batches:
                for table in batches:
                    rows += table.num_rows
                    sink.add(table)
            sink.close()
        except BaseException:
            sink.abort()
            raise
        finally:
            rejects.close()
        files = self._verify_staged(stage_dir, sink.written, where)
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

    def _verify_staged(
        self, stage_dir: Path, written: list[tuple[Path, int, str]], where: dict[str, str | None]
    ) -> list[ManifestFile]:
        files = []
        for path, rows, partition in written:
            footer = pq.read_metadata(path)
            if footer.num_rows != rows or not footer.schema.to_arrow_schema().equals(SCHEMA):
                raise IntegrityError(
                    f"staged file {path} reads back wrong ({footer.num_rows} rows)"
                )
            relative = path.relative_to(stage_dir)
            files.append(
                ManifestFile(
                    path=str(relative),
                    size=path.stat().st_size,
                    sha256=_sha256(path),
                    rows=rows,
                    partition=partition,
                )
            )
        return files

    # -- publish -----------------------------------------------------------------------

    def publish(self, manifest: Manifest) -> Path:
        """Write the manifest, then move the staged files into ``events/``; returns its path."""
        target = self.manifest_path(manifest.app, manifest.window_id, manifest.attempt)
        target.parent.mkdir(parents=True, exist_ok=True)
        temporary = target.with_suffix(".json.tmp")
        with temporary.open("wb") as handle:
            handle.write(manifest.to_json())
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_dir(target.parent)
        crashpoints.hit("writer.manifest")
        if not self.finish(manifest):
            raise IntegrityError(
                f"staged files of window {manifest.window_id} went missing before publish"
            )
        return target

    def _final(self, manifest: Manifest, item: ManifestFile) -> Path:
        return self._inside(self.events / f"app={partition_value(manifest.app)}" / item.path)

    def finish(self, manifest: Manifest) -> bool:
        """Move whatever of ``manifest`` is still staged into place; True if all files are there."""
        stage_dir = self._stage_dir(manifest.app, manifest.window_id, manifest.attempt)
        for item in manifest.files:
            final = self._final(manifest, item)
            staged = stage_dir / item.path
            if final.exists() and final.stat().st_size == item.size:
                continue
            if not staged.exists():
                return False
            final.parent.mkdir(parents=True, exist_ok=True)
            os.replace(staged, final)
            _fsync_dir(final.parent)
            crashpoints.hit("writer.publish")
        shutil.rmtree(stage_dir, ignore_errors=True)
        return True

    def load_manifest(self, path: Path) -> Manifest:
        return Manifest.from_json(path.read_bytes())

    def load(self, app: str, window_id: int, attempt: int) -> Manifest | None:
        """The manifest of that attempt, if it was published."""
        path = self.manifest_path(app, window_id, attempt)
        return self.load_manifest(path) if path.exists() else None

    def manifests(self) -> list[Path]:
        """Every manifest under ``_manifests/``."""
        if not self.manifests_dir.exists():
            return []
        return sorted(self.manifests_dir.glob("*/*.json"))

    def remove(self, manifest: Manifest) -> None:
        """Take an attempt's files out of ``events/``, then its manifest."""
        for item in manifest.files:
            with contextlib.suppress(FileNotFoundError):
                self._final(manifest, item).unlink()
        path = self.manifest_path(manifest.app, manifest.window_id, manifest.attempt)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        shutil.rmtree(
            self._stage_dir(manifest.app, manifest.window_id, manifest.attempt), ignore_errors=True
        )

    def check_manifest(self, path: Path, rows: int | None) -> list[str]:
        """Problems with one committed attempt: its manifest, its files, their bytes and rows."""
        if not path.exists():
            return [f"{path}: the manifest of a committed window is missing"]
        try:
            manifest = self.load_manifest(path)
        except (ValueError, TypeError, KeyError) as exc:
            return [f"{path}: unreadable manifest ({exc})"]
        problems = []
        if rows is not None and manifest.rows != rows:
            problems.append(f"{path}: {manifest.rows} rows, the ledger says {rows}")
        for item in manifest.files:
            final = self._final(manifest, item)
            if not final.exists():
                problems.append(f"{final}: missing (listed in {path.name})")
                continue
            if final.stat().st_size != item.size:
                problems.append(
                    f"{final}: {final.stat().st_size} bytes, the manifest says {item.size}"
                )
                continue
            if _sha256(final) != item.sha256:
                problems.append(f"{final}: sha256 differs from the manifest")
                continue
            try:
                found = pq.read_metadata(final).num_rows
            except (OSError, pa.ArrowException) as exc:
                problems.append(f"{final}: unreadable Parquet ({exc})")
                continue
            if found != item.rows:
                problems.append(f"{final}: {found} rows, the manifest says {item.rows}")
        return problems

    def orphans(self, live: set[tuple[int, int]]) -> list[str]:
        """Files a reader could see, or that linger, which belong to no committed attempt."""
        problems = []
        pattern = re.compile(r"part-(\d+)-(\d+)-\d+\.parquet$")
        for path in sorted(self.events.glob("app=*/dt=*/*")) if self.events.exists() else []:
            match = pattern.match(path.name)
            if not match:
                problems.append(f"{path}: not a file backfill wrote")
            elif (int(match[1]), int(match[2])) not in live:
                problems.append(f"{path}: belongs to no committed window attempt")
        for path in self.manifests():
            match = re.fullmatch(r"(\d+)\.(\d+)\.json", path.name)
            if not match or (int(match[1]), int(match[2])) not in live:
                problems.append(f"{path}: manifest of no committed window attempt")
        if self.staging.exists() and any(p.is_file() for p in self.staging.rglob("*")):
            problems.append(f"{self.staging}: staged files left behind (the next run sweeps them)")
        return problems

    def sweep_downloads(self, keep: set[tuple[int, int]]) -> int:
        """Delete downloads whose (window id, attempt) is not in ``keep``; returns how many."""
        removed = 0
        for path in self.downloads.glob("*/*.gz") if self.downloads.exists() else []:
            match = re.fullmatch(r"(\d+)\.(\d+)\.gz", path.name)
            if not match or (int(match[1]), int(match[2])) not in keep:
                path.unlink()
                removed += 1
        return removed

    def discard_staging(self) -> None:
        """Drop everything staged (call only when no stage is running)."""
        shutil.rmtree(self.staging, ignore_errors=True)

    def sweep(self, live: set[tuple[int, int]]) -> list[Path]:
        """Delete event files and manifests whose (window id, attempt) is not in ``live``.

        Returns what was deleted.  Files that do not look like ours are left alone.
        """
        removed = []
        pattern = re.compile(r"part-(\d+)-(\d+)-\d+\.parquet$")
        if self.events.exists():
            for path in self.events.glob("app=*/dt=*/*.parquet"):
                match = pattern.match(path.name)
                if match and (int(match[1]), int(match[2])) not in live:
                    path.unlink()
                    removed.append(path)
        for path in self.manifests():
            match = re.fullmatch(r"(\d+)\.(\d+)\.json", path.name)
            if match and (int(match[1]), int(match[2])) not in live:
                path.unlink()
                removed.append(path)
        for temporary in self.manifests_dir.glob("*/*.tmp") if self.manifests_dir.exists() else []:
            temporary.unlink()
        return removed


class _Rejects:
    """The quarantine file of one attempt: one JSON line per rejected row."""

    def __init__(self, path: Path, writer: Writer) -> None:
        self.path = writer._inside(path)
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


class _Background:
    """One worker thread running submitted jobs in order; the first error is raised at ``close``."""

    def __init__(self, depth: int = 2) -> None:
        self._jobs: queue.Queue[Callable[[], None] | None] = queue.Queue(depth)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if self._error is None:
                try:
                    job()
                except BaseException as exc:  # kept for close(), which raises it
                    self._error = exc

    def submit(self, job: Callable[[], None]) -> None:
        if self._error is not None:
            raise self._error
        self._jobs.put(job)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join()
        if self._error is not None:
            raise self._error


class _PartitionSink:
    """Buffers rows per UTC day and writes each day as sorted zstd Parquet files."""

    def __init__(self, writer: Writer, stage_dir: Path, window_id: int, attempt: int) -> None:
        self.background = _Background(depth=1)
        self.writer = writer
        self.stage_dir = stage_dir
        self.window_id = window_id
        self.attempt = attempt
        self.partitions: dict[int, _Partition] = {}
        self.buffered = 0
        self.seq = 0
        self.tick = 0
        self.written: list[tuple[Path, int, str]] = []

    def add(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        self.tick += 1
        stamps = table.column("sessionTimestamp").cast(pa.int64()).to_numpy()
        days = stamps // _DAY_MS
        if len(days) > 1 and not (np.diff(days) >= 0).all():
            order = np.argsort(days, kind="stable")
            table, days = table.take(pa.array(order)), days[order]
        bounds = np.flatnonzero(np.diff(days)) + 1
        for lo, hi in zip(
            np.concatenate(([0], bounds)), np.concatenate((bounds, [len(days)])), strict=True
        ):
            day = int(days[lo])
            part = self.partitions.setdefault(day, _Partition(day))
            piece = table.slice(int(lo), int(hi - lo))
            part.tables.append(piece)
            part.nbytes += piece.nbytes
            part.touched = self.tick
            self.buffered += piece.nbytes
        # A day the last two blocks did not touch is most likely complete (downloads come
        # sorted by session): write it now, so writing overlaps with parsing.
        # A day past the file size is written now too: memory stays flat however big days get.
        limit = self.writer.limits.file_bytes
        for part in [
            p for p in self.partitions.values() if p.touched < self.tick - 1 or p.nbytes >= limit
        ]:
            self._flush(part)
        while self.buffered > self.writer.limits.buffer_bytes and self.partitions:
            self._flush(min(self.partitions.values(), key=lambda p: (p.touched, -p.nbytes)))

    def close(self) -> None:
        try:
            for part in sorted(self.partitions.values(), key=lambda p: p.day):
                self._flush(part)
        finally:
            self.background.close()

    def abort(self) -> None:
        """Stop without writing what is buffered (the stage failed)."""
        self.partitions.clear()
        with contextlib.suppress(BaseException):
            self.background.close()

    def _flush(self, part: _Partition) -> None:
        del self.partitions[part.day]
        self.buffered -= part.nbytes
        seq, self.seq = self.seq, self.seq + 1
        self.background.submit(lambda: self._write(part, seq))

    def _write(self, part: _Partition, seq: int) -> None:
        table = pa.concat_tables(part.tables)
        stamps = table.column("sessionTimestamp").cast(pa.int64()).to_numpy()
        if len(stamps) > 1 and not (np.diff(stamps) >= 0).all():
            table = table.take(pa.array(np.argsort(stamps, kind="stable")))
        date = np.datetime64(part.day, "D").astype(str)
        partition = f"dt={date}"
        directory = self.stage_dir / partition
        directory.mkdir(parents=True, exist_ok=True)
        path = directory / f"part-{self.window_id}-{self.attempt}-{seq}.parquet"
        with path.open("wb") as handle:
            pq.write_table(
                table,
                handle,
                compression="zstd",
                row_group_size=self.writer.limits.row_group_rows,
                use_dictionary=_DICTIONARY,
                write_statistics=_STATISTICS,
            )
            handle.flush()
            os.fsync(handle.fileno())
        crashpoints.hit("writer.stage")
        self.written.append((path, table.num_rows, partition))
