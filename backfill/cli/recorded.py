"""The recorded settings of each app, read from the ledger and checked before a run starts.

``check`` gathers what ``guard.refusals`` needs from the ledger and raises ``ConfigError``
(exit 2, nothing started) when an app must not run; ``record`` writes the config's settings
for the apps that passed.  The commands call them under the run lock, before planning.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from backfill import guard
from backfill.errors import ConfigError
from backfill.ledger_schema import RecordedSettings

if TYPE_CHECKING:
    from collections.abc import Iterable

    from backfill.config import AppSettings
    from backfill.ledger import Ledger

__all__ = ["check", "record", "settings_of"]


def settings_of(app: AppSettings) -> RecordedSettings:
    """What the ledger records for ``app``: its key and filters (never the format)."""
    return RecordedSettings(
        app=app.name, api_key=app.api_key, app_versions=app.app_versions, event_ids=app.event_ids
    )


async def check(
    ledger: Ledger, apps: Iterable[AppSettings], *, refreshing: str | None = None
) -> None:
    """Refuse (``ConfigError``) if any of ``apps`` would mix rows pulled with other settings."""
    chosen = list(apps)
    facts = {
        app.name: guard.AppFacts(
            recorded=await ledger.recorded_settings(app.name),
            has_rows=await ledger.newest_committed_end(app.name) is not None,
            key_owner=await ledger.app_with_key(app.api_key),
        )
        for app in chosen
    }
    refused = guard.refusals(chosen, facts, refreshing=refreshing)
    if refused:
        raise ConfigError("\n".join(refused))


async def record(ledger: Ledger, apps: Iterable[AppSettings]) -> None:
    """Record the config's settings of ``apps`` where the ledger holds other ones (or none)."""
    for app in apps:
        if not guard.same(await ledger.recorded_settings(app.name), app):
            await ledger.record_settings(settings_of(app))
