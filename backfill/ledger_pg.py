"""The ledger on PostgreSQL: the SQLite ledger's behaviour, shared by many workers.

Theory of operation.  ``PgLedger`` is ``ledger.Ledger`` (same methods, same compare-and-set
moves, same crash points, errors as ``LedgerError``) on a PostgreSQL database that several
processes, on several hosts, use at once.  Each call is one transaction on a pooled
connection (``ledger_pg_conn``).  Every move is ``UPDATE ... WHERE id AND attempt AND state``:
PostgreSQL re-checks the condition after a concurrent writer commits, so exactly one of two
racing moves wins and the other gets ``StaleAttemptError``.  Planning a range takes
``pg_advisory_xact_lock(hashtext('backfill:' || app))`` first, so two processes planning the
same range at once create each window once.

What only a shared ledger has: leases (``ledger_pg_leases``: a worker claims windows, renews
and releases them; a window whose holder stopped renewing is taken over), fencing (every window
write of this ledger adds ``AND (lease_owner IS NULL OR lease_owner = me)``, so a worker whose
window was taken over can no longer move it; a move to COMMITTED, FAILED or SPLIT clears the
lease), and the API budget every worker shares (``ledger_pg_budget``).
"""

from __future__ import annotations

import datetime as dt
import time
from typing import TYPE_CHECKING, Any

from backfill import crashpoints, planner
from backfill.errors import LedgerError, StaleAttemptError
from backfill.ledger_pg_apps import PgAppFacts
from backfill.ledger_pg_budget import PgBudget
from backfill.ledger_pg_conn import PgConnection
from backfill.ledger_pg_leases import FENCE, PgLeases
from backfill.ledger_pg_schema import COLUMNS, WorkerInfo, mask_url, record_of
from backfill.ledger_schema import UPDATABLE, RecordedSettings
from backfill.models import UNFINISHED, Window, WindowRecord, WindowState, advance, check_tiles

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Sequence
    from typing import Unpack

    from backfill.ledger_pg_conn import Conn
    from backfill.models import Changes

__all__ = ["PgLedger", "RecordedSettings", "WorkerInfo", "mask_url"]

_UNLEASH = {WindowState.COMMITTED, WindowState.FAILED, WindowState.SPLIT}


