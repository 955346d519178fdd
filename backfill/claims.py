"""Many workers on one plan: claim windows under a lease, keep the leases, give them back.

Theory of operation.  With a ledger many processes share (``LedgerPort.shared``: PostgreSQL),
a run does not take every unfinished window at its start.  ``Claims.feed`` claims them a few at
a time, as the pool has room (``SharedLedger.claim_next``: ``FOR UPDATE SKIP LOCKED``, a lease
per window, a replacement group whole), and goes on until no unfinished window of the run's
range is left that it has not had: windows other workers hold are waited for, and taken over
when their holder's lease runs out (it died, or hung past its lease); the wait ends if none of
them moves for three leases (at least 30 s).  The taker's attempt is
one higher, so the files of the old holder's attempt are no one's and the sweep removes them.
``Claims.keep`` renews this worker's leases (and its API slots) every third of the lease.  A
lost lease stops nothing by itself: the ledger fences every move, so the old holder's next move
of that window is stale and it drops the window, removing what it had published.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from backfill import logs
from backfill.events import WindowEvent
from backfill.models import UNFINISHED
from backfill.pool import run_pool
from backfill.requeue import overlaps

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Awaitable, Callable, Collection, Iterable

    from backfill.models import WindowRecord
    from backfill.ports import SharedLedger

__all__ = ["Claims"]


class Claims:
    """One run's claims on a shared ledger: what it feeds its pool, and the leases it keeps."""

    def __init__(
        self,
        ledger: SharedLedger,
        *,
        apps: list[str],
        lease_s: float,
        room: int,
        start: int | None,
        end: int | None,
        only: Collection[int] | None,
        stopping: anyio.Event,
    ) -> None:
        self.ledger = ledger
        self.apps = apps
        self.lease_ms = int(lease_s * 1000)
        self.range = (start, end, None if only is None else set(only))
        self.stopping = stopping
        self.room = anyio.Semaphore(room)
        self.had: set[int] = set()  # every window this run has had in its pool
        self.claimed: set[int] = set()  # those holding a place of ``room`` now
        self.poll_s = max(0.2, min(2.0, lease_s / 5))
        self.patience = max(30.0, 3 * lease_s)  # no progress elsewhere this long: stop waiting
        self.last_seen: frozenset[tuple[int, int, str]] = frozenset()
        self.since = 0.0

    def _wanted(self, record: WindowRecord) -> bool:
        start, end, only = self.range
        return overlaps(record.window, start, end) and (only is None or record.id in only)

    async def feed(self) -> AsyncIterator[WindowRecord]:
        """Windows claimed as the pool has room for them, until none is left to wait for."""
        start, end, only = self.range
        while not self.stopping.is_set():
            free = self.room.value
            if free == 0:  # every consumer busy: wait for one to finish its window
                await self.room.acquire()
                self.room.release()
                continue
            got = await self.ledger.claim_next(self.apps, lease_ms=self.lease_ms, limit=free,
                                               start=start, end=end, only=only)  # fmt: skip
            fresh = [r for r in got if r.id not in self.had]
            for record in fresh:
                self.had.add(record.id)
                await self.room.acquire()
                self.claimed.add(record.id)
                yield record
            if fresh:
                continue
            others = await self._others()
            if not others or self._stuck(others):
                return
            with anyio.move_on_after(self.poll_s):
                await self.stopping.wait()

    def _stuck(self, others: list[WindowRecord]) -> bool:
        """Whether the windows others hold have not moved for ``patience`` seconds: held live
        but going nowhere (a group waiting on a failed member), or polling a slow request.
        Either way the run ends rather than wait on them; a later run takes over what dies."""
        seen = frozenset((r.id, r.attempt, r.state) for r in others)
        now = anyio.current_time()
        if seen != self.last_seen:
            self.last_seen, self.since = seen, now
        return now - self.since > self.patience

    async def _others(self) -> list[WindowRecord]:
        """Unfinished windows of the range this run has not had (other workers hold them)."""
        left = await self.ledger.windows(apps=self.apps, states=UNFINISHED)
        return [r for r in left if self._wanted(r) and r.id not in self.had]

    def handler(
        self, handle: Callable[[WindowRecord], Awaitable[Iterable[WindowRecord]]]
    ) -> Callable[[WindowRecord], Awaitable[Iterable[WindowRecord]]]:
        """``handle``, giving the pool's room back when a claimed window's turn ends."""

        async def handled(record: WindowRecord) -> Iterable[WindowRecord]:
            try:
                follow = list(await handle(record))
            finally:
                if record.id in self.claimed:
                    self.claimed.discard(record.id)
                    self.room.release()
            self.had.update(r.id for r in follow)
            return follow

        return handled

    async def keep(self) -> None:
        """Renew this worker's leases every third of the lease, until cancelled."""
        log = logs.get("claims")
        while True:
            await anyio.sleep(self.lease_ms / 3000)
            try:
                await self.ledger.renew(lease_ms=self.lease_ms)
            except Exception as exc:  # the ledger is away: the moves will say so, fenced
                log.warning("claims.renew.fail", error=logs.scrub(str(exc)))

    async def run(
        self,
        handle: Callable[[WindowRecord], Awaitable[Iterable[WindowRecord]]],
        *,
        workers: int,
        emit: Callable[[WindowEvent], None],
    ) -> None:
        """A pool of ``workers`` running ``handle`` on the windows claimed, leases kept
        meanwhile and given back at the end."""

        async def queued() -> AsyncIterator[WindowRecord]:
            async for record in self.feed():
                emit(WindowEvent(name="window.queued", record=record))
                yield record

        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self.keep)
                await run_pool(queued(), self.handler(handle), workers=workers)
                group.cancel_scope.cancel()
        finally:
            await self.give_back()

    async def give_back(self) -> None:
        """Release every lease this worker still holds (its windows are free for others); an
        unreachable ledger is logged, not raised over the run's own end (the leases expire)."""
        with anyio.move_on_after(10, shield=True):
            try:
                await self.ledger.release()
            except Exception as exc:
                logs.get("claims").warning("claims.release.fail", error=logs.scrub(str(exc)))
