"""The set-up shared by the commands: the config, the chosen apps, the token, the ledger, the lock.

The commands see the environment only as the ``env`` that ``main`` hands them; here it gives
the config path (``BACKFILL_CONFIG``) and the token variable the config names.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
import time
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from backfill import config, ledgers, logs
from backfill.errors import ConfigError, LockedError

if TYPE_CHECKING:
    import argparse
    from collections.abc import AsyncIterator, Iterator, Mapping

    from backfill.config import AppSettings, Settings
    from backfill.ledger import Ledger

__all__ = [
    "DEFAULT_CONFIG",
    "check_order",
    "chosen",
    "day",
    "demo_config",
    "exclusive",
    "exclusive_at",
    "load",
    "open_ledger",
    "open_ledger_at",
    "prologue",
    "register_token",
]

DEFAULT_CONFIG = Path("config/backfill.toml")


def demo_config() -> Path:
    """The demo's config file, shipped inside the package (``config/demo.toml`` links to it)."""
    return Path(str(resources.files("backfill.simulator").joinpath("demo.toml")))


def load(args: argparse.Namespace, env: Mapping[str, str]) -> Settings:
    """The config of ``--config`` (else ``$BACKFILL_CONFIG``, else the default) with the
    command-line overrides (``--format``, ``--max-in-flight``); its warnings go to stderr."""
    path = args.config or Path(env.get("BACKFILL_CONFIG") or DEFAULT_CONFIG)
    settings = config.load(path)
    changes: dict[str, Any] = {}
    if getattr(args, "format", None):
        changes["format"] = args.format
    if getattr(args, "max_in_flight", None) is not None:
        if args.max_in_flight < 1:
            raise ConfigError(f"--max-in-flight {args.max_in_flight}: expected at least 1")
        changes["max_in_flight"] = args.max_in_flight
    if changes:
        settings = config.replace_api(settings, **changes)
    for warning in settings.warnings:
        print(f"backfill: warning: {warning}", file=sys.stderr)
    return settings


def chosen(settings: Settings, names: list[str] | None) -> list[AppSettings]:
    """The apps named by ``--app`` (all of them when none is); an unknown name is refused."""
    if not names:
        return list(settings.apps)
    known = [a.name for a in settings.apps]
    for name in names:
        if name not in known:
            raise ConfigError(
                f"--app {name!r}: not an app of {settings.source} (apps: {', '.join(known)})"
            )
    return [a for a in settings.apps if a.name in names]


def prologue(
    args: argparse.Namespace, env: Mapping[str, str], *, names: list[str] | None = None
) -> tuple[Settings, list[AppSettings], str]:
    """The config, the chosen apps and the token (registered for redaction) of a command.

    The apps are ``names`` if given, else those of ``--app``.
    """
    settings = load(args, env)
    apps = chosen(settings, names if names is not None else args.app)
    token = config.read_token(settings, env)
    logs.register_secret(token)
    return settings, apps, token


def register_token(settings: Settings, env: Mapping[str, str]) -> None:
    """The token, if it can be read, registered for redaction (``status`` needs no token)."""
    with contextlib.suppress(ConfigError):
        logs.register_secret(config.read_token(settings, env))


def check_order(args: argparse.Namespace) -> None:
    """``--end`` after ``--start`` when both are given, or ``ConfigError``."""
    if args.start is not None and args.end is not None and args.end <= args.start:
        raise ConfigError(f"--end must be after --start (got {day(args.start)} .. {day(args.end)})")


def day(ms: int) -> str:
    """An epoch-ms instant as the ISO text the messages show."""
    from backfill.models import iso

    return iso(ms)


@contextlib.contextmanager
def exclusive(settings: Settings, *, wait: float | None = None) -> Iterator[None]:
    """One run per ledger: a second one refuses clearly instead of sharing windows.

    The lock is an ``flock`` on ``{ledger}.lock``, which holds the pid of the run holding it;
    the kernel releases it when that process dies, so a killed run never leaves it stale.
    ``wait`` (``--wait``) is how long to queue behind the holder (``math.inf``: as long as it
    takes); without it, or when it runs out, a held lock is a ``LockedError`` naming the pid.
    A PostgreSQL ledger has no run lock: many workers share it, each window under a lease.
    """
    if settings.ledger.url is not None:
        yield
        return
    with exclusive_at(settings.ledger_path, wait=wait):
        yield


@contextlib.contextmanager
def exclusive_at(ledger_path: Path, *, wait: float | None = None) -> Iterator[None]:
    """The run lock of the ledger at ``ledger_path`` (see ``exclusive``)."""
    path = ledger_path.with_name(ledger_path.name + ".lock")
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        _acquire(handle, ledger_path, wait)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


_POLL_S = 0.2  # how often a waiting run tries the lock again (flock cannot time out by itself)


def _acquire(handle: TextIO, ledger_path: Path, wait: float | None) -> None:
    """Take the lock on ``handle``: at once, or within ``wait`` seconds, saying once (on
    stderr) which pid it waits for; else ``LockedError``.  Polling, not a blocking ``flock``,
    so that a wait can end, and Ctrl-C ends it at once."""
    deadline = None if wait is None else time.monotonic() + wait
    announced = False
    while True:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return
        except BlockingIOError:
            pid = _holder(handle)
        shown = "?" if pid is None else str(pid)
        if deadline is None:
            raise LockedError(
                f"{ledger_path}: another backfill run (pid {shown}) is using this ledger; "
                "wait for it (--wait) or stop it",
                pid=pid,
            )
        left = deadline - time.monotonic()
        if left <= 0:
            raise LockedError(
                f"{ledger_path}: another backfill run (pid {shown}) still holds this ledger "
                f"after waiting {wait:g} s",
                pid=pid,
            )
        if not announced:
            print(f"backfill: waiting for pid {shown} to finish with {ledger_path}",
                  file=sys.stderr, flush=True)  # fmt: skip
            announced = True
        time.sleep(min(_POLL_S, left))


def _holder(handle: TextIO) -> int | None:
    """The pid the lock file holds (None before the holder wrote it)."""
    handle.seek(0)
    text = handle.read().strip()
    return int(text) if text.isdigit() else None


@contextlib.asynccontextmanager
async def open_ledger(settings: Settings, *, command: str = "") -> AsyncIterator[Ledger]:
    """The ledger of ``settings`` (see ``ledgers.opened``), closed on the way out."""
    async with ledgers.opened(settings, command=command) as ledger:
        yield ledger


@contextlib.asynccontextmanager
async def open_ledger_at(path: Path) -> AsyncIterator[Ledger]:
    """The ledger at ``path``, closed on the way out."""
    from backfill.ledger import Ledger

    ledger = await Ledger.open(path)
    try:
        yield ledger
    finally:
        await ledger.close()
