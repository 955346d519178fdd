"""The manifest: the record of what one attempt of one window landed, file by file.

Theory of operation.  A manifest is written (``to_json``) before any of its files is moved into
place, so it is the intent record that lets an interrupted publish be finished or undone, and
the record ``verify`` checks the landed files against: each file's path, size, sha256, rows and
partition.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pathlib import Path

__all__ = ["Manifest", "ManifestFile", "sha256"]


@dataclass(frozen=True, slots=True, kw_only=True)
class ManifestFile:
    """One landed Parquet file of an attempt."""

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
        """Raises ``ValueError``, ``TypeError`` or ``KeyError`` for a malformed document."""
        document = json.loads(raw)
        document["files"] = tuple(ManifestFile(**f) for f in document["files"])
        return cls(**document)


def sha256(path: Path) -> str:
    """The hex sha256 of the file at ``path``, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()
