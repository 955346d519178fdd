"""What happens to windows, as events: the one way counts reach the summary and the progress.

Theory of operation.  The worker reports each step of each window as a ``WindowEvent`` named
``window.<action>.<outcome>`` (``window.queued``, ``window.submit.ok``, ``window.commit.ok``,
``window.split.done``, ``window.fail.done``, ...).  Listeners fold them: ``Tallies`` keeps each
app's counts for the summary and the live view, ``log_events`` writes the log line.  Nobody
else counts anything.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backfill import logs

if TYPE_CHECKING:
    from collections.abc import Mapping

    from backfill.models import WindowRecord

__all__ = ["AppTally", "Summary", "Tallies", "WindowEvent", "log_events"]


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowEvent:
    name: str
    record: WindowRecord
    fields: Mapping[str, Any] = field(default_factory=dict)


@dataclass(slots=True)
class AppTally:
    """One app's windows in this run: planned (after splits), committed, failed; what landed."""

    planned: int = 0
    committed: int = 0
    failed: int = 0
    split: int = 0
    rows: int = 0
    bytes: int = 0


@dataclass(slots=True)
class Summary:
    """What one run did, for the closing table and the exit code."""

    committed: int = 0
    split: int = 0
    failed: int = 0
    rows: int = 0
    bytes: int = 0
    wall_s: float = 0.0
    interrupted: bool = False
    fatal: str | None = None
    exit_code: int = 0
    calls: dict[str, int] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # app, window, reason


@dataclass(slots=True)
class Tallies:
    """Per-app counts of a run, folded from its events."""

    apps: dict[str, AppTally] = field(default_factory=dict)
    failures: list[tuple[str, str, str]] = field(default_factory=list)

    def __call__(self, event: WindowEvent) -> None:
        record = event.record
        tally = self.apps.setdefault(record.window.app, AppTally())
        if event.name == "window.queued":
            tally.planned += 1
        elif event.name == "window.split.done":
            tally.planned -= 1  # its children are queued in its place
            tally.split += 1
        elif event.name == "window.commit.ok":
            tally.committed += 1
            tally.rows += record.rows or 0
            tally.bytes += record.bytes or 0
        elif event.name == "window.fail.done":
            tally.failed += 1
            reason = str(event.fields.get("reason", ""))
            self.failures.append((record.window.app, record.window.label, reason))

    def clear(self) -> None:
        self.apps.clear()
        self.failures.clear()

    def total(self) -> AppTally:
        """Every app's tally added up."""
        t = list(self.apps.values())
        return AppTally(
            planned=sum(x.planned for x in t),
            committed=sum(x.committed for x in t),
            failed=sum(x.failed for x in t),
            split=sum(x.split for x in t),
            rows=sum(x.rows for x in t),
            bytes=sum(x.bytes for x in t),
        )


_LOG = logs.get("engine")


def log_events(event: WindowEvent) -> None:
    """One log line per event (``window.queued`` is not worth one)."""
    if event.name == "window.queued":
        return
    record = event.record
    _LOG.info(
        event.name,
        app=record.window.app,
        window=record.window.label,
        attempt=record.attempt,
        request_id=record.request_id,
        **event.fields,
    )
