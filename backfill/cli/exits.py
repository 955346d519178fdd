"""The exit codes of ``backfill`` and their text, in one place.

Every command returns one of these; ``EXIT_CODES`` is the table printed under each ``--help``,
``BY_STANDING`` turns how a run's range stands afterwards into its code, and ``for_error`` turns
an error that ended a command into its message (on stderr) and code.
"""

from __future__ import annotations

import sys
from typing import Final

from backfill import logs
from backfill.errors import AuthError, ConfigError, IntegrityError, LockedError

__all__ = [
    "BY_STANDING",
    "EXIT_AUTH",
    "EXIT_CODES",
    "EXIT_FAILED_WINDOWS",
    "EXIT_INTEGRITY",
    "EXIT_INTERRUPTED",
    "EXIT_LOCKED",
    "EXIT_OK",
    "EXIT_TRANSIENT",
    "EXIT_USAGE",
    "code_of",
    "for_error",
]

EXIT_OK: Final = 0
EXIT_USAGE: Final = 2
EXIT_AUTH: Final = 3
EXIT_FAILED_WINDOWS: Final = 4
EXIT_INTEGRITY: Final = 5
EXIT_LOCKED: Final = 6
EXIT_TRANSIENT: Final = 75
EXIT_INTERRUPTED: Final = 130

EXIT_CODES: Final = f"""exit codes:
  {EXIT_OK}    all requested windows committed
  {EXIT_USAGE}    usage or configuration error; nothing started
  {EXIT_AUTH}    authentication refused by the API
  {EXIT_FAILED_WINDOWS}    finished, but some windows FAILED (`backfill status`; `backfill retry`)
  {EXIT_INTEGRITY}    ledger or integrity problem (see `backfill verify`)
  {EXIT_LOCKED}    another run holds the ledger; nothing started (`--wait` queues behind it)
  {EXIT_TRANSIENT}   transient failures exhausted; safe to re-run
  {EXIT_INTERRUPTED}  interrupted after a clean drain; run again to resume
"""

# How the requested windows stand after a run that ended by itself (``outcome_of_range``).
BY_STANDING: Final = {
    "done": EXIT_OK,
    "failed": EXIT_FAILED_WINDOWS,
    "retryable": EXIT_TRANSIENT,
    "unfinished": EXIT_TRANSIENT,
}

_TOKEN_HINT = "[api].token_env or [api].token_file of the config"


def for_error(exc: Exception, *, usage: bool = False, json_log: bool = False) -> int:
    """Print ``exc`` as ``backfill: error: ...`` on stderr and return its exit code.

    ``usage`` marks an error that is a usage or configuration error without being a
    ``ConfigError`` (the simulator's own config errors).  Any other error, a ``BackfillError``
    by contract of the caller, is transient.  With ``json_log`` the error is a JSON log line
    instead (``run.fatal.error`` with the message and the exit code), for log collectors.
    """
    code, hint = _classify(exc, usage)
    message = f"{logs.scrub(str(exc))}{hint}"
    if json_log:
        logs.get("cli").error("run.fatal.error", message=message, exit_code=code)
    else:
        print(f"backfill: error: {message}", file=sys.stderr)
    return code


def code_of(exc: Exception, *, usage: bool = False) -> int:
    """The exit code ``for_error`` gives ``exc``, without printing it."""
    return _classify(exc, usage)[0]


def _classify(exc: Exception, usage: bool) -> tuple[int, str]:
    if usage or isinstance(exc, ConfigError):
        return EXIT_USAGE, ""
    if isinstance(exc, AuthError):
        return EXIT_AUTH, f"; check the token ({_TOKEN_HINT})"
    if isinstance(exc, IntegrityError):
        return EXIT_INTEGRITY, ""
    if isinstance(exc, LockedError):
        return EXIT_LOCKED, ""
    return EXIT_TRANSIENT, ""
