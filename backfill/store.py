"""The local-filesystem output store: stage, publish, recover, audit and sweep window output.

Theory of operation.  ``LocalStore`` is the adapter of the output-store port on a local (or
mounted) directory; its methods are synchronous and the engine runs them on worker threads.
``stage()`` converts a download into Parquet under ``_staging/`` (see ``staging``).
``publish()`` writes the manifest to ``_manifests/`` (the intent record), then moves each file
into ``events/`` (fsync the file, rename, fsync the directory).  Only then may the ledger say
COMMITTED.  ``finish()`` completes an interrupted publish from its manifest; ``remove()`` takes
an attempt's files out; ``sweep()`` deletes whatever belongs to no live attempt; ``orphans()``
and ``check_manifest()`` report, for ``verify``, what is wrong without changing anything.  No
reader ever sees a file without its footer: files appear in ``events/`` only by rename, and
every path is checked to stay under the output root with no symbolic link on the way (see
``layout``): nothing here deletes, moves or writes through a link, and a sweep that meets one
refuses, naming it, before it deletes anything.
"""

from __future__ import annotations

import datetime as dt
import functools
import os
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from backfill import convertpool, crashpoints, decode, staging
from backfill.errors import IntegrityError
from backfill.layout import (
    Layout,
    Listing,
    download_owner,
    manifest_owner,
    part_owner,
    partition_value,
    rejects_owner,
    staged_owner,
)
from backfill.manifest import Manifest, ManifestFile, sha256
from backfill.models import iso
from backfill.schema import Limits

if TYPE_CHECKING:
    import threading
    from collections.abc import Callable, Iterable

__all__ = ["LocalStore"]


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _session_span(footer: pq.FileMetaData) -> tuple[int, int] | None:
    """The first and last ``sessionTimestamp`` (epoch ms) the row groups' statistics give."""
    column = footer.schema.to_arrow_schema().get_field_index("sessionTimestamp")
    lows, highs = [], []
    for group in range(footer.num_row_groups):
        stats = footer.row_group(group).column(column).statistics
        if stats is None or not stats.has_min_max:
            return None
        lows.append(_epoch_ms(stats.min))
        highs.append(_epoch_ms(stats.max))
    return (min(lows), max(highs)) if lows else None


def _epoch_ms(value: dt.datetime | int) -> int:
    """A timestamp statistic (a datetime, or its int64 when Arrow gives the raw value)."""
    return round(value.timestamp() * 1000) if isinstance(value, dt.datetime) else int(value)


