"""Where the ledger and the output live: the checks of ``[ledger]`` against ``[output]``.

A SQLite ``path`` or a PostgreSQL ``url`` (never both; a URL is only ever shown ``masked``);
an object-store output root needs a ledger outside it, named.  ``config.parse`` calls these.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from backfill.config_toml import at_least, fail
from backfill.errors import ConfigError

if TYPE_CHECKING:
    from pathlib import Path


class LedgerSettings(Protocol):
    """What the checks read of ``config.LedgerSettings`` (this module stays below config)."""

    @property
    def path(self) -> Path | None: ...
    @property
    def url(self) -> str | None: ...
    @property
    def password_env(self) -> str | None: ...
    @property
    def lease_s(self) -> float: ...


class OutputSettings(Protocol):
    """What the checks read of ``config.OutputSettings``."""

    @property
    def root(self) -> Path | str: ...


__all__ = ["check_ledger", "check_ledger_outside", "masked"]


def check_ledger(ledger: LedgerSettings, source: str) -> None:
    """``[ledger]``: a SQLite ``path`` or a PostgreSQL ``url`` (not both), a sane lease."""
    if ledger.url is not None:
        if ledger.path is not None:
            raise ConfigError(
                f"{source}: ledger: expected one of path (SQLite) or url (PostgreSQL), not both"
            )
        if not ledger.url.startswith(("postgresql://", "postgres://")):
            raise fail(source, "ledger.url", masked(ledger.url), "a postgresql:// URL")
    elif ledger.password_env is not None:
        raise ConfigError(f"{source}: ledger.password_env: only for a PostgreSQL ledger.url")
    at_least(source, "ledger.lease_s", ledger.lease_s, 1.0)


def masked(url: str) -> str:
    """``url`` with its password (in the user part, or a ``password=`` parameter, or a key/value
    conninfo's ``password=``) as ``***``: the only way a ledger URL is ever shown."""
    if "://" not in url:
        return " ".join(
            "password=***" if part.lower().startswith("password=") else part for part in url.split()
        )
    try:
        parts = urlsplit(url)
    except ValueError:
        return "<unparsable database URL>"
    netloc = parts.netloc
    if "@" in netloc:
        user, _, host = netloc.rpartition("@")
        if ":" in user:
            user = user.split(":", 1)[0] + ":***"
        netloc = f"{user}@{host}"
    query = urlencode(
        [(k, "***" if k.lower() == "password" else v) for k, v in parse_qsl(parts.query)],
        safe="*",
    )
    return urlunsplit((parts.scheme, netloc, parts.path, query, parts.fragment))


def check_ledger_outside(output: OutputSettings, ledger: Any, source: str) -> None:
    """An object-store root keeps no ledger: ``[ledger]`` must name one (a local ``path`` or a
    database ``url``), or ``ConfigError`` saying what to add."""
    if not isinstance(output.root, str):
        return
    named = isinstance(ledger, dict) and ("path" in ledger or "url" in ledger)
    if not named:
        raise ConfigError(
            f"{source}: output.root = {output.root!r}: an object-store root cannot hold the "
            "ledger; add one to the config: [ledger] url = 'postgresql://HOST/DB' (shared by "
            "many workers) or a local file, [ledger] path = '/var/lib/backfill/ledger.sqlite'"
        )
