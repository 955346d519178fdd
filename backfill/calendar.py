"""The coverage calendar: which UTC days of an app hold committed rows, as a month-by-day grid.

Pure: ranges of epoch ms in, day states and text out.  ``day_states`` decides each day of a
span from the ranges the ledger holds; ``months`` lays the days out one row per month (cell
``i`` is day ``i + 1``); ``render`` adds a ruler of day numbers; ``runs`` finds the stretches
of consecutive days in some states (the gaps of ``backfill status``).
"""

from __future__ import annotations

import datetime as dt
from enum import StrEnum
from typing import TYPE_CHECKING, Final

from backfill.models import DAY_MS

if TYPE_CHECKING:
    from collections.abc import Callable, Iterable, Mapping

__all__ = ["LEGEND", "OUTSIDE", "Day", "day_ms", "day_of", "day_states", "months", "render", "runs"]


class Day(StrEnum):
    """A day's state, as its one character in the calendar."""

    COMMITTED = "#"  # every hour of it (inside the span) has committed rows
    FAILED = "x"  # not committed, and a FAILED window holds part of it
    PENDING = "."  # not committed, and a window being pulled (or waiting to be) holds part of it
    NEVER = "-"  # inside the span, yet no window holds it: never asked for


OUTSIDE: Final = " "  # a day of the month outside the app's planned span
LEGEND: Final = (
    "# committed   x failed   . pending or in flight   - never asked   "
    "(blank: outside the planned span)"
)
_WORSE = (Day.FAILED, Day.PENDING)  # what a day not wholly committed shows, first match wins


def day_of(ms: int) -> dt.date:
    """The UTC day holding the instant ``ms``."""
    return dt.datetime.fromtimestamp(ms // 1000, tz=dt.UTC).date()


def day_ms(day: dt.date) -> int:
    """Epoch ms of the start of UTC ``day``."""
    return (day - dt.date(1970, 1, 1)).days * DAY_MS


def day_states(ranges: Iterable[tuple[int, int, Day]], lo: int, hi: int) -> dict[dt.date, Day]:
    """The state of each UTC day overlapping ``[lo, hi)``, in day order.

    A day counts only its part inside ``[lo, hi)`` (the span may start or end mid-day).  It is
    COMMITTED when COMMITTED ranges cover that part entirely; otherwise FAILED if a FAILED range
    overlaps it, else PENDING if a PENDING range does, else NEVER (the ranges leave a hole).
    """
    if hi <= lo:
        return {}
    first, last = lo // DAY_MS, (hi - 1) // DAY_MS
    covered: dict[int, list[tuple[int, int]]] = {}
    touched: dict[int, set[Day]] = {}
    for start, end, state in ranges:
        start, end = max(start, lo), min(end, hi)
        for number in range(start // DAY_MS, (end - 1) // DAY_MS + 1) if end > start else ():
            if state is Day.COMMITTED:
                covered.setdefault(number, []).append((start, end))
            else:
                touched.setdefault(number, set()).add(state)
    out: dict[dt.date, Day] = {}
    for number in range(first, last + 1):
        part = (max(lo, number * DAY_MS), min(hi, (number + 1) * DAY_MS))
        day = dt.date(1970, 1, 1) + dt.timedelta(days=number)
        if _covers(covered.get(number, []), *part):
            out[day] = Day.COMMITTED
        else:
            seen = touched.get(number, set())
            out[day] = next((s for s in _WORSE if s in seen), Day.NEVER)
    return out


def _covers(spans: list[tuple[int, int]], lo: int, hi: int) -> bool:
    """Whether the union of ``spans`` holds all of ``[lo, hi)``."""
    reach = lo
    for start, end in sorted(spans):
        if start > reach:
            return False
        reach = max(reach, end)
    return reach >= hi


def months(days: Mapping[dt.date, Day]) -> list[tuple[str, str]]:
    """``(YYYY-MM, cells)`` per month from the first day to the last, with no month skipped.

    Cell ``i`` is day ``i + 1`` of the month: the day's character, or a blank for a day not in
    ``days``; a row ends at the month's last day.
    """
    if not days:
        return []
    first, last = min(days), max(days)
    rows = []
    month = first.replace(day=1)
    while month <= last:
        following = (month + dt.timedelta(days=32)).replace(day=1)
        length = (following - month).days
        cells = "".join(str(days.get(month.replace(day=d), OUTSIDE)) for d in range(1, length + 1))
        rows.append((month.strftime("%Y-%m"), cells))
        month = following
    return rows


def render(days: Mapping[dt.date, Day], indent: str = "") -> list[str]:
    """The calendar as text lines: a ruler of day numbers, then one line per month."""
    ruler = [" "] * 31
    for number in (1, 5, 10, 15, 20, 25, 30):
        ruler[number - 1 : number - 1 + len(str(number))] = str(number)
    lines = [f"{indent}{'':9}{''.join(ruler).rstrip()}"]
    lines += [f"{indent}{month:9}{cells.rstrip()}" for month, cells in months(days)]
    return lines


def runs(days: Mapping[dt.date, Day], keep: Callable[[Day], bool]) -> list[tuple[dt.date, dt.date]]:
    """The stretches ``(first, last)`` (inclusive) of consecutive days whose state ``keep``s."""
    out: list[tuple[dt.date, dt.date]] = []
    for day in sorted(days):
        if not keep(days[day]):
            continue
        if out and out[-1][1] + dt.timedelta(days=1) == day:
            out[-1] = (out[-1][0], day)
        else:
            out.append((day, day))
    return out
