"""The output layout: where every file of an attempt lives, and how its name is read back.

Theory of operation.  Under the output root::

    events/app={app}/dt={YYYY-MM-DD}/part-{window}-{attempt}-{seq}.parquet   what readers see
    _manifests/{app}/{window}.{attempt}.json                                 publish intents
    _staging/{app}/{window}.{attempt}/dt=.../part-...parquet                 before publish
    _rejects/{app}/{window}.{attempt}.ndjson                                 quarantined rows
    _downloads/{app}/{window}.{attempt}.gz                                   before staging

``{app}`` is ``partition_value(app)``: percent-encoded, so no app name can climb out of its
directory or hide from a hive reader; and every path handed out is checked to stay under the
root with no symbolic link on the way (a link could send a write or a delete elsewhere; the
root itself may be a link, nothing below it may).  ``files`` lists what lies below a folder
without following links, and ``remove_file``/``remove_tree`` delete only through real folders:
the sweep, recovery, ``remove`` and ``forget`` delete through these alone.  A row goes to the
partition of its session's UTC day.  This module is the one place that writes these names and
the one place that parses them back (``part_owner``, ``manifest_owner``, ``download_owner``).
"""

from __future__ import annotations

import os
import re
import shutil
import stat
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from backfill.errors import IntegrityError
from backfill.models import DAY_MS

if TYPE_CHECKING:
    from collections.abc import Iterator
    from pathlib import Path

__all__ = [
    "Layout",
    "Listing",
    "day_partition",
    "days",
    "download_owner",
    "rejects_owner",
    "manifest_owner",
    "part_name",
    "part_owner",
    "partition_value",
]

_SAFE = re.compile(r"[A-Za-z0-9_.\-]")
_PART = re.compile(r"part-(\d+)-(\d+)-\d+\.parquet")
_MANIFEST = re.compile(r"(\d+)\.(\d+)\.json")
_DOWNLOAD = re.compile(r"(\d+)\.(\d+)\.gz")
_REJECTS = re.compile(r"(\d+)\.(\d+)\.ndjson")
_STAGED = re.compile(r"(\d+)\.(\d+)")


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


def days(stamps_ms: np.ndarray[Any, Any]) -> np.ndarray[Any, Any]:
    """The UTC day number (days since the epoch) of each millisecond timestamp."""
    return stamps_ms // DAY_MS


def day_partition(day: int) -> str:
    """The partition directory of UTC day number ``day``: ``dt=YYYY-MM-DD``."""
    return f"dt={np.datetime64(day, 'D').astype(str)}"


def part_name(window_id: int, attempt: int, seq: int) -> str:
    """The name of the ``seq``-th Parquet file an attempt writes."""
    return f"part-{window_id}-{attempt}-{seq}.parquet"


def _owner(pattern: re.Pattern[str], name: str) -> tuple[int, int] | None:
    match = pattern.fullmatch(name)
    return (int(match[1]), int(match[2])) if match else None


def part_owner(name: str) -> tuple[int, int] | None:
    """The (window id, attempt) a Parquet file name belongs to, or None if not ours."""
    return _owner(_PART, name)


def manifest_owner(name: str) -> tuple[int, int] | None:
    """The (window id, attempt) of a manifest file name, or None if not ours."""
    return _owner(_MANIFEST, name)


def rejects_owner(name: str) -> tuple[int, int] | None:
    """The (window id, attempt) of a quarantine file name, or None if not ours."""
    return _owner(_REJECTS, name)


def staged_owner(name: str) -> tuple[int, int] | None:
    """The (window id, attempt) of a staging folder's name, or None if not ours."""
    return _owner(_STAGED, name)


def download_owner(name: str) -> tuple[int, int] | None:
    """The (window id, attempt) of a download file name, or None if not ours."""
    return _owner(_DOWNLOAD, name)


