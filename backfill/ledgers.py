"""Opening the ledger a config names: SQLite at ``[ledger] path``, or PostgreSQL at ``url``.

The command line and the Python API both open it here.  A PostgreSQL ledger is shared by many
workers: this process gets an id of its own (``worker_id``) and, for a command that runs
windows, a row in the ledger's ``workers`` table (``backfill status`` shows it) until it ends.
The password of a URL, or of ``password_env``, is registered for redaction before anything is
opened, so no message can show it.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import socket
from typing import TYPE_CHECKING

import anyio

from backfill import logs

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Mapping

    from backfill.config import Settings
    from backfill.ledger import Ledger

__all__ = ["opened", "worker_id"]


def worker_id() -> str:
    """This process's id among the workers of a shared ledger: host, pid and a random tag."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


@contextlib.asynccontextmanager
async def opened(
    settings: Settings, *, command: str = "", env: Mapping[str, str] = os.environ
) -> AsyncIterator[Ledger]:
    """The ledger of ``settings``, closed on the way out (see the module's docstring)."""
    from backfill.ledger import Ledger

    url = settings.ledger.url
    if url is None:
        ledger = await Ledger.open(settings.ledger_path)
        try:
            yield ledger
        finally:
            await ledger.close()
        return
    from backfill.ledger_pg import PgLedger
    from backfill.ledger_pg_schema import url_password

    for secret in (url_password(url), env.get(settings.ledger.password_env or "")):
        if secret:
            logs.register_secret(secret)
    pg = await PgLedger.open(url, worker=worker_id(), password_env=settings.ledger.password_env)
    try:
        if command:
            await pg.register(command, socket.gethostname(), os.getpid())
        yield pg  # type: ignore[misc]  # the same public surface as Ledger (tests run both)
    finally:
        with anyio.CancelScope(shield=True):
            if command:
                await pg.unregister()
            await pg.close()
