"""The PostgreSQL ledger's connections: the pool, one transaction per call, safe errors.

Theory of operation.  ``PgConnection`` owns a ``psycopg_pool.AsyncConnectionPool`` of
autocommit connections; every ledger call takes one and runs its statements in one explicit
transaction (``_tx``), so a call is all or nothing and several calls of one process run at once.
Opening first makes one plain connection and migrates under ``pg_advisory_xact_lock`` (see
``ledger_pg_schema``): a bad URL or password fails at once as a ``LedgerError``, not after the
pool's retries.  Credentials come from the URL's usual sources (libpq's ``PGPASSWORD``,
``.pgpass``) or from the environment variable named by ``password_env``, passed to libpq as a
keyword, never written into a URL.  Every psycopg error becomes a ``LedgerError`` whose text is
scrubbed (``logs.scrub``, the password blanked) and which does not chain the original.
"""

from __future__ import annotations

import os
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any

import psycopg
from psycopg.rows import dict_row
from psycopg_pool import AsyncConnectionPool

from backfill.errors import LedgerError
from backfill.ledger_pg_schema import MIGRATIONS, VERSION_TABLE, mask_url, statements, url_password
from backfill.logs import scrub

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable

__all__ = ["Conn", "PgConnection", "connect_args"]

Conn = psycopg.AsyncConnection[Any]
_MIGRATION_LOCK = 0x6261636B66696C6C  # "backfill": one advisory lock for every migrating process
POOL_SIZE = 8


def connect_args(url: str, password_env: str | None) -> dict[str, Any]:
    """libpq keywords beside the URL: the password from ``password_env``, if named."""
    args: dict[str, Any] = {"autocommit": True}
    if password_env is not None:
        password = os.environ.get(password_env)
        if not password:
            raise LedgerError(
                f"the ledger's password variable {password_env} is not set (for {mask_url(url)})"
            )
        args["password"] = password
    return args


class PgConnection:
    """Connections to one PostgreSQL ledger database, and the helpers every part uses."""

    shared = True

    def __init__(
        self,
        pool: AsyncConnectionPool[Any],
        *,
        worker: str,
        clock: Callable[[], float],
        secrets: tuple[str, ...],
    ) -> None:
        self._pool = pool
        self.worker = worker
        self._clock = clock
        self._secrets = secrets
        self._lease_ms: int | None = None  # the last lease length asked for
        self._closed = False

    @staticmethod
    async def _start(
        url: str, password_env: str | None
    ) -> tuple[AsyncConnectionPool[Any], tuple[str, ...]]:
        """Migrate the database and open the pool; raises ``LedgerError``."""
        kwargs = connect_args(url, password_env)
        secrets = tuple(s for s in (kwargs.get("password"), url_password(url)) if s)
        try:
            async with await psycopg.AsyncConnection.connect(url, **kwargs) as conn:
                await _migrate(conn)
            pool: AsyncConnectionPool[Any] = AsyncConnectionPool(
                url, kwargs=kwargs, min_size=1, max_size=POOL_SIZE, open=False, timeout=60
            )
            await pool.open(wait=True, timeout=30)
        except psycopg.Error as exc:
            text = _safe(f"{mask_url(url)}: cannot open the ledger: {exc}", secrets)
            raise LedgerError(text) from None
        return pool, secrets

    async def close(self) -> None:
        if not self._closed:
            self._closed = True
            await self._pool.close()

    @asynccontextmanager
    async def _tx(self) -> AsyncIterator[Conn]:
        """One pooled connection in one transaction; psycopg errors become ``LedgerError``."""
        try:
            async with self._pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise LedgerError(_safe(f"ledger error: {exc}", self._secrets)) from None

    def _now(self) -> int:
        return int(self._clock() * 1000)

    @staticmethod
    async def _rows(conn: Conn, sql: str, params: Any = ()) -> list[dict[str, Any]]:
        async with conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchall()

    @staticmethod
    async def _one(conn: Conn, sql: str, params: Any = ()) -> dict[str, Any] | None:
        async with conn.cursor(row_factory=dict_row) as cursor:
            await cursor.execute(sql, params)
            return await cursor.fetchone()

    @staticmethod
    async def _exec(conn: Conn, sql: str, params: Any = ()) -> int:
        """Run one statement; the number of rows it touched."""
        cursor = await conn.execute(sql, params)
        return cursor.rowcount

    async def _fetch(self, sql: str, params: Any = ()) -> dict[str, Any] | None:
        async with self._tx() as conn:
            return await self._one(conn, sql, params)


def _safe(text: str, secrets: tuple[str, ...]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return scrub(text)


async def _migrate(conn: Conn) -> None:
    """Run the migrations the database lacks, once, whoever else opens it at the same time."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_MIGRATION_LOCK,))
        await conn.execute(VERSION_TABLE)
        cursor = await conn.execute("SELECT version FROM backfill_schema")
        row = await cursor.fetchone()
        version = 0 if row is None else int(row[0])
        if version > len(MIGRATIONS):
            raise LedgerError(
                f"ledger schema version {version} is newer than this backfill knows "
                f"({len(MIGRATIONS)}); upgrade backfill"
            )
        for script in MIGRATIONS[version:]:
            for statement in statements(script):
                await conn.execute(statement)
        if row is None:
            await conn.execute("INSERT INTO backfill_schema VALUES (%s)", (len(MIGRATIONS),))
        else:
            await conn.execute("UPDATE backfill_schema SET version = %s", (len(MIGRATIONS),))
