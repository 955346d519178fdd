"""The window lifecycle as data: (state, event) → the next state and the effect to carry out.

Theory of operation.  A worker holds one window at a time.  It starts it with ``Event.START``
(or ``Event.STOPPING`` when the run is stopping), asks ``decide`` what follows, moves the ledger
to ``Step.state`` if that differs from where the window is, sleeps ``Step.delay_s``, then carries
out ``Step.effect`` against its ports (the API, the ledger, the output store).  What the effect
came back with is the next ``Outcome``, and so on until an effect ends the window's turn
(``DONE``, ``LEAVE``, ``SPLIT``, ``FAIL``, ``STOP``).  ``TABLE`` below holds every rule; like
h11's state table, it is the one place to read to know what happens after what::

    PENDING     START → SUBMIT (or SPLIT, no call, when the window outgrew its app's size)
                ACCEPTED → SUBMITTED, POLL        TOO_LARGE → SPLIT
    SUBMITTED   PROCESSING → POLL (or RESUBMIT once the request is overdue)
                READY → READY, DOWNLOAD           FAILED → RESUBMIT once, then FAIL
    READY       START → LINK (ask for a fresh link)   DOWNLOADED → DOWNLOADED, LAND
    DOWNLOADED  START → LAND (the commit protocol moves it STAGED → COMMITTED; then DONE)
                HELD → DONE (it replaces a committed range with others: the last one lands all)
    STAGED      START → RESUBMIT (the stage was lost outside recovery)
    transient errors (429, 5xx, connection, expired link) repeat the step that failed after a
    backoff, and FAIL (retryable) after ``max_attempts`` in a row; 401 STOPs the run; a window
    the API will never accept, or a download that is unusable, FAILs (not retryable);
    STOPPING LEAVEs the window where it is (its request id is in the ledger).

``Progress`` counts what the current window went through (retries of the step, polls,
resubmits, Failures); ``decide`` returns the counts after the step, so the worker keeps no
arithmetic of its own.  The policy's numbers (backoff, poll schedule, resubmit limits) come in as
a ``Policy``; jitter from an injected ``random.Random``.  Nothing here does I/O or reads a clock.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING

from backfill import errors
from backfill.models import HOUR_MS, UNFINISHED, WindowState

if TYPE_CHECKING:
    import random

    from backfill.policy import Policy

__all__ = [
    "SLACK_MS",
    "TABLE",
    "Effect",
    "Event",
    "Outcome",
    "Progress",
    "Step",
    "decide",
    "outcome_of",
]

S = WindowState
SLACK_MS = 2 * HOUR_MS  # a DST day is 23 or 25 hours: still "the planned size"


class Event(StrEnum):
    """What happened to a window: its pick-up, or what the last effect came back with."""

    START = "start"  # a worker picked the window up
    STOPPING = "stopping"  # the run is stopping: start nothing new
    ACCEPTED = "accepted"  # the POST returned a request id
    PROCESSING = "processing"  # the status is not final yet
    READY = "ready"  # the status is Success, with a link
    DOWNLOADED = "downloaded"  # the file is on local disk
    COMMITTED = "committed"  # converted, published and COMMITTED in the ledger
    DOWNLOAD_LOST = "download_lost"  # the downloaded file is gone before landing
    HELD = "held"  # downloaded; lands with the rest of the range it replaces, when they are in
    FAILED = "failed"  # Flurry reported Failure
    TOO_LARGE = "too_large"
    RATE_LIMITED = "rate_limited"
    SERVER_ERROR = "server_error"
    TRANSPORT_ERROR = "transport_error"
    LINK_EXPIRED = "link_expired"
    RESULTS_EXPIRED = "results_expired"
    TIMED_OUT = "timed_out"
    UNAUTHORIZED = "unauthorized"
    REJECTED = "rejected"  # the API will never accept this window as asked
    BAD_DATA = "bad_data"  # the download is corrupt or breaks the schema
    ERROR = "error"  # an exception nobody expected: fails this window (retryably), not the run


class Effect(StrEnum):
    """What the worker carries out next."""

    SUBMIT = "submit"  # POST a new request (holding a place among those processing)
    POLL = "poll"  # ask the status of the request
    LINK = "link"  # ask the status only for a fresh download link
    DOWNLOAD = "download"  # fetch the link to local disk
    LAND = "land"  # convert, stage, publish, COMMITTED
    RESUBMIT = "resubmit"  # back to PENDING with attempt + 1, then SUBMIT
    SPLIT = "split"  # retire the window as SPLIT; its children are the follow-ups
    FAIL = "fail"  # mark the window FAILED
    STOP = "stop"  # stop the whole run (a fatal error)
    LEAVE = "leave"  # leave the window where it is, for the next run
    DONE = "done"  # nothing left to do


ENDS = frozenset({Effect.SPLIT, Effect.FAIL, Effect.STOP, Effect.LEAVE, Effect.DONE})


@dataclass(frozen=True, slots=True, kw_only=True)
class Outcome:
    """An event and the facts a rule needs to decide on it."""

    event: Event
    after: Effect | None = None  # the effect that came back with this event
    retry_after_s: float | None = None
    refill_per_minute: float | None = None
    limit: int | None = None  # RATE_LIMITED: the cap of requests processing Flurry reported
    suggested_ms: int | None = None  # TOO_LARGE: the size the API suggests
    window_ms: int = 0  # START: the window's length ...
    planned_ms: int | None = None  # ... and the size its app is planned at now
    detail: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """How far one window's current turn has come."""

    step_retries: int = 0  # consecutive retries of the current step
    polls: int = 0  # status polls of the current request
    resubmits: int = 0  # new requests for this window after the first
    failures: int = 0  # Failure statuses seen for this window
    elapsed_s: float = 0.0  # since the current request was accepted (the worker's clock)
    expected_s: float | None = None  # the estimate of this request's processing time


