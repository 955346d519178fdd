"""The engine: plan → recover → claim → run each window → commit.  Wiring only.

Theory of operation.  ``Engine.run`` plans the requested range into the ledger, recovers what a
killed run left behind, then feeds every unfinished window of the chosen apps (oldest first)
through a memory stream to a pool of workers in one anyio task group.  A worker drives its
window through the states of ``models.TRANSITIONS``: submit (holding a place among the requests
processing at Flurry), poll on the policy's schedule, download, convert and commit with
``land``.  Every error becomes an ``Outcome`` and the policy's ``Decision`` says what follows:
retry the step, poll again, submit again, split (the children go back into the stream; the size
is remembered for the app), fail the window, or stop the run.  Caps: requests processing at
Flurry (all apps, and per app), API calls per minute, downloads and conversions at once.  A 429
closes the submit gate for its Retry-After (polls go on) and lowers the in-flight cap to the
``X-RateLimit-Limit`` it reports.  ``stop()`` ends the run gently: no new submit, polls and
downloads abandoned (their request ids are in the ledger), conversions finish.
"""

from __future__ import annotations

import contextlib
import math
import random
import time
import zoneinfo
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal, Protocol

import anyio
import anyio.to_thread

from backfill import logs, planner
from backfill.errors import (
    CannotSplitError,
    FatalError,
    RequestTimeoutError,
    RetryableError,
    StorageError,
    WindowError,
    first_of,
)
from backfill.models import (
    DAY_MS,
    HOUR_MS,
    UNFINISHED,
    Outcome,
    OutcomeKind,
    WindowRecord,
    WindowState,
)
from backfill.policy import Action, Estimator, Policy, Progress, outcome_for
from backfill.protocol import Processing, Ready

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Callable, Iterable
    from pathlib import Path

    from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

    from backfill.client import ApiCalls
    from backfill.config import AppSettings, Settings
    from backfill.ledger import Ledger
    from backfill.models import Window
    from backfill.writer import Manifest, Writer

__all__ = [
    "Api",
    "AppTally",
    "Engine",
    "Recovery",
    "Summary",
    "land",
    "outcome_of_range",
    "recover",
]

S = WindowState


class Api(Protocol):
    """What the engine needs of the Flurry API (``client.FlurryClient`` in production)."""

    calls: ApiCalls

    async def submit(
        self,
        window: Window,
        *,
        api_key: str,
        output_format: str = ...,
        app_versions: tuple[str, ...] = ...,
        event_ids: tuple[str, ...] = ...,
    ) -> str: ...

    async def status(self, request_id: str, *, window: Window) -> Processing | Ready: ...

    async def download(self, url: str, target: Path, *, window: Window, request_id: str) -> int: ...


@dataclass(slots=True)
class Summary:
    """What one run did, for the closing table and the exit code."""

    committed: int = 0
    split: int = 0
    failed: int = 0
    rows: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    fatal: str | None = None
    exit_code: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # app, window, reason


@dataclass(slots=True)
class AppTally:
    """One app's windows in this run: planned (after splits), committed, failed; what landed."""

    planned: int = 0
    committed: int = 0
    failed: int = 0
    rows: int = 0
    bytes: int = 0


class _Stopping(Exception):
    """The run is stopping gently: leave this window where it is."""


@dataclass(slots=True)
class _Flight:
    """One window's in-memory state while a worker drives it (the ledger has the rest)."""

    record: WindowRecord | None = None  # the window as the ledger last moved it
    url: str | None = None
    accepted_at: float = 0.0  # monotonic seconds when the current request was accepted
    pending_s: float = 0.0  # elapsed at the last poll that saw it still processing
    polls: int = 0
    step_retries: int = 0
    resubmits: int = 0
    failures: int = 0

    def progress(self, now: float, expected: float | None = None) -> Progress:
        return Progress(
            step_retries=self.step_retries,
            polls=self.polls,
            resubmits=self.resubmits,
            failures=self.failures,
            elapsed_s=now - self.accepted_at,
            expected_s=expected,
        )


@dataclass(slots=True)
class _SizeStats:
    """Windows of an app submitted at its planned size, and how many were refused as too large."""

    tried: int = 0
    refused: int = 0


