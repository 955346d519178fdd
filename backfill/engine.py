"""The engine: recover → plan → a pool of workers → a summary.  Wiring only.

Theory of operation.  ``Engine.run`` recovers what a killed run left behind (``commit.recover``),
takes every unfinished window of the chosen apps (oldest first) and hands them to a generic pool
(``pool.run_pool``) whose handler is ``Worker.handle``: the worker carries out the lifecycle
table's effects against the ports and returns a split window's children, which the pool runs
too.  Counts reach the summary and the progress view only as events (``events.Tallies``).
``stop()`` is the one way to say "stopping": no new submit, waits end, conversions finish.
Planning (``plan``, ``prepare_sync``, ``requeue_*``) puts windows in the ledger before a run.
On a ledger many workers share (``ledger.shared``) the pool is fed by ``claims.Claims``
instead: windows claimed under a lease as the pool has room, the budget counted in the ledger,
and a last sweep so that what a worker taken over had published is gone when the run ends.
"""

from __future__ import annotations

import random
import time
import zoneinfo
from typing import TYPE_CHECKING, cast

import anyio
import anyio.to_thread

from backfill import commit, planner
from backfill.appkeys import AppKeys
from backfill.budget import Budget
from backfill.claims import Claims
from backfill.errors import first_of
from backfill.events import AppTally, Summary, Tallies, WindowEvent, log_events
from backfill.models import DAY_MS, UNFINISHED, WindowState
from backfill.policy import Estimator
from backfill.pool import run_pool
from backfill.requeue import Requeue, overlaps
from backfill.sizing import Sizes
from backfill.worker import Context, Worker

if TYPE_CHECKING:
    from collections.abc import Callable, Collection, Iterable

    from backfill.config import AppSettings, Settings
    from backfill.models import WindowRecord
    from backfill.ports import Api, LedgerPort, SharedLedger, StorePort

__all__ = ["AppTally", "Engine", "Summary"]

S = WindowState


