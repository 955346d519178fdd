"""Pure window planning: tile a range with windows, split them, find the incremental range.

Theory of operation.  Windows are half-open ``[start, end)`` in epoch ms.  Inside a range,
every boundary falls on a local midnight of the configured zone (for windows of a day or more)
or on a multiple of the size from a local midnight (for windows under a day), so a window is
always whole local days, however long DST makes them; only the range's own ends may be
unaligned, when the user asked for that.  ``split`` re-plans a window at a smaller size, so the
children tile the parent exactly by construction.  Sizes go down the ladder
30 d → 7 d → 1 d → 6 h → 1 h; below an hour a window cannot be split.
"""

from __future__ import annotations

import datetime as dt
from typing import TYPE_CHECKING

from backfill.errors import CannotSplitError
from backfill.models import DAY_MS, HOUR_MS, WEEK_MS, Window

if TYPE_CHECKING:
    from collections.abc import Iterable

__all__ = [
    "FLOOR_MS",
    "HORIZON_DAYS",
    "LADDER",
    "ceil_midnight",
    "clamp",
    "floor_midnight",
    "full_range",
    "gaps",
    "horizon_start",
    "incremental_start",
    "next_size",
    "normal_size",
    "planned_size",
    "plan",
    "range_end",
    "split",
]

LADDER: tuple[int, ...] = (30 * DAY_MS, WEEK_MS, DAY_MS, 6 * HOUR_MS, HOUR_MS)
FLOOR_MS = HOUR_MS
HORIZON_DAYS = 730  # the API serves "the last 2 years"


def _date(ms: int, tz: dt.tzinfo) -> dt.date:
    return dt.datetime.fromtimestamp(ms / 1000, tz=tz).date()


def _midnight(day: dt.date, tz: dt.tzinfo) -> int:
    # A midnight that DST skips resolves (fold=0) to the transition instant: the day's first.
    return round(dt.datetime.combine(day, dt.time(), tzinfo=tz).timestamp() * 1000)


def floor_midnight(ms: int, tz: dt.tzinfo) -> int:
    """The last local midnight at or before ``ms``."""
    day = _date(ms, tz)
    start = _midnight(day, tz)
    return start if start <= ms else _midnight(day - dt.timedelta(days=1), tz)


def ceil_midnight(ms: int, tz: dt.tzinfo) -> int:
    """The first local midnight at or after ``ms``."""
    day = _date(ms, tz)
    start = _midnight(day, tz)
    return start if start >= ms else _midnight(day + dt.timedelta(days=1), tz)


def normal_size(size_ms: int) -> int:
    """A size the planner can align: whole days from a day up, at least an hour below."""
    if size_ms >= DAY_MS:
        return size_ms // DAY_MS * DAY_MS
    return max(FLOOR_MS, size_ms)