class _Pacer:
    """At most ``per_minute`` calls a minute, in bursts of up to a tenth of that."""

    def __init__(self, per_minute: int, clock: Callable[[], float]) -> None:
        self.interval = 60.0 / per_minute
        self.burst = max(1.0, per_minute / 10)
        self.tokens = self.burst
        self.clock = clock
        self.stamp = clock()
        self.lock = anyio.Lock()

    async def wait(self) -> None:
        async with self.lock:
            now = self.clock()
            self.tokens = min(self.burst, self.tokens + (now - self.stamp) / self.interval)
            self.stamp = now
            if self.tokens < 1:
                await anyio.sleep((1 - self.tokens) * self.interval)
                self.tokens, self.stamp = 1.0, self.clock()
            self.tokens -= 1


class Engine:
    """Runs windows for a set of apps against one ledger, writer and API."""

    def __init__(
        self,
        *,
        settings: Settings,
        ledger: Ledger,
        writer: Writer,
        api: Api,
        now_ms: Callable[[], int] = lambda: int(time.time() * 1000),
        monotonic: Callable[[], float] = time.monotonic,
        rng: random.Random | None = None,
        on_event: Callable[[str, WindowRecord], None] | None = None,
    ) -> None:
        self.settings = settings
        self.ledger = ledger
        self.writer = writer
        self.api = api
        self.now_ms = now_ms
        self.clock = monotonic
        self.rng = rng or random.Random()
        self.on_event = on_event
        self.tz = zoneinfo.ZoneInfo(settings.windows.timezone)
        a = settings.api
        self.policy = Policy(
            poll_initial_s=a.poll_initial_s,
            poll_min_s=a.poll_min_s,
            poll_max_s=a.poll_max_s,
            request_timeout_s=a.request_timeout_s,
            max_step_retries=a.max_attempts,
            backoff_base_s=a.backoff_base_s,
            backoff_cap_s=a.backoff_cap_s,
        )
        self.estimator = Estimator()
        self.log = logs.get("engine")
        self._in_flight = anyio.CapacityLimiter(a.max_in_flight)
        per_app = a.max_in_flight_per_app or a.max_in_flight
        self._per_app = {app.name: anyio.CapacityLimiter(per_app) for app in settings.apps}
        self._downloads = anyio.CapacityLimiter(a.downloads_at_once)
        self._conversions = anyio.CapacityLimiter(a.conversions_at_once)
        self._pacer = _Pacer(a.calls_per_minute, monotonic)
        self._submit_open_at = 0.0
        self._learned: dict[str, int] = {}
        self._sizes: dict[str, _SizeStats] = {}
        self._stop = anyio.Event()
        self._download_scopes: set[anyio.CancelScope] = set()
        self.stopping = False
        self.summary = Summary()
        self.tallies: dict[str, AppTally] = {}
        self._outstanding = 0
        self._send: MemoryObjectSendStream[WindowRecord] | None = None

    # -- ranges ----------------------------------------------------------------------------

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
            self.now_ms(),
            start,
            end,
            history_days=w.history_days,
            lag_hours=w.lag_hours,
            tz=self.tz,
        )

    async def plan(self, apps: Iterable[AppSettings], start: int, end: int) -> int:
        """Put the windows of ``[start, end)`` for ``apps`` in the ledger; returns the new count."""
        added = 0
        for app in apps:
            learned = await self.ledger.learned_size(app.name)
            if learned:
                self._learned[app.name] = learned
            size = min(learned or math.inf, self.settings.windows.max_days * DAY_MS)
            added += len(
                await self.ledger.add_windows(app.name, start, end, size_ms=int(size), tz=self.tz)
            )
        return added

    async def sync_range(self, app: AppSettings) -> tuple[int, int]:
        """Where an incremental pull of ``app`` starts and ends: the watermark less the lookback."""
        full_start, end = self.full_range()
        mark = await self.ledger.watermark(app.name)
        if mark is None:
            return full_start, end
        start = planner.incremental_start(mark, self.settings.windows.lookback_days, self.tz)
        return max(start, full_start), end

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

    async def requeue_failed(self, apps: Iterable[AppSettings]) -> int:
        """Send the FAILED windows of ``apps`` back to PENDING (the ``retry`` command)."""
        count = 0
        for record in await self.ledger.failed(apps=[a.name for a in apps]):
            await self.ledger.retry(record)
            count += 1
        return count

    # -- the run ---------------------------------------------------------------------------

    @property
    def processing(self) -> int:
        """Requests of this run processing at Flurry now."""
        return int(self._in_flight.borrowed_tokens)

    def stop(self) -> None:
        """Stop gently: no new submit; polls and downloads are left for the next run."""
        self.stopping = True
        self._stop.set()
        for scope in list(self._download_scopes):
            scope.cancel()

    async def run(self, apps: Iterable[AppSettings]) -> Summary:
        """Recover, then run every unfinished window of ``apps`` to the end."""
        began = self.clock()
        chosen = list(apps)
        recovery = await recover(self.ledger, self.writer)
        if recovery.finished or recovery.requeued or recovery.swept:
            self.log.info(
                "run.recover.ok",
                finished=len(recovery.finished),
                requeued=len(recovery.requeued),
                swept=recovery.swept,
            )
        work = await self.ledger.windows(apps=[a.name for a in chosen], states=UNFINISHED)
        keep = {(r.id, r.attempt) for r in work if r.state is S.DOWNLOADED}
        await anyio.to_thread.run_sync(self.writer.sweep_downloads, keep)
        work.sort(key=lambda r: (r.window.start, r.window.app))
        for app in chosen:
            learned = await self.ledger.learned_size(app.name)
            if learned:
                self._learned[app.name] = learned
        send, receive = anyio.create_memory_object_stream[WindowRecord](math.inf)
        self._send = send
        workers = (
            self.settings.api.max_in_flight
            + self.settings.api.downloads_at_once
            + self.settings.api.conversions_at_once
        )
        try:
            async with anyio.create_task_group() as group, receive:
                self._outstanding = len(work)
                for record in work:
                    self.tally(record.window.app).planned += 1
                for record in work:
                    send.send_nowait(record)
                if not work:
                    send.close()
                for _ in range(workers):
                    group.start_soon(self._worker, receive.clone())
        except BaseExceptionGroup as group:
            # A fatal error (401, ledger trouble) ended the task group: raise it as itself.
            fatal = first_of(group)
            if fatal is None:
                raise
            self.summary.fatal = str(fatal)
            raise fatal from None
        finally:
            send.close()
            self.summary.wall_s = self.clock() - began
            totals = self.totals()
            self.summary.committed, self.summary.failed = totals.committed, totals.failed
            self.summary.rows, self.summary.bytes = totals.rows, totals.bytes
            self.summary.interrupted = self.stopping
            self.summary.calls = {
                k: getattr(self.api.calls, k)
                for k in ("submit", "status", "download", "rate_limited", "resumed")
            }
        return self.summary

    async def _worker(self, receive: MemoryObjectReceiveStream[WindowRecord]) -> None:
        async with receive:
            async for record in receive:
                try:
                    if not self.stopping:
                        await self._drive(record)
                finally:
                    self._outstanding -= 1
                    if self._outstanding == 0 and self._send is not None:
                        self._send.close()

    def totals(self) -> AppTally:
        """The tallies of every app added up."""
        t = list(self.tallies.values())
        return AppTally(
            planned=sum(x.planned for x in t),
            committed=sum(x.committed for x in t),
            failed=sum(x.failed for x in t),
            rows=sum(x.rows for x in t),
            bytes=sum(x.bytes for x in t),
        )

    def tally(self, app: str) -> AppTally:
        """This run's counts for ``app`` (the progress display reads them)."""
        return self.tallies.setdefault(app, AppTally())

    def _enqueue(self, records: Iterable[WindowRecord]) -> None:
        assert self._send is not None
        for record in records:
            self.tally(record.window.app).planned += 1
            self._outstanding += 1
            self._send.send_nowait(record)

    def _event(self, name: str, record: WindowRecord, **extra: Any) -> None:
        self.log.info(
            name,
            app=record.window.app,
            window=record.window.label,
            attempt=record.attempt,
            request_id=record.request_id,
            **extra,
        )
        if self.on_event is not None:
            self.on_event(name, record)

    async def _sleep(self, seconds: float) -> None:
        """Sleep, or raise ``_Stopping`` as soon as the run stops."""
        if seconds > 0:
            with anyio.move_on_after(seconds):
                await self._stop.wait()
        if self.stopping:
            raise _Stopping

    # -- one window ------------------------------------------------------------------------

    async def _drive(self, record: WindowRecord) -> None:
        app = self.settings.app(record.window.app)
        flight = _Flight()
        if record.state is S.SUBMITTED and record.submitted_at is not None:  # re-attach
            flight.accepted_at = self.clock() - max(0, self.now_ms() - record.submitted_at) / 1000
        if (
            record.state is S.PENDING
            and record.window.length > self._planned_size(app.name) + 2 * HOUR_MS
        ):
            await self._presplit(record)  # planned before the size was learned
            return
        while record.state not in (S.COMMITTED, S.FAILED, S.SPLIT):
            flight.record = record
            try:
                if record.state is S.PENDING:
                    record = await self._submit(record, app, flight)
                elif record.state is S.SUBMITTED:
                    async with self._slot(app):
                        record = await self._wait_ready(record, flight)
                elif record.state is S.READY:
                    record = await self._download(record, flight)
                elif record.state is S.DOWNLOADED:
                    record = await self._land(record)
                else:  # STAGED outside recovery: the stage was lost
                    record = await self.ledger.retry(record)
                flight.step_retries = 0
            except _Stopping:
                return
            except WindowError as exc:
                # A step may have moved the window before failing: decide on where it is now.
                record = flight.record if flight.record is not None else record
                next_record = await self._decide(record, flight, exc)
                if next_record is None:
                    return
                record = next_record

    @contextlib.asynccontextmanager
    async def _slot(self, app: AppSettings) -> AsyncIterator[None]:
        """A place among the requests processing at Flurry: the app's, then the global one."""
        async with self._per_app[app.name], self._in_flight:
            yield

    async def _submit(
        self, record: WindowRecord, app: AppSettings, flight: _Flight
    ) -> WindowRecord:
        while True:
            # A 429 closes the gate for everyone's submits (polls go on); wait outside a slot.
            await self._sleep(max(0.0, self._submit_open_at - self.clock()))
            retry_in = 0.0
            async with self._slot(app):
                if self._submit_open_at > self.clock():
                    continue  # the gate closed while this window waited for its slot
                await self._pacer.wait()
                try:
                    request_id = await self.api.submit(
                        record.window,
                        api_key=app.api_key,
                        output_format=self.settings.api.format,
                        app_versions=app.app_versions,
                        event_ids=app.event_ids,
                    )
                except RetryableError as exc:
                    retry_in = self._backoff(record, flight, exc, gate=True)
                else:
                    if self._at_planned_size(record.window):
                        self._sizes.setdefault(app.name, _SizeStats()).tried += 1
                    flight.accepted_at, flight.pending_s, flight.polls = self.clock(), 0.0, 0
                    flight.url = None
                    record = flight.record = await self.ledger.advance(
                        record, S.SUBMITTED, request_id=request_id, submitted_at=self.now_ms()
                    )
                    self._event("window.submit.ok", record)
                    return await self._wait_ready(record, flight)
            await self._sleep(retry_in)  # outside the slot: a 429 may have lowered the cap

    def _backoff(
        self, record: WindowRecord, flight: _Flight, exc: RetryableError, *, gate: bool = False
    ) -> float:
        """How long to wait before repeating a step that failed in a retryable way.

        Raises ``exc`` again when the policy gives up (the caller's handler fails the window).
        On a 429 at submit, closes the submit gate and lowers the in-flight cap to the limit
        Flurry reported.
        """
        outcome = outcome_for(exc)
        decision = self.policy.decide(outcome, flight.progress(self.clock()), self.rng)
        if decision.action is Action.FAIL:
            raise exc  # _decide turns the same outcome into FAILED
        flight.step_retries += 1
        limit = getattr(exc, "limit", None)
        if gate and outcome.kind is OutcomeKind.RATE_LIMITED:
            self._submit_open_at = max(self._submit_open_at, self.clock() + decision.delay_s)
            if limit and limit < self._in_flight.total_tokens:
                self._in_flight.total_tokens = max(1, limit)  # Flurry told us its cap
        self._event(
            "window.retry.wait", record, reason=str(exc), delay_s=round(decision.delay_s, 3)
        )
        return decision.delay_s

    def _estimate_key(self, window: Window) -> str:
        return f"{window.app}:{window.length // HOUR_MS}"

    async def _wait_ready(self, record: WindowRecord, flight: _Flight) -> WindowRecord:
        """Poll until the request is ready (→ READY, with a link); holds the caller's slot."""
        assert record.request_id is not None
        key = self._estimate_key(record.window)
        while True:
            progress = flight.progress(self.clock(), self.estimator.expected(key))
            kind = OutcomeKind.ACCEPTED if flight.polls == 0 else OutcomeKind.PROCESSING
            decision = self.policy.decide(Outcome(kind=kind), progress, self.rng)
            if decision.action is not Action.POLL:
                raise RequestTimeoutError(
                    f"the request did not finish within {self.policy.request_timeout_s:g} s",
                    app=record.window.app,
                    window=record.window.label,
                    request_id=record.request_id,
                )
            await self._sleep(decision.delay_s)
            await self._pacer.wait()
            try:
                answer = await self.api.status(record.request_id, window=record.window)
            except RetryableError as exc:
                await self._sleep(self._backoff(record, flight, exc))
                continue
            flight.polls += 1
            flight.step_retries = 0
            elapsed = self.clock() - flight.accepted_at
            if isinstance(answer, Processing):
                flight.pending_s = elapsed
                continue
            self.estimator.observe(key, pending_s=flight.pending_s, ready_s=elapsed)
            flight.url = answer.url
            record = flight.record = await self.ledger.advance(
                record, S.READY, ready_at=self.now_ms()
            )
            self._event("window.poll.ready", record, polls=flight.polls, seconds=round(elapsed, 3))
            return record

    async def _download(self, record: WindowRecord, flight: _Flight) -> WindowRecord:
        assert record.request_id is not None
        if flight.url is None:  # re-attached, or the link expired: ask for a fresh one
            await self._pacer.wait()
            answer = await self.api.status(record.request_id, window=record.window)
            if isinstance(answer, Processing):
                await self._sleep(self.policy.poll_min_s)
                return record
            flight.url = answer.url
        target = self.writer.download_path(record.window.app, record.id, record.attempt)
        async with self._downloads:
            with anyio.CancelScope() as scope:
                self._download_scopes.add(scope)
                if self.stopping:
                    scope.cancel()
                try:
                    size = await self.api.download(
                        flight.url, target, window=record.window, request_id=record.request_id
                    )
                finally:
                    self._download_scopes.discard(scope)
            if scope.cancelled_caught:
                target.unlink(missing_ok=True)
                raise _Stopping
        record = flight.record = await self.ledger.advance(record, S.DOWNLOADED)
        self._event("window.download.ok", record, bytes=size)
        return record

    async def _land(self, record: WindowRecord) -> WindowRecord:
        source = self.writer.download_path(record.window.app, record.id, record.attempt)
        if not source.exists():  # the download was lost: fetch it again
            return await self.ledger.retry(
                record, error_class="DownloadLost", error_message="download file missing"
            )
        async with self._conversions:
            record = await land(self.ledger, self.writer, record, source)
        source.unlink(missing_ok=True)
        tally = self.tally(record.window.app)
        tally.committed += 1
        tally.rows += record.rows or 0
        tally.bytes += record.bytes or 0
        self._event("window.commit.ok", record, rows=record.rows, bytes=record.bytes)
        return record

    async def _decide(
        self, record: WindowRecord, flight: _Flight, exc: WindowError
    ) -> WindowRecord | None:
        """Apply the policy's decision for ``exc``; returns the window to go on with, or None."""
        outcome = outcome_for(exc)
        if outcome.kind is OutcomeKind.FAILED:
            flight.failures += 1
        decision = self.policy.decide(outcome, flight.progress(self.clock()), self.rng)
        action = decision.action
        if action is Action.SPLIT:
            await self._split(record, decision.split_ms)
            return None
        if action is Action.FAIL:
            failed = await self.ledger.advance(
                record,
                S.FAILED,
                error_class=type(exc).__name__,
                error_message=decision.reason or str(exc),
                retryable=decision.retryable,
            )
            self.tally(record.window.app).failed += 1
            self.summary.failures.append(
                (record.window.app, record.window.label, decision.reason or str(exc))
            )
            self._event(
                "window.fail.done",
                failed,
                reason=decision.reason or str(exc),
                retryable=decision.retryable,
            )
            return None
        if action is Action.SUBMIT:
            flight.resubmits += 1
            flight.step_retries = 0
            record = await self.ledger.retry(
                record, error_class=type(exc).__name__, error_message=str(exc)
            )
            self._event(
                "window.resubmit.wait", record, reason=str(exc), delay_s=round(decision.delay_s, 3)
            )
            await self._sleep(decision.delay_s)
            return record
        if action is Action.POLL:  # the link expired: the READY step asks for a fresh one
            flight.url = None
            flight.step_retries += 1
            return record
        if action is Action.RETRY:
            flight.step_retries += 1
            self._event(
                "window.retry.wait", record, reason=str(exc), delay_s=round(decision.delay_s, 3)
            )
            await self._sleep(decision.delay_s)
            return record
        raise FatalError(decision.reason or str(exc))  # Action.STOP

    async def _split(self, record: WindowRecord, size_ms: int | None) -> None:
        """Replace a refused window by children of the suggested size, and learn from it."""
        try:
            children = planner.split(record.window, size_ms, tz=self.tz)
        except CannotSplitError as exc:
            await self._decide(record, _Flight(), exc)
            return
        app = record.window.app
        if self._at_planned_size(record.window):
            stats = self._sizes.setdefault(app, _SizeStats())
            stats.refused += 1
            stats.tried += record.state is S.PENDING  # refused at POST: never counted as tried
            await self._maybe_learn(app)
        added = await self.ledger.split(record, children)
        self.summary.split += 1
        size = max(c.length for c in children)
        self._event("window.split.done", record, children=len(children), size_h=size // HOUR_MS)
        self.tally(app).planned -= 1  # the children replace it
        self._enqueue(added)

    def _planned_size(self, app: str) -> int:
        return min(self._learned.get(app, math.inf), self.settings.windows.max_days * DAY_MS)  # type: ignore[return-value]

    def _at_planned_size(self, window: Window) -> bool:
        """Whether ``window`` has its app's planned size now (give or take a DST hour)."""
        return abs(window.length - self._planned_size(window.app)) <= 2 * HOUR_MS

    async def _maybe_learn(self, app: str) -> None:
        """Plan ``app``'s windows one ladder step smaller once its planned size keeps failing.

        The first refusal at the configured maximum (30 days) steps down at once; below it, a
        size is dropped when more than half of at least four windows of that size were refused,
        so one spike day does not turn two years of weeks into days.
        """
        planned = self._planned_size(app)
        stats = self._sizes.setdefault(app, _SizeStats())
        at_max = planned >= self.settings.windows.max_days * DAY_MS
        if not (
            (at_max and stats.refused) or (stats.tried >= 4 and 2 * stats.refused > stats.tried)
        ):
            return
        smaller = planner.next_size(planned)
        if smaller is None:
            return
        self._learned[app] = smaller
        self._sizes[app] = _SizeStats()
        await self.ledger.learn_size(app, smaller)
        self.log.info("app.size.learned", app=app, size_h=smaller // HOUR_MS)

    async def _presplit(self, record: WindowRecord) -> None:
        """Cut a window planned before its app's size was learned; no API call."""
        children = planner.split(record.window, self._planned_size(record.window.app), tz=self.tz)
        self.tally(record.window.app).planned -= 1
        self._enqueue(await self.ledger.split(record, children))


async def outcome_of_range(
    ledger: Ledger, apps: Iterable[str], start: int | None = None, end: int | None = None
) -> Literal["done", "failed", "retryable", "unfinished"]:
    """How the windows of ``apps`` (in ``[start, end)`` if given) stand after a run."""
    records = await ledger.windows(apps=list(apps))
    live = [
        r
        for r in records
        if r.state is not S.SPLIT
        and (start is None or r.window.end > start)
        and (end is None or r.window.start < end)
    ]
    if any(r.state is S.FAILED and not r.retryable for r in live):
        return "failed"
    if any(r.state is S.FAILED for r in live):
        return "retryable"
    if any(r.state in UNFINISHED for r in live):
        return "unfinished"
    return "done"


async def land(ledger: Ledger, writer: Writer, record: WindowRecord, source: Path) -> WindowRecord:
    """Convert a DOWNLOADED window's file, publish it and mark it COMMITTED.

    Stage (off the event loop) → STAGED → publish (manifest first, then the files) → COMMITTED
    → only then remove the files of the attempt committed before, if any.  The publish and the
    ledger's COMMITTED run shielded from cancellation, so an interrupt cannot split them;
    a crash between them is finished by ``recover``.
    """
    window = record.window
    try:
        manifest = await anyio.to_thread.run_sync(
            lambda: writer.stage(
                app=window.app,
                window_id=record.id,
                attempt=record.attempt,
                start_ms=window.start,
                end_ms=window.end,
                source=source,
            )
        )
        with anyio.CancelScope(shield=True):
            record = await ledger.advance(record, WindowState.STAGED)
            path = await anyio.to_thread.run_sync(writer.publish, manifest)
            record = await _commit(ledger, writer, record, manifest, path)
    except OSError as exc:  # disk full, permissions: no window can land until it is fixed
        raise StorageError(f"cannot write under {writer.root}: {exc.strerror or exc}") from exc
    return record


async def _commit(
    ledger: Ledger, writer: Writer, record: WindowRecord, manifest: Manifest, path: Path
) -> WindowRecord:
    """STAGED → COMMITTED for a published manifest, then drop the attempt committed before."""
    previous = record.committed_attempt
    record = await ledger.advance(
        record, WindowState.COMMITTED, rows=manifest.rows, bytes=manifest.size, manifest=str(path)
    )
    if previous is not None and previous != record.attempt:
        await anyio.to_thread.run_sync(
            _remove_attempt, writer, record.window.app, record.id, previous
        )
    return record


def _remove_attempt(writer: Writer, app: str, window_id: int, attempt: int) -> None:
    path = writer.manifest_path(app, window_id, attempt)
    if path.exists():
        writer.remove(writer.load_manifest(path))


def _manifest_if_any(writer: Writer, path: Path) -> Manifest | None:
    return writer.load_manifest(path) if path.exists() else None


@dataclass(slots=True)
class Recovery:
    """What start-up recovery did."""

    finished: list[int] = field(default_factory=list)  # STAGED windows whose publish it completed
    requeued: list[int] = field(default_factory=list)  # windows sent back to PENDING
    swept: int = 0  # files and manifests of no live attempt, deleted


async def recover(ledger: Ledger, writer: Writer) -> Recovery:
    """Finish or discard what a killed run left between staging and COMMITTED, then sweep.

    A STAGED window whose manifest is on disk with every file either published or still staged
    is published and COMMITTED; any other STAGED window goes back to PENDING with its partial
    output removed.  Then staging is emptied and every event file or manifest that belongs to no
    committed attempt is deleted.  Call it before any window runs.
    """
    report = Recovery()
    for record in await ledger.windows(states=[WindowState.STAGED]):
        window = record.window
        path = writer.manifest_path(window.app, record.id, record.attempt)
        manifest = await anyio.to_thread.run_sync(_manifest_if_any, writer, path)
        if manifest is not None and await anyio.to_thread.run_sync(writer.finish, manifest):
            await _commit(ledger, writer, record, manifest, path)
            report.finished.append(record.id)
            continue
        if manifest is not None:
            await anyio.to_thread.run_sync(writer.remove, manifest)
        await ledger.retry(
            record, error_class="Interrupted", error_message="the run stopped while staging"
        )
        report.requeued.append(record.id)
    live = {
        (r.id, r.committed_attempt)
        for r in await ledger.windows()
        if r.committed_attempt is not None
    }
    await anyio.to_thread.run_sync(writer.discard_staging)
    report.swept = len(await anyio.to_thread.run_sync(writer.sweep, live))
    return report
