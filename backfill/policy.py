"""Pure policy: what to do after each outcome, and when to poll.

Theory of operation.  The engine reports each step's ``Outcome`` with the window's ``Progress``
(attempt, retries of the current step, polls, resubmits, Failures seen, elapsed time); the
policy answers with one ``Decision``: poll after *t*, retry the same step after *t*, submit
again, download, split, fail the window (retryable or not), or stop the run.  Randomness (jitter)
comes from an injected ``random.Random``; nothing here sleeps or reads a clock.

Backoff is "full jitter" (uniform in ``[0, min(cap, base * 2**n)]``), never shorter than a
``Retry-After`` or one credit of ``X-RateLimit-RefillPerMinute``.  ``Failure`` is submitted
again once and then fails the window, as Flurry's documentation advises.

Poll schedule.  With no estimate of the processing time, the first poll comes after
``poll_initial_s`` and each next one after ``(growth - 1) × elapsed`` (at least
``poll_min_s``, at most ``poll_max_s``), so a request seen at time *T* was finished at most
``(growth - 1) × T`` earlier, and a request of *T* seconds is polled about
``1 + log(T / initial) / log(growth)`` times: with the defaults (30 s, ×1.25, cap 300 s) a
30-minute request takes about 18 polls and a 4-hour one about 60 instead of the 480 a fixed
30-second interval would make.  Once the engine has an estimate (from requests like it that
finished, ``Estimator``), the first poll lands on the estimate and the next ones come every
5% of it: about 1 to 3 polls per window, each request seen at most 5% (or ``poll_min_s``) late.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING

from backfill import errors
from backfill.models import Outcome, OutcomeKind

if TYPE_CHECKING:
    import random

__all__ = ["Action", "Decision", "Estimator", "Policy", "Progress", "outcome_for"]


class Action(StrEnum):
    POLL = "poll"  # ask the status again after delay_s
    RETRY = "retry"  # repeat the step that failed after delay_s
    SUBMIT = "submit"  # submit the window again (a new request) after delay_s
    DOWNLOAD = "download"  # fetch the link now
    SPLIT = "split"  # replace the window by children of split_ms (None: the next size down)
    FAIL = "fail"  # mark the window FAILED
    STOP = "stop"  # stop the run


@dataclass(frozen=True, slots=True, kw_only=True)
class Decision:
    action: Action
    delay_s: float = 0.0
    split_ms: int | None = None
    retryable: bool = False
    reason: str = ""


@dataclass(frozen=True, slots=True, kw_only=True)
class Progress:
    """How far one window's current attempt has come."""

    step_retries: int = 0  # consecutive retries of the current step
    polls: int = 0  # status polls of the current request
    resubmits: int = 0  # new requests for this window after the first
    failures: int = 0  # Failure statuses seen for this window, this one included
    elapsed_s: float = 0.0  # since the current request was accepted
    expected_s: float | None = None  # the engine's estimate of this request's processing time


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The tunables; the defaults follow flurry-api.md section 6."""

    backoff_base_s: float = 1.0
    backoff_cap_s: float = 300.0
    max_step_retries: int = 8
    failure_resubmits: int = 1
    max_resubmits: int = 3
    request_timeout_s: float = 6 * 3600.0
    poll_initial_s: float = 30.0
    poll_min_s: float = 1.0
    poll_max_s: float = 300.0
    poll_growth: float = 1.25
    poll_fine: float = 0.05  # past the estimate, poll every 5% of it

    def backoff(self, retries: int, rng: random.Random, *, at_least: float = 0.0) -> float:
        """Full-jitter backoff for the ``retries``-th retry, never under ``at_least``."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(retries, 30))
        return max(at_least, rng.uniform(0.0, ceiling))

    def poll_delay(self, progress: Progress) -> float:
        """Seconds until the next status poll (see the module docstring for the schedule)."""
        elapsed, expected = progress.elapsed_s, progress.expected_s
        if expected is not None:
            if elapsed < expected:
                return max(self.poll_min_s, expected - elapsed)
            if elapsed < 2 * expected:  # just past the estimate: look often, briefly
                return min(self.poll_max_s, max(self.poll_min_s, self.poll_fine * expected))
        elif progress.polls == 0:
            return self.poll_initial_s
        grown = (self.poll_growth - 1.0) * max(elapsed, self.poll_initial_s)
        return min(self.poll_max_s, max(self.poll_min_s, grown))

    def expected_polls(self, processing_s: float) -> int:
        """Polls the schedule makes, with no estimate, for a request of ``processing_s``."""
        if processing_s <= self.poll_initial_s:
            return 1
        capped_from = max(self.poll_initial_s, self.poll_max_s / (self.poll_growth - 1.0))
        geometric = math.log(min(processing_s, capped_from) / self.poll_initial_s)
        linear = max(0.0, processing_s - capped_from) / self.poll_max_s
        return 1 + math.ceil(geometric / math.log(self.poll_growth) + linear)

    def decide(self, outcome: Outcome, progress: Progress, rng: random.Random) -> Decision:
        """What to do next; pure apart from drawing jitter from ``rng``."""
        kind = outcome.kind
        if kind is OutcomeKind.UNAUTHORIZED:
            return Decision(action=Action.STOP, reason="the API refused the token (401)")
        if kind is OutcomeKind.REJECTED:
            return Decision(
                action=Action.FAIL, reason=outcome.detail or "the API rejected the window"
            )
        if kind is OutcomeKind.BAD_DATA:
            return Decision(action=Action.FAIL, reason=outcome.detail or "the download is unusable")
        if kind is OutcomeKind.TOO_LARGE:
            return Decision(
                action=Action.SPLIT, split_ms=outcome.suggested_ms, reason=outcome.detail
            )
        if kind is OutcomeKind.READY:
            return Decision(action=Action.DOWNLOAD)
        if kind in (OutcomeKind.ACCEPTED, OutcomeKind.PROCESSING):
            if progress.elapsed_s >= self.request_timeout_s:
                return self._resubmit(progress, rng, "the request did not finish in time")
            return Decision(action=Action.POLL, delay_s=self.poll_delay(progress))
        if kind is OutcomeKind.FAILED:
            if progress.failures > self.failure_resubmits:
                reason = f"Flurry reported Failure {progress.failures} times; escalate to Flurry"
                return Decision(action=Action.FAIL, retryable=True, reason=reason)
            delay = self.backoff(progress.resubmits, rng)
            return Decision(action=Action.SUBMIT, delay_s=delay, reason="Flurry reported Failure")
        if kind in (OutcomeKind.RESULTS_EXPIRED, OutcomeKind.TIMED_OUT):
            return self._resubmit(progress, rng, outcome.detail or str(kind))
        return self._retry(outcome, progress, rng)

    def _resubmit(self, progress: Progress, rng: random.Random, reason: str) -> Decision:
        if progress.resubmits >= self.max_resubmits:
            reason = f"{reason}; gave up after {progress.resubmits} resubmits"
            return Decision(action=Action.FAIL, retryable=True, reason=reason)
        return Decision(
            action=Action.SUBMIT, delay_s=self.backoff(progress.resubmits, rng), reason=reason
        )

    def _retry(self, outcome: Outcome, progress: Progress, rng: random.Random) -> Decision:
        # RATE_LIMITED, SERVER_ERROR, TRANSPORT_ERROR, LINK_EXPIRED
        if progress.step_retries >= self.max_step_retries:
            reason = f"{outcome.kind} {progress.step_retries + 1} times in a row: {outcome.detail}"
            return Decision(action=Action.FAIL, retryable=True, reason=reason)
        if outcome.kind is OutcomeKind.LINK_EXPIRED:
            return Decision(action=Action.POLL, reason="the download link expired")
        floor = outcome.retry_after_s or 0.0
        if outcome.refill_per_minute:
            floor = max(floor, 60.0 / outcome.refill_per_minute)
        delay = self.backoff(progress.step_retries, rng, at_least=floor)
        return Decision(action=Action.RETRY, delay_s=delay, reason=str(outcome.kind))


