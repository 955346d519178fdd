"""How each command plans its run: the ``prepare`` step the API and the command line share.

A ``prepare`` plans on the engine before it runs and returns the range whose windows decide the
exit code (None: every window of the apps); the engine then takes the unfinished windows
overlapping it.  ``retry`` also fills a list with exactly the windows it takes back: the run
takes those and nothing else, and ``standing`` judges them (their ``spans``).  What a
``prepare`` has to tell (a clamped range, windows taken back) goes to ``say(level, text)``:
the command line prints it, the API logs it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backfill.models import WindowState

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable, Sequence

    from backfill.config import AppSettings, Settings
    from backfill.engine import Engine
    from backfill.ledger import Ledger
    from backfill.models import WindowRecord

    Prepare = Callable[[Engine], Awaitable[tuple[int | None, int | None]]]
    Finished = Callable[[Ledger], Awaitable[None]]
    # ``say(level, text)``: "warning" (the CLI prefixes ``backfill: warning:``), "note" (``note:``,
    # on stderr) or "info" (the command's own line).
    Say = Callable[[str, str], None]

__all__ = [
    "preparing_refresh",
    "preparing_retry",
    "preparing_run",
    "preparing_sync",
    "spans",
    "standing",
]

_LISTED = 20  # windows that ``retry`` names one by one


def _plural(count: int, word: str) -> str:
    return f"{count} {word}{'s' * (count != 1)}"


def _took_back(count: int, say: Say) -> None:
    if count:
        say("info", f"taking back {_plural(count, 'failed window')} (retryable; a failed "
                    "night heals on the next one)")  # fmt: skip


def preparing_run(apps: list[AppSettings], start: int | None, end: int | None, say: Say) -> Prepare:
    """``run``: ``[start, end)`` clamped to the horizon, planned; its retryable failures back."""

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        lo, hi, notes = engine.clamp(start, end)
        for note in notes:
            say("warning", note)
        await engine.plan(apps, lo, hi)
        _took_back(await engine.requeue_failed(apps, lo, hi, heal=True), say)
        return lo, hi

    return prepare


def preparing_sync(apps: list[AppSettings], say: Say) -> Prepare:
    """``sync``: the lookback before each app's newest rows, the gaps, retryable failures."""

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        await engine.prepare_sync(apps)
        _took_back(await engine.requeue_failed(apps, heal=True), say)
        return None, None

    return prepare


def preparing_retry(apps: list[AppSettings], say: Say, taken: list[WindowRecord]) -> Prepare:
    """``retry``: every FAILED window of the apps, queued again, named (the first ``_LISTED``
    one by one) and added to ``taken``: the run takes those and nothing else (a window pending
    for another reason waits for ``run``/``sync``)."""

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        taken.extend(await engine.take_failed(apps))
        lines = [f"retrying {_plural(len(taken), 'failed window')}{':' * bool(taken)}"]
        lines += [f"  {r.window.app} {r.window.label}" for r in taken[:_LISTED]]
        if len(taken) > _LISTED:
            lines.append(f"  and {len(taken) - _LISTED} more")
        say("info", "\n".join(lines))
        return None, None

    return prepare


def preparing_refresh(
    settings: Settings, app: AppSettings, start: int | None, end: int | None,
    *, damaged: bool, accept_shrink: bool, say: Say,
) -> tuple[Prepare, Finished]:  # fmt: skip
    """``refresh``: the chosen committed windows back to PENDING; the settings recorded after
    a run that pulled every window of the app (``Finished``)."""
    from backfill.cli import life, recorded  # the choice and the guard are the CLI's (see api)

    whole: list[bool] = []

    def in_range(lo: int, hi: int) -> bool:
        return (start is None or hi > start) and (end is None or lo < end)

    async def prepare(engine: Engine) -> tuple[int | None, int | None]:
        chosen = await life.refresh_choice(
            engine.ledger, settings, app.name, start, end, damaged=damaged
        )
        records = await engine.ledger.windows(apps=[app.name])
        live = {r.id for r in records if r.committed_attempt is not None}
        whole.append({r.id for r in chosen} >= live)
        for record in chosen:
            if record.state is WindowState.COMMITTED:
                await engine.requeue_committed(app, record.window.start, record.window.end)
        if accept_shrink:  # the re-pulls held for shrinking go again, and are accepted
            for record in records:
                held = record.error_class == "ShrinkError" and record.state is WindowState.FAILED
                if held and in_range(record.window.start, record.window.end):
                    chosen.append(await engine.ledger.retry(record))
        say("info", f"refreshing {_plural(len(chosen), 'window')} of {app.name}")
        if not chosen:
            return start, end
        return min(r.window.start for r in chosen), max(r.window.end for r in chosen)

    async def finished(ledger: Ledger) -> None:
        from backfill import guard

        if whole and whole[0]:
            await recorded.record(ledger, [app])
        elif not guard.same(await ledger.recorded_settings(app.name), app):
            say(
                "note",
                f"windows of {app.name} outside the refreshed range hold rows pulled with the "
                "old settings; refresh them too before the next run or sync",
            )

    return prepare, finished


_SEVERITY = ("done", "unfinished", "retryable", "failed")  # BY_STANDING's keys, worst last


def spans(records: Sequence[WindowRecord]) -> list[tuple[str, int, int]]:
    """The windows' ranges as (app, start, end), touching or overlapping ranges merged."""
    merged: list[tuple[str, int, int]] = []
    for w in sorted((r.window for r in records), key=lambda w: (w.app, w.start)):
        if merged and merged[-1][0] == w.app and merged[-1][2] >= w.start:
            app, start, end = merged.pop()
            merged.append((app, start, max(end, w.end)))
        else:
            merged.append((w.app, w.start, w.end))
    return merged


async def standing(
    ledger: Ledger, ranges: Sequence[tuple[str, int | None, int | None]], heal_runs: int
) -> str:
    """How the windows of ``ranges`` (app, start, end) stand after a run: the worst of them."""
    from backfill.audit import outcome_of_range

    worst = "done"
    for app, start, end in ranges:
        got = await outcome_of_range(ledger, [app], start, end, heal_runs=heal_runs)
        worst = max(worst, got, key=_SEVERITY.index)
    return worst