@dataclass(frozen=True, slots=True, kw_only=True)
class Listing:
    """What a store found at one moment: every event file, manifest and quarantine file it
    may sweep, each with the (window id, attempt) that owns it, and the links met on the way.

    A sweep deletes from such a listing only: taken BEFORE the ledger is read, it cannot hold
    a file another worker published after the ledger said which attempts are live.
    """

    owned: tuple[tuple[Path | str, tuple[int, int]], ...] = ()
    links: tuple[Path, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Layout:
    """The paths under one output root; each one checked to stay under it."""

    root: Path

    @property
    def events(self) -> Path:
        return self.root / "events"

    @property
    def manifests(self) -> Path:
        return self.root / "_manifests"

    @property
    def staging(self) -> Path:
        return self.root / "_staging"

    @property
    def rejects(self) -> Path:
        return self.root / "_rejects"

    @property
    def downloads(self) -> Path:
        return self.root / "_downloads"

    def inside(self, path: Path) -> Path:
        """``path``, once sure it resolves under the root with no link on the way; else
        ``IntegrityError`` naming the path (and the link)."""
        link = self._first_link(path)  # first: the link is the clearer thing to name
        if link is not None:
            raise IntegrityError(_link_refusal(path, link))
        # Spelled from the root without "..", and no link on the way: it resolves under the
        # root (the cheap check; ``resolve`` costs a system call a component).
        plain = path.is_relative_to(self.root) and ".." not in path.parts
        if not plain and not path.resolve().is_relative_to(self.root.resolve()):
            raise IntegrityError(f"refusing to touch {path}: outside the output root {self.root}")
        return path

    def _first_link(self, path: Path) -> Path | None:
        """The first symbolic link from just below the root down to ``path`` (itself included)."""
        try:
            parts = path.relative_to(self.root).parts
        except ValueError:  # not spelled from the root: the resolved check names it
            return None
        current = str(self.root)
        for depth, part in enumerate(parts, 1):
            current = os.path.join(current, part)
            try:
                mode = os.lstat(current).st_mode  # one system call: a link, or there at all
            except (FileNotFoundError, NotADirectoryError):  # nothing deeper exists to be a link
                return None
            if stat.S_ISLNK(mode):
                return self.root.joinpath(*parts[:depth])
        return None

    def files(self, base: Path, depth: int) -> tuple[list[Path], list[Path]]:
        """The regular files exactly ``depth`` levels below ``base``, and the links met on the way.

        Never follows a link: a linked folder is listed among the links, not entered.
        """
        found: list[Path] = []
        links: list[Path] = []
        if not base.exists() and not base.is_symlink():
            return found, links
        link = self._first_link(base)
        if link is not None:
            return found, [link]
        for path, is_link in _walk(base, depth):
            (links if is_link else found).append(path)
        return sorted(found), sorted(links)

    def remove_file(self, path: Path) -> bool:
        """Delete ``path`` (a file under the root, reached through real folders only).

        Returns whether it was there; ``IntegrityError`` if a link is on the way.
        """
        self.inside(path)
        try:
            os.unlink(path)
        except FileNotFoundError:
            return False
        return True

    def remove_tree(self, path: Path) -> None:
        """Delete the folder ``path`` and all below it, never through a link.

        The way down to it is checked (``inside``); below it, ``shutil.rmtree`` works from file
        descriptors and unlinks a link instead of entering it (``avoids_symlink_attacks``).
        """
        if not path.exists() and not path.is_symlink():
            return
        self.inside(path)
        assert shutil.rmtree.avoids_symlink_attacks, "this platform's rmtree follows links"
        shutil.rmtree(path)

    def stage_dir(self, app: str, window_id: int, attempt: int) -> Path:
        """The directory an attempt's files are staged in."""
        return self.inside(self.staging / partition_value(app) / f"{window_id}.{attempt}")

    def download_path(self, app: str, window_id: int, attempt: int) -> Path:
        """Where a window's download lands before it is converted."""
        return self.inside(self.downloads / partition_value(app) / f"{window_id}.{attempt}.gz")

    def manifest_path(self, app: str, window_id: int, attempt: int) -> Path:
        """Where an attempt's manifest is published."""
        return self.inside(self.manifests / partition_value(app) / f"{window_id}.{attempt}.json")

    def rejects_path(self, app: str, window_id: int, attempt: int) -> Path:
        """The quarantine file of an attempt."""
        return self.inside(self.rejects / partition_value(app) / f"{window_id}.{attempt}.ndjson")

    def event_path(self, app: str, relative: str) -> Path:
        """The published place of a file listed as ``relative`` (``dt=.../part-...``)."""
        return self.inside(self.events / f"app={partition_value(app)}" / relative)


def _link_refusal(path: Path, link: Path) -> str:
    try:
        target = os.readlink(link)
    except OSError:
        target = "?"
    return (
        f"refusing to touch {path}: {link} is a symbolic link (to {target}); backfill never "
        "follows links below the output root: remove the link and run again"
    )


def _walk(base: Path, depth: int) -> Iterator[tuple[Path, bool]]:
    """(path, is a link) of the regular files ``depth`` levels below ``base``, and its links."""
    with os.scandir(base) as entries:
        for entry in entries:
            path = base / entry.name
            if entry.is_symlink():
                yield path, True
            elif depth > 1 and entry.is_dir(follow_symlinks=False):
                yield from _walk(path, depth - 1)
            elif depth == 1 and entry.is_file(follow_symlinks=False):
                yield path, False
