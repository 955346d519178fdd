"""What the ledger and the output say together: ``status`` rows and ``verify`` problems."""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread

from backfill import calendar, logs
from backfill.calendar import Day
from backfill.models import DAY_MS, UNFINISHED, WindowState

if TYPE_CHECKING:
    from collections.abc import Iterable

    from backfill.models import WindowRecord
    from backfill.ports import LedgerPort, StorePort

__all__ = [
    "AppCoverage",
    "AppStatus",
    "Failure",
    "Problem",
    "coverage",
    "outcome_of_range",
    "planned_windows",
    "status",
    "verify",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Failure:
    """One FAILED window of ``backfill status``: its range, its last error, whether it waits."""

    window: str
    error: str
    retryable: bool
    failures: int  # times it was moved to FAILED
    needs_person: bool  # not retryable, or failed ``heal_runs`` times: no run takes it back

    def to_json(self) -> dict[str, Any]:
        return {
            "window": self.window,
            "error": self.error,
            "retryable": self.retryable,
            "failures": self.failures,
            "needs_person": self.needs_person,
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AppStatus:
    """One app in ``backfill status``: its windows, and its days as the calendar shows them.

    ``days`` holds every UTC day of the app's planned span (the first planned window's start
    to the last one's end) with its ``calendar.Day``; ``gaps`` are the stretches of those days
    without committed rows, inclusive ``(first, last)`` ISO days.
    """

    app: str
    committed: int
    failed: int
    pending: int  # every unfinished state
    split: int
    rows: int
    bytes: int
    first_day: str | None  # the first day with committed rows
    last_day: str | None  # the last day with committed rows
    days: dict[dt.date, Day] = field(default_factory=dict)
    gaps: tuple[tuple[str, str], ...] = ()
    failures: tuple[Failure, ...] = ()

    @property
    def committed_days(self) -> int:
        return sum(1 for s in self.days.values() if s is Day.COMMITTED)

    @property
    def span(self) -> tuple[str, str] | None:
        """The first and last day of the planned span, if anything is planned."""
        return (min(self.days).isoformat(), max(self.days).isoformat()) if self.days else None

    def to_json(self) -> dict[str, Any]:
        span = self.span
        return {
            "app": self.app,
            "windows": {
                "committed": self.committed,
                "failed": self.failed,
                "pending": self.pending,
                "split": self.split,
            },  # fmt: skip
            "rows": self.rows,
            "bytes": self.bytes,
            "first_day": self.first_day,
            "last_day": self.last_day,
            "span": {"first": span[0], "last": span[1], "days": len(self.days)} if span else None,
            "committed_days": self.committed_days,
            "calendar": [{"month": m, "days": cells} for m, cells in calendar.months(self.days)],
            "gaps": [
                {"first": a, "last": b, "days": (_day(b) - _day(a)).days + 1} for a, b in self.gaps
            ],
            "failures": [f.to_json() for f in self.failures],
        }


def _day(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


@dataclass(frozen=True, slots=True, kw_only=True)
class AppCoverage:
    """What the ledger holds for one app."""

    app: str
    states: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0
    first_ms: int | None = None  # start of the earliest committed window
    last_ms: int | None = None  # end of the latest committed window
    gaps: tuple[tuple[int, int], ...] = ()  # stretches of the span without committed rows
    days: dict[dt.date, Day] = field(default_factory=dict)  # every day of the planned span


def _day_of_record(record: WindowRecord) -> Day | None:
    """How a window colours the days it holds: live files first, then its state."""
    if record.committed_attempt is not None:
        return Day.COMMITTED
    if record.state is WindowState.FAILED:
        return Day.FAILED
    return Day.PENDING if record.state in UNFINISHED else None


def coverage(records: Iterable[WindowRecord]) -> list[AppCoverage]:
    """Per app: windows by state, rows and bytes landed, committed span, its days and gaps.

    A window whose files are live (``committed_attempt`` set, whatever its state) makes its
    days committed; the gaps are the days of the planned span that are not, in epoch ms
    (clipped to the span).
    """
    by_app: dict[str, list[WindowRecord]] = {}
    for record in records:
        by_app.setdefault(record.window.app, []).append(record)
    result = []
    for app, group in sorted(by_app.items()):
        states: dict[str, int] = {}
        for r in group:
            states[r.state] = states.get(r.state, 0) + 1
        done = [r for r in group if r.committed_attempt is not None]
        lo = min(r.window.start for r in group)
        hi = max(r.window.end for r in group)
        coloured = [(r.window.start, r.window.end, _day_of_record(r)) for r in group]
        days = calendar.day_states([(a, b, d) for a, b, d in coloured if d], lo, hi)
        holes = calendar.runs(days, lambda d: d is not Day.COMMITTED)
        result.append(
            AppCoverage(
                app=app,
                states=states,
                rows=sum(r.rows or 0 for r in done),
                bytes=sum(r.bytes or 0 for r in done),
                first_ms=min((r.window.start for r in done), default=None),
                last_ms=max((r.window.end for r in done), default=None),
                gaps=tuple(
                    (max(lo, calendar.day_ms(a)), min(hi, calendar.day_ms(b) + DAY_MS))
                    for a, b in holes
                ),
                days=days,
            )
        )
    return result


async def status(
    ledger: LedgerPort, apps: Iterable[str], *, heal_runs: int | None = None
) -> list[AppStatus]:
    """Per app: windows by state, rows and bytes landed, its days, gaps and failures.

    A FAILED window needs a person when it is not retryable or failed ``heal_runs`` times
    (when given): no ``run`` or ``sync`` takes it back on its own.
    """
    names = list(apps)
    covered = {c.app: c for c in coverage(await ledger.windows(apps=names))}
    failed = await ledger.windows(apps=names, states=[WindowState.FAILED])
    out = []
    for name in names:
        c = covered.get(name) or AppCoverage(app=name)
        unfinished = sum(n for s, n in c.states.items() if s in UNFINISHED)
        with_rows = [d for d, s in c.days.items() if s is Day.COMMITTED]
        out.append(
            AppStatus(
                app=name,
                committed=c.states.get("COMMITTED", 0),
                failed=c.states.get("FAILED", 0),
                pending=unfinished,
                split=c.states.get("SPLIT", 0),
                rows=c.rows,
                bytes=c.bytes,
                first_day=min(with_rows).isoformat() if with_rows else None,
                last_day=max(with_rows).isoformat() if with_rows else None,
                days=c.days,
                gaps=tuple(
                    (calendar.day_of(a).isoformat(), calendar.day_of(b - 1).isoformat())
                    for a, b in c.gaps
                ),
                failures=tuple(_failure(r, heal_runs) for r in failed if r.window.app == name),
            )
        )
    return out


def _failure(record: WindowRecord, heal_runs: int | None) -> Failure:
    retryable = bool(record.retryable)
    worn = heal_runs is not None and record.failures >= heal_runs
    return Failure(
        window=record.window.label,
        error=logs.scrub(record.error_message or record.error_class or "?"),
        retryable=retryable,
        failures=record.failures,
        needs_person=not retryable or worn,
    )


@dataclass(frozen=True, slots=True, kw_only=True)
class Problem:
    """One thing ``verify`` found wrong; ``window_id`` names the window whose files it concerns.

    A problem with a window id is damage to that window's committed files (missing, changed,
    truncated, unreadable, or its manifest): ``refresh --damaged`` re-pulls exactly those.
    """

    window_id: int | None
    text: str

    def __str__(self) -> str:
        return self.text


async def verify(ledger: LedgerPort, store: StorePort) -> list[Problem]:
    """Every problem found: files against manifests, orphans, and ranges that overlap.

    Two kinds of overlap: live windows (not SPLIT) whose ranges overlap in the ledger, and any
    two windows whose files are live (``committed_attempt`` set, whatever their state: a SPLIT
    window keeps its files while its range is re-pulled) over overlapping ranges, which
    means rows a reader sees twice.
    """
    records = await ledger.windows()
    problems: list[Problem] = []
    live: set[tuple[int, int]] = set()
    for record in records:
        if record.committed_attempt is None:
            continue
        live.add((record.id, record.committed_attempt))
        path = store.manifest_path(record.window.app, record.id, record.committed_attempt)
        found = await anyio.to_thread.run_sync(store.check_manifest, path, record.rows)
        problems += [Problem(window_id=record.id, text=text) for text in found]
    orphans = await anyio.to_thread.run_sync(store.orphans, live)
    problems += [Problem(window_id=None, text=text) for text in orphans]
    planned = [r for r in records if r.state is not WindowState.SPLIT]
    problems += _overlaps(planned, "windows overlap")
    landed = [r for r in records if r.committed_attempt is not None]
    problems += _overlaps(landed, "live files overlap (rows are visible twice)")
    return problems


def _overlaps(records: Iterable[WindowRecord], what: str) -> list[Problem]:
    """One problem per window whose range starts inside an earlier one of the same app."""
    by_app: dict[str, list[WindowRecord]] = {}
    for record in records:
        by_app.setdefault(record.window.app, []).append(record)
    out = []
    for app, group in sorted(by_app.items()):
        group.sort(key=lambda r: (r.window.start, r.window.end))
        reach: WindowRecord | None = None  # the window reaching furthest so far
        for record in group:
            if reach is not None and record.window.start < reach.window.end:
                out.append(
                    Problem(
                        window_id=None,
                        text=f"{app}: {what}: window {reach.id} {reach.window.label} and "
                        f"window {record.id} {record.window.label}",
                    )
                )
            if reach is None or record.window.end > reach.window.end:
                reach = record
    return out


async def planned_windows(
    ledger: LedgerPort | None, app: str, start: int, end: int, *, max_days: int, tz: dt.tzinfo
) -> list[tuple[int, int, str]]:
    """``backfill plan``'s view of one app in ``[start, end)``: the windows the ledger has
    (with their state), and its gaps planned as a run would plan them (``"NEW"``), in order."""
    from backfill import planner

    records = await ledger.windows(apps=[app]) if ledger else []
    live = [
        r
        for r in records
        if r.state is not WindowState.SPLIT and r.window.end > start and r.window.start < end
    ]
    learned = await ledger.learned_size(app) if ledger else None
    size = planner.planned_size(max_days, learned)
    items = [(r.window.start, r.window.end, str(r.state)) for r in live]
    for lo, hi in planner.gaps([(r.window.start, r.window.end) for r in live], start, end):
        items += [(x.start, x.end, "NEW") for x in planner.plan(app, lo, hi, size_ms=size, tz=tz)]
    return sorted(items)


async def outcome_of_range(
    ledger: LedgerPort,
    apps: Iterable[str],
    start: int | None = None,
    end: int | None = None,
    *,
    heal_runs: int | None = None,
) -> Literal["done", "failed", "retryable", "unfinished"]:
    """How the windows of ``apps`` (in ``[start, end)`` if given) stand after a run.

    A FAILED window that is not retryable, or that failed ``heal_runs`` times already (no run
    takes it back on its own any more), is "failed": it needs a person.
    """
    records = await ledger.windows(apps=list(apps))
    live = [
        r
        for r in records
        if r.state is not WindowState.SPLIT
        and (start is None or r.window.end > start)
        and (end is None or r.window.start < end)
    ]

    def stuck(r: WindowRecord) -> bool:
        return not r.retryable or (heal_runs is not None and r.failures >= heal_runs)

    if any(r.state is WindowState.FAILED and stuck(r) for r in live):
        return "failed"
    if any(r.state is WindowState.FAILED for r in live):
        return "retryable"
    if any(r.state in UNFINISHED for r in live):
        return "unfinished"
    return "done"
