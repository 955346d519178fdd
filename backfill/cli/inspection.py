"""The commands that only look: ``plan``, ``status`` and ``verify``.

None of them calls the API or changes the ledger; ``plan`` and ``status`` work before the
ledger exists (everything NEW, nothing landed), ``verify`` needs one.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import sys
from typing import TYPE_CHECKING, Any

from backfill.calendar import LEGEND, render
from backfill.cli import session
from backfill.cli.exits import EXIT_FAILED_WINDOWS, EXIT_INTEGRITY, EXIT_OK
from backfill.errors import ConfigError
from backfill.models import WindowState, iso

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping, Sequence

    from backfill.audit import AppStatus, Failure
    from backfill.config import AppSettings, Settings
    from backfill.ledger import Ledger

__all__ = ["plan", "print_status", "status", "verify"]


async def plan(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill plan``: the windows of the range per app, with their ledger state."""
    import zoneinfo

    from backfill import planner

    settings = session.load(args, env)
    apps = session.chosen(settings, args.app)
    session.check_order(args)
    if args.refresh or args.damaged:
        return await _plan_refresh(args, settings, apps)
    tz = zoneinfo.ZoneInfo(settings.windows.timezone)
    w = settings.windows
    now = int(dt.datetime.now(dt.UTC).timestamp() * 1000)
    start, end, _ = planner.clamp(
        now, args.start, args.end, history_days=w.history_days, lag_hours=w.lag_hours, tz=tz
    )
    rows: list[dict[str, str]] = []
    exists = settings.ledger_exists()
    async with contextlib.AsyncExitStack() as stack:
        ledger = await stack.enter_async_context(session.open_ledger(settings)) if exists else None
        for app in apps:
            rows += await _plan_rows(ledger, app.name, start, end, max_days=w.max_days, tz=tz)
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'app':20} {'start':22} {'end':22} state")
    for row in rows:
        print(f"{row['app']:20} {row['start']:22} {row['end']:22} {row['state']}")
    todo = sum(1 for r in rows if r["state"] != WindowState.COMMITTED)
    done = sum(1 for r in rows if r["state"] == WindowState.COMMITTED)
    print(
        f"\n{len(rows)} windows: {done} already committed; "
        f"a run would submit at least {todo} requests"
    )
    return EXIT_OK


async def _plan_refresh(
    args: argparse.Namespace, settings: Settings, apps: Sequence[AppSettings]
) -> int:
    """``plan --refresh --app NAME``: the windows a ``refresh`` would pull again."""
    from backfill.cli import life

    if len(apps) != 1 or not args.app:
        raise ConfigError("plan --refresh: name exactly one app with --app")
    rows: list[dict[str, str]] = []
    if settings.ledger_exists():
        async with session.open_ledger(settings) as ledger:
            chosen = await life.refresh_choice(
                ledger,
                settings,
                apps[0].name,
                args.start,
                args.end,
                damaged=args.damaged,
            )
        rows = [
            {"app": r.window.app, "start": iso(r.window.start), "end": iso(r.window.end),
             "state": "REFRESH" if r.state is WindowState.COMMITTED else str(r.state)}
            for r in chosen
        ]  # fmt: skip
    if args.json:
        print(json.dumps(rows, indent=1))
        return EXIT_OK
    print(f"{'app':20} {'start':22} {'end':22} state")
    for row in rows:
        print(f"{row['app']:20} {row['start']:22} {row['end']:22} {row['state']}")
    again = sum(1 for r in rows if r["state"] == "REFRESH")
    print(f"\na refresh would pull {again} committed window{'s' * (again != 1)} again")
    return EXIT_OK


async def _plan_rows(
    ledger: Ledger | None, app: str, start: int, end: int, *, max_days: int, tz: dt.tzinfo
) -> list[dict[str, str]]:
    """One app's windows in ``[start, end)`` (``audit.planned_windows``), as JSON rows."""
    from backfill import audit

    planned = await audit.planned_windows(ledger, app, start, end, max_days=max_days, tz=tz)
    return [{"app": app, "start": iso(a), "end": iso(b), "state": state} for a, b, state in planned]