class LocalStore:
    """Stages, publishes and recovers window output under one root directory."""

    def __init__(
        self,
        root: Path,
        *,
        limits: Limits | None = None,
        on_bad_rows: Literal["fail", "quarantine"] = "fail",
        stop: threading.Event | None = None,
        processes: int = 0,
    ) -> None:
        self.root = root
        self.stop = stop  # set: a conversion under way gives up soon (``Stopped``)
        # Small downloads convert in up to this many worker processes (``convertpool``); 0: none.
        self.processes = processes if convertpool.available() else 0
        self.limits = limits or Limits()
        self.on_bad_rows = on_bad_rows
        self.layout = Layout(root=root)

    # -- paths ---------------------------------------------------------------------------

    def download_path(self, app: str, window_id: int, attempt: int) -> Path:
        """Where a window's download lands before it is converted."""
        return self.layout.download_path(app, window_id, attempt)

    def manifest_path(self, app: str, window_id: int, attempt: int) -> Path:
        """Where the manifest of an attempt is (once published)."""
        return self.layout.manifest_path(app, window_id, attempt)

    def _final(self, manifest: Manifest, item: ManifestFile) -> Path:
        return self.layout.event_path(manifest.app, item.path)

    # -- stage and publish ---------------------------------------------------------------

    def stage(
        self, *, app: str, window_id: int, attempt: int, start_ms: int, end_ms: int, source: Path
    ) -> Manifest:
        """Convert ``source`` into staged Parquet files; returns their (unpublished) manifest.

        Raises ``BadDataError`` for a corrupt, hostile or schema-breaking download; nothing
        outside ``_staging/`` is touched, and a failed stage leaves no staged files.
        """
        convert: Callable[..., Manifest] = staging.stage
        if self.processes and decode.small(source, self.limits):  # see ``convertpool``
            convert = functools.partial(convertpool.stage, size=self.processes)
        return convert(self.layout, self.limits, self.on_bad_rows, app=app, window_id=window_id,
                       attempt=attempt, start_ms=start_ms, end_ms=end_ms, source=source,
                       stop=self.stop)  # fmt: skip

    def publish(self, manifest: Manifest) -> Path:
        """Write the manifest, then move the staged files into ``events/``; returns its path."""
        target = self.intend(manifest)
        if not self.finish(manifest):
            raise IntegrityError(
                f"staged files of window {manifest.window_id} went missing before publish"
            )
        return target

    def intend(self, manifest: Manifest) -> Path:
        """Write the manifest (the intent record ``finish`` completes from); returns its path."""
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
        return target

    def finish(self, manifest: Manifest) -> bool:
        """Move whatever of ``manifest`` is still staged into place; True if all files are there."""
        stage_dir = self.layout.stage_dir(manifest.app, manifest.window_id, manifest.attempt)
        for item in manifest.files:
            final = self._final(manifest, item)
            staged = self.layout.inside(stage_dir / item.path)
            if final.exists() and final.stat().st_size == item.size:
                continue
            if not staged.exists():
                return False
            final.parent.mkdir(parents=True, exist_ok=True)
            self.layout.inside(final)  # the folders just made: still no link on the way
            os.replace(staged, final)
            _fsync_dir(final.parent)
            crashpoints.hit("writer.publish")
        self.layout.remove_tree(stage_dir)
        return True

    def remove(self, manifest: Manifest) -> None:
        """Take an attempt's files out of ``events/``, then its manifest (never through a link)."""
        for item in manifest.files:
            self.layout.remove_file(self._final(manifest, item))
        self.layout.remove_file(
            self.manifest_path(manifest.app, manifest.window_id, manifest.attempt)
        )
        self.layout.remove_tree(
            self.layout.stage_dir(manifest.app, manifest.window_id, manifest.attempt)
        )

    # -- manifests -----------------------------------------------------------------------

    def load_manifest(self, path: Path) -> Manifest:
        """The manifest at ``path``; ``ValueError``, ``TypeError`` or ``KeyError`` if malformed."""
        return Manifest.from_json(path.read_bytes())

    def load(self, app: str, window_id: int, attempt: int) -> Manifest | None:
        """The published manifest of that attempt, or None if it has none."""
        path = self.manifest_path(app, window_id, attempt)
        return self.load_manifest(path) if path.exists() else None

    def manifests(self) -> list[Path]:
        """Every manifest under ``_manifests/`` (a linked folder or file is not one)."""
        found, _ = self.layout.files(self.layout.manifests, 2)
        return [p for p in found if p.suffix == ".json"]

    def check_manifest(self, path: Path | str, rows: int | None) -> list[str]:
        """Problems with one committed attempt: its manifest, its files, their bytes and rows."""
        path = Path(path)
        if not path.exists():
            return [f"{path}: the manifest of a committed window is missing"]
        try:
            manifest = self.load_manifest(path)
        except (ValueError, TypeError, KeyError) as exc:
            return [f"{path}: unreadable manifest ({exc})"]
        problems = []
        if rows is not None and manifest.rows != rows:
            problems.append(f"{path}: {manifest.rows} rows, the ledger says {rows}")
        window = (
            (manifest.start_ms, manifest.end_ms) if manifest.end_ms > manifest.start_ms else None
        )
        for item in manifest.files:
            problem = self._check_file(self._final(manifest, item), item, path.name, window)
            if problem is not None:
                problems.append(problem)
        return problems

    def _check_file(
        self, final: Path, item: ManifestFile, listed_in: str, window: tuple[int, int] | None
    ) -> str | None:
        """What is wrong with one landed file against its manifest entry, or None."""
        if not final.exists():
            return f"{final}: missing (listed in {listed_in})"
        if final.stat().st_size != item.size:
            return f"{final}: {final.stat().st_size} bytes, the manifest says {item.size}"
        if sha256(final) != item.sha256:
            return f"{final}: sha256 differs from the manifest"
        try:
            footer = pq.read_metadata(final)
        except (OSError, pa.ArrowException) as exc:
            return f"{final}: unreadable Parquet ({exc})"
        if footer.num_rows != item.rows:
            return f"{final}: {footer.num_rows} rows, the manifest says {item.rows}"
        span = _session_span(footer)
        if (
            window is not None
            and span is not None
            and (span[0] < window[0] or span[1] >= window[1])
        ):
            return f"{final}: rows from {iso(span[0])} to {iso(span[1])}, outside its window"
        return None

    # -- orphans and sweeping ------------------------------------------------------------

    def orphans(self, live: set[tuple[int, int]]) -> list[str]:
        """Files a reader could see, or that linger, which belong to no committed attempt, and
        every symbolic link below the root's folders (backfill never follows one)."""
        problems = []
        layout = self.layout
        events, links = layout.files(layout.events, 3)
        for path in events:
            if not (path.parent.name.startswith("dt=") and _app_folder(path, layout)):
                continue
            owner = part_owner(path.name)
            if owner is None:
                problems.append(f"{path}: not a file backfill wrote")
            elif owner not in live:
                problems.append(f"{path}: belongs to no committed window attempt")
        problems.extend(
            f"{path}: manifest of no committed window attempt"
            for path in self.manifests()
            if manifest_owner(path.name) not in live
        )
        staged, staged_links = layout.files(layout.staging, 4)
        if staged or _any_file(layout.staging):
            problems.append(
                f"{layout.staging}: staged files left behind (the next run sweeps them)"
            )
        for base, depth in ((layout.manifests, 2), (layout.rejects, 2), (layout.downloads, 2)):
            links += layout.files(base, depth)[1]
        problems.extend(
            f"{link}: a symbolic link below the output root (backfill never follows links; "
            "the next run refuses to start until it is removed)"
            for link in sorted(set(links + staged_links))
        )
        return problems

    def listing(self) -> Listing:
        """Every event file, manifest (and manifest being written) and quarantine file with
        its owner, and every link met; the first half of a sweep."""
        layout = self.layout
        events, links = layout.files(layout.events, 3)
        manifests, manifest_links = layout.files(layout.manifests, 2)
        rejects, reject_links = layout.files(layout.rejects, 2)
        found: list[tuple[Path | str, tuple[int, int] | None]] = [
            (p, part_owner(p.name)) for p in events if _app_folder(p, layout)
        ]
        found += [(p, manifest_owner(p.name.removesuffix(".tmp"))) for p in manifests]
        found += [(p, rejects_owner(p.name)) for p in rejects]
        return Listing(
            owned=tuple((p, owner) for p, owner in found if owner is not None),
            links=tuple(links + manifest_links + reject_links),
        )

    def sweep(self, live: set[tuple[int, int]], listing: Listing | None = None) -> list[Path]:
        """Delete the event files, manifests and quarantine files of ``listing`` (default: one
        taken now) whose (window id, attempt) is not in ``live``; returns what was deleted.
        Files that do not look like ours are left alone, and so is every file published after
        the listing: list first, then read the ledger, then sweep.

        A link in the listing is an ``IntegrityError`` naming it, raised before anything is
        deleted.
        """
        listing = self.listing() if listing is None else listing
        _refuse_links(list(listing.links))
        doomed = [p for p, owner in listing.owned if isinstance(p, Path) and owner not in live]
        return [p for p in doomed if self.layout.remove_file(p)]

    def sweep_downloads(self, keep: set[tuple[int, int]], apps: Iterable[str]) -> int:
        """Delete downloads of ``apps`` whose (window id, attempt) is not in ``keep``.

        Returns how many; another app's downloads (another run's) are left alone, and so is
        every file not named like a download.  A link met is an ``IntegrityError`` naming it,
        raised before anything is deleted.
        """
        found: list[Path] = []
        links: list[Path] = []
        for app in apps:
            files, met = self.layout.files(self.layout.downloads / partition_value(app), 1)
            found += files
            links += met
        _refuse_links(links)
        doomed = [p for p in found if _dead(download_owner(p.name), keep)]
        return sum(self.layout.remove_file(p) for p in doomed)

    def work_listing(self) -> list[tuple[Path, tuple[int, int]]]:
        """Each attempt's local work (its staging folder, its download) with its owner: the
        first half of ``sweep_work``, taken before the ledger is read.  A link met is an
        ``IntegrityError`` naming it."""
        layout = self.layout
        found = []
        for app_dir in _folders(layout.staging):
            found += [(d, o) for d in _folders(app_dir) if (o := staged_owner(d.name))]
        downloads, links = layout.files(layout.downloads, 2)
        _refuse_links(links)
        found += [(p, o) for p in downloads if (o := download_owner(p.name))]
        return found

    def sweep_work(
        self, keep: set[tuple[int, int]], listing: list[tuple[Path, tuple[int, int]]]
    ) -> int:
        """Delete the listed local work of attempts not in ``keep``; returns how many.

        For a ledger many workers share: another worker's stage or download under way is in
        ``keep`` (its window is unfinished at that attempt), one a dead worker left is not.
        """
        gone = 0
        for path, owner in listing:
            if owner not in keep:
                try:
                    if path.is_dir():
                        self.layout.remove_tree(path)
                    else:
                        self.layout.remove_file(path)
                except FileNotFoundError:  # another worker is sweeping it at the same moment
                    continue
                gone += 1
        return gone

    def discard_staging(self) -> None:
        """Drop everything staged (call only when no stage is running); never through a link."""
        self.layout.remove_tree(self.layout.staging)


