"""The live view's ETA, from the span of time the run's windows cover rather than their count.

Counting windows makes the ETA jump: a 30-day window split into days adds 29 windows to the
plan at once.  The span does not change when a window splits (its children cover what it
covered), so ``Remaining`` folds the run's events into the milliseconds of data planned and
done per app, and the ETA is the time taken so far per millisecond done times what is left.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from backfill.events import WindowEvent

__all__ = ["Remaining"]


@dataclass(slots=True)
class _Span:
    planned_ms: int = 0
    done_ms: int = 0


@dataclass(slots=True)
class Remaining:
    """An event listener: per app, the span of the windows planned and done (committed or
    failed) in this run; ``eta`` estimates the seconds left."""

    apps: dict[str, _Span] = field(default_factory=dict)

    def __call__(self, event: WindowEvent) -> None:
        window = event.record.window
        span = self.apps.setdefault(window.app, _Span())
        width = window.end - window.start
        if event.name == "window.queued":
            span.planned_ms += width
        elif event.name == "window.split.done":
            span.planned_ms -= width  # its children are queued in its place, the same span
        elif event.name in ("window.commit.ok", "window.fail.done"):
            span.done_ms += width

    def eta(self, elapsed_s: float, app: str | None = None) -> int | None:
        """Seconds left for ``app`` (every app when None) at this run's pace so far; None
        before anything is done."""
        spans = list(self.apps.values()) if app is None else [self.apps.get(app, _Span())]
        planned = sum(s.planned_ms for s in spans)
        done = sum(s.done_ms for s in spans)
        if not done:
            return None
        return round(elapsed_s / done * max(planned - done, 0))
