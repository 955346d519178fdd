"""Logging: structlog set up once, JSON lines off a terminal, console lines on one, secrets out.

Events are named ``<component>.<action>.<outcome>`` (``window.submit.ok``).  One processor,
``redact``, stands between every event and its output: in every value, nested or not (strings,
dicts, lists, tuples, exceptions), it cuts the query string (a presigned link's signature) off
every URL and replaces each registered secret (the API token) with ``***``.  Nothing else calls
``structlog.configure``.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["configure", "get", "redact", "register_secret"]

_SECRETS: set[str] = set()
_URL = re.compile(r"(https?://[^\s?#\"']+)\?[^\s#\"']*")


def register_secret(value: str) -> None:
    """From now on, ``value`` is replaced by ``***`` in every log event."""
    if len(value) >= 4:
        _SECRETS.add(value)


def _scrub(value: Any) -> Any:
    """``value`` with URL query strings cut and registered secrets replaced, at any depth."""
    if isinstance(value, str):
        value = _URL.sub(r"\1?…", value)
        for secret in _SECRETS:
            value = value.replace(secret, "***")
        return value
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
