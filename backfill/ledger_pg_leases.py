"""Leases on windows, so several workers share one PostgreSQL ledger without doing work twice.

Theory of operation.  A worker (``self.worker``) claims windows with ``claim_next``: one
transaction selects unfinished windows nobody else holds (no lease, its own, or an expired one)
with ``FOR UPDATE SKIP LOCKED`` - two workers claiming at once never get the same window - and
leases each to it until ``now + lease_ms`` (epoch ms, the ledger's clock).  A window that
replaces a committed range (``replaces``) is claimed with every other unfinished member of its
group, or not at all: the group commits in one ``commit_group``.  Taking a window another
worker held is a takeover: its attempt goes up by one (the old holder's compare-and-set moves
now fail), its request id is kept (the new holder re-attaches to Flurry's request), and a
DOWNLOADED or STAGED window goes back to READY (the download and staging were on the old
holder's disk), or to PENDING if it has no request id.

A worker renews its leases (``renew``) well within ``lease_ms``; ``holds`` tells whether a
lease is still its own; ``release`` drops them (at a clean stop).  ``FENCE`` is the condition
every window write of the ledger adds, so a worker that lost a window cannot move it.  The
``workers`` table says who is working, from where, and since when (``backfill status``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backfill.ledger_pg_conn import PgConnection
from backfill.ledger_pg_schema import COLUMNS, WorkerInfo, record_of
from backfill.models import UNFINISHED, Window, WindowRecord, WindowState

if TYPE_CHECKING:
    from collections.abc import Collection, Sequence

    from backfill.ledger_pg_conn import Conn

__all__ = ["FENCE", "PgLeases"]

# The lease condition of every fenced write; its one parameter is this worker's id.
FENCE = "(lease_owner IS NULL OR lease_owner = %s)"
SEEN_WITHIN_MS = 5 * 60_000
_UNFINISHED = sorted(str(s) for s in UNFINISHED)
_ON_DISK = {WindowState.DOWNLOADED, WindowState.STAGED}
_PICKED = "id, app, start_ms, replaces, state, request_id, lease_owner, lease_until"


class PgLeases(PgConnection):
    """Claiming, renewing, holding and releasing windows; the workers table."""

    async def claim_next(
        self,
        apps: Sequence[str],
        *,
        lease_ms: int,
        limit: int,
        start: int | None = None,
        end: int | None = None,
        only: Collection[int] | None = None,
    ) -> list[WindowRecord]:
        """Lease up to ``limit`` unfinished windows of ``apps`` (a group counts as one).

        Oldest range first; optionally only windows overlapping ``[start, end)`` and only the
        ids in ``only`` (the other members of a group come with it whatever the filters).
        Never a window this worker holds already, even past its lease: its run has that one in
        hand (worker ids are unique per process).  Returns the windows as they now are
        (taken-over ones moved on).
        """
        self._lease_ms = lease_ms
        if limit <= 0:
            return []
        now = self._now()
        clauses = [
            "app = ANY(%s)",
            "state = ANY(%s)",
            # Free, or another's run out; never this worker's own: it has them in hand already.
            "(lease_owner IS NULL OR (lease_owner <> %s AND lease_until < %s))",
        ]
        params: list[Any] = [list(apps), _UNFINISHED, self.worker, now]
        for clause, value in (("end_ms > %s", start), ("start_ms < %s", end)):
            if value is not None:
                clauses.append(clause)
                params.append(value)
        if only is not None:
            clauses.append("id = ANY(%s)")
            params.append(list(only))
        async with self._tx() as conn:
            units = await self._pick(conn, " AND ".join(clauses), params, now, limit)
            return [
                await self._lease(conn, row, now, now + lease_ms) for unit in units for row in unit
            ]

    async def _pick(
        self, conn: Conn, where: str, params: list[Any], now: int, limit: int
    ) -> list[list[dict[str, Any]]]:
        """Lock and pick the claimable units (a window, or a whole group), in range order."""
        units: list[list[dict[str, Any]]] = []
        groups: set[int] = set()
        after: tuple[int, str, int] | None = None
        while len(units) < limit:
            keyset = "" if after is None else " AND (start_ms, app, id) > (%s, %s, %s)"
            rows = await self._rows(
                conn,
                f"SELECT {_PICKED} FROM windows WHERE {where}{keyset} "
                "ORDER BY start_ms, app, id LIMIT %s FOR UPDATE SKIP LOCKED",
                (*params, *(after or ()), batch := limit - len(units)),
            )
            for row in rows:
                after = (row["start_ms"], row["app"], row["id"])
                group = row["replaces"]
                if group is None:
                    units.append([row])
                elif group not in groups:
                    groups.add(group)
                    members = await self._whole_group(conn, group, now)
                    if members:
                        units.append(members)
                if len(units) == limit:
                    break
            if len(rows) < batch:
                break
        return units

    async def _whole_group(self, conn: Conn, group: int, now: int) -> list[dict[str, Any]]:
        """Every unfinished member of ``group`` locked and free to take, or none."""
        where = "replaces = %s AND state = ANY(%s)"
        count = await self._one(
            conn, f"SELECT COUNT(*) AS n FROM windows WHERE {where}", (group, _UNFINISHED)
        )
        members = await self._rows(
            conn,
            f"SELECT {_PICKED} FROM windows WHERE {where} "
            "ORDER BY start_ms, id FOR UPDATE SKIP LOCKED",
            (group, _UNFINISHED),
        )
        assert count is not None
        if len(members) != count["n"]:
            return []  # another transaction holds a member right now
        for member in members:
            owner, until = member["lease_owner"], member["lease_until"]
            if owner is not None and owner != self.worker and until is not None and until >= now:
                return []
        return members

    async def _lease(self, conn: Conn, row: dict[str, Any], now: int, until: int) -> WindowRecord:
        owner = row["lease_owner"]
        if owner is None or owner == self.worker:
            found = await self._one(
                conn,
                f"UPDATE windows SET lease_owner = %s, lease_until = %s WHERE id = %s "
                f"RETURNING {COLUMNS}",
                (self.worker, until, row["id"]),
            )
        else:
            state = WindowState(row["state"])
            if state in _ON_DISK:
                state = WindowState.READY if row["request_id"] else WindowState.PENDING
            found = await self._one(
                conn,
                "UPDATE windows SET lease_owner = %s, lease_until = %s, attempt = attempt + 1, "
                f"state = %s, updated_at = %s WHERE id = %s RETURNING {COLUMNS}",
                (self.worker, until, state, now, row["id"]),
            )
        assert found is not None
        return record_of(found)

    async def renew(self, *, lease_ms: int) -> set[int]:
        """Extend every unfinished window leased to this worker; their ids.

        Also marks this worker seen and extends its API slots.
        """
        self._lease_ms = lease_ms
        now = self._now()
        until = now + lease_ms
        async with self._tx() as conn:
            rows = await self._rows(
                conn,
                "UPDATE windows SET lease_until = %s WHERE lease_owner = %s "
                "AND state = ANY(%s) RETURNING id",
                (until, self.worker, _UNFINISHED),
            )
            await conn.execute(
                "UPDATE workers SET seen_at = %s WHERE worker = %s", (now, self.worker)
            )
            await conn.execute(
                "UPDATE api_slots SET until_ms = %s WHERE worker = %s", (until, self.worker)
            )
            return {int(r["id"]) for r in rows}

    async def holds(self, window_id: int) -> bool:
        """Whether this worker holds ``window_id``'s lease, unexpired now."""
        row = await self._fetch(
            "SELECT lease_owner, lease_until FROM windows WHERE id = %s", (window_id,)
        )
        if row is None or row["lease_owner"] != self.worker or row["lease_until"] is None:
            return False
        return int(row["lease_until"]) >= self._now()

    async def release(self, ids: Collection[int] | None = None) -> None:
        """Drop this worker's leases (on ``ids`` only, if given; with none, its API slots too)."""
        sql = "UPDATE windows SET lease_owner = NULL, lease_until = NULL WHERE lease_owner = %s"
        params: tuple[Any, ...] = (self.worker,)
        if ids is not None:
            sql += " AND id = ANY(%s)"
            params += (list(ids),)
        async with self._tx() as conn:
            await conn.execute(sql, params)
            if ids is None:  # the worker is done: its API slots go too, not at their expiry
                await conn.execute("DELETE FROM api_slots WHERE worker = %s", (self.worker,))

    async def register(self, command: str, host: str, pid: int) -> None:
        """Record this worker (``workers`` table) as started now."""
        now = self._now()
        async with self._tx() as conn:
            await conn.execute(
                "INSERT INTO workers (worker, host, pid, command, started_at, seen_at) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (worker) DO UPDATE SET "
                "host = excluded.host, pid = excluded.pid, command = excluded.command, "
                "started_at = excluded.started_at, seen_at = excluded.seen_at",
                (self.worker, host, pid, command, now, now),
            )

    async def unregister(self) -> None:
        async with self._tx() as conn:
            await conn.execute("DELETE FROM workers WHERE worker = %s", (self.worker,))

    async def workers(self) -> list[WorkerInfo]:
        """Workers seen in the last five minutes or holding unexpired leases, by id."""
        now = self._now()
        async with self._tx() as conn:
            known = await self._rows(
                conn, "SELECT worker, host, pid, command, started_at, seen_at FROM workers"
            )
            leases = await self._rows(
                conn,
                "SELECT id, app, start_ms, end_ms, state, lease_owner FROM windows "
                "WHERE lease_owner IS NOT NULL AND lease_until >= %s "
                "ORDER BY lease_owner, start_ms, app, id",
                (now,),
            )
        holding: dict[str, list[tuple[int, str, str, str]]] = {}
        for r in leases:
            label = Window(app=r["app"], start=r["start_ms"], end=r["end_ms"]).label
            holding.setdefault(r["lease_owner"], []).append((r["id"], r["app"], label, r["state"]))
        rows = {r["worker"]: r for r in known}
        for name in holding.keys() - rows.keys():  # holds leases, never registered
            rows[name] = {"worker": name, "host": "", "pid": 0, "command": "",
                          "started_at": 0, "seen_at": 0}  # fmt: skip
        return [
            WorkerInfo(**rows[name], holding=holding.get(name, []))
            for name in sorted(rows)
            if name in holding or rows[name]["seen_at"] >= now - SEEN_WITHIN_MS
        ]