def _boundary(cur: int, size_ms: int, tz: dt.tzinfo) -> int:
    """The first aligned boundary after ``cur`` for windows of ``size_ms``."""
    day = _date(cur, tz)
    day_start = _midnight(day, tz)
    if day_start > cur:  # cur sits in a DST gap's shadow; the day began the day before
        day = day - dt.timedelta(days=1)
        day_start = _midnight(day, tz)
    if size_ms >= DAY_MS:
        return _midnight(day + dt.timedelta(days=size_ms // DAY_MS), tz)
    next_day = _midnight(day + dt.timedelta(days=1), tz)
    step = (cur - day_start) // size_ms + 1
    return min(day_start + step * size_ms, next_day)


def plan(
    app: str, start: int, end: int, *, size_ms: int = 30 * DAY_MS, tz: dt.tzinfo = dt.UTC
) -> list[Window]:
    """Tile ``[start, end)`` with windows of at most ``size_ms`` (whole local days from a day up).

    Returns no window for an empty range.  Interior boundaries are aligned; the windows never
    overlap and leave no gap.
    """
    size = normal_size(size_ms)
    windows = []
    cur = start
    while cur < end:
        stop = min(_boundary(cur, size, tz), end)
        windows.append(Window(app=app, start=cur, end=stop))
        cur = stop
    return windows


def next_size(length_ms: int) -> int | None:
    """The first ladder size strictly under ``length_ms``, or None at the floor."""
    return next((size for size in LADDER if size < length_ms), None)


def split(
    window: Window, suggested_ms: int | None = None, *, tz: dt.tzinfo = dt.UTC
) -> list[Window]:
    """Children of ``window`` at the suggested size, or the next size down the ladder.

    The children tile the parent exactly and there are at least two.  Raises
    ``CannotSplitError`` when the window is already at the floor (one hour).
    """
    size = normal_size(suggested_ms) if suggested_ms else None
    if size is None or size >= window.length:
        size = next_size(window.length)
    while size is not None:
        children = plan(window.app, window.start, window.end, size_ms=size, tz=tz)
        if len(children) > 1:
            return children
        size = next_size(size)  # a 25-hour DST day is still one "day": go further down
    raise CannotSplitError(
        f"window is too large even at the smallest size ({FLOOR_MS // HOUR_MS} h)",
        app=window.app,
        window=window.label,
    )


def horizon_start(now_ms: int, tz: dt.tzinfo = dt.UTC) -> int:
    """The earliest window start to ask for, on a local midnight: the 2-year horizon less a day.

    The day of margin keeps the oldest window valid when the API's clock runs ahead of ours
    (or the run crosses midnight): asking a day late loses nothing, a day early fails the window.
    """
    utc_today = now_ms // DAY_MS * DAY_MS
    return ceil_midnight(utc_today - (HORIZON_DAYS - 1) * DAY_MS, tz)


def range_end(now_ms: int, lag_ms: int, tz: dt.tzinfo = dt.UTC) -> int:
    """The end of the newest window allowed: the local midnight at or before ``now - lag``."""
    return floor_midnight(now_ms - lag_ms, tz)


def full_range(
    now_ms: int, *, history_days: int, lag_hours: int, tz: dt.tzinfo = dt.UTC
) -> tuple[int, int]:
    """``[today - history, today - lag)`` on local midnights, clamped to the 2-year horizon."""
    start = floor_midnight(now_ms - history_days * DAY_MS, tz)
    start = max(start, horizon_start(now_ms, tz))
    return start, range_end(now_ms, lag_hours * HOUR_MS, tz)


def clamp(
    now_ms: int,
    start: int | None,
    end: int | None,
    *,
    history_days: int,
    lag_hours: int,
    tz: dt.tzinfo = dt.UTC,
) -> tuple[int, int, list[str]]:
    """A requested range made valid: defaults filled in, the horizon and the lag applied.

    Returns ``(start, end, notes)``; each note says what was clamped, for a warning.
    """
    full_start, full_end = full_range(now_ms, history_days=history_days, lag_hours=lag_hours, tz=tz)
    notes = []
    lo = full_start if start is None else start
    hi = full_end if end is None else end
    if lo < (horizon := horizon_start(now_ms, tz)):
        notes.append("the start is older than the API's 2-year horizon: clamped to it")
        lo = horizon
    if hi > full_end:
        notes.append(f"the end is newer than now minus the {lag_hours} h lag: clamped")
        hi = full_end
    return lo, max(lo, hi), notes


def planned_size(max_days: int, learned_ms: int | None) -> int:
    """The size new windows of an app are planned at: the configured maximum or the learned."""
    limit = max_days * DAY_MS
    return limit if learned_ms is None else min(learned_ms, limit)


def incremental_start(mark: int, lookback_days: int, tz: dt.tzinfo = dt.UTC) -> int:
    """``lookback_days`` local days before ``mark`` (the local midnight at or before it)."""
    day = _date(floor_midnight(mark, tz), tz)
    return _midnight(day - dt.timedelta(days=lookback_days), tz)


def gaps(taken: Iterable[tuple[int, int]], start: int, end: int) -> list[tuple[int, int]]:
    """The parts of ``[start, end)`` that no range of ``taken`` covers, in order."""
    holes = []
    cur = start
    for lo, hi in sorted(taken):
        if hi <= cur:
            continue
        if lo >= end:
            break
        if lo > cur:
            holes.append((cur, lo))
        cur = max(cur, hi)
    if cur < end:
        holes.append((cur, end))
    return holes
