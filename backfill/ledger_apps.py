"""The ledger's per-app facts: learned window sizes, recorded settings, forgetting an app.

``Ledger`` mixes this in; the connection helpers it uses (``_run``, ``_write``, ``_fetchone``,
``_execute``, ``_now``) are the ledger's own.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, TypeVar

from backfill.ledger_schema import RecordedSettings, settings_of

if TYPE_CHECKING:
    import sqlite3
    from collections.abc import Callable

__all__ = ["AppFacts"]

T = TypeVar("T")


class AppFacts:
    """What the ledger knows of each app beside its windows."""

    _db: sqlite3.Connection

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _write(self, fn: Callable[..., T], *args: Any) -> T:
        raise NotImplementedError

    def _fetchone(self, sql: str, params: tuple[Any, ...] = ()) -> sqlite3.Row | None:
        raise NotImplementedError

    def _execute(self, sql: str, params: tuple[Any, ...] = ()) -> None:
        raise NotImplementedError

    def _now(self) -> int:
        raise NotImplementedError

    async def learned_size(self, app: str) -> int | None:
        """The window size learned for ``app`` from too-large refusals, if any."""
        row = await self._run(self._fetchone, "SELECT size_ms FROM app_sizes WHERE app = ?", (app,))
        return None if row is None else int(row[0])

    async def learn_size(self, app: str, size_ms: int) -> None:
        """Remember ``size_ms`` for ``app`` if it is smaller than what was known."""
        sql = (
            "INSERT INTO app_sizes (app, size_ms, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (app) DO UPDATE SET size_ms = MIN(size_ms, excluded.size_ms), "
            "updated_at = excluded.updated_at"
        )
        await self._run(self._write, self._execute, sql, (app, size_ms, self._now()))

    async def newest_committed_end(self, app: str) -> int | None:
        """The end of ``app``'s newest window with live rows, or None."""
        sql = "SELECT MAX(end_ms) FROM windows WHERE app = ? AND committed_attempt IS NOT NULL"
        row = await self._run(self._fetchone, sql, (app,))
        return None if row is None or row[0] is None else int(row[0])

    async def recorded_settings(self, app: str) -> RecordedSettings | None:
        """The settings ``app``'s committed rows were pulled with, if recorded."""
        sql = "SELECT app, api_key, app_versions, event_ids FROM app_settings WHERE app = ?"
        row = await self._run(self._fetchone, sql, (app,))
        return None if row is None else settings_of(row)

    async def app_with_key(self, api_key: str) -> str | None:
        """The app recorded with ``api_key``, if any."""
        sql = "SELECT app FROM app_settings WHERE api_key = ?"
        row = await self._run(self._fetchone, sql, (api_key,))
        return None if row is None else str(row[0])

    async def record_settings(self, settings: RecordedSettings) -> None:
        """Record (or replace) the settings ``settings.app``'s rows are pulled with."""
        sql = (
            "INSERT INTO app_settings (app, api_key, app_versions, event_ids, updated_at) "
            "VALUES (?, ?, ?, ?, ?) ON CONFLICT (app) DO UPDATE SET api_key = excluded.api_key, "
            "app_versions = excluded.app_versions, event_ids = excluded.event_ids, "
            "updated_at = excluded.updated_at"
        )
        params = (settings.app, settings.api_key, ",".join(settings.app_versions),
                  ",".join(settings.event_ids), self._now())  # fmt: skip
        await self._run(self._write, self._execute, sql, params)

    async def forget(self, app: str) -> int:
        """Delete every row of ``app`` (windows, learned size, settings); returns the windows."""
        return await self._run(self._write, self._forget, app)

    def _forget(self, app: str) -> int:
        self._db.execute(
            "UPDATE windows SET parent_id = NULL, replaces = NULL WHERE app = ?", (app,)
        )
        count = self._db.execute("DELETE FROM windows WHERE app = ?", (app,)).rowcount
        self._db.execute("DELETE FROM app_sizes WHERE app = ?", (app,))
        self._db.execute("DELETE FROM app_settings WHERE app = ?", (app,))
        return int(count)
