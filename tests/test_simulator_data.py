"""The simulator's data generator and settings, without a server."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest

from backfill.simulator import SimulatorConfigError, ground_truth, load, parse
from backfill.simulator.data import DAY_MS, FIELDS, count_rows, event_catalogue, rows
from tests.simkit import LARGE, SMALL, settings

DAY0 = 20_000 * DAY_MS  # 2024-10-04


def test_rows_are_deterministic_per_seed() -> None:
    one = ground_truth(settings(), SMALL.api_key, DAY0, DAY0 + 3 * DAY_MS)
    assert one == ground_truth(settings(), SMALL.api_key, DAY0, DAY0 + 3 * DAY_MS)
    assert one != ground_truth(settings(seed=12), SMALL.api_key, DAY0, DAY0 + 3 * DAY_MS)


def test_every_row_has_every_field_in_the_documented_order() -> None:
    for row in ground_truth(settings(), SMALL.api_key, DAY0, DAY0 + DAY_MS):
        assert tuple(row) == FIELDS


def test_each_day_has_sessions_in_its_first_and_last_millisecond() -> None:
    stamps = {
        r["sessionTimestamp"]
        for r in ground_truth(settings(), SMALL.api_key, DAY0, DAY0 + 5 * DAY_MS)
    }
    for day in range(5):
        assert DAY0 + day * DAY_MS in stamps
        assert DAY0 + (day + 1) * DAY_MS - 1 in stamps


def test_sessions_have_several_events_sharing_session_fields() -> None:
    data = ground_truth(settings(), LARGE.api_key, DAY0, DAY0 + DAY_MS)
    by_session = Counter(r["sessionTimestamp"] for r in data)
    assert max(by_session.values()) >= 3
    shared = ("appVersion", "sessionDuration", "deviceIdentifiers", "deviceModel", "userId")
    for stamp, count in by_session.items():
        if count > 1:
            members = [r for r in data if r["sessionTimestamp"] == stamp]
            assert all(
                tuple(m[k] for k in shared) == tuple(members[0][k] for k in shared) for m in members
            )
            offsets = [m["eventOffset"] for m in members]
            assert offsets == sorted(offsets)
            assert all(0 <= o < members[0]["sessionDuration"] for o in offsets)


def test_parameters_are_keyed_by_event_and_awkward() -> None:
    data = ground_truth(settings(), LARGE.api_key, DAY0, DAY0 + 7 * DAY_MS)
    keys = {k for r in data for k in r["eventParameters"]}
    assert len(keys) >= 150, "hundreds of distinct parameter keys per app"
    per_event: dict[str, set[str]] = {}
    for r in data:
        per_event.setdefault(r["eventName"], set()).update(r["eventParameters"])
    catalogue = {e.name: set(e.keys) for e in event_catalogue(settings().seed, LARGE.api_key)}
    assert all(seen <= catalogue[name] for name, seen in per_event.items())
    values = {v for r in data for v in r["eventParameters"].values()}
    assert {"", "a,b,c", 'say "hi"', "café ☕", "日本語テキスト"} <= values


def test_nullable_fields_are_sometimes_null_and_sometimes_not() -> None:
    data = ground_truth(settings(), LARGE.api_key, DAY0, DAY0 + 2 * DAY_MS)
    for name in ("userId", "gender", "birthYear", "latitude", "longitude"):
        values = [r[name] for r in data]
        assert None in values and any(v is not None for v in values), name


def test_count_rows_matches_generated_rows_on_unaligned_windows() -> None:
    app = LARGE.data
    for start, end in [
        (DAY0, DAY0 + DAY_MS),
        (DAY0 + 123_456, DAY0 + 3 * DAY_MS - 7),
        (DAY0, DAY0 + 1),
    ]:
        assert count_rows(11, app, start, end) == sum(1 for _ in rows(11, app, start, end))


def test_spike_days_carry_several_times_the_rows() -> None:
    counts = [
        count_rows(11, LARGE.data, DAY0 + d * DAY_MS, DAY0 + (d + 1) * DAY_MS) for d in range(60)
    ]
    ordinary = sorted(counts)[len(counts) // 2]
    assert max(counts) > 4 * ordinary


def test_demo_config_loads_three_apps_with_a_large_one() -> None:
    demo = load(Path(__file__).parent.parent / "config" / "demo.toml")
    assert len(demo.apps) == 3
    large = [a for a in demo.apps if a.too_large_rows]
    assert len(large) == 1
    month = count_rows(demo.seed, large[0].data, DAY0, DAY0 + 30 * DAY_MS)
    assert month > large[0].too_large_rows, "the large app's 30-day windows are always refused"


@pytest.mark.parametrize(
    ("table", "message"),
    [
        ({"tokn": "x"}, r"simulator\.tokn: unknown key"),
        ({"seed": "one"}, r"simulator\.seed: expected int, got 'one'"),
        ({"time_scale": True}, r"simulator\.time_scale: expected float"),
        ({"faults": {"failure": 2.0}}, r"simulator\.faults\.failure: expected a rate in \[0, 1\]"),
        ({"faults": {"boom": 0.1}}, r"simulator\.faults\.boom: unknown key"),
        ({"apps": [{"name": "x"}]}, r"simulator\.apps\[0\]\.api_key: required"),
        ({"apps": [{"api_key": "K", "sessions_per_day": 1}]}, r"sessions_per_day: expected >= 2"),
        ({"too_large_phrasings": ["shouty"]}, r"unknown phrasing 'shouty'"),
        ({"too_large_shape": "xml"}, r"too_large_shape: expected one of"),
    ],
)
def test_bad_simulator_settings_name_the_key(table: dict[str, object], message: str) -> None:
    with pytest.raises(SimulatorConfigError, match=message):
        parse(table)