class Engine(Requeue):
    """Runs windows for a set of apps against one ledger, output store and API."""

    def __init__(
        self,
        *,
        settings: Settings,
        ledger: LedgerPort,
        store: StorePort,
        api: Api,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        listeners: Iterable[Callable[[WindowEvent], None]] = (),
        accept_shrink: bool = False,
        token_checked: bool = False,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.store = store
        self.api = api
        self.now_ms = now_ms
        self.clock = monotonic
        self.tz = zoneinfo.ZoneInfo(settings.windows.timezone)
        self._tallies = Tallies()
        self._listeners: list[Callable[[WindowEvent], None]] = [
            self._tallies,
            log_events,
            *listeners,
        ]
        self._stopping = anyio.Event()
        self.budget = Budget.of(settings, ledger, monotonic)
        self.sizes = Sizes(max_days=settings.windows.max_days)
        self._context = Context(
            settings=settings,
            ledger=ledger,
            store=store,
            api=api,
            budget=self.budget,
            sizes=self.sizes,
            policy=settings.policy,
            estimator=Estimator(),
            stopping=self._stopping,
            group_lock=anyio.Lock(),
            min_share=0.0 if accept_shrink else settings.output.min_repull_share,
            emit=self._emit,
            now_ms=now_ms,
            clock=monotonic,
            rng=rng or random.Random(),
            tz=self.tz,
            keys=AppKeys() if token_checked else None,  # a 401 at a POST: that app's key
        )
        self.summary = Summary()

    # -- planning ----------------------------------------------------------------------------

    def full_range(self) -> tuple[int, int]:
        """``[today - history, today - lag)``, clamped to the API's 2-year horizon."""
        w = self.settings.windows
        return planner.full_range(
            self.now_ms(), history_days=w.history_days, lag_hours=w.lag_hours, tz=self.tz
        )

    def clamp(self, start: int | None, end: int | None) -> tuple[int, int, list[str]]:
        """A requested range made valid: defaults filled in, the horizon and the lag applied."""
        w = self.settings.windows
        return planner.clamp(
            self.now_ms(), start, end, history_days=w.history_days, lag_hours=w.lag_hours,
            tz=self.tz,
        )  # fmt: skip

    async def plan(self, apps: Iterable[AppSettings], start: int, end: int) -> int:
        """Put the windows of ``[start, end)`` for ``apps`` in the ledger; returns the new count.

        The last ``lookback_days`` before now are planned as days, so that a nightly sync pulls
        days again for late data, not a whole 30-day window.
        """
        recent = planner.incremental_start(
            self.full_range()[1], self.settings.windows.lookback_days, self.tz
        )
        added = 0
        for app in apps:
            self.sizes.know({app.name: await self.ledger.learned_size(app.name)})
            size = self.sizes.planned(app.name)
            for lo, hi, at in ((start, min(end, recent), size), (max(start, recent), end, DAY_MS)):
                if lo < hi:
                    new = await self.ledger.add_windows(
                        app.name, lo, hi, size_ms=min(size, at), tz=self.tz
                    )
                    added += len(new)
        return added

    # -- the run -----------------------------------------------------------------------------

    @property
    def processing(self) -> int:
        """Requests of this run processing at Flurry now."""
        return self.budget.processing

    @property
    def stopping(self) -> bool:
        return self._stopping.is_set()

    @property
    def tallies(self) -> dict[str, AppTally]:
        """This run's counts per app, as its events told them (the progress view reads them)."""
        return self._tallies.apps

    def totals(self) -> AppTally:
        return self._tallies.total()

    def stop(self) -> None:
        """Stop gently: no new submit; every wait ends at once; what is downloaded is converted
        (a second signal, in the CLI, stops at once)."""
        self._stopping.set()

    async def run(
        self,
        apps: Iterable[AppSettings],
        start: int | None = None,
        end: int | None = None,
        *,
        only: Collection[int] | None = None,
    ) -> Summary:
        """Recover, then run the unfinished windows of ``apps`` to the end: every one, or with
        ``start``/``end`` only those overlapping ``[start, end)``, or with ``only`` only the
        windows of those ids (``retry``); a leftover elsewhere waits for a run that asks."""
        began = self.clock()
        self._tallies.clear()
        self.summary = Summary()
        names = [a.name for a in apps]
        a = self.settings.api
        workers = a.max_in_flight + a.downloads_at_once + a.conversions_at_once
        try:
            if self.ledger.shared:
                await self._run_shared(names, start, end, only, workers)
            else:
                work = await self._prepare(names, start, end, only)
                await run_pool(work, Worker(self._context).handle, workers=workers)
        except BaseExceptionGroup as group:
            # A fatal error (401, ledger trouble, a full disk) ended the pool: raise it as itself.
            fatal = first_of(group)
            if fatal is None:
                raise
            self.summary.fatal = str(fatal)
            raise fatal from None
        finally:
            self._summarise(self.clock() - began)
        return self.summary

    async def _prepare(
        self, names: list[str], start: int | None, end: int | None, only: Collection[int] | None
    ) -> list[WindowRecord]:
        (await commit.recover(self.ledger, self.store)).log()
        work = await self.ledger.windows(apps=names, states=UNFINISHED)
        keep = {(r.id, r.attempt) for r in work if r.state is S.DOWNLOADED}
        work = [
            r for r in work
            if overlaps(r.window, start, end) and (only is None or r.id in only)
        ]  # fmt: skip
        await anyio.to_thread.run_sync(self.store.sweep_downloads, keep, names)
        work.sort(key=lambda r: (r.window.start, r.window.app))
        self.sizes.know({name: await self.ledger.learned_size(name) for name in names})
        for record in work:
            self._emit(WindowEvent(name="window.queued", record=record))
        return work

    async def _run_shared(
        self,
        names: list[str],
        start: int | None,
        end: int | None,
        only: Collection[int] | None,
        workers: int,
    ) -> None:
        """The pool fed by claims on a shared ledger (see ``claims``), leases kept meanwhile."""
        ledger = cast("SharedLedger", self.ledger)
        (await commit.recover(ledger, self.store)).log()
        self.sizes.know({name: await ledger.learned_size(name) for name in names})
        claims = Claims(ledger, apps=names, lease_s=self.settings.ledger.lease_s, room=workers,
                        start=start, end=end, only=only, stopping=self._stopping)  # fmt: skip
        await claims.run(Worker(self._context).handle, workers=workers, emit=self._emit)
        await commit.sweep(ledger, self.store)  # what a worker taken over had published

    def _summarise(self, wall_s: float) -> None:
        totals, s = self.totals(), self.summary
        s.committed, s.failed, s.split = totals.committed, totals.failed, totals.split
        s.rows, s.bytes, s.wall_s = totals.rows, totals.bytes, wall_s
        s.failures = list(self._tallies.failures)
        s.interrupted = self.stopping
        calls = self.api.calls
        s.calls = {k: getattr(calls, k) for k in ("submit", "status", "download", "rate_limited",
                                                  "resumed")}  # fmt: skip

    def _emit(self, event: WindowEvent) -> None:
        for listener in self._listeners:
            listener(event)
