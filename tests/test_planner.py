"""Window planning: tiling, alignment across DST, splitting, horizon, lookback."""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from backfill import planner
from backfill.errors import CannotSplitError
from backfill.models import DAY_MS, HOUR_MS, WEEK_MS, Window

ZONES = [dt.UTC, ZoneInfo("Europe/Berlin"), ZoneInfo("America/New_York"),
         ZoneInfo("Australia/Lord_Howe"), ZoneInfo("America/Santiago"), ZoneInfo("Asia/Kolkata")]  # fmt: skip
T0 = 1_640_995_200_000  # 2022-01-01T00:00Z
SPAN = 4 * 365 * DAY_MS


def _local(ms: int, tz: dt.tzinfo) -> dt.datetime:
    return dt.datetime.fromtimestamp(ms / 1000, tz=tz)


def _assert_tiles(windows: list[Window], start: int, end: int) -> None:
    assert windows[0].start == start and windows[-1].end == end
    for a, b in zip(windows, windows[1:], strict=False):
        assert a.end == b.start, "no gap, no overlap"
    assert all(w.start < w.end for w in windows)


@settings(max_examples=300, deadline=None)
@given(
    tz=st.sampled_from(ZONES),
    start=st.integers(T0, T0 + SPAN),
    length=st.integers(1, 800 * DAY_MS),
    days=st.integers(1, 30),
)
def test_plans_tile_the_range_aligned_and_no_longer_than_max_days(
    tz: dt.tzinfo, start: int, length: int, days: int
) -> None:
    end = start + length
    windows = planner.plan("app", start, end, size_ms=days * DAY_MS, tz=tz)
    _assert_tiles(windows, start, end)
    for w in windows:
        first, last = _local(w.start, tz), _local(w.end, tz)
        assert (last.date() - first.date()).days <= days
        assert w.length <= days * DAY_MS + 2 * HOUR_MS, "DST can add at most an hour or two"
    for w in windows[1:]:
        assert w.start == planner.floor_midnight(w.start, tz), "interior boundaries on midnights"


@settings(max_examples=200, deadline=None)
@given(tz=st.sampled_from(ZONES), day=st.integers(0, 4 * 365), count=st.integers(1, 3))
def test_aligned_ranges_give_whole_local_days(tz: dt.tzinfo, day: int, count: int) -> None:
    start = planner.ceil_midnight(T0 + day * DAY_MS, tz)
    end = planner.ceil_midnight(start + count * 30 * DAY_MS, tz)
    for w in planner.plan("app", start, end, size_ms=7 * DAY_MS, tz=tz):
        assert planner.floor_midnight(w.start, tz) == w.start
        assert planner.floor_midnight(w.end, tz) == w.end


@settings(max_examples=200, deadline=None)
@given(
    tz=st.sampled_from(ZONES),
    day=st.integers(0, 4 * 365),
    suggestions=st.lists(
        st.sampled_from([None, WEEK_MS, DAY_MS, 6 * HOUR_MS, HOUR_MS, 12345]), max_size=6
    ),
    picks=st.lists(st.integers(0, 10_000), min_size=6, max_size=6),
)
def test_any_sequence_of_splits_still_tiles_the_parent(
    tz: dt.tzinfo, day: int, suggestions: list[int | None], picks: list[int]
) -> None:
    start = planner.ceil_midnight(T0 + day * DAY_MS, tz)
    parent = planner.plan("app", start, start + 30 * DAY_MS, tz=tz)[0]
    leaves = [parent]
    for suggestion, pick in zip(suggestions, picks, strict=False):
        victim = leaves[pick % len(leaves)]
        try:
            children = planner.split(victim, suggestion, tz=tz)
        except CannotSplitError:
            assert victim.length <= planner.FLOOR_MS
            continue
        assert len(children) >= 2
        _assert_tiles(children, victim.start, victim.end)
        index = leaves.index(victim)
        leaves[index : index + 1] = children
    _assert_tiles(leaves, parent.start, parent.end)


def test_splitting_walks_the_ladder_and_stops_at_the_floor() -> None:
    window = Window(app="a", start=T0, end=T0 + 30 * DAY_MS)
    sizes = []
    while True:
        try:
            children = planner.split(window)
        except CannotSplitError as exc:
            assert "smallest size" in str(exc)
            break
        sizes.append(children[0].length)
        window = children[0]
    assert sizes == [WEEK_MS, DAY_MS, 6 * HOUR_MS, HOUR_MS]


def test_split_follows_a_suggestion_and_ignores_one_not_smaller() -> None:
    window = Window(app="a", start=T0, end=T0 + 30 * DAY_MS)
    assert {c.length for c in planner.split(window, DAY_MS)} == {DAY_MS}
    assert planner.split(window, 60 * DAY_MS)[0].length == WEEK_MS
    assert planner.split(window, 36 * HOUR_MS)[0].length == DAY_MS, "rounded down to whole days"


def test_a_25_hour_dst_day_splits_below_a_day() -> None:
    berlin = ZoneInfo("Europe/Berlin")
    start = planner.floor_midnight(1_698_530_400_000, berlin)  # 2023-10-29, clocks go back
    end = planner.ceil_midnight(start + HOUR_MS, berlin)
    assert end - start == 25 * HOUR_MS
    children = planner.split(Window(app="a", start=start, end=end), tz=berlin)
    assert [c.length for c in children] == [6 * HOUR_MS] * 4 + [HOUR_MS]


def test_horizon_and_range_end() -> None:
    now = T0 + 10 * HOUR_MS
    assert planner.horizon_start(now) == T0 - 729 * DAY_MS, "a day of margin for clock skew"
    assert planner.range_end(now, 24 * HOUR_MS) == T0 - DAY_MS
    assert planner.range_end(now, 0) == T0
    kolkata = ZoneInfo("Asia/Kolkata")
    assert planner.horizon_start(now, kolkata) >= T0 - 730 * DAY_MS
    assert planner.horizon_start(now, kolkata) == planner.floor_midnight(
        planner.horizon_start(now, kolkata), kolkata
    )


def test_incremental_start_is_lookback_local_days_before() -> None:
    assert planner.incremental_start(T0 + 5 * DAY_MS, 3) == T0 + 2 * DAY_MS


@pytest.mark.parametrize(
    ("taken", "start", "end", "holes"),
    [
        ([], 0, 10, [(0, 10)]),
        ([(0, 10)], 0, 10, []),
        ([(2, 4), (6, 8)], 0, 10, [(0, 2), (4, 6), (8, 10)]),
        ([(0, 3), (3, 12)], 2, 10, []),
        ([(5, 20)], 0, 10, [(0, 5)]),
    ],
)
def test_gaps(
    taken: list[tuple[int, int]], start: int, end: int, holes: list[tuple[int, int]]
) -> None:
    assert planner.gaps(taken, start, end) == holes
