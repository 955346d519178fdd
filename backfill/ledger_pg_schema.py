"""The PostgreSQL ledger's schema: its migrations, and safe URLs.

Theory of operation.  ``MIGRATIONS[n]`` takes a database from schema version n to n + 1 (the
one row of ``backfill_schema``); ``PgLedger.open`` runs the ones a database lacks in one
transaction under an advisory lock, so two processes opening a new database migrate it once.
Versions 1-3 are the SQLite ledger's three migrations in PostgreSQL's dialect (``BIGSERIAL``
ids, ``BIGINT`` epoch ms, ``BOOLEAN`` retryable); version 4 adds what only a shared ledger
needs: window leases (``lease_owner``, ``lease_until``), the ``workers`` table, the shared API
budget (``api_slots``) and the shared pacer and 429 gate (``api_pacer``, one row).

A row becomes a value as in the SQLite ledger (``ledger_schema.record_of`` and ``settings_of``,
re-exported here): the two share their columns.  A connection URL may carry a password;
``mask_url`` shows one with the password replaced by ``***``, and no message of the
PostgreSQL ledger is built from the raw URL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlsplit

from backfill.config_places import masked
from backfill.ledger_schema import COLUMNS, record_of, settings_of

__all__ = [
    "COLUMNS",
    "MIGRATIONS",
    "WorkerInfo",
    "mask_url",
    "record_of",
    "settings_of",
]

MIGRATIONS: tuple[str, ...] = (
    """
    CREATE TABLE windows (
        id                BIGSERIAL PRIMARY KEY,
        app               TEXT    NOT NULL,
        start_ms          BIGINT  NOT NULL,
        end_ms            BIGINT  NOT NULL CHECK (end_ms > start_ms),
        state             TEXT    NOT NULL,
        attempt           INTEGER NOT NULL DEFAULT 0,
        parent_id         BIGINT  REFERENCES windows (id),
        request_id        TEXT,
        submitted_at      BIGINT,
        ready_at          BIGINT,
        error_class       TEXT,
        error_message     TEXT,
        retryable         BOOLEAN,
        rows              BIGINT,
        bytes             BIGINT,
        manifest          TEXT,
        committed_attempt INTEGER,
        created_at        BIGINT  NOT NULL,
        updated_at        BIGINT  NOT NULL
    );
    CREATE INDEX windows_by_app ON windows (app, start_ms);
    CREATE INDEX windows_by_state ON windows (state);
    CREATE TABLE app_sizes (
        app        TEXT PRIMARY KEY,
        size_ms    BIGINT NOT NULL,
        updated_at BIGINT NOT NULL
    );
    """,
    # 2: replacement by range, and the settings each app's rows were pulled with.
    """
    ALTER TABLE windows ADD COLUMN replaces BIGINT REFERENCES windows (id);
    CREATE INDEX windows_by_replaces ON windows (replaces);
    CREATE TABLE app_settings (
        app          TEXT PRIMARY KEY,
        api_key      TEXT NOT NULL,
        app_versions TEXT NOT NULL,
        event_ids    TEXT NOT NULL,
        updated_at   BIGINT NOT NULL
    );
    """,
    # 3: how many times each window has failed, so later runs take it back a bounded number.
    """
    ALTER TABLE windows ADD COLUMN failures INTEGER NOT NULL DEFAULT 0;
    """,
    # 4: leases, workers, and the API budget every worker of the ledger shares.
    """
    ALTER TABLE windows ADD COLUMN lease_owner TEXT;
    ALTER TABLE windows ADD COLUMN lease_until BIGINT;
    CREATE INDEX windows_by_lease_owner ON windows (lease_owner);
    CREATE TABLE workers (
        worker     TEXT PRIMARY KEY,
        host       TEXT    NOT NULL,
        pid        INTEGER NOT NULL,
        command    TEXT    NOT NULL,
        started_at BIGINT  NOT NULL,
        seen_at    BIGINT  NOT NULL
    );
    CREATE TABLE api_slots (
        window_id BIGINT PRIMARY KEY,
        app       TEXT   NOT NULL,
        worker    TEXT   NOT NULL,
        until_ms  BIGINT NOT NULL
    );
    CREATE TABLE api_pacer (
        id          INTEGER PRIMARY KEY CHECK (id = 1),
        tokens      DOUBLE PRECISION,
        refilled_at BIGINT,
        gate_until  BIGINT NOT NULL DEFAULT 0
    );
    INSERT INTO api_pacer (id) VALUES (1);
    """,
)

# The schema version, one row; created (if missing) before any migration runs.
VERSION_TABLE = "CREATE TABLE IF NOT EXISTS backfill_schema (version INTEGER NOT NULL)"


def statements(script: str) -> list[str]:
    """The statements of one migration (none holds a ``;`` inside)."""
    return [s.strip() for s in script.split(";") if s.strip()]


@dataclass(frozen=True, slots=True, kw_only=True)
class WorkerInfo:
    """One worker of a shared ledger, for ``backfill status``.

    ``holding``: (window id, app, label, state) of each unexpired lease it holds.
    """

    worker: str
    host: str
    pid: int
    command: str
    started_at: int
    seen_at: int
    holding: list[tuple[int, str, str, str]] = field(default_factory=list)


mask_url = masked  # one masking for the config's messages and the adapter's


def url_password(url: str) -> str | None:
    """The password written in ``url`` (to blank it out of messages), if any."""
    if "://" not in url:
        for part in url.split():
            if part.lower().startswith("password="):
                return part.split("=", 1)[1]
        return None
    try:
        parts = urlsplit(url)
    except ValueError:
        return None
    if parts.password:
        return parts.password
    return dict(parse_qsl(parts.query)).get("password")
