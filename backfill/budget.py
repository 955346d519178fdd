"""The API budget of one run: requests processing at Flurry, calls a minute, the submit gate.

Theory of operation.  Flurry limits the requests processing at once per token and answers 429
past it.  A window holds a ``Slot`` (its app's place, then a global one) from the moment it
submits until its request is finished, so at most ``max_in_flight`` requests are processing.
Every call waits its turn at a token-bucket ``Pacer`` (``calls_per_minute``, in bursts of a
tenth).  A 429 at submit closes the submit gate for its ``Retry-After`` (polls go on) and
lowers the cap to the ``X-RateLimit-Limit`` it reports.  Downloads and conversions have their
own caps.  This is the one place a shared budget across workers would replace.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

__all__ = ["Budget", "Pacer", "Slot"]


class Pacer:
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


class Slot:
    """One window's place among the requests processing at Flurry (its app's, then global).

    The slot itself is the borrower, so any task may take or give it back; ``acquire`` and
    ``release`` are idempotent.
    """

    def __init__(self, app: anyio.CapacityLimiter, everyone: anyio.CapacityLimiter) -> None:
        self._limiters = (app, everyone)
        self.held = False

    async def acquire(self) -> None:
        if not self.held:
            await self._limiters[0].acquire_on_behalf_of(self)
            try:
                await self._limiters[1].acquire_on_behalf_of(self)
            except BaseException:
                self._limiters[0].release_on_behalf_of(self)
                raise
            self.held = True

    def release(self) -> None:
        if self.held:
            self._limiters[1].release_on_behalf_of(self)
            self._limiters[0].release_on_behalf_of(self)
            self.held = False


class Budget:
    """The caps and the pacing every worker of a run shares."""

    def __init__(
        self,
        *,
        apps: Iterable[str],
        max_in_flight: int,
        max_in_flight_per_app: int,
        calls_per_minute: int,
        downloads_at_once: int,
        conversions_at_once: int,
        clock: Callable[[], float],
    ) -> None:
        self.clock = clock
        self.in_flight = anyio.CapacityLimiter(max_in_flight)
        per_app = max_in_flight_per_app or max_in_flight
        self._per_app = {app: anyio.CapacityLimiter(per_app) for app in apps}
        self.downloads = anyio.CapacityLimiter(downloads_at_once)
        self.conversions = anyio.CapacityLimiter(conversions_at_once)
        self.pacer = Pacer(calls_per_minute, clock)
        self.gate_opens_at = 0.0

    @property
    def processing(self) -> int:
        """Requests of this run processing at Flurry now."""
        return int(self.in_flight.borrowed_tokens)

    def slot(self, app: str) -> Slot:
        return Slot(self._per_app[app], self.in_flight)

    def gate_wait(self) -> float:
        """Seconds until submits may go again (0 when the gate is open)."""
        return max(0.0, self.gate_opens_at - self.clock())

    def close_gate(self, seconds: float, limit: int | None) -> None:
        """A 429 at submit: no app submits for ``seconds``; the cap drops to ``limit``."""
        self.gate_opens_at = max(self.gate_opens_at, self.clock() + seconds)
        if limit and limit < self.in_flight.total_tokens:
            self.in_flight.total_tokens = max(1, limit)  # Flurry told us its cap
