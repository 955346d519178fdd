"""What a window's data must look like: the one output schema, the input types, the bounds.

Theory of operation.  Every landed Parquet file has exactly ``SCHEMA``: the sixteen Flurry
fields of ``FIELDS`` plus the derived ``eventTimestamp``, the three ``MAPS`` as
``map<string, string>``.  ``INPUT`` is the type each field is read as before the final cast
(timestamps arrive as integer milliseconds, maps as JSON text).  ``Limits`` bounds what a
download may be before it is refused as corrupt or hostile, and how the output is buffered and
cut into files.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import TYPE_CHECKING

import pyarrow as pa

from backfill.errors import Stopped

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["FIELDS", "INPUT", "MAP", "MAPS", "SCHEMA", "Limits", "Stopped", "stop_check"]

FIELDS: tuple[str, ...] = (
    "sessionTimestamp", "appVersion", "sessionDuration", "eventOffset", "deviceIdentifiers",
    "deviceModel", "deviceSubModel", "countryISO", "eventName", "eventParameters", "userId",
    "gender", "birthYear", "latitude", "longitude", "sessionProperties",
)  # fmt: skip
MAPS = ("deviceIdentifiers", "eventParameters", "sessionProperties")
MAP = pa.map_(pa.string(), pa.string())
_TS = pa.timestamp("ms", tz="UTC")
SCHEMA = pa.schema(
    [
        ("sessionTimestamp", _TS),
        ("eventTimestamp", _TS),
        ("appVersion", pa.string()),
        ("sessionDuration", pa.int64()),
        ("eventOffset", pa.int64()),
        ("deviceIdentifiers", MAP),
        ("deviceModel", pa.string()),
        ("deviceSubModel", pa.string()),
        ("countryISO", pa.string()),
        ("eventName", pa.string()),
        ("eventParameters", MAP),
        ("userId", pa.string()),
        ("gender", pa.string()),
        ("birthYear", pa.int32()),
        ("latitude", pa.float64()),
        ("longitude", pa.float64()),
        ("sessionProperties", MAP),
    ]
)
# The type each field is read as, before the cast to ``SCHEMA`` (a map: as its JSON text).
INPUT: dict[str, pa.DataType] = {
    "sessionTimestamp": pa.int64(), "sessionDuration": pa.int64(), "eventOffset": pa.int64(),
    "birthYear": pa.int32(), "latitude": pa.float64(), "longitude": pa.float64(),
} | {name: pa.string() for name in FIELDS if name not in ("sessionTimestamp", "sessionDuration",
     "eventOffset", "birthYear", "latitude", "longitude")}  # fmt: skip


@dataclass(frozen=True, slots=True, kw_only=True)
class Limits:
    """What a download may be before it is refused as corrupt or hostile."""

    max_compressed_bytes: int = 64 << 30
    max_decompressed_bytes: int = 256 << 30
    max_ratio: float = 250.0  # decompressed / compressed; gzip tops out near 1032 for bombs
    ratio_grace_bytes: int = 64 << 20  # small files may compress better than the ratio
    max_line_bytes: int = 8 << 20
    block_bytes: int = 4 << 20
    buffer_bytes: int = 128 << 20  # Arrow bytes buffered across partitions before a flush
    file_bytes: int = 16 << 20  # a day with this many Arrow bytes buffered: one row group written
    row_group_rows: int = 128 * 1024
    parse_workers: int = 2  # blocks parsed at once, each on one thread
    # The sane range of ``sessionTimestamp`` (ms): a row outside it is bad whatever the window
    # (2000-01-01 .. 2100-01-01 UTC; Flurry began in 2005).
    min_session_ms: int = 946_684_800_000
    max_session_ms: int = 4_102_444_800_000


def stop_check(stop: Callable[[], bool] | threading.Event | None) -> Callable[[], None]:
    """A callable that raises ``Stopped`` once ``stop`` (a callable or an Event) says so."""
    if stop is None:
        return _never
    asked = stop.is_set if isinstance(stop, threading.Event) else stop

    def check() -> None:
        if asked():
            raise Stopped("stopped on request")

    return check


def _never() -> None:
    return None
