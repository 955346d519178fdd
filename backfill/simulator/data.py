"""Deterministic Flurry-like raw data, and the ground truth the tests compare against.

Every row is a pure function of ``(seed, apiKey, UTC day)``: a day's sessions are drawn from a
``random.Random`` seeded by a stable hash of the three, so the server and the ground truth make
exactly the same rows without sharing any state.  A day is generated in two steps: a cheap
*skeleton* (session start times and event counts, enough to count rows) and, on demand, the
rows themselves.

Shapes follow ``flurry-api.md`` section 4: one row per event, the session fields repeated on
every row of a session, ``eventParameters`` whose keys depend on the event name, nullable user
fields, and on every day a session in its first and its last millisecond.
"""

from __future__ import annotations

import csv
import functools
import gzip
import hashlib
import io
import random
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import orjson

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator, Sequence

__all__ = [
    "DAY_MS",
    "FIELDS",
    "MAP_FIELDS",
    "AppData",
    "count_rows",
    "encode_csv",
    "encode_json",
    "event_catalogue",
    "gzip_members",
    "rows",
]

DAY_MS = 86_400_000

FIELDS: tuple[str, ...] = (
    "sessionTimestamp",
    "appVersion",
    "sessionDuration",
    "eventOffset",
    "deviceIdentifiers",
    "deviceModel",
    "deviceSubModel",
    "countryISO",
    "eventName",
    "eventParameters",
    "userId",
    "gender",
    "birthYear",
    "latitude",
    "longitude",
    "sessionProperties",
)
MAP_FIELDS = frozenset({"deviceIdentifiers", "eventParameters", "sessionProperties"})

_DEVICES = (
    ("iPhone X", "iPhone10,3"),
    ("iPhone 12", "iPhone13,2"),
    ("iPhone 15 Pro", "iPhone16,1"),
    ("iPad Air", "iPad13,1"),
    ("Galaxy S9", "SM-G960U"),
    ("Galaxy S9+", "SM-G965F"),
    ("Pixel 7", "GVU6C"),
    ("Redmi Note 12", "23021RAAEG"),
)
_COUNTRIES = ("US", "GB", "DE", "FR", "JP", "BR", "IN", "CA", "MX", "KR", "ES", "IT")
_VERBS = ("view", "tap", "start", "finish", "buy", "share", "open", "close", "win", "lose")
_NOUNS = ("level", "shop", "item", "ad", "menu", "profile", "tutorial", "reward", "friend", "map")
_KEY_WORDS = (
    "id",
    "name",
    "count",
    "price",
    "currency",
    "source",
    "slot",
    "variant",
    "score",
    "step",
    "result",
    "reason",
    "tier",
    "duration",
    "retries",
    "category",
    "position",
    "label",
)
# Values chosen to break naive CSV/JSON handling: commas, quotes, unicode, empty strings.
_AWKWARD_VALUES = (
    "",
    "a,b,c",
    'say "hi"',
    "café ☕",
    "日本語テキスト",
    "emoji 🎮🔥",
    "back\\slash",
    "'single'",
    "semi;colon",
    "tab\there",
    "100%",
    "zero",
)
_PROPERTY_KEYS = ("ab_group", "theme", "install_source", "push_enabled", "locale")


@dataclass(frozen=True, slots=True, kw_only=True)
class AppData:
    """What shapes one app's data: its key, its volume and its spike days."""

    api_key: str
    sessions_per_day: int
    events_per_session: int = 4
    versions: tuple[str, ...] = ("1.0.0", "1.1.0", "2.0.0")
    spike_every_days: int = 0
    spike_factor: int = 1
    growth_from_day: int = 0  # days from this one (0: none) have growth_factor times the sessions
    growth_factor: float = 1.0


@dataclass(frozen=True, slots=True)
class _Event:
    name: str
    event_id: str
    keys: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class _Session:
    timestamp: int
    events: int
    seed: int


def _stable_int(*parts: object) -> int:
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


@functools.lru_cache(maxsize=64)
def event_catalogue(seed: int, api_key: str) -> tuple[_Event, ...]:
    """The app's event names, their numeric ids (for the ``eventIds`` filter) and parameter keys.

    100 event names of 5 to 12 keys each, several hundred distinct keys in all.
    """
    rng = random.Random(_stable_int(seed, api_key, "catalogue"))
    events = []
    for verb in _VERBS:
        for noun in _NOUNS:
            name = f"{verb}_{noun}"
            keys = tuple(
                f"{noun}_{word}" if i % 2 else f"{verb}_{word}"
                for i, word in enumerate(rng.sample(_KEY_WORDS, rng.randint(5, 12)))
            )
            event_id = str(10_000_000 + _stable_int(api_key, name) % 90_000_000)
            events.append(_Event(name, event_id, keys))
    return tuple(events)


def _is_spike(app: AppData, day: int) -> bool:
    if app.spike_every_days <= 0:
        return False
    return (day + _stable_int(app.api_key, "spike")) % app.spike_every_days == 0


@functools.lru_cache(maxsize=8192)
def _skeleton(seed: int, app: AppData, day: int) -> tuple[_Session, ...]:
    rng = random.Random(_stable_int(seed, app.api_key, day))
    base = app.sessions_per_day * (app.spike_factor if _is_spike(app, day) else 1)
    n = max(2, round(base * rng.uniform(0.8, 1.2)))
    if app.growth_from_day and day >= app.growth_from_day:  # late data: the day grew
        n = max(2, round(n * app.growth_factor))
    start = day * DAY_MS
    # The first and the last millisecond of the day always open a session: boundary bugs show.
    stamps = sorted(
        [start, start + DAY_MS - 1, *(start + rng.randrange(DAY_MS) for _ in range(n - 2))]
    )
    top = 2 * app.events_per_session - 1
    return tuple(_Session(ts, rng.randint(1, top), rng.getrandbits(48)) for ts in stamps)


