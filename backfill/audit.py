"""What the ledger and the output say together: ``status`` rows and ``verify`` problems."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

import anyio.to_thread

from backfill import logs
from backfill.models import UNFINISHED, WindowState, iso

if TYPE_CHECKING:
    from collections.abc import Iterable

    from backfill.models import WindowRecord
    from backfill.ports import LedgerPort, StorePort

__all__ = [
    "AppCoverage",
    "AppStatus",
    "Problem",
    "coverage",
    "outcome_of_range",
    "status",
    "verify",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class AppStatus:
    """One app's line of ``backfill status``."""

    app: str
    committed: int
    failed: int
    pending: int  # every unfinished state
    split: int
    rows: int
    bytes: int
    first_day: str | None
    last_day: str | None  # the last day covered (the end is exclusive)
    gaps: tuple[tuple[str, str], ...]
    errors: tuple[tuple[str, str], ...]  # (window, last error) of each FAILED window

    def to_json(self) -> dict[str, Any]:
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
            "gaps": [{"start": a, "end": b} for a, b in self.gaps],
            "failures": [{"window": w, "error": e} for w, e in self.errors],
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class AppCoverage:
    """What the ledger holds for one app."""

    app: str
    states: dict[str, int] = field(default_factory=dict)
    rows: int = 0
    bytes: int = 0
    first_ms: int | None = None  # start of the earliest committed window
    last_ms: int | None = None  # end of the latest committed window
    gaps: tuple[tuple[int, int], ...] = ()  # planned ranges not committed, merged


def coverage(records: Iterable[WindowRecord]) -> list[AppCoverage]:
    """Per app: windows by state, rows and bytes landed, committed span and the gaps."""
    by_app: dict[str, list[WindowRecord]] = {}
    for record in records:
        by_app.setdefault(record.window.app, []).append(record)
    result = []
    for app, group in sorted(by_app.items()):
        states: dict[str, int] = {}
        for r in group:
            states[r.state] = states.get(r.state, 0) + 1
        leaves = [r for r in group if r.state is not WindowState.SPLIT]
        done = [r for r in leaves if r.committed_attempt is not None]
        holes: list[tuple[int, int]] = []
        for r in leaves:
            if r.committed_attempt is None:
                if holes and holes[-1][1] == r.window.start:
                    holes[-1] = (holes[-1][0], r.window.end)
                else:
                    holes.append((r.window.start, r.window.end))
        result.append(
            AppCoverage(
                app=app,
                states=states,
                rows=sum(r.rows or 0 for r in done),
                bytes=sum(r.bytes or 0 for r in done),
                first_ms=min((r.window.start for r in done), default=None),
                last_ms=max((r.window.end for r in done), default=None),
                gaps=tuple(holes),
            )
        )
    return result


async def status(ledger: LedgerPort, apps: Iterable[str]) -> list[AppStatus]:
    """Per app: windows by state, rows and bytes landed, the days covered, gaps and failures."""
    names = list(apps)
    covered = {c.app: c for c in coverage(await ledger.windows(apps=names))}
    failed = await ledger.windows(apps=names, states=[WindowState.FAILED])
    out = []
    for name in names:
        c = covered.get(name)
        states = c.states if c else {}
        unfinished = sum(n for s, n in states.items() if s not in ("COMMITTED", "FAILED", "SPLIT"))
        out.append(
            AppStatus(
                app=name,
                committed=states.get("COMMITTED", 0),
                failed=states.get("FAILED", 0),
                pending=unfinished,
                split=states.get("SPLIT", 0),
                rows=c.rows if c else 0,
                bytes=c.bytes if c else 0,
                first_day=iso(c.first_ms)[:10] if c and c.first_ms is not None else None,
                last_day=iso(c.last_ms - 1)[:10] if c and c.last_ms is not None else None,
                gaps=tuple((iso(a), iso(b)) for a, b in c.gaps) if c else (),
                errors=tuple(
                    (r.window.label, logs.scrub(r.error_message or r.error_class or "?"))
                    for r in failed
                    if r.window.app == name
                ),  # fmt: skip
            )
        )
    return out


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
