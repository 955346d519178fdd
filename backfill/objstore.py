"""The object-store output store (S3, GCS): local staging, then objects under one prefix.

Theory of operation.  ``ObjectStore`` is the second adapter of the output-store port, for a
root such as ``s3://bucket/prefix``.  Downloads and staging stay on local disk: it keeps a
``LocalStore`` on a local work folder (``[output] staging``) and stages exactly as that does.
``publish()`` PUTs the manifest to ``_manifests/{app}/{window}.{attempt}.json`` (the intent
record), then uploads each staged file to its final key under ``events/`` (the same hive
layout and names as a local root) and deletes the staged copy; a PUT is atomic per object, so
a reader never sees half a file.  ``finish()`` completes an interrupted publish from its
manifest (each file still staged, or else already uploaded with its size); ``remove()`` deletes an
attempt's objects by key; ``check_manifest()`` reads each object back (size, sha256, footer,
rows, window).  A sweep lists first (``listing()``: every object with its owner, and the local
leftovers), then deletes from that listing only, so a file published after it is never
swept.  Every key is checked to stay under the prefix (``objfs.Bucket.key``), and app names
are the layout's percent-encoded partition values.  ``open_store`` builds the store a config
names; ``check_output`` checks it can be written.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from backfill import config, crashpoints, objfs
from backfill.errors import IntegrityError
from backfill.layout import Listing, manifest_owner, part_owner, partition_value, rejects_owner
from backfill.manifest import Manifest, ManifestFile
from backfill.models import iso
from backfill.store import LocalStore, _session_span

if TYPE_CHECKING:
    import threading
    from collections.abc import Iterable

    from backfill.config import Settings
    from backfill.schema import Limits

__all__ = ["ObjectStore", "check_output", "open_store"]

_RELATIVE = re.compile(r"dt=\d{4}-\d{2}-\d{2}/part-\d+-\d+-\d+\.parquet")


class ObjectStore:
    """Stages locally, publishes and recovers window output under one object-store prefix."""

    def __init__(
        self,
        root: str,
        *,
        staging: Path,
        endpoint_url: str | None = None,
        region: str | None = None,
        limits: Limits | None = None,
        on_bad_rows: Literal["fail", "quarantine"] = "fail",
        stop: threading.Event | None = None,
        fs: Any = None,
        processes: int = 0,
    ) -> None:
        self.bucket = objfs.Bucket.parse(root)
        self.endpoint_url, self.region = endpoint_url, region
        self.fs = fs or objfs.filesystem(self.bucket, endpoint_url=endpoint_url, region=region)
        self.local = LocalStore(
            staging, limits=limits, on_bad_rows=on_bad_rows, stop=stop, processes=processes
        )

    @property
    def root(self) -> str:
        return self.bucket.uri

    # -- keys ----------------------------------------------------------------------------

    def download_path(self, app: str, window_id: int, attempt: int) -> Path:
        """Where a window's download lands (locally) before it is converted."""
        return self.local.download_path(app, window_id, attempt)

    def _manifest_key(self, app: str, window_id: int, attempt: int) -> str:
        return self.bucket.key("_manifests", partition_value(app), f"{window_id}.{attempt}.json")

    def manifest_path(self, app: str, window_id: int, attempt: int) -> str:
        """The URI of an attempt's manifest (once published)."""
        return self.bucket.to_uri(self._manifest_key(app, window_id, attempt))

    def _event_key(self, app: str, relative: str) -> str:
        if not _RELATIVE.fullmatch(relative):
            raise IntegrityError(f"refusing to touch {relative!r}: not a file backfill writes")
        return self.bucket.key("events", f"app={partition_value(app)}", relative)

    def _rejects_key(self, app: str, window_id: int, attempt: int) -> str:
        return self.bucket.key("_rejects", partition_value(app), f"{window_id}.{attempt}.ndjson")

    # -- stage and publish ---------------------------------------------------------------

    def stage(
        self, *, app: str, window_id: int, attempt: int, start_ms: int, end_ms: int, source: Path
    ) -> Manifest:
        """Convert ``source`` into locally staged Parquet files (``LocalStore.stage``)."""
        return self.local.stage(app=app, window_id=window_id, attempt=attempt,
                                start_ms=start_ms, end_ms=end_ms, source=source)  # fmt: skip

    def publish(self, manifest: Manifest) -> str:
        """PUT the manifest, then upload the staged files; returns the manifest's URI."""
        target = self.intend(manifest)
        if not self.finish(manifest):
            raise IntegrityError(
                f"staged files of window {manifest.window_id} went missing before publish"
            )
        return target

    def intend(self, manifest: Manifest) -> str:
        """PUT the manifest (the intent record ``finish`` completes from); returns its URI."""
        key = self._manifest_key(manifest.app, manifest.window_id, manifest.attempt)
        objfs.put(self.fs, key, manifest.to_json())
        crashpoints.hit("writer.manifest")
        return self.bucket.to_uri(key)

    def finish(self, manifest: Manifest) -> bool:
        """Upload whatever of ``manifest`` is still staged; True if all its files are there."""
        layout = self.local.layout
        stage_dir = layout.stage_dir(manifest.app, manifest.window_id, manifest.attempt)
        for item in manifest.files:
            key = self._event_key(manifest.app, item.path)
            staged = layout.inside(stage_dir / item.path)
            if not staged.exists():  # uploaded before (a PUT lands whole or not at all)?
                if objfs.info(self.fs, key) == item.size:
                    continue
                return False
            objfs.put(self.fs, key, staged)  # over an earlier upload of it: the same bytes
            staged.unlink()
            crashpoints.hit("writer.publish")
        rejects = layout.rejects_path(manifest.app, manifest.window_id, manifest.attempt)
        if rejects.exists():
            objfs.put(self.fs, self._rejects_key(manifest.app, manifest.window_id,
                                                 manifest.attempt), rejects)  # fmt: skip
            layout.remove_file(rejects)
        layout.remove_tree(stage_dir)
        return True

    def remove(self, manifest: Manifest) -> None:
        """Delete an attempt's objects, then its manifest, then what it has staged."""
        for item in manifest.files:
            objfs.delete(self.fs, self._event_key(manifest.app, item.path))
        objfs.delete(self.fs, self._manifest_key(manifest.app, manifest.window_id,
                                                 manifest.attempt))  # fmt: skip
        self.local.layout.remove_tree(
            self.local.layout.stage_dir(manifest.app, manifest.window_id, manifest.attempt)
        )

    # -- manifests -----------------------------------------------------------------------

    def load_manifest(self, path: Path | str) -> Manifest:
        """The manifest at URI ``path``; ``FileNotFoundError`` if there is none, ``ValueError``,
        ``TypeError`` or ``KeyError`` if malformed."""
        raw = objfs.read(self.fs, self.bucket.of_uri(str(path)))
        if raw is None:
            raise FileNotFoundError(str(path))
        return Manifest.from_json(raw)

    def load(self, app: str, window_id: int, attempt: int) -> Manifest | None:
        """The published manifest of that attempt, or None if it has none."""
        raw = objfs.read(self.fs, self._manifest_key(app, window_id, attempt))
        return None if raw is None else Manifest.from_json(raw)

    def check_manifest(self, path: Path | str, rows: int | None) -> list[str]:
        """Problems with one committed attempt: its manifest, its objects, their bytes and rows."""
        try:
            manifest = self.load_manifest(path)
        except FileNotFoundError:
            return [f"{path}: the manifest of a committed window is missing"]
        except (ValueError, TypeError, KeyError) as exc:
            return [f"{path}: unreadable manifest ({exc})"]
        problems = []
        if rows is not None and manifest.rows != rows:
            problems.append(f"{path}: {manifest.rows} rows, the ledger says {rows}")
        window = (
            (manifest.start_ms, manifest.end_ms) if manifest.end_ms > manifest.start_ms else None
        )
        name = str(path).rsplit("/", 1)[-1]
        for item in manifest.files:
            try:
                key = self._event_key(manifest.app, item.path)
            except IntegrityError as exc:
                problems.append(f"{path}: {exc}")
                continue
            problem = self._check_file(key, item, name, window)
            if problem is not None:
                problems.append(problem)
        return problems

    def _check_file(
        self, key: str, item: ManifestFile, listed_in: str, window: tuple[int, int] | None
    ) -> str | None:
        """What is wrong with one landed object against its manifest entry, or None."""
        shown = self.bucket.to_uri(key)
        size = objfs.info(self.fs, key)
        if size is None:
            return f"{shown}: missing (listed in {listed_in})"
        if size != item.size:
            return f"{shown}: {size} bytes, the manifest says {item.size}"
        if objfs.sha256(self.fs, key) != item.sha256:
            return f"{shown}: sha256 differs from the manifest"
        try:
            with self.fs.open_input_file(key) as handle:
                footer = pq.ParquetFile(handle).metadata
        except (OSError, pa.ArrowException) as exc:
            return f"{shown}: unreadable Parquet ({exc})"
        if footer.num_rows != item.rows:
            return f"{shown}: {footer.num_rows} rows, the manifest says {item.rows}"
        span = _session_span(footer)
        if window is not None and span is not None and (span[0] < window[0] or
                                                        span[1] >= window[1]):  # fmt: skip
            return f"{shown}: rows from {iso(span[0])} to {iso(span[1])}, outside its window"
        return None

    # -- orphans and sweeping ------------------------------------------------------------

    def _objects(self, folder: str, depth: int) -> list[tuple[str, list[str]]]:
        """(key, its parts below ``folder``) of every object exactly ``depth`` levels below."""
        base = self.bucket.key(folder)
        found = []
        for key, _ in objfs.listing(self.fs, base):
            parts = key[len(base) + 1 :].split("/")
            if len(parts) == depth:
                found.append((key, parts))
        return found

    def _events(self) -> list[tuple[str, tuple[int, int] | None]]:
        """Every object in an ``app=``/``dt=`` folder of ``events/``, with its owner."""
        return [
            (key, part_owner(parts[2]))
            for key, parts in self._objects("events", 3)
            if parts[0].startswith("app=") and parts[1].startswith("dt=")
        ]

    def listing(self) -> Listing:
        """Every event object, manifest and quarantine object with its owner, and the local
        leftovers (quarantine files, links) of the staging folder; a sweep's first half."""
        local = self.local.listing()
        found: list[tuple[Path | str, tuple[int, int] | None]] = list(local.owned)
        found += list(self._events())
        found += [(k, manifest_owner(p[1])) for k, p in self._objects("_manifests", 2)]
        found += [(k, rejects_owner(p[1])) for k, p in self._objects("_rejects", 2)]
        owned = tuple((key, owner) for key, owner in found if owner is not None)
        return Listing(owned=owned, links=local.links)

    def sweep(self, live: set[tuple[int, int]], listing: Listing | None = None) -> list[str]:
        """Delete what ``listing`` (default: one taken now) holds of no attempt in ``live``;
        returns the URIs (or local paths) deleted.  A local link is refused, as locally."""
        listing = self.listing() if listing is None else listing
        dead = Listing(owned=tuple((p, o) for p, o in listing.owned if o not in live),
                       links=listing.links)  # fmt: skip
        removed = [str(p) for p in self.local.sweep(live, dead)]
        for key, _ in dead.owned:
            if isinstance(key, str) and objfs.delete(self.fs, self.bucket.key(
                    key.removeprefix(f"{self.bucket.base}/"))):  # fmt: skip
                removed.append(self.bucket.to_uri(key))
        return removed

    def orphans(self, live: set[tuple[int, int]]) -> list[str]:
        """Objects a reader could see, or that linger, which belong to no committed attempt,
        and the local staging folder's leftovers."""
        problems = []
        for key, owner in self._events():
            if owner is None:
                problems.append(f"{self.bucket.to_uri(key)}: not a file backfill wrote")
            elif owner not in live:
                problems.append(
                    f"{self.bucket.to_uri(key)}: belongs to no committed window attempt"
                )
        problems += [
            f"{self.bucket.to_uri(key)}: manifest of no committed window attempt"
            for key, parts in self._objects("_manifests", 2)
            if parts[1].endswith(".json") and manifest_owner(parts[1]) not in live
        ]
        return problems + self.local.orphans(live)

    def sweep_downloads(self, keep: set[tuple[int, int]], apps: Iterable[str]) -> int:
        """Delete local downloads of ``apps`` not in ``keep`` (``LocalStore.sweep_downloads``)."""
        return self.local.sweep_downloads(keep, apps)

    def work_listing(self) -> list[tuple[Path, tuple[int, int]]]:
        """The local work of each attempt (``LocalStore.work_listing``)."""
        return self.local.work_listing()

    def sweep_work(
        self, keep: set[tuple[int, int]], listing: list[tuple[Path, tuple[int, int]]]
    ) -> int:
        """Delete the listed local work of attempts not in ``keep`` (``LocalStore.sweep_work``)."""
        return self.local.sweep_work(keep, listing)

    def discard_staging(self) -> None:
        """Drop everything staged locally (call only when no stage is running)."""
        self.local.discard_staging()


