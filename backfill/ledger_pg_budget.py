"""The API budget every worker of one PostgreSQL ledger shares (Flurry's limits are per token).

Theory of operation.  Three shared limits, each kept in the database and changed only inside a
transaction that serialises the workers:

* requests processing at Flurry: one ``api_slots`` row per window holding a slot, with an owner
  and an expiry (``until_ms``, renewed by ``renew``).  ``take_slot`` runs under one advisory
  lock for the whole ledger: it drops expired slots, lets a window keep (take over) its own
  slot, and otherwise counts all slots and the app's slots against the two caps before it
  inserts, so racing workers can never exceed either cap;
* calls a minute: a token bucket in the one ``api_pacer`` row (``SELECT ... FOR UPDATE``), in
  bursts of a tenth of the rate, as ``budget.Pacer`` does for one process;
* the 429 gate: the time submits may go again, in the same row, only ever pushed later.

All times are epoch ms of the ledger's clock.
"""

from __future__ import annotations

from backfill.ledger_pg_conn import PgConnection

__all__ = ["PgBudget"]

_SLOTS_LOCK = 0x736C6F7473  # "slots": the advisory lock every take_slot takes


class PgBudget(PgConnection):
    """Shared slots, pacer and gate."""

    async def take_slot(
        self, window_id: int, app: str, *, max_in_flight: int, max_per_app: int, lease_ms: int
    ) -> bool:
        """Take (or keep) a processing slot for ``window_id``; False when a cap is reached.

        ``max_per_app`` 0 means no per-app cap.
        """
        now = self._now()
        until = now + lease_ms
        async with self._tx() as conn:
            await conn.execute("SELECT pg_advisory_xact_lock(%s)", (_SLOTS_LOCK,))
            await conn.execute("DELETE FROM api_slots WHERE until_ms < %s", (now,))
            kept = await self._exec(
                conn,
                "UPDATE api_slots SET worker = %s, until_ms = %s WHERE window_id = %s",
                (self.worker, until, window_id),
            )
            if kept:
                return True
            row = await self._one(
                conn,
                "SELECT COUNT(*) AS everyone, COUNT(*) FILTER (WHERE app = %s) AS mine "
                "FROM api_slots",
                (app,),
            )
            assert row is not None
            if row["everyone"] >= max_in_flight or (0 < max_per_app <= row["mine"]):
                return False
            await conn.execute(
                "INSERT INTO api_slots (window_id, app, worker, until_ms) VALUES (%s, %s, %s, %s)",
                (window_id, app, self.worker, until),
            )
            return True

    async def give_slot(self, window_id: int) -> None:
        """Free ``window_id``'s slot if this worker holds it (a worker whose window was taken
        over must not free the taker's)."""
        async with self._tx() as conn:
            await conn.execute(
                "DELETE FROM api_slots WHERE window_id = %s AND worker = %s",
                (window_id, self.worker),
            )

    async def take_call(self, *, per_minute: int) -> float:
        """Take one call from the shared bucket: 0.0, or the seconds until one is available.

        Nothing is taken when the answer is not 0.0; ask again after that long.
        """
        if per_minute <= 0:
            return 0.0
        burst = max(1.0, per_minute / 10)
        per_ms = per_minute / 60_000
        now = self._now()
        async with self._tx() as conn:
            row = await self._one(
                conn, "SELECT tokens, refilled_at FROM api_pacer WHERE id = 1 FOR UPDATE"
            )
            assert row is not None
            tokens = burst if row["tokens"] is None else float(row["tokens"])
            since = 0 if row["refilled_at"] is None else max(0, now - int(row["refilled_at"]))
            tokens = min(burst, tokens + since * per_ms)
            wait = 0.0
            if tokens >= 1:
                tokens -= 1
            else:
                wait = (1 - tokens) / per_ms / 1000
            await conn.execute(
                "UPDATE api_pacer SET tokens = %s, refilled_at = %s WHERE id = 1", (tokens, now)
            )
            return wait

    async def close_gate(self, until_ms: int) -> None:
        """Submits wait until ``until_ms`` (or later, if the gate already closes later)."""
        async with self._tx() as conn:
            await conn.execute(
                "UPDATE api_pacer SET gate_until = GREATEST(gate_until, %s) WHERE id = 1",
                (until_ms,),
            )

    async def gate_until(self) -> int:
        """When submits may go again (epoch ms; in the past when the gate is open)."""
        row = await self._fetch("SELECT gate_until FROM api_pacer WHERE id = 1")
        return 0 if row is None else int(row["gate_until"])
