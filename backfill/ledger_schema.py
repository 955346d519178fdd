"""The SQLite ledger's schema: its migrations, and how a row becomes a value.

Theory of operation.  ``MIGRATIONS[n]`` takes a ledger from ``PRAGMA user_version`` n to n + 1;
``Ledger.open`` runs the ones a file lacks, each in one transaction.  Version 2 adds replacement
by range (``windows.replaces``) and the settings each app's rows were pulled with
(``app_settings``); version 3 counts the failures of each window.  The SQL is plain enough to
port to PostgreSQL.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backfill.errors import LedgerError
from backfill.models import Changes, Window, WindowRecord, WindowState

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Mapping

    Row = sqlite3.Row | Mapping[str, Any]  # a row of either ledger, read by column name

__all__ = ["COLUMNS", "MIGRATIONS", "UPDATABLE", "RecordedSettings", "record_of", "settings_of"]

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE windows (
        id                INTEGER PRIMARY KEY,
        app               TEXT    NOT NULL,
        start_ms          INTEGER NOT NULL,
        end_ms            INTEGER NOT NULL CHECK (end_ms > start_ms),
        state             TEXT    NOT NULL,
        attempt           INTEGER NOT NULL DEFAULT 0,
        parent_id         INTEGER REFERENCES windows (id),
        request_id        TEXT,
        submitted_at      INTEGER,
        ready_at          INTEGER,
        error_class       TEXT,
        error_message     TEXT,
        retryable         INTEGER,
        rows              INTEGER,
        bytes             INTEGER,
        manifest          TEXT,
        committed_attempt INTEGER,
        created_at        INTEGER NOT NULL,
        updated_at        INTEGER NOT NULL
    );
    CREATE INDEX windows_by_app ON windows (app, start_ms);
    CREATE INDEX windows_by_state ON windows (state);
    CREATE TABLE app_sizes (
        app        TEXT PRIMARY KEY,
        size_ms    INTEGER NOT NULL,
        updated_at INTEGER NOT NULL
    );
    """,
    # 2: replacement by range, and the settings each app's rows were pulled with.
    """
    ALTER TABLE windows ADD COLUMN replaces INTEGER REFERENCES windows (id);
    CREATE INDEX windows_by_replaces ON windows (replaces);
    CREATE TABLE app_settings (
        app          TEXT PRIMARY KEY,
        api_key      TEXT NOT NULL,
        app_versions TEXT NOT NULL,
        event_ids    TEXT NOT NULL,
        updated_at   INTEGER NOT NULL
    );
    """,
    # 3: how many times each window has failed, so later runs take it back a bounded number.
    """
    ALTER TABLE windows ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    """,
)

COLUMNS = (
    "id, app, start_ms, end_ms, state, attempt, parent_id, request_id, submitted_at, ready_at, "
    "error_class, error_message, retryable, rows, bytes, manifest, committed_attempt, "
    "created_at, updated_at, replaces, failures"
)
# The columns a move may set: the typed ``Changes``, and what a commit sets itself.  They are
# interpolated into SQL, so the ledger checks every name against this set.
UPDATABLE = Changes.__optional_keys__ | {"committed_attempt"}


def _state(row: Row) -> WindowState:
    try:
        return WindowState(row["state"])
    except ValueError:
        raise LedgerError(
            f"window {row['id']} has the state {row['state']!r}, which this backfill does not "
            "know (written by a newer version, or edited by hand); upgrade backfill or fix the row"
        ) from None


def record_of(row: Row) -> WindowRecord:
    """A ``windows`` row (selected with ``COLUMNS``) as a value; SQLite's or PostgreSQL's."""
    retryable = row["retryable"]
    return WindowRecord(
        id=row["id"],
        window=Window(app=row["app"], start=row["start_ms"], end=row["end_ms"]),
        state=_state(row),
        attempt=row["attempt"],
        parent_id=row["parent_id"],
        request_id=row["request_id"],
        submitted_at=row["submitted_at"],
        ready_at=row["ready_at"],
        error_class=row["error_class"],
        error_message=row["error_message"],
        retryable=None if retryable is None else bool(retryable),
        rows=row["rows"],
        bytes=row["bytes"],
        manifest=row["manifest"],
        committed_attempt=row["committed_attempt"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        replaces=row["replaces"],
        failures=row["failures"],
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class RecordedSettings:
    """What shapes an app's rows: the app's key and the filters it was pulled with."""

    app: str
    api_key: str
    app_versions: tuple[str, ...] = ()
    event_ids: tuple[str, ...] = ()


def settings_of(row: Row) -> RecordedSettings:
    def items(text: str) -> tuple[str, ...]:
        return tuple(filter(None, text.split(",")))

    return RecordedSettings(app=row["app"], api_key=row["api_key"],
                            app_versions=items(row["app_versions"]),
                            event_ids=items(row["event_ids"]))  # fmt: skip
