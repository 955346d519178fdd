"""The settings guard: an app's rows are pulled with one set of settings for their whole life.

Theory of operation.  What shapes an app's rows is its API key and its filters
(``app_versions``, ``event_ids``); the download ``format`` does not (JSON and CSV land the same
rows).  The ledger records, per app, the settings its committed rows were pulled with.  Before
a run starts anything, ``refusals`` compares those with the config and says, for each app, why
it must not run: a setting changed while rows pulled with the old value are live (the way out
is ``backfill refresh``), or the app's API key is recorded under another name (a rename: the
way out is ``backfill forget``).  Pure: the facts come in, messages go out; the command line
reads the ledger and raises.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = ["SHAPING", "AppFacts", "Change", "Shaped", "changes", "refusals", "same"]

# The settings that shape an app's rows, in the order messages name them.
SHAPING = ("api_key", "app_versions", "event_ids")


class Shaped(Protocol):
    """Anything with an app's name and the settings that shape its rows (config or ledger)."""

    @property
    def api_key(self) -> str: ...

    @property
    def app_versions(self) -> tuple[str, ...]: ...

    @property
    def event_ids(self) -> tuple[str, ...]: ...


class _Named(Shaped, Protocol):
    @property
    def name(self) -> str: ...


@dataclass(frozen=True, slots=True, kw_only=True)
class Change:
    """One setting whose value in the config differs from the recorded one."""

    setting: str
    old: str
    new: str


@dataclass(frozen=True, slots=True, kw_only=True)
class AppFacts:
    """What the ledger says about one app of the config."""

    recorded: Shaped | None  # the settings its rows were pulled with, if recorded
    has_rows: bool  # some window of it has live (committed) files
    key_owner: str | None  # the app the ledger records the config's API key for, if any


def _text(value: str | tuple[str, ...]) -> str:
    if isinstance(value, str):
        return value
    return ",".join(value) if value else "(none)"


def _value(settings: Shaped, name: str) -> str | tuple[str, ...]:
    value: str | tuple[str, ...] = getattr(settings, name)
    # A filter is a set: the order of its values changes no row.
    return value if isinstance(value, str) else tuple(sorted(value))


def changes(recorded: Shaped, wanted: Shaped) -> list[Change]:
    """The shaping settings whose value differs between ``recorded`` and ``wanted``."""
    return [
        Change(setting=name, old=_text(_value(recorded, name)), new=_text(_value(wanted, name)))
        for name in SHAPING
        if _value(recorded, name) != _value(wanted, name)
    ]


def same(recorded: Shaped | None, wanted: Shaped) -> bool:
    """True if ``recorded`` exists and every shaping setting equals ``wanted``'s."""
    return recorded is not None and not changes(recorded, wanted)


def _changed(app: str, found: list[Change]) -> str:
    lines = [f"app {app!r}: its committed rows were pulled with other settings than the config's:"]
    lines += [f"  {c.setting}: was {c.old}, the config now says {c.new}" for c in found]
    lines.append(
        f"  run `backfill refresh --app {app}` to pull its history again with the new "
        "settings, or restore the old value"
    )
    return "\n".join(lines)


def _renamed(app: str, owner: str, api_key: str) -> str:
    return (
        f"app {app!r}: its api_key {api_key} is recorded in the ledger for the app {owner!r}; "
        f"pulling it under a second name would land every row twice.\n"
        f"  rename: run `backfill forget --app {owner}` to drop the old name's data (the next "
        f"run pulls it under {app!r}), or keep the old name {owner!r} in the config"
    )


def refusals(
    apps: Iterable[_Named], facts: Mapping[str, AppFacts], *, refreshing: str | None = None
) -> list[str]:
    """Why each app of ``apps`` must not run, one message per refused app (empty: go ahead).

    ``refreshing`` names the app a ``refresh`` re-pulls with the config's settings on purpose:
    its changed settings are no reason to refuse; a key recorded under another name still is.
    """
    out = []
    for app in apps:
        fact = facts[app.name]
        if fact.key_owner is not None and fact.key_owner != app.name:
            out.append(_renamed(app.name, fact.key_owner, app.api_key))
            continue
        if app.name == refreshing or fact.recorded is None or not fact.has_rows:
            continue
        found = changes(fact.recorded, app)
        if found:
            out.append(_changed(app.name, found))
    return out