@dataclass(frozen=True, slots=True, kw_only=True)
class Step:
    """The table's answer: where the window goes, what to do there, after how long."""

    state: WindowState
    effect: Effect
    progress: Progress
    delay_s: float = 0.0
    split_ms: int | None = None  # SPLIT: the children's size (None: the next size down)
    retryable: bool = False  # FAIL: may a later run take it back on its own
    close_gate: bool = False  # a 429 at submit: hold every app's submits for delay_s
    reason: str = ""


Rule = Callable[[WindowState, Outcome, Progress, "Policy", "random.Random"], Step]


def _step(
    state: WindowState,
    effect: Effect,
    progress: Progress,
    *,
    delay_s: float = 0.0,
    split_ms: int | None = None,
    retryable: bool = False,
    close_gate: bool = False,
    reason: str = "",
) -> Step:
    return Step(
        state=state,
        effect=effect,
        progress=progress,
        delay_s=delay_s,
        split_ms=split_ms,
        retryable=retryable,
        close_gate=close_gate,
        reason=reason,
    )


# -- rules ---------------------------------------------------------------------------------


def _submit(
    state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
) -> Step:
    if o.planned_ms is not None and o.window_ms > o.planned_ms + SLACK_MS:
        reason = "planned before its app's window size was learned"
        return _step(S.SPLIT, Effect.SPLIT, p, split_ms=o.planned_ms, reason=reason)
    return _step(state, Effect.SUBMIT, p)


def _poll(state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random) -> Step:
    """Poll on the schedule; an overdue request is submitted again."""
    seen = dataclasses.replace(p, step_retries=0, polls=p.polls + (o.event is Event.PROCESSING))
    if seen.elapsed_s >= policy.request_timeout_s:
        reason = f"the request did not finish within {policy.request_timeout_s:g} s"
        return _resubmit(state, dataclasses.replace(o, detail=reason), seen, policy, rng)
    return _step(S.SUBMITTED, Effect.POLL, seen, delay_s=_poll_delay(policy, seen))


def _poll_delay(policy: Policy, p: Progress) -> float:
    return policy.poll_delay(polls=p.polls, elapsed=p.elapsed_s, expected=p.expected_s)


def _to(target: WindowState, effect: Effect) -> Rule:
    """A step forward: move to ``target`` and carry out ``effect``; the retries start over."""

    def rule(
        state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
    ) -> Step:
        polls = p.polls + (o.event is Event.READY)
        return _step(target, effect, dataclasses.replace(p, step_retries=0, polls=polls))

    return rule


def _stay(effect: Effect) -> Rule:
    def rule(
        state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
    ) -> Step:
        return _step(state, effect, p)

    return rule


def _split(state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random) -> Step:
    return _step(S.SPLIT, Effect.SPLIT, p, split_ms=o.suggested_ms, reason=o.detail)


