"""Logging: structlog set up once, JSON lines off a terminal, console lines on one, secrets out.

Events are named ``<component>.<action>.<outcome>`` (``window.submit.ok``).  Two processors stand
between every event and its output: ``redact_urls`` cuts the query string (a presigned link's
signature) off every URL, and ``redact_secrets`` replaces each registered secret (the API token)
wherever it appears, in any value.  Nothing else calls ``structlog.configure``.
"""

from __future__ import annotations

import logging
import re
import sys
from typing import TYPE_CHECKING, Any, Literal, TextIO

import structlog

if TYPE_CHECKING:
    from collections.abc import MutableMapping

__all__ = ["configure", "get", "redact_secrets", "redact_urls", "register_secret"]

_SECRETS: set[str] = set()
_URL = re.compile(r"(https?://[^\s?#\"']+)\?[^\s#\"']*")


def register_secret(value: str) -> None:
    """From now on, ``value`` is replaced by ``***`` in every log event."""
    if len(value) >= 4:
        _SECRETS.add(value)


def _scrub(value: Any) -> Any:
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


def redact_urls(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Cut query strings off URLs in every value (presigned links carry their signature there)."""
    return {k: _scrub(v) if isinstance(v, str) else v for k, v in event.items()}


def redact_secrets(_: Any, __: str, event: MutableMapping[str, Any]) -> MutableMapping[str, Any]:
    """Replace every registered secret, in any value, nested or not."""
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
            redact_urls,
            redact_secrets,
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
