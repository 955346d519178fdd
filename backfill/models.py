"""Frozen values shared by every module, and the window lifecycle as a transition table.

Theory of operation.  A window moves through the ledger states below; every move is checked
against ``TRANSITIONS`` by ``advance()``, and the ledger applies it as a compare-and-set on
``(window id, attempt)``.  A retry goes back to ``PENDING`` with ``attempt + 1``; a split
retires the parent as ``SPLIT`` and creates children; ``COMMITTED`` may go back to ``PENDING``
only to be re-pulled (late data), and its files stay live until the new attempt commits::

    PENDING → SUBMITTED → READY → DOWNLOADED → STAGED → COMMITTED
    any unfinished → PENDING (retry)   PENDING/SUBMITTED → SPLIT   any unfinished → FAILED
    FAILED → PENDING (retry command)   COMMITTED → PENDING (re-pull)
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, TypedDict

from backfill.errors import IllegalTransitionError

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "Changes",
    "DAY_MS",
    "HOUR_MS",
    "TRANSITIONS",
    "UNFINISHED",
    "WEEK_MS",
    "Window",
    "WindowRecord",
    "WindowState",
    "advance",
    "iso",
]

HOUR_MS = 3_600_000
DAY_MS = 24 * HOUR_MS
WEEK_MS = 7 * DAY_MS


class WindowState(StrEnum):
    PENDING = "PENDING"
    SUBMITTED = "SUBMITTED"
    READY = "READY"
    DOWNLOADED = "DOWNLOADED"
    STAGED = "STAGED"
    COMMITTED = "COMMITTED"
    SPLIT = "SPLIT"
    FAILED = "FAILED"


_S = WindowState
UNFINISHED = frozenset({_S.PENDING, _S.SUBMITTED, _S.READY, _S.DOWNLOADED, _S.STAGED})

TRANSITIONS: dict[WindowState, frozenset[WindowState]] = {
    _S.PENDING: frozenset({_S.SUBMITTED, _S.PENDING, _S.SPLIT, _S.FAILED}),
    _S.SUBMITTED: frozenset({_S.READY, _S.PENDING, _S.SPLIT, _S.FAILED}),
    _S.READY: frozenset({_S.DOWNLOADED, _S.PENDING, _S.FAILED}),
    _S.DOWNLOADED: frozenset({_S.STAGED, _S.PENDING, _S.FAILED}),
    _S.STAGED: frozenset({_S.COMMITTED, _S.PENDING, _S.FAILED}),
    _S.COMMITTED: frozenset({_S.PENDING}),
    _S.FAILED: frozenset({_S.PENDING}),
    _S.SPLIT: frozenset(),
}


def advance(current: WindowState, target: WindowState) -> WindowState:
    """Return ``target`` if ``current → target`` is a legal edge; raise otherwise."""
    if target not in TRANSITIONS[current]:
        raise IllegalTransitionError(f"illegal window transition {current} → {target}")
    return target


def iso(ms: int) -> str:
    """Epoch milliseconds as an ISO-8601 UTC string (``2026-01-01T00:00:00Z``)."""
    moment = dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC)
    text = moment.isoformat(timespec="milliseconds" if ms % 1000 else "seconds")
    return text.replace("+00:00", "Z")


@dataclass(frozen=True, slots=True, kw_only=True, order=True)
class Window:
    """One app's half-open range ``[start, end)`` of session start times, in epoch ms."""

    app: str
    start: int
    end: int

    def __post_init__(self) -> None:
        if self.end <= self.start:
            raise ValueError(f"empty window [{self.start}, {self.end}) for {self.app}")

    @property
    def length(self) -> int:
        return self.end - self.start

    @property
    def label(self) -> str:
        """``2026-01-01T00:00:00Z/2026-01-31T00:00:00Z``: how logs and errors name it."""
        return f"{iso(self.start)}/{iso(self.end)}"


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowRecord:
    """A window as the ledger holds it.  Times are epoch ms; the download link is never kept."""

    id: int
    window: Window
    state: WindowState
    attempt: int
    parent_id: int | None = None
    request_id: str | None = None
    submitted_at: int | None = None
    ready_at: int | None = None
    error_class: str | None = None
    error_message: str | None = None
    retryable: bool | None = None
    rows: int | None = None
    bytes: int | None = None
    manifest: str | None = None
    committed_attempt: int | None = None
    created_at: int = 0
    updated_at: int = 0
    replaces: int | None = None  # the committed window whose range this one re-pulls, if split
    failures: int = 0  # times this window was moved to FAILED


class Changes(TypedDict, total=False):
    """The columns a move may set beside the state (checked by mypy, not at run time)."""

    request_id: str | None
    submitted_at: int | None
    ready_at: int | None
    error_class: str | None
    error_message: str | None
    retryable: bool | None
    rows: int | None
    bytes: int | None
    manifest: str | None


def check_tiles(window: Window, children: Sequence[Window]) -> None:
    """Raise ``ValueError`` unless ``children`` (of ``window``'s app) tile ``window`` exactly:
    no gap, no overlap, nothing outside (what a split must hand the ledger)."""
    spans = sorted((c.start, c.end) for c in children)
    tiled = (
        bool(spans)
        and spans[0][0] == window.start
        and spans[-1][1] == window.end
        and all(a[1] == b[0] for a, b in zip(spans, spans[1:], strict=False))
    )
    if not tiled or any(c.app != window.app for c in children):
        raise ValueError(f"children do not tile {window.label}")
