"""The ``backfill`` command line: ``main`` parses the arguments and runs one command.

The package is the edge: ``main`` is the one place that reads ``os.environ`` (handed to the
commands as ``env``: the config path, the token variable, the crash-test seams) and builds
sessions, connections and paths for the engine.  Its rooms: ``parser`` (the table of commands),
``exits`` (the exit codes and their text), ``session`` (config, apps, token, ledger, run lock),
``runs`` (run, sync, retry, demo), ``check`` (the preflight and ``backfill check``), ``life``
(refresh, forget), ``recorded`` (the settings guard), ``inspection`` (plan, status, verify),
``tools`` (convert, simulate) and ``landing`` (convert into a managed root).
"""

from __future__ import annotations

import atexit
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio

from backfill import logs
from backfill.cli import check, exits, inspection, life, parser, runs, tools
from backfill.cli.exits import EXIT_CODES
from backfill.errors import BackfillError, first_of

if TYPE_CHECKING:
    import argparse
    from collections.abc import Awaitable, Callable, Mapping, Sequence

    _Handler = Callable[[argparse.Namespace, Mapping[str, str]], Awaitable[int]]

__all__ = ["EXIT_CODES", "HANDLERS", "main"]

# What runs each command of ``parser.COMMANDS``.
HANDLERS: dict[str, _Handler] = {
    "plan": inspection.plan,
    "run": runs.run,
    "sync": runs.sync,
    "retry": runs.retry,
    "refresh": life.refresh,
    "forget": life.forget,
    "status": inspection.status,
    "verify": inspection.verify,
    "convert": tools.convert,
    "simulate": tools.simulate,
    "demo": runs.demo,
    "check": check.check,
}

# The commands that show a live progress table on a terminal.
_LIVE = ("run", "sync", "retry", "refresh", "demo")


def main(argv: Sequence[str] | None = None, env: Mapping[str, str] | None = None) -> int:
    """Run the command line; returns the exit code (the console script exits with it)."""
    from backfill import crashpoints
    from backfill.simulator import SimulatorConfigError

    env = os.environ if env is None else env
    args = parser.build().parse_args(argv)
    quiet = getattr(args, "quiet", False)
    log_format: Any = getattr(args, "log_format", "auto")
    # On a terminal the live progress table says what info lines would; keep the screen clean.
    live = log_format == "auto" and sys.stderr.isatty() and args.command in _LIVE
    logs.configure(fmt=log_format, level="warning" if quiet or live else "info")
    # Fatal errors as JSON log lines where the log lines are JSON (a collector reads them).
    json_log = log_format == "json" or (log_format == "auto" and not sys.stderr.isatty())
    crashpoints.arm(env.get("BACKFILL_CRASH_AT"))  # the crash tests' seam; unset in real use
    if counts := env.get("BACKFILL_CRASH_COUNTS"):  # ... and where the sweep learns the steps
        atexit.register(lambda: Path(counts).write_text(json.dumps(crashpoints.counts())))
    try:
        try:
            return anyio.run(HANDLERS[args.command], args, env)
        except BaseExceptionGroup as group:  # task groups wrap what ended them
            found = first_of(group)
            if found is None:
                raise
            raise found from None
    except SimulatorConfigError as exc:
        return exits.for_error(exc, usage=True, json_log=json_log)
    except BackfillError as exc:
        return exits.for_error(exc, json_log=json_log)
    except KeyboardInterrupt:
        return exits.EXIT_INTERRUPTED
    except BrokenPipeError:  # `backfill plan --json | head -1`: the reader has what it wanted
        _quiet_stdout()
        return exits.EXIT_OK


def _quiet_stdout() -> None:
    """Point stdout at /dev/null, so the interpreter's last flush does not fail again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    os.close(devnull)
