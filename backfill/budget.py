"""The API budget of one run: requests processing at Flurry, calls a minute, the submit gate.

Theory of operation.  Flurry limits the requests processing at once per token and answers 429
past it.  A window holds a ``Slot`` (its app's place, then a global one) from the moment it
submits until its request is finished, so at most ``max_in_flight`` requests are processing.
Every call waits its turn at a token-bucket ``Pacer`` (``calls_per_minute``, in bursts of a
tenth).  A 429 at submit closes the submit gate for its ``Retry-After`` (polls go on) and
lowers the cap to the ``X-RateLimit-Limit`` it reports.  Downloads and conversions have their
own caps.

With a ledger shared by many workers (``LedgerPort.shared``), Flurry's limits are the token's,
not the process's: a ``Budget`` given that ledger (``shared``) keeps the local caps as an upper
bound and takes every slot, every call and the 429 gate through the ledger too
(``take_slot``, ``take_call``, ``close_gate``), where a lock makes the count exact across
processes and machines.  A slot of
a worker that died runs out with its lease; the worker that takes its window over takes it.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, cast

import anyio

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable

    from backfill.config import Settings
    from backfill.ports import LedgerPort, SharedLedger

__all__ = ["Budget", "Pacer", "SharedPacer", "SharedSlot", "Slot"]

_RETRY_S = 0.1  # how often a worker waiting for a shared slot asks the ledger again (~1 ms a call)


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

    async def release(self) -> None:
        self._release()

    def _release(self) -> None:
        if self.held:
            self._limiters[1].release_on_behalf_of(self)
            self._limiters[0].release_on_behalf_of(self)
            self.held = False


class SharedSlot(Slot):
    """A slot counted in the ledger too, so every worker of the ledger shares the caps."""

    def __init__(
        self,
        app: anyio.CapacityLimiter,
        everyone: anyio.CapacityLimiter,
        *,
        ledger: SharedLedger,
        window_id: int,
        app_name: str,
        caps: tuple[int, int],
        lease_ms: int,
    ) -> None:
        super().__init__(app, everyone)
        self.ledger, self.window_id, self.app_name = ledger, window_id, app_name
        self.caps, self.lease_ms = caps, lease_ms
        self.shared = False

    async def acquire(self) -> None:
        await super().acquire()
        try:
            while not self.shared:
                with anyio.CancelScope(shield=True):  # a slot taken is known to be taken
                    self.shared = await self.ledger.take_slot(
                        self.window_id, self.app_name, max_in_flight=self.caps[0],
                        max_per_app=self.caps[1], lease_ms=self.lease_ms,
                    )  # fmt: skip
                if not self.shared:
                    await anyio.sleep(_RETRY_S)
        except BaseException:
            await self.release()
            raise

    async def release(self) -> None:
        try:
            if self.shared:
                self.shared = False
                with anyio.CancelScope(shield=True):
                    await self.ledger.give_slot(self.window_id)
        finally:
            self._release()


class SharedPacer(Pacer):
    """The calls a minute of every worker of the ledger, from one bucket in the ledger."""

    def __init__(self, per_minute: int, clock: Callable[[], float], ledger: SharedLedger) -> None:
        super().__init__(per_minute, clock)
        self.per_minute = per_minute
        self.ledger = ledger

    async def wait(self) -> None:
        await super().wait()
        while True:  # the bucket is in the ledger: only asking again tells when it refills
            wait = await self.ledger.take_call(per_minute=self.per_minute)
            if wait <= 0:
                return
            await anyio.sleep(min(wait, 5.0))


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
        shared: SharedLedger | None = None,
        lease_ms: int = 60_000,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.clock = clock
        self.shared, self.lease_ms, self.wall = shared, lease_ms, wall
        self.per_app_cap = max_in_flight_per_app
        self.in_flight = anyio.CapacityLimiter(max_in_flight)
        per_app = max_in_flight_per_app or max_in_flight
        self._per_app = {app: anyio.CapacityLimiter(per_app) for app in apps}
        self.downloads = anyio.CapacityLimiter(downloads_at_once)
        self.conversions = anyio.CapacityLimiter(conversions_at_once)
        self.pacer = (
            Pacer(calls_per_minute, clock)
            if shared is None
            else SharedPacer(calls_per_minute, clock, shared)
        )
        self.gate_opens_at = 0.0

    @classmethod
    def of(cls, settings: Settings, ledger: LedgerPort, clock: Callable[[], float]) -> Budget:
        """A run's budget: ``[api]``'s caps, counted in the ledger too when workers share it."""
        a = settings.api
        return cls(
            apps=[app.name for app in settings.apps],
            max_in_flight=a.max_in_flight,
            max_in_flight_per_app=a.max_in_flight_per_app,
            calls_per_minute=a.calls_per_minute,
            downloads_at_once=a.downloads_at_once,
            conversions_at_once=a.conversions_at_once,
            clock=clock,
            shared=cast("SharedLedger", ledger) if ledger.shared else None,
            lease_ms=int(settings.ledger.lease_s * 1000),
        )

    @property
    def processing(self) -> int:
        """Requests of this run processing at Flurry now."""
        return int(self.in_flight.borrowed_tokens)

    def slot(self, app: str, window_id: int) -> Slot:
        """``window_id``'s place among the requests processing (counted in a shared ledger)."""
        if self.shared is None:
            return Slot(self._per_app[app], self.in_flight)
        caps = (int(self.in_flight.total_tokens), self.per_app_cap)
        return SharedSlot(self._per_app[app], self.in_flight, ledger=self.shared,
                          window_id=window_id, app_name=app, caps=caps,
                          lease_ms=self.lease_ms)  # fmt: skip

    async def gate_wait(self) -> float:
        """Seconds until submits may go again (0 when the gate is open)."""
        wait = max(0.0, self.gate_opens_at - self.clock())
        if self.shared is not None:
            wait = max(wait, await self.shared.gate_until() / 1000 - self.wall())
        return wait

    async def close_gate(self, seconds: float, limit: int | None) -> None:
        """A 429 at submit: no app submits for ``seconds``; the cap drops to ``limit``."""
        self.gate_opens_at = max(self.gate_opens_at, self.clock() + seconds)
        if limit and limit < self.in_flight.total_tokens:
            self.in_flight.total_tokens = max(1, limit)  # Flurry told us its cap
        if self.shared is not None:
            await self.shared.close_gate(int((self.wall() + seconds) * 1000))
