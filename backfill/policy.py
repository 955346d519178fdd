"""Pure policy: the lifecycle's numbers (backoff, poll schedule, resubmit limits).

Theory of operation.  ``lifecycle.decide`` says what follows each outcome; the numbers it needs
come from here.  Randomness (jitter) comes from an injected ``random.Random``; nothing here
sleeps or reads a clock.  The field names are the ``[api]`` keys of the config, which parses
them straight into a ``Policy``.

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
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import random

__all__ = ["Estimator", "Policy"]


@dataclass(frozen=True, slots=True, kw_only=True)
class Policy:
    """The tunables, as the ``[api]`` table names them; the defaults follow Flurry's advice."""

    poll_initial_s: float = 30.0
    poll_min_s: float = 1.0
    poll_max_s: float = 300.0
    request_timeout_s: float = 6 * 3600.0
    max_attempts: int = 8  # retries of one step (5xx, 429, connection) before the window fails
    backoff_base_s: float = 1.0  # full-jitter backoff: uniform in [0, base * 2**retries] ...
    backoff_cap_s: float = 300.0  # ... never above this
    failure_resubmits: int = 1  # Flurry's Failure is submitted again this many times
    max_resubmits: int = 3  # new requests after an overdue or expired one
    poll_growth: float = 1.25
    poll_fine: float = 0.05  # past the estimate, poll every 5% of it

    def backoff(self, retries: int, rng: random.Random, *, at_least: float = 0.0) -> float:
        """Full-jitter backoff for the ``retries``-th retry, never under ``at_least``."""
        ceiling = min(self.backoff_cap_s, self.backoff_base_s * 2 ** min(retries, 30))
        return max(at_least, rng.uniform(0.0, ceiling))

    def poll_delay(self, *, polls: int, elapsed: float, expected: float | None) -> float:
        """Seconds until the next status poll (see the module docstring for the schedule).

        ``polls`` made so far of a request accepted ``elapsed`` seconds ago, whose processing
        time is ``expected`` (None: no estimate yet).
        """
        if expected is not None:
            if elapsed < expected:
                return max(self.poll_min_s, expected - elapsed)
            if elapsed < 2 * expected:  # just past the estimate: look often, briefly
                return min(self.poll_max_s, max(self.poll_min_s, self.poll_fine * expected))
        elif polls == 0:
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
