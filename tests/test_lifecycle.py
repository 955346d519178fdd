"""The lifecycle table: every (state, event) pair, synchronously, no server, no clock."""

from __future__ import annotations

import itertools
import random

import pytest

from backfill import errors
from backfill.lifecycle import TABLE, Effect, Event, Outcome, Progress, Step, decide, outcome_of
from backfill.models import DAY_MS, HOUR_MS, TRANSITIONS, UNFINISHED, WindowState
from backfill.policy import Policy

S, E, F = WindowState, Event, Effect
P = Policy()
UNEXPECTED = (S.FAILED, F.FAIL)  # an event out of turn fails an unfinished window, retryably

# The expected (next state, effect) of every pair, written out by hand, with the default
# Progress().  A pair missing from a state's row is an event out of turn there.
_TRANSIENT = {E.RATE_LIMITED, E.SERVER_ERROR, E.TRANSPORT_ERROR}
_STOP_OR_LEAVE = {E.STOPPING: (None, F.LEAVE), E.UNAUTHORIZED: (None, F.STOP)}
EXPECTED: dict[WindowState, dict[Event, tuple[WindowState | None, Effect]]] = {
    S.PENDING: {
        E.START: (None, F.SUBMIT),
        E.ACCEPTED: (S.SUBMITTED, F.POLL),
        E.TOO_LARGE: (S.SPLIT, F.SPLIT),
        E.REJECTED: (S.FAILED, F.FAIL),
        E.BAD_DATA: (S.FAILED, F.FAIL),
        **dict.fromkeys(_TRANSIENT, (None, F.SUBMIT)),
        **_STOP_OR_LEAVE,
    },
    S.SUBMITTED: {
        E.START: (S.SUBMITTED, F.POLL),
        E.PROCESSING: (S.SUBMITTED, F.POLL),
        E.READY: (S.READY, F.DOWNLOAD),
        E.FAILED: (S.PENDING, F.RESUBMIT),
        E.TOO_LARGE: (S.SPLIT, F.SPLIT),
        E.RESULTS_EXPIRED: (S.PENDING, F.RESUBMIT),
        E.TIMED_OUT: (S.PENDING, F.RESUBMIT),
        E.REJECTED: (S.FAILED, F.FAIL),
        E.BAD_DATA: (S.FAILED, F.FAIL),
        **dict.fromkeys(_TRANSIENT, (None, F.POLL)),
        **_STOP_OR_LEAVE,
    },
    S.READY: {
        E.START: (None, F.LINK),
        E.READY: (S.READY, F.DOWNLOAD),
        E.PROCESSING: (None, F.LINK),
        E.DOWNLOADED: (S.DOWNLOADED, F.LAND),
        E.LINK_EXPIRED: (None, F.LINK),
        E.FAILED: (S.PENDING, F.RESUBMIT),
        E.RESULTS_EXPIRED: (S.PENDING, F.RESUBMIT),
        E.REJECTED: (S.FAILED, F.FAIL),
        E.BAD_DATA: (S.FAILED, F.FAIL),
        **dict.fromkeys(_TRANSIENT, (None, F.DOWNLOAD)),
        **_STOP_OR_LEAVE,
    },
    S.DOWNLOADED: {
        E.START: (None, F.LAND),
        E.HELD: (None, F.DONE),
        E.DOWNLOAD_LOST: (S.PENDING, F.RESUBMIT),
        E.REJECTED: (S.FAILED, F.FAIL),
        E.BAD_DATA: (S.FAILED, F.FAIL),
        **_STOP_OR_LEAVE,
    },
    S.STAGED: {E.START: (S.PENDING, F.RESUBMIT), **_STOP_OR_LEAVE},
    S.COMMITTED: {E.START: (None, F.DONE), E.COMMITTED: (None, F.DONE), E.STOPPING: (None, F.DONE)},
    S.SPLIT: {E.START: (None, F.DONE), E.STOPPING: (None, F.DONE)},
    S.FAILED: {E.START: (None, F.DONE), E.STOPPING: (None, F.DONE)},
}

