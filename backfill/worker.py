"""The worker: carries out the lifecycle's effects for one window against the ports.

Theory of operation.  ``Worker.handle`` takes one window and loops: ask ``lifecycle.decide``
for the step that follows the last outcome, move the ledger to the step's state, wait its delay,
carry out its effect (submit, poll, link, download, land), and turn what came back (a value, or
a typed error) into the next ``Outcome``.  It decides nothing itself.  It returns the window's
follow-ups: the children of a split, for the pool to run.  Every wait that starts no work
(the submit gate, a slot, the pacer, a backoff, a poll, a download) ends as soon as the run is
stopping, and the window is left where it is; a POST already sent and a conversion already
started finish.  Counts leave only as events.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

import anyio
import anyio.to_thread

from backfill import commit, lifecycle, planner
from backfill.errors import AuthError, FatalError, StaleAttemptError, Stopped, WindowError
from backfill.events import WindowEvent
from backfill.lifecycle import Effect, Event, Outcome, Progress
from backfill.logs import scrub
from backfill.models import HOUR_MS, WindowState
from backfill.protocol import Ready

if TYPE_CHECKING:
    import datetime as dt
    import random
    from collections.abc import Awaitable, Callable

    from backfill.appkeys import AppKeys
    from backfill.budget import Budget, Slot
    from backfill.config import Settings
    from backfill.models import Changes, WindowRecord
    from backfill.policy import Estimator, Policy
    from backfill.ports import Api, LedgerPort, StorePort
    from backfill.sizing import Sizes

__all__ = ["Worker"]

S = WindowState
T = TypeVar("T")


class _Stopped:
    """What a wait returns when the run stopped during it."""


STOPPED = _Stopped()


@dataclass(slots=True)
class _Turn:
    """One window while a worker holds it (the ledger has the rest)."""

    record: WindowRecord
    slot: Slot
    progress: Progress = dataclasses.field(default_factory=Progress)
    request_id: str | None = None  # from the last POST, until the ledger has it
    url: str | None = None  # the download link: never stored, never logged
    accepted_at: float = 0.0  # monotonic seconds when the current request was accepted
    pending_s: float = 0.0  # elapsed at the last poll that saw it still processing
    error: BaseException | None = None  # what the last outcome came from
    follow: list[WindowRecord] = dataclasses.field(default_factory=list)  # more for the pool


@dataclass(frozen=True, slots=True, kw_only=True)
class Context:
    """What every worker of a run shares."""

    settings: Settings
    ledger: LedgerPort
    store: StorePort
    api: Api
    budget: Budget
    sizes: Sizes
    policy: Policy
    estimator: Estimator
    stopping: anyio.Event
    group_lock: anyio.Lock  # one group landing at a time: the last member in lands them all
    min_share: float  # a re-pull under this share of the rows it replaces fails (0: accepted)
    emit: Callable[[WindowEvent], None]
    now_ms: Callable[[], int]
    clock: Callable[[], float]
    rng: random.Random
    tz: dt.tzinfo
    keys: AppKeys | None = None  # the token was probed: a 401 at a POST fails that app alone


class Worker:
    """Drives windows through the lifecycle, one at a time per call of ``handle``."""

    def __init__(self, context: Context) -> None:
        self.c = context

    async def handle(self, record: WindowRecord) -> list[WindowRecord]:
        """Run ``record`` as far as it goes now; returns its children if it was split."""
        turn = _Turn(record=record, slot=self.c.budget.slot(record.window.app, record.id))
        if record.state is S.SUBMITTED and record.submitted_at is not None:  # re-attach
            waited = max(0, self.c.now_ms() - record.submitted_at) / 1000
            turn.accepted_at = self.c.clock() - waited
        try:
            return [*await self._drive(turn), *turn.follow]
        except StaleAttemptError as exc:  # another worker moved it: that one carries on
            self._emit("window.turn.stale", turn.record, reason=str(exc))
            return turn.follow
        finally:
            with anyio.CancelScope(shield=True):
                await turn.slot.release()

    async def _drive(self, turn: _Turn) -> list[WindowRecord]:
        outcome = self._start(turn.record)
        while True:
            step = self._decide(turn, outcome)
            if step.effect in lifecycle.ENDS:
                ended = await self._end(turn, step, outcome)
                if isinstance(ended, Outcome):  # the end itself failed: decide again
                    outcome = ended
                    continue
                return ended
            await self._move(turn, step, outcome)
            if turn.record.state is S.SUBMITTED and (
                await self._until_stop(turn.slot.acquire) is STOPPED
            ):
                outcome = Outcome(event=Event.STOPPING)
                continue
            if step.close_gate:
                await self.c.budget.close_gate(step.delay_s, outcome.limit)
            if step.delay_s and await self._until_stop(anyio.sleep, step.delay_s) is STOPPED:
                outcome = Outcome(event=Event.STOPPING)
                continue
            outcome = await self._carry_out(turn, step.effect)

    def _start(self, record: WindowRecord) -> Outcome:
        if self.c.stopping.is_set():
            return Outcome(event=Event.STOPPING)
        planned = self.c.sizes.planned(record.window.app)
        return Outcome(event=Event.START, window_ms=record.window.length, planned_ms=planned)

    def _decide(self, turn: _Turn, outcome: Outcome) -> lifecycle.Step:
        key = _estimate_key(turn.record)
        turn.progress = dataclasses.replace(
            turn.progress,
            elapsed_s=self.c.clock() - turn.accepted_at,
            expected_s=self.c.estimator.expected(key),
        )
        step = lifecycle.decide(
            turn.record.state, outcome, turn.progress, self.c.policy, self.c.rng
        )
        turn.progress = step.progress
        return step

    # -- ledger moves ------------------------------------------------------------------------

    async def _move(self, turn: _Turn, step: lifecycle.Step, outcome: Outcome) -> None:
        """Move the ledger where the step says; hold a slot only while SUBMITTED."""
        record, ledger = turn.record, self.c.ledger
        if step.effect is Effect.RESUBMIT:
            error = _error_class(turn, outcome)
            turn.record = await ledger.retry(record, error_class=error, error_message=step.reason)
            self._emit("window.resubmit.wait", turn.record, reason=step.reason,
                       delay_s=round(step.delay_s, 3))  # fmt: skip
        elif step.state is not record.state:
            turn.record = await ledger.advance(record, step.state, **self._changes(turn, step))
            self._emit_moved(turn, step)
        elif step.reason and step.effect is not Effect.POLL:
            self._emit("window.retry.wait", record, reason=str(turn.error or step.reason),
                       delay_s=round(step.delay_s, 3))  # fmt: skip
        if turn.record.state is not S.SUBMITTED:
            await turn.slot.release()

    def _changes(self, turn: _Turn, step: lifecycle.Step) -> Changes:
        if step.state is S.SUBMITTED:
            return {"request_id": turn.request_id, "submitted_at": self.c.now_ms()}
        if step.state is S.READY:
            return {"ready_at": self.c.now_ms()}
        return {}

    def _emit_moved(self, turn: _Turn, step: lifecycle.Step) -> None:
        record = turn.record
        if step.state is S.SUBMITTED:
            self._emit("window.submit.ok", record)
        elif step.state is S.READY:
            waited = round(self.c.clock() - turn.accepted_at, 3)
            self._emit("window.poll.ready", record, polls=turn.progress.polls, seconds=waited)

    async def _end(
        self, turn: _Turn, step: lifecycle.Step, outcome: Outcome
    ) -> list[WindowRecord] | Outcome:
        record = turn.record
        if step.effect is Effect.SPLIT:
            return await self._split(turn, step, outcome)
        if step.effect is Effect.FAIL:
            error = _error_class(turn, outcome)
            failed = await self.c.ledger.advance(record, S.FAILED, error_class=error,
                                                 error_message=step.reason,
                                                 retryable=step.retryable)  # fmt: skip
            self._emit("window.fail.done", failed, reason=step.reason, retryable=step.retryable)
        elif step.effect is Effect.STOP:
            raise turn.error or AuthError(step.reason)
        return []

    async def _split(
        self, turn: _Turn, step: lifecycle.Step, outcome: Outcome
    ) -> list[WindowRecord] | Outcome:
        record, window = turn.record, turn.record.window
        try:
            children = planner.split(window, step.split_ms, tz=self.c.tz)
        except WindowError as exc:  # too large even at the floor
            turn.error = exc
            return _outcome_of(exc)
        if outcome.event is Event.TOO_LARGE:
            smaller = self.c.sizes.refused(window, at_submit=record.state is S.PENDING)
            if smaller is not None:
                await self.c.ledger.learn_size(window.app, smaller)
                self._emit("app.size.learned", record, size_h=smaller // HOUR_MS)
        added = await self.c.ledger.split(record, children)
        size = max(c.length for c in children)
        self._emit("window.split.done", record, children=len(children), size_h=size // HOUR_MS)
        for child in added:
            self._emit("window.queued", child)
        return added

    # -- effects -----------------------------------------------------------------------------

    async def _carry_out(self, turn: _Turn, effect: Effect) -> Outcome:
        """Carry out ``effect``; what came back, as an outcome (errors by their class)."""
        act = {
            Effect.SUBMIT: self._submit,
            Effect.RESUBMIT: self._submit,
            Effect.POLL: self._poll,
            Effect.LINK: self._poll,
            Effect.DOWNLOAD: self._download,
            Effect.LAND: self._land,
        }[effect]
        turn.error = None
        try:
            return await act(turn)
        except (WindowError, AuthError) as exc:
            turn.error = exc
            return _outcome_of(exc, after=Effect.SUBMIT if effect is Effect.RESUBMIT
                                        else effect)  # fmt: skip
        except Stopped:  # a conversion gave up at once (a second signal), a POST unsent: as it was
            return Outcome(event=Event.STOPPING)
        except FatalError:  # the disk, the ledger: no window can go on
            raise
        except Exception as exc:  # a bug or a surprise: this window fails, the run goes on
            turn.error = exc
            detail = scrub(f"{type(exc).__name__}: {exc}")
            return Outcome(event=Event.ERROR, after=effect, detail=detail)

    async def _submit(self, turn: _Turn) -> Outcome:
        budget, window = self.c.budget, turn.record.window
        while True:  # the gate may close again while this window waits for its slot
            closed = await budget.gate_wait()
            if closed and await self._until_stop(anyio.sleep, closed) is STOPPED:
                return Outcome(event=Event.STOPPING)
            if await self._until_stop(turn.slot.acquire) is STOPPED:
                return Outcome(event=Event.STOPPING)
            if await budget.gate_wait() <= 0:
                break
            await turn.slot.release()
        if await self._until_stop(budget.pacer.wait) is STOPPED or self.c.stopping.is_set():
            return Outcome(event=Event.STOPPING)  # from the signal on, no new request
        app = self.c.settings.app(window.app)
        post = functools.partial(
            self.c.api.submit,
            window,
            api_key=app.api_key,
            output_format=self.c.settings.api.format,
            app_versions=app.app_versions,
            event_ids=app.event_ids,
        )
        keys, stopping = self.c.keys, self.c.stopping
        turn.request_id = await (post() if keys is None else keys.submit(window, post, stopping))
        self.c.sizes.submitted(window)
        turn.accepted_at, turn.pending_s, turn.url = self.c.clock(), 0.0, None
        return Outcome(event=Event.ACCEPTED)

    async def _poll(self, turn: _Turn) -> Outcome:
        record = turn.record
        assert record.request_id is not None
        if await self._until_stop(self.c.budget.pacer.wait) is STOPPED:
            return Outcome(event=Event.STOPPING)
        answer = await self._until_stop(self.c.api.status, record.request_id, window=record.window)
        if isinstance(answer, _Stopped):
            return Outcome(event=Event.STOPPING)
        elapsed = self.c.clock() - turn.accepted_at
        if not isinstance(answer, Ready):
            turn.pending_s = elapsed
            return Outcome(event=Event.PROCESSING)
        if record.state is S.SUBMITTED:
            key = _estimate_key(record)
            self.c.estimator.observe(key, pending_s=turn.pending_s, ready_s=elapsed)
        turn.url = answer.url
        return Outcome(event=Event.READY)

    async def _download(self, turn: _Turn) -> Outcome:
        record = turn.record
        assert record.request_id is not None and turn.url is not None
        target = self.c.store.download_path(record.window.app, record.id, record.attempt)
        async with self.c.budget.downloads:
            size = await self._until_stop(
                self.c.api.download,
                turn.url,
                target,
                window=record.window,
                request_id=record.request_id,
            )
        if isinstance(size, _Stopped):
            target.unlink(missing_ok=True)
            return Outcome(event=Event.STOPPING)
        self._emit("window.download.ok", record, bytes=size)
        return Outcome(event=Event.DOWNLOADED)

    async def _land(self, turn: _Turn) -> Outcome:
        record = turn.record
        if record.replaces is not None:  # another member may land it meanwhile: ask under lock
            async with self.c.group_lock:
                return await self._land_group(turn)
        source = self.c.store.download_path(record.window.app, record.id, record.attempt)
        if not source.exists():
            return Outcome(event=Event.DOWNLOAD_LOST, detail="the download file is missing")
        turn.record = await commit.land(self.c.ledger, self.c.store, record, source,
                                        min_share=self.c.min_share,
                                        conversions=self.c.budget.conversions)  # fmt: skip
        self._landed([turn.record])
        return Outcome(event=Event.COMMITTED)

    async def _land_group(self, turn: _Turn) -> Outcome:
        """Hold this window until every window replacing its range is in; the last lands all."""
        ledger, store = self.c.ledger, self.c.store
        turn.record = await ledger.get(turn.record.id)  # another worker may have landed it
        if turn.record.state is not S.DOWNLOADED or turn.record.replaces is None:
            return Outcome(event=Event.COMMITTED if turn.record.committed_attempt else Event.HELD)
        root = await ledger.get(turn.record.replaces)
        members = await ledger.group(root.id)
        if waiting := [m for m in members if m.state is not S.DOWNLOADED]:
            detail = f"{len(waiting)} more windows of {root.window.label} to come"
            return Outcome(event=Event.HELD, detail=detail)
        sources = [(m, store.download_path(m.window.app, m.id, m.attempt)) for m in members]
        if lost := [m for m, path in sources if not path.exists()]:
            for member in lost:  # fetched again; the range lands when they are in
                turn.follow.append(await ledger.retry(member, error_class="DownloadLost"))
            return Outcome(event=Event.HELD, detail="downloads lost: fetched again")
        try:
            landed = await commit.land_group(ledger, store, root, sources,
                                             min_share=self.c.min_share,
                                             conversions=self.c.budget.conversions)  # fmt: skip
        except WindowError as exc:
            culprit = getattr(exc, "record", None)  # None: the range as a whole (it shrank)
            targets = members if culprit is None else [culprit]
            for member in [m for m in targets if m.id != turn.record.id]:
                await self._fail_other(member, exc)
            if culprit is not None and culprit.id != turn.record.id:
                return Outcome(event=Event.HELD, detail=str(exc))
            raise
        self._landed(landed)
        turn.record = next(r for r in landed if r.id == turn.record.id)
        return Outcome(event=Event.COMMITTED)

    async def _fail_other(self, member: WindowRecord, exc: WindowError) -> None:
        """Apply the table's decision for ``exc`` to another window of the same group."""
        step = lifecycle.decide(
            member.state, _outcome_of(exc), Progress(), self.c.policy, self.c.rng
        )
        failed = await self.c.ledger.advance(member, S.FAILED, error_class=type(exc).__name__,
                                             error_message=step.reason,
                                             retryable=step.retryable)  # fmt: skip
        self._emit("window.fail.done", failed, reason=step.reason, retryable=step.retryable)

    def _landed(self, records: list[WindowRecord]) -> None:
        for landed in records:
            path = self.c.store.download_path(landed.window.app, landed.id, landed.attempt)
            path.unlink(missing_ok=True)
            self._emit("window.commit.ok", landed, rows=landed.rows, bytes=landed.bytes)

    # -- plumbing ----------------------------------------------------------------------------

    async def _until_stop(
        self, fn: Callable[..., Awaitable[T]], *args: Any, **kw: Any
    ) -> T | _Stopped:
        """``await fn(...)``, or ``STOPPED`` as soon as the run is stopping."""
        if self.c.stopping.is_set():
            return STOPPED
        result: list[T] = []
        errors: list[Exception] = []
        async with anyio.create_task_group() as group:

            async def call() -> None:
                try:
                    result.append(await fn(*args, **kw))
                except Exception as exc:  # handed to the caller below, as itself
                    errors.append(exc)
                group.cancel_scope.cancel()

            async def watch() -> None:
                await self.c.stopping.wait()
                group.cancel_scope.cancel()

            group.start_soon(call)
            group.start_soon(watch)
        if errors:
            raise errors[0]
        return result[0] if result else STOPPED

    def _emit(self, name: str, record: WindowRecord, **fields: Any) -> None:
        self.c.emit(WindowEvent(name=name, record=record, fields=fields))


def _outcome_of(error: WindowError | AuthError, after: Effect | None = None) -> Outcome:
    """The outcome ``error`` stands for, its text scrubbed (it goes to the ledger, the summary)."""
    outcome = lifecycle.outcome_of(error, after)
    return dataclasses.replace(outcome, detail=scrub(outcome.detail))


def _error_class(turn: _Turn, outcome: Outcome) -> str:
    """The ledger's ``error_class``: the error's class, or the event that stood for one."""
    if turn.error is not None:
        return type(turn.error).__name__
    if outcome.event is Event.START:
        return "Interrupted"
    return "".join(word.title() for word in outcome.event.split("_"))


def _estimate_key(record: WindowRecord) -> str:
    return f"{record.window.app}:{record.window.length // HOUR_MS}"