@dataclass(slots=True)
class Estimator:
    """Processing time of requests, learned per kind of window (an EWMA of lower bounds).

    A request seen finished at ``ready_s`` after being seen still processing at ``pending_s``
    took between the two; the lower bound keeps the estimate from drifting up by our own
    lateness.  Seen finished at the first poll (no lower bound), it took at most ``ready_s``: the
    estimate moves 10% below that, so it can come down when requests get faster.
    """

    alpha: float = 0.5
    _seconds: dict[str, float] = field(default_factory=dict)

    def expected(self, key: str) -> float | None:
        return self._seconds.get(key)

    def observe(self, key: str, *, pending_s: float, ready_s: float) -> None:
        sample = pending_s if pending_s > 0 else 0.9 * ready_s
        old = self._seconds.get(key)
        self._seconds[key] = sample if old is None else old + self.alpha * (sample - old)


_KINDS: tuple[tuple[type[errors.BackfillError], OutcomeKind], ...] = (
    (errors.AuthError, OutcomeKind.UNAUTHORIZED),
    (errors.RateLimitedError, OutcomeKind.RATE_LIMITED),
    (errors.LinkExpiredError, OutcomeKind.LINK_EXPIRED),
    (errors.TransportError, OutcomeKind.TRANSPORT_ERROR),
    (errors.RetryableError, OutcomeKind.SERVER_ERROR),
    (errors.RequestFailedError, OutcomeKind.FAILED),
    (errors.RequestTimeoutError, OutcomeKind.TIMED_OUT),
    (errors.ResubmitError, OutcomeKind.RESULTS_EXPIRED),
    (errors.TooLargeError, OutcomeKind.TOO_LARGE),
    (errors.BadDataError, OutcomeKind.BAD_DATA),
    (errors.WindowFailedError, OutcomeKind.REJECTED),
)


def outcome_for(error: errors.BackfillError) -> Outcome:
    """The outcome an error stands for, decided by its class (never its message)."""
    kind = next((k for cls, k in _KINDS if isinstance(error, cls)), None)
    if kind is None:
        raise TypeError(f"{type(error).__name__} is not a window outcome")
    return Outcome(
        kind=kind,
        retry_after_s=getattr(error, "retry_after_s", None),
        refill_per_minute=getattr(error, "refill_per_minute", None),
        suggested_ms=getattr(error, "suggested_ms", None),
        detail=str(error),
    )