# The step that failed, for the transient events (a retry repeats it).
_AFTER = {S.PENDING: F.SUBMIT, S.SUBMITTED: F.POLL, S.READY: F.DOWNLOAD}


def _decide(
    state: WindowState, event: Event, progress: Progress | None = None, **facts: object
) -> Step:
    after = _AFTER.get(state)
    outcome = Outcome(event=event, after=after, **facts)  # type: ignore[arg-type]  # facts are Outcome fields
    return decide(state, outcome, progress or Progress(), P, random.Random(1))


@pytest.mark.parametrize(("state", "event"), list(itertools.product(S, E)))
def test_every_state_and_event_pair(state: WindowState, event: Event) -> None:
    default = UNEXPECTED if state in UNFINISHED else (None, F.DONE)
    target, effect = EXPECTED[state].get(event, default)
    step = _decide(state, event)
    assert (step.state, step.effect) == (target or state, effect)
    if step.state is not state:  # a move the table asks for is a legal ledger edge
        assert step.state in TRANSITIONS[state], (state, step.state)
    if state in UNFINISHED and event not in EXPECTED[state]:
        assert step.retryable and f"unexpected {event} while {state}" in step.reason


def test_the_table_has_a_rule_for_exactly_the_expected_pairs() -> None:
    for state in S:
        assert set(TABLE[state]) == set(EXPECTED[state]), state


@pytest.mark.parametrize(
    ("state", "event", "progress", "effect", "retryable"),
    [
        (S.SUBMITTED, E.PROCESSING, Progress(polls=3, elapsed_s=100), F.POLL, False),
        (S.SUBMITTED, E.PROCESSING, Progress(elapsed_s=7 * 3600), F.RESUBMIT, False),
        (S.SUBMITTED, E.PROCESSING, Progress(elapsed_s=7 * 3600, resubmits=3), F.FAIL, True),
        (S.SUBMITTED, E.FAILED, Progress(failures=0), F.RESUBMIT, False),
        (S.SUBMITTED, E.FAILED, Progress(failures=1), F.FAIL, False),  # a person decides
        (S.SUBMITTED, E.SERVER_ERROR, Progress(step_retries=2), F.POLL, False),
        (S.SUBMITTED, E.SERVER_ERROR, Progress(step_retries=8), F.FAIL, True),
        (S.PENDING, E.TRANSPORT_ERROR, Progress(step_retries=8), F.FAIL, True),
        (S.READY, E.LINK_EXPIRED, Progress(step_retries=8), F.FAIL, True),
        (S.READY, E.PROCESSING, Progress(step_retries=3), F.LINK, False),
        (S.READY, E.PROCESSING, Progress(step_retries=8), F.FAIL, True),
        (S.SUBMITTED, E.RESULTS_EXPIRED, Progress(resubmits=3), F.FAIL, True),
        (S.SUBMITTED, E.TIMED_OUT, Progress(resubmits=2), F.RESUBMIT, False),
        (S.PENDING, E.REJECTED, Progress(), F.FAIL, False),
        (S.DOWNLOADED, E.BAD_DATA, Progress(), F.FAIL, False),
    ],
)
def test_the_policy_numbers_decide_when_to_give_up(
    state: WindowState, event: Event, progress: Progress, effect: Effect, retryable: bool
) -> None:
    step = _decide(state, event, progress)
    assert step.effect is effect
    assert step.retryable is retryable


def test_counts_move_with_the_steps() -> None:
    polled = _decide(S.SUBMITTED, E.PROCESSING, Progress(polls=2, step_retries=3))
    assert (polled.progress.polls, polled.progress.step_retries) == (3, 0)
    retried = _decide(S.SUBMITTED, E.SERVER_ERROR, Progress(step_retries=2))
    assert retried.progress.step_retries == 3
    failure = _decide(S.SUBMITTED, E.FAILED, Progress(resubmits=0))
    assert (failure.progress.failures, failure.progress.resubmits) == (1, 1)
    ready = _decide(S.SUBMITTED, E.READY, Progress(polls=4, step_retries=1))
    assert (ready.progress.polls, ready.progress.step_retries) == (5, 0)