def open_store(
    settings: Settings, *, stop: threading.Event | None = None
) -> LocalStore | ObjectStore:
    """The output store ``settings`` names: a ``LocalStore`` on a folder, an ``ObjectStore`` on
    an ``s3://``/``gs://`` root (staging in ``settings.staging_path``)."""
    out = settings.output
    # Small downloads convert in up to conversions_at_once worker processes (``convertpool``).
    a = settings.api
    processes = a.conversions_at_once if a.conversion_processes else 0
    if isinstance(out.root, Path):
        return LocalStore(out.root, on_bad_rows=out.on_bad_rows, stop=stop, processes=processes)
    return ObjectStore(
        out.root,
        staging=settings.staging_path,
        endpoint_url=out.endpoint_url,
        region=out.region,
        on_bad_rows=out.on_bad_rows,
        stop=stop,
        processes=processes,
    )


def check_output(settings: Settings) -> None:
    """The output can be written: the local folders (``config.check_writable``), and for an
    object root one tiny object written and deleted under its prefix.  ``ConfigError`` (exit 2)
    for credentials, permissions or a missing bucket; ``StorageError`` if unreachable."""
    config.check_writable(settings)
    root = settings.output.root
    if isinstance(root, str):
        store = open_store(settings)
        assert isinstance(store, ObjectStore)
        objfs.probe(store.bucket, store.fs, f"{settings.source}: output.root = {root!r}")
