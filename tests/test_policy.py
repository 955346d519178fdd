"""The policy: one decision per outcome, backoff with jitter, and the poll schedule."""

from __future__ import annotations

import random

import pytest

from backfill import errors
from backfill.models import DAY_MS, Outcome, OutcomeKind
from backfill.policy import Action, Policy, Progress, outcome_for

K = OutcomeKind
P = Policy()


def _decide(kind: OutcomeKind, progress: Progress | None = None, **outcome: object) -> object:
    return P.decide(Outcome(kind=kind, **outcome), progress or Progress(), random.Random(1))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("kind", "progress", "action", "retryable"),
    [
        (K.ACCEPTED, Progress(), Action.POLL, False),
        (K.PROCESSING, Progress(polls=3, elapsed_s=100), Action.POLL, False),
        (K.PROCESSING, Progress(elapsed_s=7 * 3600), Action.SUBMIT, False),
        (K.PROCESSING, Progress(elapsed_s=7 * 3600, resubmits=3), Action.FAIL, True),
        (K.READY, Progress(), Action.DOWNLOAD, False),
        (K.FAILED, Progress(failures=1), Action.SUBMIT, False),
        (K.FAILED, Progress(failures=2), Action.FAIL, True),
        (K.TOO_LARGE, Progress(), Action.SPLIT, False),
        (K.RATE_LIMITED, Progress(), Action.RETRY, False),
        (K.SERVER_ERROR, Progress(step_retries=2), Action.RETRY, False),
        (K.SERVER_ERROR, Progress(step_retries=8), Action.FAIL, True),
        (K.TRANSPORT_ERROR, Progress(), Action.RETRY, False),
        (K.LINK_EXPIRED, Progress(), Action.POLL, False),
        (K.LINK_EXPIRED, Progress(step_retries=8), Action.FAIL, True),
        (K.RESULTS_EXPIRED, Progress(), Action.SUBMIT, False),
        (K.RESULTS_EXPIRED, Progress(resubmits=3), Action.FAIL, True),
        (K.TIMED_OUT, Progress(), Action.SUBMIT, False),
        (K.UNAUTHORIZED, Progress(), Action.STOP, False),
        (K.REJECTED, Progress(), Action.FAIL, False),
        (K.BAD_DATA, Progress(), Action.FAIL, False),
    ],
)
def test_decisions(kind: OutcomeKind, progress: Progress, action: Action, retryable: bool) -> None:
    decision = _decide(kind, progress)
    assert decision.action is action  # type: ignore[attr-defined]
    assert decision.retryable is retryable  # type: ignore[attr-defined]


def test_split_carries_the_suggested_size() -> None:
    assert _decide(K.TOO_LARGE, suggested_ms=DAY_MS).split_ms == DAY_MS  # type: ignore[attr-defined]
    assert _decide(K.TOO_LARGE).split_ms is None  # type: ignore[attr-defined]


def test_backoff_is_full_jitter_under_the_cap_and_honours_retry_after() -> None:
    rng = random.Random(3)
    for retries in range(12):
        ceiling = min(P.backoff_cap_s, P.backoff_base_s * 2**retries)
        draws = [P.backoff(retries, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8 and min(draws) < ceiling * 0.2, "spread over the range"
    limited = _decide(K.RATE_LIMITED, retry_after_s=42.0)
    assert limited.delay_s >= 42.0  # type: ignore[attr-defined]
    refill = _decide(K.RATE_LIMITED, refill_per_minute=2.0)
    assert refill.delay_s >= 30.0  # type: ignore[attr-defined]


def _simulate_polls(
    policy: Policy, processing_s: float, expected_s: float | None
) -> tuple[int, float]:
    """Poll a request of ``processing_s`` until seen finished; return (polls, lateness)."""
    elapsed, polls = 0.0, 0
    while True:
        elapsed += policy.poll_delay(
            Progress(polls=polls, elapsed_s=elapsed, expected_s=expected_s)
        )
        polls += 1
        if elapsed >= processing_s:
            return polls, elapsed - processing_s


@pytest.mark.parametrize("processing_s", [10.0, 60.0, 1800.0, 4 * 3600.0])
def test_poll_schedule_without_an_estimate_is_logarithmic_and_late_by_a_bounded_fraction(
    processing_s: float,
) -> None:
    polls, late = _simulate_polls(P, processing_s, None)
    assert polls <= P.expected_polls(processing_s) + 1
    assert late <= max(
        P.poll_initial_s,
        (P.poll_growth - 1) * processing_s * P.poll_growth,
    )
    assert polls < processing_s / 30 or processing_s <= 60, "far fewer than a fixed 30 s interval"


def test_poll_schedule_with_an_estimate_lands_on_it() -> None:
    polls, late = _simulate_polls(P, 1800.0, 1790.0)
    assert polls <= 3
    assert late <= 0.25 * 1800


def test_outcome_for_maps_every_error_class() -> None:
    cases = {
        errors.AuthError("x"): K.UNAUTHORIZED,
        errors.RateLimitedError("x", retry_after_s=2, refill_per_minute=6): K.RATE_LIMITED,
        errors.LinkExpiredError("x"): K.LINK_EXPIRED,
        errors.TransportError("x"): K.TRANSPORT_ERROR,
        errors.ServerError("x"): K.SERVER_ERROR,
        errors.RequestFailedError("x"): K.FAILED,
        errors.ResultsExpiredError("x"): K.RESULTS_EXPIRED,
        errors.RequestTimeoutError("x"): K.TIMED_OUT,
        errors.TooLargeError("x", suggested_ms=DAY_MS): K.TOO_LARGE,
        errors.BadDataError("x"): K.BAD_DATA,
        errors.RequestRejectedError("x"): K.REJECTED,
        errors.CannotSplitError("x"): K.REJECTED,
    }
    for error, kind in cases.items():
        assert outcome_for(error).kind is kind, error
    limited = outcome_for(errors.RateLimitedError("x", retry_after_s=2, refill_per_minute=6))
    assert (limited.retry_after_s, limited.refill_per_minute) == (2, 6)
    assert outcome_for(errors.TooLargeError("x", suggested_ms=DAY_MS)).suggested_ms == DAY_MS
    with pytest.raises(TypeError):
        outcome_for(errors.ConfigError("x"))