def test_a_window_that_outgrew_its_app_size_is_split_without_a_call() -> None:
    week = _decide(S.PENDING, E.START, window_ms=30 * DAY_MS, planned_ms=7 * DAY_MS)
    assert (week.state, week.effect, week.split_ms) == (S.SPLIT, F.SPLIT, 7 * DAY_MS)
    dst = _decide(S.PENDING, E.START, window_ms=7 * DAY_MS + HOUR_MS, planned_ms=7 * DAY_MS)
    assert dst.effect is F.SUBMIT, "a DST hour more is still the planned size"


def test_backoff_honours_retry_after_and_the_refill_rate_and_a_429_at_submit_closes_the_gate() -> (
    None
):
    limited = _decide(S.PENDING, E.RATE_LIMITED, retry_after_s=42.0)
    assert limited.delay_s >= 42.0 and limited.close_gate
    refill = _decide(S.PENDING, E.RATE_LIMITED, refill_per_minute=2.0)
    assert refill.delay_s >= 30.0
    at_poll = _decide(S.SUBMITTED, E.RATE_LIMITED, retry_after_s=5.0)
    assert at_poll.delay_s >= 5.0 and not at_poll.close_gate, "polls go on"


def test_poll_delays_follow_the_schedule() -> None:
    first = _decide(S.PENDING, E.ACCEPTED)
    assert first.delay_s == P.poll_initial_s
    later = _decide(S.SUBMITTED, E.PROCESSING, Progress(polls=5, elapsed_s=600))
    assert later.delay_s == pytest.approx(0.25 * 600), "a quarter of the time so far"
    capped = _decide(S.SUBMITTED, E.PROCESSING, Progress(polls=9, elapsed_s=4 * 3600))
    assert capped.delay_s == P.poll_max_s


def test_a_split_carries_the_suggested_size() -> None:
    assert _decide(S.PENDING, E.TOO_LARGE, suggested_ms=DAY_MS).split_ms == DAY_MS
    assert _decide(S.SUBMITTED, E.TOO_LARGE).split_ms is None


def test_outcome_of_maps_every_error_class() -> None:
    cases = {
        errors.AuthError("x"): E.UNAUTHORIZED,
        errors.RateLimitedError("x", retry_after_s=2, refill_per_minute=6): E.RATE_LIMITED,
        errors.LinkExpiredError("x"): E.LINK_EXPIRED,
        errors.TransportError("x"): E.TRANSPORT_ERROR,
        errors.ServerError("x"): E.SERVER_ERROR,
        errors.RequestFailedError("x"): E.FAILED,
        errors.ResultsExpiredError("x"): E.RESULTS_EXPIRED,
        errors.RequestTimeoutError("x"): E.TIMED_OUT,
        errors.TooLargeError("x", suggested_ms=DAY_MS): E.TOO_LARGE,
        errors.BadDataError("x"): E.BAD_DATA,
        errors.RequestRejectedError("x"): E.REJECTED,
        errors.CannotSplitError("x"): E.REJECTED,
    }
    for error, event in cases.items():
        assert outcome_of(error).event is event, error
    limited = outcome_of(
        errors.RateLimitedError("x", retry_after_s=2, refill_per_minute=6, limit=3)
    )
    assert (limited.retry_after_s, limited.refill_per_minute, limited.limit) == (2, 6, 3)
    assert outcome_of(errors.TooLargeError("x", suggested_ms=DAY_MS)).suggested_ms == DAY_MS
    with pytest.raises(TypeError):
        outcome_of(errors.ConfigError("x"))


@pytest.mark.parametrize("after_s", [1e9, float("inf"), float("nan")])
def test_a_huge_or_absurd_retry_after_is_clamped_to_the_backoff_cap(after_s: float) -> None:
    step = _decide(S.PENDING, E.RATE_LIMITED, retry_after_s=after_s)
    assert step.effect is F.SUBMIT and step.delay_s <= P.backoff_cap_s
    assert _decide(S.SUBMITTED, E.RATE_LIMITED, refill_per_minute=0.0).delay_s <= P.backoff_cap_s