async def status(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill status``: coverage per app, as text with a calendar or ``--json``.

    With ``--check``, exit 4 when a FAILED window needs a person, else 0; without, always 0.
    """
    from backfill import audit

    settings = session.load(args, env)
    apps = session.chosen(settings, args.app)
    session.register_token(settings, env)  # an error message must not show it, even an old one
    workers: list[Any] = []
    if not settings.ledger_exists():
        report: list[AppStatus] = []
    else:
        async with session.open_ledger(settings) as ledger:
            names = [a.name for a in apps]
            report = await audit.status(ledger, names, heal_runs=settings.windows.heal_runs)
            if ledger.shared:
                workers = await ledger.workers()  # type: ignore[attr-defined]  # a SharedLedger
    if args.json:
        print(json.dumps([r.to_json() for r in report], indent=1))
    else:
        print_status(report, limit=None if args.all else _LIMIT)
        if settings.ledger.url is not None:
            print_workers(workers, limit=None if args.all else _LIMIT)
    stuck = sum(1 for r in report for f in r.failures if f.needs_person)
    if args.check and stuck:
        print(
            f"backfill: {stuck} FAILED window{'s need' if stuck != 1 else ' needs'} a person: "
            "fix the cause, then `backfill retry`",
            file=sys.stderr,
        )
        return EXIT_FAILED_WINDOWS
    return EXIT_OK


_LIMIT = 10  # entries of a list ``status`` shows without --all


def print_workers(workers: Sequence[Any], *, limit: int | None = _LIMIT) -> None:
    """The workers of a shared ledger: who, since when, last seen, and the windows each holds."""
    from backfill.models import iso

    if not workers:
        print("\nworkers: none running")
        return
    print(f"\nworkers: {len(workers)}")
    print(f"  {'worker':34} {'command':8} {'started':22} {'seen':22} holding")
    for w in workers:
        print(f"  {w.worker:34} {w.command:8} {iso(w.started_at):22} {iso(w.seen_at):22} "
              f"{len(w.holding)} window{'s' * (len(w.holding) != 1)}")  # fmt: skip
        for window_id, app, label, state in w.holding[:limit]:
            print(f"    #{window_id} {app} {label} {state}")
        if limit is not None and len(w.holding) > limit:
            print(f"    ... {len(w.holding) - limit} more (--all)")


def print_status(report: Sequence[AppStatus], *, limit: int | None = _LIMIT) -> None:
    """The status text (``status`` and ``demo``): a table, then per app its calendar, gaps and
    failures, each list cut at ``limit`` entries with how many more (``None``: all)."""
    if not report:
        print("nothing in the ledger yet: run `backfill run` first")
        return
    print(
        f"{'app':18} {'committed':>9} {'failed':>6} {'pending':>7} {'split':>5} "
        f"{'rows':>12} {'bytes':>14}  days with rows"
    )
    for r in report:
        print(
            f"{r.app:18} {r.committed:>9} {r.failed:>6} {r.pending:>7} {r.split:>5} "
            f"{r.rows:>12,} {r.bytes:>14,}  {r.committed_days} of {len(r.days)}"
        )
    for r in report:
        print()
        _print_app(r, limit)
    print(f"\n{LEGEND}")


def _print_app(r: AppStatus, limit: int | None) -> None:
    """One app's calendar, gaps and failures."""
    if r.span is None:
        print(f"{r.app}: nothing planned yet")
        return
    first, last = r.span
    print(f"{r.app}: {r.committed_days} of {len(r.days)} days have rows ({first} .. {last})")
    for line in render(r.days, indent="  "):
        print(line)
    gaps = [
        f"{a} .. {b} ({(_date(b) - _date(a)).days + 1} days)" if a != b else f"{a} (1 day)"
        for a, b in r.gaps
    ]
    missing = len(r.days) - r.committed_days
    if gaps:
        print(f"  gaps: {missing} day{'s' * (missing != 1)} without rows, in {len(gaps)} stretch"
              f"{'es' * (len(gaps) != 1)}")  # fmt: skip
        _print_list(gaps, limit)
    if r.failures:
        stuck = sum(1 for f in r.failures if f.needs_person)
        print(f"  failed windows: {len(r.failures)}, {stuck} of them need{'s' * (stuck == 1)} "
              "a person")  # fmt: skip
        _print_list([_failure_line(f) for f in r.failures], limit)


def _failure_line(f: Failure) -> str:
    times = f"failed {f.failures} time{'s' * (f.failures != 1)}"
    if f.needs_person:
        why = "not retryable" if not f.retryable else times
        return f"{f.window}: {f.error}  [needs a person: {why}; `backfill retry`]"
    return f"{f.window}: {f.error}  [retryable, {times}; the next run or sync takes it back]"


def _print_list(lines: Sequence[str], limit: int | None) -> None:
    shown = lines if limit is None else lines[:limit]
    for line in shown:
        print(f"    {line}")
    if len(lines) > len(shown):
        print(f"    and {len(lines) - len(shown)} more (--all lists them)")


def _date(text: str) -> dt.date:
    return dt.date.fromisoformat(text)


async def verify(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill verify``: every committed window's files against its manifest; exit 5 if not.

    Without a ledger there is nothing to verify against: a usage error (exit 2), not damage.
    """
    from backfill import audit
    from backfill.objstore import open_store

    settings = session.load(args, env)
    if not settings.ledger_exists():
        raise ConfigError(
            f"{settings.ledger_shown}: no ledger to verify against (nothing has run with this "
            "config yet, or [ledger].path points elsewhere)"
        )
    async with session.open_ledger(settings) as ledger:
        problems = await audit.verify(ledger, open_store(settings))
        committed = len(await ledger.windows(states=[WindowState.COMMITTED]))
    for problem in problems:
        print(f"problem: {problem}")
    if problems:
        print(f"{len(problems)} problem{'s' * (len(problems) != 1)} found", file=sys.stderr)
        damaged = sorted({p.window_id for p in problems if p.window_id is not None})
        if damaged:
            print(
                f"{len(damaged)} damaged window{'s' * (len(damaged) != 1)}: "
                "`backfill refresh --app NAME --damaged` pulls them again",
                file=sys.stderr,
            )
        return EXIT_INTEGRITY
    print(f"verified {committed} committed windows: every file matches its manifest, no orphan")
    return EXIT_OK