def _fail(state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random) -> Step:
    reason = o.detail or f"{o.event} while {state}"
    return _step(S.FAILED, Effect.FAIL, p, reason=reason)


def _stop(state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random) -> Step:
    return _step(state, Effect.STOP, p, reason="the API refused the token (401)")


def _leave(state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random) -> Step:
    return _step(state, Effect.LEAVE, p)


def _resubmit(
    state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
) -> Step:
    """A new request for the window (attempt + 1), up to ``max_resubmits`` times."""
    reason = o.detail or str(o.event)
    if p.resubmits >= policy.max_resubmits:
        reason = f"{reason}; gave up after {p.resubmits} resubmits"
        return _step(S.FAILED, Effect.FAIL, p, retryable=True, reason=reason)
    delay = policy.backoff(p.resubmits, rng)
    again = dataclasses.replace(p, resubmits=p.resubmits + 1, step_retries=0)
    return _step(S.PENDING, Effect.RESUBMIT, again, delay_s=delay, reason=reason)


def _restart(
    state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
) -> Step:
    """Back to PENDING at once: what was done of this attempt is lost, not refused."""
    reason = o.detail or ("the stage was lost" if state is S.STAGED else "the download was lost")
    return _step(S.PENDING, Effect.RESUBMIT, p, reason=reason)


def _failure(
    state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
) -> Step:
    """Flurry's Failure: submitted again ``failure_resubmits`` times, as its docs advise; then
    a person decides (no run takes it back on its own; ``backfill retry`` does)."""
    seen = dataclasses.replace(p, failures=p.failures + 1)
    if seen.failures > policy.failure_resubmits:
        reason = f"Flurry reported Failure {seen.failures} times; escalate to Flurry"
        return _step(S.FAILED, Effect.FAIL, seen, retryable=False, reason=reason)
    delay = policy.backoff(p.resubmits, rng)
    again = dataclasses.replace(seen, resubmits=p.resubmits + 1, step_retries=0)
    return _step(S.PENDING, Effect.RESUBMIT, again, delay_s=delay, reason="Flurry reported Failure")


def _retry(state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random) -> Step:
    """Repeat the step that failed after a backoff, or fail the window after too many."""
    if p.step_retries >= policy.max_attempts:
        reason = f"{o.event} {p.step_retries + 1} times in a row: {o.detail}"
        return _step(S.FAILED, Effect.FAIL, p, retryable=True, reason=reason)
    again = dataclasses.replace(p, step_retries=p.step_retries + 1)
    if o.event is Event.LINK_EXPIRED:
        return _step(state, Effect.LINK, again, reason="the download link expired")
    floor = o.retry_after_s or 0.0
    if o.refill_per_minute and o.refill_per_minute > 0:
        floor = max(floor, 60.0 / o.refill_per_minute)
    # A server's number never stalls the run: at most the backoff cap (inf and NaN included).
    floor = min(floor, policy.backoff_cap_s) if math.isfinite(floor) else policy.backoff_cap_s
    delay = policy.backoff(p.step_retries, rng, at_least=floor)
    effect = o.after or Effect.SUBMIT
    gate = o.event is Event.RATE_LIMITED and effect is Effect.SUBMIT
    return _step(state, effect, again, delay_s=delay, close_gate=gate, reason=str(o.event))


def _link_pending(
    state: WindowState, o: Outcome, p: Progress, policy: Policy, rng: random.Random
) -> Step:
    """Asked for a fresh link, the request said it is still processing: ask again shortly,
    and no more than ``max_attempts`` times in a row."""
    if p.step_retries >= policy.max_attempts:
        reason = f"the request kept answering Processing after it was ready ({p.step_retries})"
        return _step(S.FAILED, Effect.FAIL, p, retryable=True, reason=reason)
    again = dataclasses.replace(p, step_retries=p.step_retries + 1)
    return _step(state, Effect.LINK, again, delay_s=policy.poll_min_s)


# -- the table -----------------------------------------------------------------------------

E = Event
_TRANSIENT = (E.RATE_LIMITED, E.SERVER_ERROR, E.TRANSPORT_ERROR)
_ANYWHERE: dict[Event, Rule] = {E.STOPPING: _leave, E.UNAUTHORIZED: _stop}