class PgLedger(PgLeases, PgBudget, PgAppFacts, PgConnection):
    """The window ledger on PostgreSQL.  Open with ``await PgLedger.open(url, worker=...)``."""

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        worker: str,
        password_env: str | None = None,
        clock: Callable[[], float] = time.time,
    ) -> PgLedger:
        """Connect (creating the schema if needed) as ``worker``; raises ``LedgerError``."""
        pool, secrets = await cls._start(url, password_env)
        return cls(pool, worker=worker, clock=clock, secrets=secrets)

    # -- planning --------------------------------------------------------------------------

    async def add_windows(
        self, app: str, start: int, end: int, *, size_ms: int, tz: dt.tzinfo = dt.UTC
    ) -> list[WindowRecord]:
        """Plan ``[start, end)`` for ``app`` into windows, adding only what no live window covers.

        Returns the windows added (none when the range is already planned).
        """
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext('backfill:' || %s))", (app,))
            taken = await self._rows(
                conn,
                "SELECT start_ms, end_ms FROM windows WHERE app = %s AND state != %s "
                "AND end_ms > %s AND start_ms < %s",
                (app, WindowState.SPLIT, start, end),
            )
            holes = planner.gaps([(r["start_ms"], r["end_ms"]) for r in taken], start, end)
            return [
                await self._insert(conn, window, None, None)
                for lo, hi in holes
                for window in planner.plan(app, lo, hi, size_ms=size_ms, tz=tz)
            ]

    async def _insert(
        self,
        conn: Conn,
        window: Window,
        parent_id: int | None,
        replaces: int | None,
        lease: tuple[str, int] | None = None,
    ) -> WindowRecord:
        now = self._now()
        owner, until = lease if lease is not None else (None, None)
        row = await self._one(
            conn,
            "INSERT INTO windows (app, start_ms, end_ms, state, attempt, parent_id, created_at, "
            f"updated_at, replaces, lease_owner, lease_until) VALUES "
            f"(%s, %s, %s, %s, 0, %s, %s, %s, %s, %s, %s) RETURNING {COLUMNS}",
            (window.app, window.start, window.end, WindowState.PENDING, parent_id, now, now,
             replaces, owner, until),
        )  # fmt: skip
        assert row is not None
        return record_of(row)

    # -- compare-and-set moves -------------------------------------------------------------

    async def advance(
        self, record: WindowRecord, target: WindowState, **updates: Unpack[Changes]
    ) -> WindowRecord:
        """Move ``record`` to ``target`` in the same attempt; raises ``StaleAttemptError``."""
        advance(record.state, target)
        async with self._tx() as conn:
            return await self._move(conn, record, target, record.attempt, dict(updates))

    async def retry(self, record: WindowRecord, **updates: Unpack[Changes]) -> WindowRecord:
        """Back to ``PENDING`` with ``attempt + 1``, the request forgotten (the lease kept)."""
        advance(record.state, WindowState.PENDING)
        forget: dict[str, Any] = {"request_id": None, "submitted_at": None, "ready_at": None}
        async with self._tx() as conn:
            return await self._move(
                conn, record, WindowState.PENDING, record.attempt + 1, forget | dict(updates)
            )

    async def _move(
        self,
        conn: Conn,
        record: WindowRecord,
        target: WindowState,
        attempt: int,
        updates: dict[str, Any],
    ) -> WindowRecord:
        unknown = set(updates) - UPDATABLE
        if unknown:
            raise ValueError(f"not ledger columns: {sorted(unknown)}")
        if target is WindowState.COMMITTED:
            updates = updates | {"committed_attempt": attempt}
        sets = "".join(f", {name} = %s" for name in updates)
        if target is WindowState.FAILED:
            sets += ", failures = failures + 1"
        if target in _UNLEASH:
            sets += ", lease_owner = NULL, lease_until = NULL"
        sql = (
            f"UPDATE windows SET state = %s, attempt = %s, updated_at = %s{sets} "
            f"WHERE id = %s AND attempt = %s AND state = %s AND {FENCE} RETURNING {COLUMNS}"
        )
        params = (target, attempt, self._now(), *updates.values(), record.id, record.attempt,
                  record.state, self.worker)  # fmt: skip
        crashpoints.hit("ledger.move")
        row = await self._one(conn, sql, params)
        if row is None:
            raise StaleAttemptError(
                f"window {record.id} ({record.window.label}) is no longer {record.state} "
                f"at attempt {record.attempt}, or another worker holds it"
            )
        return record_of(row)

    async def split(self, record: WindowRecord, children: Sequence[Window]) -> list[WindowRecord]:
        """Retire ``record`` as SPLIT and insert ``children`` (which must tile it), atomically.

        The children are leased to this worker (until the parent's lease ended, or for the last
        lease length asked for).  See ``ledger.Ledger.split`` for ``replaces``.
        """
        advance(record.state, WindowState.SPLIT)
        check_tiles(record.window, children)
        async with self._tx() as conn:
            return await self._split(conn, record, list(children))

    async def _split(
        self, conn: Conn, record: WindowRecord, children: list[Window]
    ) -> list[WindowRecord]:
        now = self._now()
        before = await self._one(
            conn, "SELECT lease_until FROM windows WHERE id = %s FOR UPDATE", (record.id,)
        )
        touched = await self._exec(
            conn,
            "UPDATE windows SET state = %s, updated_at = %s, lease_owner = NULL, "
            f"lease_until = NULL WHERE id = %s AND attempt = %s AND state = %s AND {FENCE}",
            (WindowState.SPLIT, now, record.id, record.attempt, record.state, self.worker),
        )
        if before is None or touched != 1:
            raise StaleAttemptError(f"window {record.id} moved before it could be split")
        until = before["lease_until"]
        if until is None and self._lease_ms is not None:
            until = now + self._lease_ms
        lease = None if until is None else (self.worker, int(until))
        replaces = record.replaces
        if replaces is None and record.committed_attempt is not None:
            replaces = record.id
        added = []
        for child in children:
            added.append(await self._insert(conn, child, record.id, replaces, lease))
            crashpoints.hit("ledger.split")
        return added

    # -- replacement by range --------------------------------------------------------------

    async def group(self, root_id: int) -> list[WindowRecord]:
        """The windows that replace the range of ``root_id`` together (SPLIT ones excluded)."""
        return await self._select("replaces = %s AND state != %s", (root_id, WindowState.SPLIT))

    async def commit_group(
        self, root: WindowRecord, members: Sequence[tuple[WindowRecord, Changes]]
    ) -> list[WindowRecord]:
        """STAGED → COMMITTED for every member, and the root's old files no longer live.

        One transaction; raises ``StaleAttemptError`` if the root or any member moved (or
        another worker holds it).
        """
        for record, _ in members:
            advance(record.state, WindowState.COMMITTED)
        async with self._tx() as conn:
            touched = await self._exec(
                conn,
                "UPDATE windows SET committed_attempt = NULL, updated_at = %s "
                f"WHERE id = %s AND committed_attempt IS NOT DISTINCT FROM %s AND {FENCE}",
                (self._now(), root.id, root.committed_attempt, self.worker),
            )
            if touched != 1:
                raise StaleAttemptError(f"window {root.id} was replaced by another run")
            done = [
                await self._move(conn, record, WindowState.COMMITTED, record.attempt, dict(changes))
                for record, changes in members
            ]
            ids = [r.id for r in done]
            await conn.execute("UPDATE windows SET replaces = NULL WHERE id = ANY(%s)", (ids,))
            return await self._select_in(conn, "id = ANY(%s)", (ids,))

    async def next_id(self) -> int:
        """An id no other window gets: the id to give ``replace_range``'s window.

        Unlike SQLite's ``MAX(id) + 1`` it is drawn from the sequence (each call a new one), so
        it stays unique while other workers insert windows.
        """
        row = await self._fetch("SELECT nextval(pg_get_serial_sequence('windows', 'id')) AS id")
        assert row is not None
        return int(row["id"])

    async def replace_range(
        self,
        retired: Sequence[WindowRecord],
        outside: Sequence[tuple[Window, int]],
        window: Window,
        *,
        window_id: int,
        rows: int,
        size: int,
        manifest: str,
    ) -> WindowRecord:
        """One transaction: ``retired`` SPLIT with no live files, ``window`` COMMITTED under
        ``window_id`` (its files already published), and the parts of ``retired`` outside it
        planned again (PENDING, children of their window).  Raises ``StaleAttemptError``."""
        for record in retired:
            advance(record.state, WindowState.SPLIT)
        async with self._tx() as conn:
            now = self._now()
            for record in retired:
                moved = await self._exec(
                    conn,
                    "UPDATE windows SET state = %s, committed_attempt = NULL, updated_at = %s, "
                    "lease_owner = NULL, lease_until = NULL "
                    f"WHERE id = %s AND attempt = %s AND state = %s AND {FENCE}",
                    (WindowState.SPLIT, now, record.id, record.attempt, record.state, self.worker),
                )
                if moved != 1:
                    raise StaleAttemptError(
                        f"window {record.id} moved while its range was replaced"
                    )
            await conn.execute(
                "INSERT INTO windows (id, app, start_ms, end_ms, state, attempt, rows, bytes, "
                "manifest, committed_attempt, created_at, updated_at) "
                "VALUES (%s, %s, %s, %s, %s, 0, %s, %s, %s, 0, %s, %s)",
                (window_id, window.app, window.start, window.end, WindowState.COMMITTED, rows,
                 size, manifest, now, now),
            )  # fmt: skip
            await conn.execute(  # an id given by hand: the sequence must not hand it out again
                "SELECT setval(pg_get_serial_sequence('windows', 'id'), "
                "GREATEST((SELECT MAX(id) FROM windows), "
                "(SELECT last_value FROM windows_id_seq)))"
            )
            for part, parent in outside:
                await self._insert(conn, part, parent, None)
            return (await self._select_in(conn, "id = %s", (window_id,)))[0]

    # -- queries ---------------------------------------------------------------------------

    async def _select_in(self, conn: Conn, where: str, params: Any = ()) -> list[WindowRecord]:
        sql = f"SELECT {COLUMNS} FROM windows WHERE {where} ORDER BY app, start_ms, id"
        return [record_of(r) for r in await self._rows(conn, sql, params)]

    async def _select(self, where: str = "TRUE", params: Any = ()) -> list[WindowRecord]:
        async with self._tx() as conn:
            return await self._select_in(conn, where, params)

    async def get(self, window_id: int) -> WindowRecord:
        found = await self._select("id = %s", (window_id,))
        if not found:
            raise LedgerError(f"window {window_id} is not in the ledger")
        return found[0]

    async def windows(
        self, *, apps: Iterable[str] | None = None, states: Iterable[WindowState] | None = None
    ) -> list[WindowRecord]:
        """Windows, optionally of some apps and states, ordered by app and start."""
        clauses: list[str] = []
        params: list[Any] = []
        if apps is not None:
            clauses.append("app = ANY(%s)")
            params.append(list(apps))
        if states is not None:
            clauses.append("state = ANY(%s)")
            params.append([str(s) for s in states])
        return await self._select(" AND ".join(clauses) or "TRUE", tuple(params))

    async def claimable(self, apps: Iterable[str] | None = None) -> list[WindowRecord]:
        """Windows waiting to be submitted (PENDING), oldest range first."""
        return await self.windows(apps=apps, states=[WindowState.PENDING])

    async def in_flight(self, apps: Iterable[str] | None = None) -> list[WindowRecord]:
        """Windows a previous run left between submit and commit, to re-attach to or finish."""
        states = [s for s in UNFINISHED if s is not WindowState.PENDING]
        return await self.windows(apps=apps, states=states)

    async def failed(self, apps: Iterable[str] | None = None) -> list[WindowRecord]:
        return await self.windows(apps=apps, states=[WindowState.FAILED])
