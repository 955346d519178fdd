"""Test-wide setup: quiet logs, and test ids that every pytest-xdist worker collects alike.

``make test`` runs two xdist workers, and xdist refuses to start unless both collect the same test
ids in the same order.  Two things would differ between two interpreters: the order of a set
(``TRANSITIONS`` targets are frozensets; string hashes are salted per process) and the bytes of a
``gzip.compress`` parameter (its header carries the current second).  The hooks below pin both.
"""

from __future__ import annotations

import hashlib
import os

import pytest

from backfill import logs

# The loopback S3 server (`s3_root`), the store fixtures (`stores`) and the throwaway
# PostgreSQL cluster (`pg_server`, `pg_url`).
pytest_plugins = ["tests.s3server", "tests.storekit", "tests.pgserver"]

_GZIP_MAGIC = b"\x1f\x8b"


def pytest_configure(config: pytest.Config) -> None:
    """Before xdist spawns its workers: one string-hash seed for all, so sets iterate alike."""
    if os.environ.get("PYTEST_XDIST_WORKER") is None and getattr(
        config.option, "numprocesses", None
    ):
        os.environ.setdefault("PYTHONHASHSEED", "0")  # read by each worker as it starts


def pytest_make_parametrize_id(config: pytest.Config, val: object, argname: str) -> str | None:
    """A gzip payload is named by its content, without the timestamp in its header."""
    if isinstance(val, bytes) and val[:2] == _GZIP_MAGIC and len(val) >= 10:
        timeless = val[:4] + bytes(4) + val[8:]  # bytes 4-7: MTIME (RFC 1952)
        return f"gzip-{len(val)}B-{hashlib.sha256(timeless).hexdigest()[:8]}"
    return None


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    logs.configure(fmt="json", level="warning")
