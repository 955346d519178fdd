"""Logging: structlog set up once, JSON lines off a terminal, console lines on one, secrets out.

Events are named ``<component>.<action>.<outcome>`` (``window.submit.ok``).  One processor,
``redact``, stands between every event and its output: in every value, nested or not (strings,
dicts, lists, tuples, exceptions), it applies ``scrub``.  ``scrub`` is the one redaction for
everything a person or a file can see (log lines, exception texts, the ledger's error messages,
the summary, ``status``): it cuts the query string (a presigned link's signature) off every
link, whatever its scheme and even when malformed, blanks any ``X-Amz-…=``/``Signature=`` value
and any ``Authorization``/``Bearer`` credential, and replaces each registered secret (the API
token) with ``***``.  Nothing else calls ``structlog.configure``.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["configure", "get", "redact", "register_secret", "scrub"]

_SECRETS: set[str] = set()
# A link of any scheme (``https``, ``file``, ...), even a malformed one (``http://[::1/x?...``).
_URL = re.compile(r"([A-Za-z][A-Za-z0-9+.\-]*://[^\s?#\"'<>]+)\?[^\s#\"'<>]*")
# A signed query's secrets where no link is around them (an echoed ``GET /path?... HTTP/1.1``).
_SIGNED = re.compile(
    r"((?:X-Amz-[A-Za-z\-]*|Signature|Credential|Security-Token|Policy|Key-Pair-Id)=)"
    r"[^&\s\"'<>\\]+",
    re.IGNORECASE,
)
# A credential in an echoed header or text: ``Authorization: <anything>``, ``Bearer <token>``.
_AUTHORIZATION = re.compile(
    r"(authorization[\"']?\s*[:=]\s*[\"']?)(?:(?:bearer|basic|token|aws4-hmac-sha256)\s+)?"
    r"[^\s\"'\\,}]+",
    re.IGNORECASE,
)
_BEARER = re.compile(r"(bearer\s+)[A-Za-z0-9\-._~+/=]+", re.IGNORECASE)


def register_secret(value: str) -> None:
    """From now on, ``value`` is replaced by ``***`` in every log event."""
    if len(value) >= 4:
        _SECRETS.add(value)


def scrub(text: str) -> str:
    """``text`` safe to show or store: link queries cut, credentials and secrets blanked.

    The one redaction of the package: log events (``redact``), the client's exception texts,
    the ledger's error messages, the run summary and ``status`` all go through it.
    """
    for secret in _SECRETS:  # first: a secret may hold characters the patterns stop at
        text = text.replace(secret, "***")
    text = _URL.sub(r"\1?…", text)
    text = _SIGNED.sub(r"\1***", text)
    text = _AUTHORIZATION.sub(r"\1***", text)
    return _BEARER.sub(r"\1***", text)


def _scrub(value: Any) -> Any:
    """``value`` scrubbed (see ``scrub``) at any depth."""
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: _scrub(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_scrub(v) for v in value)
    if isinstance(value, BaseException):
        return _scrub(f"{type(value).__name__}: {value}")
    return value


def redact(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """The structlog processor: every value scrubbed (URL query strings cut, secrets replaced)."""
    return {k: _scrub(v) for k, v in event.items()}


def configure(
    *,
    fmt: Literal["auto", "console", "json"] = "auto",
    level: str = "info",
    stream: TextIO | None = None,
) -> None:
    """Set up structlog: console lines on a terminal (``auto``), JSON lines otherwise."""
    stream = stream or sys.stderr
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    renderer: Any = (
        structlog.dev.ConsoleRenderer(colors=stream.isatty())
        if fmt == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            redact,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(
            logging.getLevelNamesMapping()[level.upper()]
        ),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=False,
    )


def get(component: str) -> Any:
    """A logger bound to ``component``."""
    return structlog.get_logger(component=component)
