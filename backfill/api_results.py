"""The typed results of ``backfill.api``: what a run did, what a plan would do, how apps stand.

Every result is a frozen dataclass with ``to_json``; ``RunResult.to_json`` is the end-of-run
record that ``--summary-json`` prints and the ``run.summary.done`` log line carries.
"""

from __future__ import annotations

import contextlib
import datetime as dt
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from backfill import ledgers, logs
from backfill.models import WindowState, iso

if TYPE_CHECKING:
    from collections.abc import Mapping

    from backfill.audit import AppStatus
    from backfill.config import Settings
    from backfill.events import AppTally, Summary

__all__ = [
    "AppOutcome",
    "Failure",
    "PlanResult",
    "PlannedWindow",
    "RunResult",
    "StatusResult",
    "When",
    "instant",
    "plan_windows",
    "result_of",
]

# An instant as the API takes it: a date (midnight UTC), a datetime (UTC if naive), ISO text,
# epoch milliseconds, or None (the default of the command).
When = dt.date | dt.datetime | str | int | None


def instant(when: When) -> int | None:
    """``when`` as epoch ms (see ``When``)."""
    if when is None or isinstance(when, int):
        return when
    if isinstance(when, str):
        when = dt.datetime.fromisoformat(when)
    if not isinstance(when, dt.datetime):
        when = dt.datetime(when.year, when.month, when.day)
    if when.tzinfo is None:
        when = when.replace(tzinfo=dt.UTC)
    return int(when.timestamp() * 1000)


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """A window that failed in this run, and why (scrubbed)."""

    app: str
    window: str
    reason: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AppOutcome:
    """One app's windows in this run."""

    app: str
    committed: int
    failed: int
    split: int
    rows: int
    bytes: int


@dataclass(frozen=True, slots=True, kw_only=True)
class RunResult:
    """What one run, sync, retry or refresh did, and its exit code (the CLI's)."""

    command: str
    exit_code: int
    committed: int
    split: int
    failed: int
    rows: int
    bytes: int
    wall_s: float
    interrupted: bool
    fatal: str | None
    calls: Mapping[str, int]
    failures: tuple[Failure, ...]
    apps: tuple[AppOutcome, ...]

    @property
    def ok(self) -> bool:
        """Every requested window committed."""
        return self.exit_code == 0

    def to_json(self) -> dict[str, Any]:
        """The end-of-run record, one JSON object."""
        return {
            "command": self.command,
            "exit_code": self.exit_code,
            "committed": self.committed,
            "failed": self.failed,
            "split": self.split,
            "rows": self.rows,
            "bytes": self.bytes,
            "wall_s": round(self.wall_s, 3),
            "calls": dict(self.calls),
            "failures": [
                {"app": f.app, "window": f.window, "reason": f.reason} for f in self.failures
            ],  # fmt: skip
            "apps": {
                a.app: {
                    "committed": a.committed,
                    "failed": a.failed,
                    "split": a.split,
                    "rows": a.rows,
                    "bytes": a.bytes,
                }
                for a in self.apps
            },  # fmt: skip
            "interrupted": self.interrupted,
            "fatal": self.fatal,
        }


def result_of(command: str, summary: Summary, tallies: Mapping[str, AppTally]) -> RunResult:
    """The frozen result of an engine's ``summary`` and per-app ``tallies``."""
    return RunResult(
        command=command,
        exit_code=summary.exit_code,
        committed=summary.committed,
        split=summary.split,
        failed=summary.failed,
        rows=summary.rows,
        bytes=summary.bytes,
        wall_s=summary.wall_s,
        interrupted=summary.interrupted,
        fatal=None if summary.fatal is None else logs.scrub(summary.fatal),
        calls=dict(summary.calls),
        failures=tuple(
            Failure(app=app, window=window, reason=logs.scrub(reason))
            for app, window, reason in summary.failures
        ),
        apps=tuple(
            AppOutcome(
                app=name,
                committed=t.committed,
                failed=t.failed,
                split=t.split,
                rows=t.rows,
                bytes=t.bytes,
            )
            for name, t in sorted(tallies.items())
        ),  # fmt: skip
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class PlannedWindow:
    """A window of a plan: in the ledger with its state, or ``NEW``."""

    app: str
    start: str  # ISO, inclusive
    end: str  # ISO, exclusive
    state: str


@dataclass(frozen=True, slots=True, kw_only=True)
class PlanResult:
    """The windows a run of the range would work on."""

    windows: tuple[PlannedWindow, ...]

    @property
    def to_submit(self) -> int:
        """Requests a run would submit at least (every window not committed)."""
        return sum(1 for w in self.windows if w.state != WindowState.COMMITTED)

    def to_json(self) -> list[dict[str, str]]:
        return [{"app": w.app, "start": w.start, "end": w.end, "state": w.state}
                for w in self.windows]  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class StatusResult:
    """Each app's coverage (``backfill status``); empty before the first run."""

    apps: tuple[AppStatus, ...]

    def to_json(self) -> list[dict[str, Any]]:
        return [a.to_json() for a in self.apps]


async def plan_windows(
    settings: Settings, apps: list[str], start: int | None, end: int | None, now: int
) -> PlanResult:
    """``backfill plan``'s windows: per app, those in the ledger and its gaps planned NEW."""
    import zoneinfo

    from backfill import planner
    from backfill.audit import planned_windows

    w = settings.windows
    tz = zoneinfo.ZoneInfo(w.timezone)
    lo, hi, _ = planner.clamp(
        now, start, end, history_days=w.history_days, lag_hours=w.lag_hours, tz=tz
    )
    out: list[tuple[str, int, int, str]] = []
    async with contextlib.AsyncExitStack() as stack:
        ledger = (
            await stack.enter_async_context(ledgers.opened(settings))
            if settings.ledger_exists()
            else None
        )
        for app in apps:
            planned = await planned_windows(ledger, app, lo, hi, max_days=w.max_days, tz=tz)
            out += [(app, a, b, state) for a, b, state in planned]
    return PlanResult(
        windows=tuple(
            PlannedWindow(app=app, start=iso(a), end=iso(b), state=s) for app, a, b, s in out
        )  # fmt: skip
    )
