"""Pure size learning: the window size each app is planned at, stepped down when refused.

Theory of operation.  Every app starts at ``[windows].max_days``.  The first refusal as too large
at that size steps the app one ladder size down at once (30 d → 7 d); below it, a size is dropped
only when more than half of at least four windows submitted at it were refused, so one spike day
does not turn two years of weeks into days.  The engine reports each submit and each refusal;
``Sizes`` answers with the new size when it changes, and the engine records it in the ledger.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from backfill import planner
from backfill.lifecycle import SLACK_MS
from backfill.models import DAY_MS

if TYPE_CHECKING:
    from collections.abc import Mapping

    from backfill.models import Window

__all__ = ["Sizes"]


@dataclass(slots=True)
class _Tried:
    tried: int = 0
    refused: int = 0


@dataclass(slots=True)
class Sizes:
    """The planned window size of each app, learned from the API's too-large refusals."""

    max_days: int
    learned: dict[str, int] = field(default_factory=dict)
    _tries: dict[str, _Tried] = field(default_factory=dict)

    def know(self, sizes: Mapping[str, int | None]) -> None:
        """Take the sizes the ledger remembers from earlier runs."""
        self.learned.update({app: size for app, size in sizes.items() if size})

    def planned(self, app: str) -> int:
        """The size new windows of ``app`` are planned at now."""
        return planner.planned_size(self.max_days, self.learned.get(app))

    def at_planned(self, window: Window) -> bool:
        """Whether ``window`` has its app's planned size (give or take a DST hour)."""
        return abs(window.length - self.planned(window.app)) <= SLACK_MS

    def submitted(self, window: Window) -> None:
        """A request for ``window`` was accepted."""
        if self.at_planned(window):
            self._tries.setdefault(window.app, _Tried()).tried += 1

    def refused(self, window: Window, *, at_submit: bool) -> int | None:
        """``window`` was refused as too large; returns the app's new size if it stepped down.

        A window refused at submit was never counted as submitted; one refused at poll was.
        """
        if not self.at_planned(window):
            return None
        app = window.app
        tries = self._tries.setdefault(app, _Tried())
        tries.refused += 1
        tries.tried += at_submit
        planned = self.planned(app)
        at_max = planned >= self.max_days * DAY_MS
        if not (
            (at_max and tries.refused) or (tries.tried >= 4 and 2 * tries.refused > tries.tried)
        ):
            return None
        smaller = planner.next_size(planned)
        if smaller is None:
            return None
        self.learned[app] = smaller
        self._tries[app] = _Tried()
        return smaller