def _session_rows(seed: int, app: AppData, session: _Session) -> list[dict[str, Any]]:
    rng = random.Random(session.seed)
    catalogue = event_catalogue(seed, app.api_key)
    device, sub_model = rng.choice(_DEVICES)
    apple = sub_model.startswith(("iPhone", "iPad"))
    ident = f"{rng.getrandbits(64):016X}-{rng.getrandbits(32):08X}"
    identifiers = (
        {"IDFV": ident, "IDFA": f"{rng.getrandbits(64):016X}"}
        if apple
        else {"AndroidID": ident.lower()}
    )
    duration = rng.randint(1_000, 1_800_000)
    has_user = rng.random() < 0.6
    located = rng.random() < 0.5
    shared = {
        "sessionTimestamp": session.timestamp,
        "appVersion": rng.choice(app.versions),
        "sessionDuration": duration,
        "deviceIdentifiers": identifiers,
        "deviceModel": device,
        "deviceSubModel": sub_model,
        "countryISO": rng.choice(_COUNTRIES),
        "userId": f"user-{rng.getrandbits(40):x}" if has_user else None,
        "gender": rng.choice(("M", "F")) if has_user and rng.random() < 0.7 else None,
        "birthYear": rng.randint(1950, 2010) if has_user and rng.random() < 0.5 else None,
        "latitude": round(rng.uniform(-60, 70), 1) if located else None,
        "longitude": round(rng.uniform(-180, 180), 1) if located else None,
        "sessionProperties": {
            k: rng.choice(("a", "b", "on", "off", ""))
            for k in rng.sample(_PROPERTY_KEYS, rng.randint(0, 3))
        },
    }
    offsets = sorted(rng.randrange(duration) for _ in range(session.events))
    out = []
    for offset in offsets:
        event = rng.choice(catalogue)
        params = {}
        for key in event.keys[: rng.randint(1, len(event.keys))]:
            roll = rng.random()
            if roll < 0.25:
                params[key] = rng.choice(_AWKWARD_VALUES)
            elif roll < 0.6:
                params[key] = str(rng.randint(0, 100_000))
            else:
                params[key] = f"{key}-{rng.randint(0, 50)}"
        row = dict(shared)
        row["eventOffset"] = offset
        row["eventName"] = event.name
        row["eventParameters"] = params
        out.append({field: row[field] for field in FIELDS})
    return out


def _days(start_ms: int, end_ms: int) -> range:
    return range(start_ms // DAY_MS, -(-end_ms // DAY_MS))


def count_rows(seed: int, app: AppData, start_ms: int, end_ms: int) -> int:
    """Rows (events) of sessions starting in ``[start_ms, end_ms)``, without generating them."""
    return sum(
        s.events
        for day in _days(start_ms, end_ms)
        for s in _skeleton(seed, app, day)
        if start_ms <= s.timestamp < end_ms
    )


def rows(
    seed: int,
    app: AppData,
    start_ms: int,
    end_ms: int,
    *,
    app_versions: Sequence[str] | None = None,
    event_ids: Sequence[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """The exact rows of sessions starting in ``[start_ms, end_ms)``, in session order.

    This is the ground truth: the server serves exactly these rows for the same window and
    filters (``app_versions`` keeps rows whose ``appVersion`` is listed, ``event_ids`` rows
    whose event's numeric id is listed).
    """
    versions = frozenset(app_versions) if app_versions else None
    names = None
    if event_ids:
        wanted = frozenset(event_ids)
        names = frozenset(
            e.name for e in event_catalogue(seed, app.api_key) if e.event_id in wanted
        )
    for day in _days(start_ms, end_ms):
        for session in _skeleton(seed, app, day):
            if not start_ms <= session.timestamp < end_ms:
                continue
            for row in _session_rows(seed, app, session):
                if versions is not None and row["appVersion"] not in versions:
                    continue
                if names is not None and row["eventName"] not in names:
                    continue
                yield row


def encode_json(batch: Iterable[dict[str, Any]]) -> bytes:
    """NDJSON: one object per line, ``null`` for a missing value."""
    return b"".join(orjson.dumps(row) + b"\n" for row in batch)


def _csv_cell(field: str, value: Any) -> Any:
    if value is None:
        return ""
    if field in MAP_FIELDS:
        return orjson.dumps(value).decode()
    return value


def encode_csv(batch: Iterable[dict[str, Any]], *, header: bool = True) -> bytes:
    """RFC 4180 CSV: a header line, maps as JSON text in one quoted cell, null as empty."""
    buffer = io.StringIO(newline="")
    writer = csv.writer(buffer, lineterminator="\r\n")
    if header:
        writer.writerow(FIELDS)
    writer.writerows([_csv_cell(f, row[f]) for f in FIELDS] for row in batch)
    return buffer.getvalue().encode()


def gzip_members(payload: bytes, members: int = 1) -> bytes:
    """Gzip ``payload``, as ``members`` concatenated gzip members (a valid multi-member file)."""
    if members <= 1 or len(payload) < members:
        return gzip.compress(payload, compresslevel=1, mtime=0)
    step = -(-len(payload) // members)
    parts = [payload[i : i + step] for i in range(0, len(payload), step)]
    return b"".join(gzip.compress(part, compresslevel=1, mtime=0) for part in parts)
