"""Every error backfill raises, classified by what the caller should do about it.

The class decides what happens next, never the message text::

    BackfillError
    ├── ConfigError                  bad configuration or usage: nothing starts (exit 2)
    ├── LockedError                  another run holds the ledger: nothing starts (exit 6)
    ├── Stopped                      the work was asked to stop at once: nothing of it is kept
    ├── FatalError                   stop the whole run
    │   ├── AuthError                the API refused the token (exit 3)
    │   ├── StorageError             the output cannot be written (disk full): free space, re-run
    │   └── IntegrityError           ledger or output integrity problem (exit 5)
    │       ├── LedgerError          the ledger cannot be opened, migrated or written
    │       ├── StaleAttemptError    a compare-and-set lost: another attempt owns the window
    │       └── IllegalTransitionError  a move the transition table forbids (a bug)
    └── WindowError                  concerns one window; carries app, window and request id
        ├── RetryableError           try the same step again after a backoff
        │   ├── TransportError       connection refused, reset, timed out
        │   ├── ServerError          5xx, or a body that is not the JSON it should be
        │   ├── RateLimitedError     429: wait (Retry-After, refill rate) before submitting
        │   └── LinkExpiredError     the presigned link expired: poll again for a fresh one
        ├── ResubmitError            submit the window again (a new request)
        │   ├── RequestFailedError   Flurry reported Failure
        │   ├── ResultsExpiredError  "Expired URI. Please resubmit request", or a lost id (404)
        │   └── RequestTimeoutError  the request never finished within the allowed time
        ├── TooLargeError            split the window (suggested size, or the next size down)
        └── WindowFailedError        the window cannot be done as asked: fail it
            ├── RequestRejectedError 400: a window the API will never accept
            ├── CannotSplitError     too large even at the smallest size
            ├── BadDataError         a download that is corrupt or breaks the schema
            └── ShrinkError          a re-pull with far fewer rows than what it replaces
"""

from __future__ import annotations

from typing import TypedDict, Unpack

__all__ = [
    "AuthError",
    "first_of",
    "Where",
    "BackfillError",
    "BadDataError",
    "CannotSplitError",
    "ConfigError",
    "FatalError",
    "IllegalTransitionError",
    "IntegrityError",
    "LedgerError",
    "LinkExpiredError",
    "LockedError",
    "RateLimitedError",
    "RequestFailedError",
    "RequestRejectedError",
    "RequestTimeoutError",
    "ResubmitError",
    "ResultsExpiredError",
    "RetryableError",
    "ServerError",
    "ShrinkError",
    "StaleAttemptError",
    "StorageError",
    "Stopped",
    "TooLargeError",
    "TransportError",
    "WindowError",
    "WindowFailedError",
]


class Where(TypedDict, total=False):
    """Which window an error concerns."""

    app: str | None
    window: str | None
    request_id: str | None


class BackfillError(Exception):
    """The root of every error backfill raises on purpose."""


class ConfigError(BackfillError):
    """Configuration or usage is wrong; the message names the file, key, value and expectation."""


class LockedError(BackfillError):
    """Another run holds the ledger's run lock (``pid``: its process id, if it wrote one).

    Nothing started and nothing is wrong: wait for it (``--wait``) or run again later."""

    def __init__(self, message: str, *, pid: int | None = None) -> None:
        super().__init__(message)
        self.pid = pid


class Stopped(BackfillError):
    """Work asked to stop at once (a second Ctrl-C, or a stop Event) gave up; nothing is kept."""


class FatalError(BackfillError):
    """The run cannot go on; stop claiming windows and exit."""


class AuthError(FatalError):
    """The API refused the token (401)."""


class StorageError(FatalError):
    """The output cannot be written (disk full, permissions); nothing committed is lost."""


class IntegrityError(FatalError):
    """The ledger or the output is not what it must be."""


class LedgerError(IntegrityError):
    """The ledger cannot be opened, migrated or written."""


class StaleAttemptError(IntegrityError):
    """A compare-and-set on (window, attempt) found another state: this worker is stale."""


class IllegalTransitionError(IntegrityError, ValueError):
    """A move that ``models.TRANSITIONS`` does not allow: a bug, never an API condition."""


class WindowError(BackfillError):
    """An error about one window; ``context`` says which (app, window, request id)."""

    def __init__(
        self,
        message: str,
        *,
        app: str | None = None,
        window: str | None = None,
        request_id: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.app = app
        self.window = window
        self.request_id = request_id

    def context(self) -> str:
        pairs = (("app", self.app), ("window", self.window), ("request", self.request_id))
        parts = [f"{k}={v}" for k, v in pairs if v]
        return " ".join(parts)

    def __str__(self) -> str:
        where = self.context()
        return f"{self.message} ({where})" if where else self.message


class RetryableError(WindowError):
    """Try the same step again after a backoff."""

    def __init__(
        self, message: str, *, retry_after_s: float | None = None, **kw: Unpack[Where]
    ) -> None:
        super().__init__(message, **kw)
        self.retry_after_s = retry_after_s


class TransportError(RetryableError):
    """The connection failed or timed out."""


class ServerError(RetryableError):
    """5xx, or a response body that is not what the contract says."""


class RateLimitedError(RetryableError):
    """429: too many requests processing.  Carries the rate-limit headers' values."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float | None = None,
        refill_per_minute: float | None = None,
        remaining: int | None = None,
        limit: int | None = None,
        **kw: Unpack[Where],
    ) -> None:
        super().__init__(message, retry_after_s=retry_after_s, **kw)
        self.refill_per_minute = refill_per_minute
        self.remaining = remaining
        self.limit = limit


class LinkExpiredError(RetryableError):
    """The presigned download link expired (403): poll the status again for a new one."""


class ResubmitError(WindowError):
    """The request is gone or failed: submit the window again."""


class RequestFailedError(ResubmitError):
    """Flurry reported ``Failure`` for the request."""


class ResultsExpiredError(ResubmitError):
    """The results are past retention (``Expired URI...``) or the request id is unknown."""


class RequestTimeoutError(ResubmitError):
    """The request did not finish within the allowed processing time."""


class TooLargeError(WindowError):
    """Too much data for the window; ``suggested_ms`` is the size the API proposed, if readable."""

    def __init__(
        self, message: str, *, suggested_ms: int | None = None, **kw: Unpack[Where]
    ) -> None:
        super().__init__(message, **kw)
        self.suggested_ms = suggested_ms


class WindowFailedError(WindowError):
    """The window cannot be done as asked; fail it (not retryable unless something changes)."""


class RequestRejectedError(WindowFailedError):
    """400 for a window the API will never accept (too long, too old, malformed)."""


class CannotSplitError(WindowFailedError):
    """Still too large at the smallest window size."""


class BadDataError(WindowFailedError):
    """A download that is corrupt, too big, or breaks the schema."""


class ShrinkError(WindowFailedError):
    """A re-pull whose rows fall below the share of the rows it would replace: a person decides."""


def first_of(error: BaseException) -> BackfillError | None:
    """The first ``BackfillError`` inside ``error`` (itself, or nested in exception groups)."""
    if isinstance(error, BackfillError):
        return error
    if isinstance(error, BaseExceptionGroup):
        for inner in error.exceptions:
            if (found := first_of(inner)) is not None:
                return found
    return None
