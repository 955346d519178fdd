"""The PostgreSQL ledger's per-app facts: learned sizes, recorded settings, forgetting an app.

The same methods and meaning as ``ledger_apps.AppFacts`` (the SQLite ledger's), each one
transaction on a pooled connection.  ``forget`` is not fenced by leases: it is an operator's
command that deletes the app whoever holds its windows.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backfill.ledger_pg_conn import PgConnection
from backfill.ledger_pg_schema import settings_of

if TYPE_CHECKING:
    from backfill.ledger_schema import RecordedSettings

__all__ = ["PgAppFacts"]


class PgAppFacts(PgConnection):
    """What the ledger knows of each app beside its windows."""

    async def learned_size(self, app: str) -> int | None:
        """The window size learned for ``app`` from too-large refusals, if any."""
        row = await self._fetch("SELECT size_ms FROM app_sizes WHERE app = %s", (app,))
        return None if row is None else int(row["size_ms"])

    async def learn_size(self, app: str, size_ms: int) -> None:
        """Remember ``size_ms`` for ``app`` if it is smaller than what was known."""
        sql = (
            "INSERT INTO app_sizes (app, size_ms, updated_at) VALUES (%s, %s, %s) "
            "ON CONFLICT (app) DO UPDATE SET "
            "size_ms = LEAST(app_sizes.size_ms, excluded.size_ms), "
            "updated_at = excluded.updated_at"
        )
        async with self._tx() as conn:
            await conn.execute(sql, (app, size_ms, self._now()))

    async def newest_committed_end(self, app: str) -> int | None:
        """The end of ``app``'s newest window with live rows, or None."""
        sql = (
            "SELECT MAX(end_ms) AS end_ms FROM windows "
            "WHERE app = %s AND committed_attempt IS NOT NULL"
        )
        row = await self._fetch(sql, (app,))
        return None if row is None or row["end_ms"] is None else int(row["end_ms"])

    async def recorded_settings(self, app: str) -> RecordedSettings | None:
        """The settings ``app``'s committed rows were pulled with, if recorded."""
        sql = "SELECT app, api_key, app_versions, event_ids FROM app_settings WHERE app = %s"
        row = await self._fetch(sql, (app,))
        return None if row is None else settings_of(row)

    async def app_with_key(self, api_key: str) -> str | None:
        """The app recorded with ``api_key``, if any."""
        row = await self._fetch("SELECT app FROM app_settings WHERE api_key = %s", (api_key,))
        return None if row is None else str(row["app"])

    async def record_settings(self, settings: RecordedSettings) -> None:
        """Record (or replace) the settings ``settings.app``'s rows are pulled with."""
        sql = (
            "INSERT INTO app_settings (app, api_key, app_versions, event_ids, updated_at) "
            "VALUES (%s, %s, %s, %s, %s) ON CONFLICT (app) DO UPDATE SET "
            "api_key = excluded.api_key, app_versions = excluded.app_versions, "
            "event_ids = excluded.event_ids, updated_at = excluded.updated_at"
        )
        params = (settings.app, settings.api_key, ",".join(settings.app_versions),
                  ",".join(settings.event_ids), self._now())  # fmt: skip
        async with self._tx() as conn:
            await conn.execute(sql, params)

    async def forget(self, app: str) -> int:
        """Delete every row of ``app`` (windows, learned size, settings); returns the windows."""
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE windows SET parent_id = NULL, replaces = NULL WHERE app = %s", (app,)
            )
            count = await self._exec(conn, "DELETE FROM windows WHERE app = %s", (app,))
            await conn.execute("DELETE FROM app_sizes WHERE app = %s", (app,))
            await conn.execute("DELETE FROM app_settings WHERE app = %s", (app,))
            return count
