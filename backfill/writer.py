"""Transitional: the old names of the output side, until engine, cli and audit import the new."""

from __future__ import annotations

from backfill.layout import partition_value
from backfill.manifest import Manifest, ManifestFile
from backfill.schema import FIELDS, SCHEMA, Limits
from backfill.store import LocalStore

__all__ = [
    "FIELDS",
    "SCHEMA",
    "Limits",
    "Manifest",
    "ManifestFile",
    "Writer",
    "partition_value",
]

Writer = LocalStore