def _folders(base: Path) -> list[Path]:
    """The real folders just below ``base`` (a link is refused, naming it)."""
    if not base.is_dir() or base.is_symlink():
        return []
    entries = list(base.iterdir())
    _refuse_links([e for e in entries if e.is_symlink()])
    return [e for e in entries if e.is_dir()]


def _dead(owner: tuple[int, int] | None, live: set[tuple[int, int]]) -> bool:
    """Whether a file named for ``owner`` is ours and belongs to no live attempt."""
    return owner is not None and owner not in live


def _app_folder(path: Path, layout: Layout) -> bool:
    """Whether ``path`` (``events/X/dt=.../file``) lies in an ``app=`` folder."""
    return path.parent.parent.name.startswith("app=") and path.parent.parent.parent == layout.events


def _any_file(base: Path) -> bool:
    """Whether any file lies below ``base`` (``os.walk`` never enters a linked folder)."""
    return not base.is_symlink() and any(names for _, _, names in os.walk(base))


def _refuse_links(links: list[Path]) -> None:
    if links:
        shown = ", ".join(f"{link} -> {os.readlink(link)}" for link in links[:5])
        raise IntegrityError(
            f"refusing to sweep the output root: {len(links)} symbolic link"
            f"{'s' * (len(links) != 1)} below it ({shown}); backfill never follows links "
            "there: remove them and run again"
        )