TABLE: dict[WindowState, dict[Event, Rule]] = {
    S.PENDING: {
        E.START: _submit,
        E.ACCEPTED: _poll,
        E.TOO_LARGE: _split,
        E.REJECTED: _fail,
        E.BAD_DATA: _fail,
        **dict.fromkeys(_TRANSIENT, _retry),
    },
    S.SUBMITTED: {
        E.START: _poll,
        E.PROCESSING: _poll,
        E.READY: _to(S.READY, Effect.DOWNLOAD),
        E.FAILED: _failure,
        E.TOO_LARGE: _split,
        E.RESULTS_EXPIRED: _resubmit,
        E.TIMED_OUT: _resubmit,
        E.REJECTED: _fail,
        E.BAD_DATA: _fail,
        **dict.fromkeys(_TRANSIENT, _retry),
    },
    S.READY: {
        E.START: _stay(Effect.LINK),
        E.READY: _to(S.READY, Effect.DOWNLOAD),
        E.PROCESSING: _link_pending,
        E.DOWNLOADED: _to(S.DOWNLOADED, Effect.LAND),
        E.LINK_EXPIRED: _retry,
        E.FAILED: _failure,
        E.RESULTS_EXPIRED: _resubmit,
        E.REJECTED: _fail,
        E.BAD_DATA: _fail,
        **dict.fromkeys(_TRANSIENT, _retry),
    },
    S.DOWNLOADED: {
        E.START: _stay(Effect.LAND),
        E.HELD: _stay(Effect.DONE),
        E.DOWNLOAD_LOST: _restart,
        E.REJECTED: _fail,
        E.BAD_DATA: _fail,
    },
    S.STAGED: {E.START: _restart},
    S.COMMITTED: {E.START: _stay(Effect.DONE), E.COMMITTED: _stay(Effect.DONE)},
    S.SPLIT: {E.START: _stay(Effect.DONE)},
    S.FAILED: {E.START: _stay(Effect.DONE)},
}
for _state in (S.PENDING, S.SUBMITTED, S.READY, S.DOWNLOADED, S.STAGED):
    TABLE[_state].update(_ANYWHERE)
for _state in (S.COMMITTED, S.SPLIT, S.FAILED):
    TABLE[_state][E.STOPPING] = _stay(Effect.DONE)


def decide(
    state: WindowState, outcome: Outcome, progress: Progress, policy: Policy, rng: random.Random
) -> Step:
    """The step that follows ``outcome`` for a window in ``state``; pure but for jitter.

    An event the table has no rule for in that state (a server answering out of turn) fails
    the window, retryably, naming both: one odd answer never stops the run.  A finished
    window (COMMITTED, SPLIT, FAILED) is left as it is whatever comes.
    """
    rule = TABLE[state].get(outcome.event)
    if rule is None and state not in UNFINISHED:  # a finished window is left alone
        return _step(state, Effect.DONE, progress)
    if rule is None:
        reason = f"unexpected {outcome.event} while {state}" + (
            f": {outcome.detail}" if outcome.detail else ""
        )
        return _step(S.FAILED, Effect.FAIL, progress, retryable=True, reason=reason)
    return rule(state, outcome, progress, policy, rng)


_EVENTS: tuple[tuple[type[errors.BackfillError], Event], ...] = (
    (errors.AuthError, E.UNAUTHORIZED),
    (errors.RateLimitedError, E.RATE_LIMITED),
    (errors.LinkExpiredError, E.LINK_EXPIRED),
    (errors.TransportError, E.TRANSPORT_ERROR),
    (errors.RetryableError, E.SERVER_ERROR),
    (errors.RequestFailedError, E.FAILED),
    (errors.RequestTimeoutError, E.TIMED_OUT),
    (errors.ResubmitError, E.RESULTS_EXPIRED),
    (errors.TooLargeError, E.TOO_LARGE),
    (errors.BadDataError, E.BAD_DATA),
    (errors.WindowFailedError, E.REJECTED),
)


def outcome_of(error: errors.BackfillError, after: Effect | None = None) -> Outcome:
    """The outcome an error stands for, decided by its class (never its message)."""
    event = next((e for cls, e in _EVENTS if isinstance(error, cls)), None)
    if event is None:
        raise TypeError(f"{type(error).__name__} is not a window outcome")
    return Outcome(
        event=event,
        after=after,
        retry_after_s=getattr(error, "retry_after_s", None),
        refill_per_minute=getattr(error, "refill_per_minute", None),
        limit=getattr(error, "limit", None),
        suggested_ms=getattr(error, "suggested_ms", None),
        detail=str(error),
    )
