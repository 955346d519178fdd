"""The policy's numbers: backoff with jitter, and the poll schedule."""

from __future__ import annotations

import random

import pytest

from backfill.policy import Policy

P = Policy()


def test_backoff_is_full_jitter_under_the_cap_and_honours_a_floor() -> None:
    rng = random.Random(3)
    for retries in range(12):
        ceiling = min(P.backoff_cap_s, P.backoff_base_s * 2**retries)
        draws = [P.backoff(retries, rng) for _ in range(200)]
        assert all(0 <= d <= ceiling for d in draws)
        assert max(draws) > ceiling * 0.8 and min(draws) < ceiling * 0.2, "spread over the range"
    assert P.backoff(0, rng, at_least=42.0) >= 42.0


def _simulate_polls(
    policy: Policy, processing_s: float, expected_s: float | None
) -> tuple[int, float]:
    """Poll a request of ``processing_s`` until seen finished; return (polls, lateness)."""
    elapsed, polls = 0.0, 0
    while True:
        elapsed += policy.poll_delay(polls=polls, elapsed=elapsed, expected=expected_s)
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
