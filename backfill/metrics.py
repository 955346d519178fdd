"""The end of a run as a Prometheus text-format file, for node-exporter's textfile collector.

``write`` builds a fresh ``CollectorRegistry`` of gauges from one run's record and writes it
with ``prometheus_client.write_to_textfile``, which writes a temporary file and renames it over
the old one: the collector never reads half a file.  One file holds the last run of the job
that writes it (give each timer its own file).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

if TYPE_CHECKING:
    from collections.abc import Mapping
    from pathlib import Path

__all__ = ["APP_GAUGES", "write"]

# The per-app gauges: (metric name, help, key of the run record's per-app counts).
APP_GAUGES = (
    ("backfill_windows_committed", "Windows committed by the last run", "committed"),
    ("backfill_windows_failed", "Windows that failed in the last run", "failed"),
    ("backfill_windows_split", "Windows split in the last run", "split"),
    ("backfill_rows_landed", "Rows landed by the last run", "rows"),
    ("backfill_bytes_landed", "Bytes of Parquet landed by the last run", "bytes"),
)


def write(
    path: Path,
    *,
    command: str,
    exit_code: int,
    finished_at: float,
    wall_s: float | None = None,
    interrupted: bool = False,
    apps: Mapping[str, Mapping[str, int]] | None = None,
) -> None:
    """Write the last run's gauges to ``path`` (atomically; its folder is created).

    ``apps`` maps each app to its counts (the keys of ``APP_GAUGES``); a run that ended on a
    fatal error has none, and says so by its exit code alone.
    """
    registry = CollectorRegistry()
    last = {"command": command}
    _gauge(registry, "backfill_last_run_exit_code", "Exit code of the last run", last, exit_code)
    _gauge(
        registry,
        "backfill_last_run_timestamp_seconds",
        "When the last run ended (Unix time)",
        last,
        finished_at,
    )
    _gauge(registry, "backfill_last_run_interrupted", "1 if the last run was interrupted", last,
           float(interrupted))  # fmt: skip
    if wall_s is not None:
        _gauge(registry, "backfill_last_run_duration_seconds", "Wall time of the last run", last,
               wall_s)  # fmt: skip
    for name, text, key in APP_GAUGES:
        gauge = Gauge(name, text, ["app"], registry=registry)
        for app, counts in sorted((apps or {}).items()):
            gauge.labels(app=app).set(counts.get(key, 0))
    path.parent.mkdir(parents=True, exist_ok=True)
    write_to_textfile(str(path), registry)


def _gauge(
    registry: CollectorRegistry, name: str, text: str, labels: Mapping[str, str], value: float
) -> None:
    Gauge(name, text, list(labels), registry=registry).labels(**labels).set(value)
