"""What goes back to the queue: late data for the nightly pull, failed windows, re-pulls.

``Engine`` mixes this in.  Each method moves windows of the ledger back to PENDING (their files,
if committed, stay live until new rows replace them) or plans what no window covers; the run
then takes them like any other window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backfill import planner
from backfill.models import WindowState

if TYPE_CHECKING:
    import datetime as dt
    from collections.abc import Iterable

    from backfill.config import AppSettings, Settings
    from backfill.models import Window, WindowRecord
    from backfill.ports import LedgerPort

__all__ = ["Requeue", "overlaps"]

S = WindowState


class Requeue:
    """Planning steps that send windows back: ``prepare_sync``, ``requeue_*``."""

    settings: Settings
    ledger: LedgerPort
    tz: dt.tzinfo

    def full_range(self) -> tuple[int, int]:
        raise NotImplementedError

    async def plan(self, apps: Iterable[AppSettings], start: int, end: int) -> int:
        raise NotImplementedError

    async def prepare_sync(self, apps: Iterable[AppSettings]) -> None:
        """The nightly pull: late data, then every gap up to now.

        For each app, the committed windows of the last ``lookback_days`` before its newest
        committed end go back to be pulled again (their files stay live until the new rows
        replace them), whatever failed elsewhere; then every part of the full range that no
        window covers is planned.
        """
        full_start, full_end = self.full_range()
        for app in apps:
            newest = await self.ledger.newest_committed_end(app.name)
            if newest is not None:
                lookback = self.settings.windows.lookback_days
                start = max(full_start, planner.incremental_start(newest, lookback, self.tz))
                await self.requeue_committed(app, start, newest)
            await self.plan([app], full_start, full_end)

    async def requeue_committed(self, app: AppSettings, start: int, end: int) -> int:
        """Send the committed windows of ``app`` overlapping ``[start, end)`` to be pulled again."""
        count = 0
        for record in await self.ledger.windows(apps=[app.name], states=[S.COMMITTED]):
            if record.window.end > start and record.window.start < end:
                await self.ledger.retry(
                    record, error_class=None, error_message="re-pulled for late data"
                )
                count += 1
        return count

    async def requeue_failed(
        self,
        apps: Iterable[AppSettings],
        start: int | None = None,
        end: int | None = None,
        *,
        heal: bool = False,
    ) -> int:
        """``take_failed``, counted."""
        return len(await self.take_failed(apps, start, end, heal=heal))

    async def take_failed(
        self,
        apps: Iterable[AppSettings],
        start: int | None = None,
        end: int | None = None,
        *,
        heal: bool = False,
    ) -> list[WindowRecord]:
        """Send the FAILED windows of ``apps`` (overlapping ``[start, end)``) back to PENDING: all
        of them (the ``retry`` command), or with ``heal`` the retryable ones that failed fewer
        than ``[windows].heal_runs`` times (what ``run`` and ``sync`` take back on their own).
        Returns them as they were (FAILED, oldest first): exactly the windows sent back."""
        taken, limit = [], self.settings.windows.heal_runs
        for r in await self.ledger.windows(apps=[a.name for a in apps], states=[S.FAILED]):
            if not overlaps(r.window, start, end):
                continue
            if heal and not (r.retryable and r.failures < limit):
                continue
            await self.ledger.retry(r)
            taken.append(r)
        taken.sort(key=lambda r: (r.window.start, r.window.app))
        return taken


def overlaps(window: Window, start: int | None, end: int | None) -> bool:
    """Whether ``window`` overlaps ``[start, end)``; an open bound (None) reaches everything."""
    return (start is None or window.end > start) and (end is None or window.start < end)
