"""The simulator's settings: the ``[simulator]`` table of a config file, parsed strictly.

Every key has a default, so ``SimulatorSettings()`` is a working simulator with no apps; unknown
keys and wrong types are refused with the key's dotted name.
"""

from __future__ import annotations

import dataclasses
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from backfill.simulator.data import AppData

if TYPE_CHECKING:
    from pathlib import Path

__all__ = [
    "PHRASINGS",
    "AppProfile",
    "Faults",
    "SimulatorConfigError",
    "SimulatorSettings",
    "load",
    "parse",
]


class SimulatorConfigError(ValueError):
    """The ``[simulator]`` table is malformed; the message names the key."""


# How a too-large refusal may be worded: (week suggestion, day suggestion).  The real wording
# is unknown (flurry-api.md section 5), so the client must read every one of these.
PHRASINGS: dict[str, tuple[str, str]] = {
    "canonical": (
        "Requested data is too large for this window. Please retry with a window of 1 week",
        "Requested data is too large for this window. Please retry with a window of 1 day",
    ),
    "days": (
        "Too much data requested; use a window of 7 days or less",
        "Too much data requested; use a window of 24 hours or less",
    ),
    "adverb": (
        "The report is too large. Please request it weekly instead",
        "The report is too large. Please request it daily instead",
    ),
    "article": (
        "Data volume exceeds the limit for this period, try a week",
        "Data volume exceeds the limit for this period, try a day",
    ),
    "iso": (
        "Result too large: maximum window for this app is P7D",
        "Result too large: maximum window for this app is P1D",
    ),
    "millis": (
        "Response size too large. Suggested window: 604800000",
        "Response size too large. Suggested window: 86400000",
    ),
}
_SHAPES = ("strings", "objects")


@dataclass(frozen=True, slots=True, kw_only=True)
class Faults:
    """Each fault's rate, from 0 (never) to 1 (every time).  All zero by default."""

    failure: float = 0.0  # a finished request reports Failure
    server_error: float = 0.0  # any API call answers 5xx with an HTML body
    rate_limit_burst: float = 0.0  # a POST answers 429 though under the cap
    cut_download: float = 0.0  # a download stops halfway and the connection drops
    slow_download: float = 0.0  # a download trickles in small, delayed chunks
    multi_member: float = 0.0  # a file is served as several gzip members
    expired_link: float = 0.0  # a status GET mints a link that has already expired
    expired_results: float = 0.0  # a finished request reports "Expired URI..."
    too_large_at_poll: float = 0.0  # a too-large window is accepted, then reported as Failure
    corrupt_download: float = 0.0  # a request's file is served with damaged gzip data
    empty_download: float = 0.0  # a request's file is served as 0 bytes (never the contract)
    stray_row: float = 0.0  # a request's file holds one more row, from just after its window
    stuck: float = 0.0  # a request is accepted and never finishes
    html_ok: float = 0.0  # an API call answers 200 with an HTML page instead of JSON


@dataclass(frozen=True, slots=True, kw_only=True)
class AppProfile:
    """One simulated app: its key, volume and the row count above which a window is refused."""

    api_key: str
    name: str = ""
    sessions_per_day: int = 20
    events_per_session: int = 4
    versions: tuple[str, ...] = ("1.0.0", "1.1.0", "2.0.0")
    spike_every_days: int = 0
    spike_factor: int = 1
    too_large_rows: int = 0  # 0: never too large
    growth_from_day: int = 0  # late data: from this UTC day (epoch days; 0: none) ...
    growth_factor: float = 1.0  # ... each day has this many times the sessions

    @property
    def data(self) -> AppData:
        return AppData(
            api_key=self.api_key,
            sessions_per_day=self.sessions_per_day,
            events_per_session=self.events_per_session,
            versions=self.versions,
            spike_every_days=self.spike_every_days,
            spike_factor=self.spike_factor,
            growth_from_day=self.growth_from_day,
            growth_factor=self.growth_factor,
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class SimulatorSettings:
    """How the simulated API behaves.  Times are seconds of simulator time."""

    token: str = "demo-token"
    seed: int = 1
    apps: tuple[AppProfile, ...] = ()
    max_processing: int = 4  # requests processing at once per token before 429
    latency_base_s: float = 60.0  # processing time of an empty request
    latency_per_krow_s: float = 1.0  # extra processing time per 1000 rows
    time_scale: float = 1.0  # multiplies every processing time
    link_ttl_s: float = 600.0  # a presigned link's life
    retention_s: float = 30 * 86_400.0  # a finished request's results' life
    retry_after_s: int = 1  # the Retry-After sent with 429 and 503
    refill_per_minute: int = 60  # X-RateLimit-RefillPerMinute
    too_large_phrasings: tuple[str, ...] = ("canonical",)
    too_large_shape: str = "strings"  # errors as "strings" or "objects" (detail/title)
    slow_chunk_delay_s: float = 0.05
    clock_skew_s: float = 0.0  # the API's clock runs this far ahead of the machine's
    content_encoding: str = ""  # e.g. "gzip": a download host that labels the gzip body
    faults: Faults = field(default_factory=Faults)
    fault_seed: int = 7

    def app(self, api_key: str) -> AppProfile | None:
        return next((a for a in self.apps if a.api_key == api_key), None)


def _check(value: Any, expected: type | tuple[type, ...], key: str) -> Any:
    if isinstance(value, bool) and expected is not bool:
        raise SimulatorConfigError(f"{key}: expected {_name(expected)}, got {value!r}")
    if expected is float and isinstance(value, int):
        return float(value)
    if not isinstance(value, expected):
        raise SimulatorConfigError(f"{key}: expected {_name(expected)}, got {value!r}")
    return value


def _name(expected: type | tuple[type, ...]) -> str:
    if isinstance(expected, tuple):
        return " or ".join(t.__name__ for t in expected)
    return expected.__name__


def _build(cls: type[Any], table: Mapping[str, Any], prefix: str, nested: Mapping[str, Any]) -> Any:
    if not isinstance(table, Mapping):
        raise SimulatorConfigError(f"{prefix}: expected a table, got {table!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    values: dict[str, Any] = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key not in fields:
            known = ", ".join(sorted(fields))
            raise SimulatorConfigError(f"{dotted}: unknown key (known: {known})")
        if key in nested:
            values[key] = nested[key](value, dotted)
            continue
        kind = _KINDS[fields[key].type]
        if kind is tuple:
            items = _check(value, list, dotted)
            values[key] = tuple(_check(v, str, f"{dotted}[{i}]") for i, v in enumerate(items))
        else:
            values[key] = _check(value, kind, dotted)
    for name, f in fields.items():
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and name not in values:
            raise SimulatorConfigError(f"{prefix}.{name}: required")
    return cls(**values)


_KINDS: dict[Any, Any] = {"str": str, "int": int, "float": float, "tuple[str, ...]": tuple}


def _faults(value: Any, key: str) -> Faults:
    faults: Faults = _build(Faults, value, key, {})
    for f in dataclasses.fields(faults):
        rate = getattr(faults, f.name)
        if not 0.0 <= rate <= 1.0:
            raise SimulatorConfigError(f"{key}.{f.name}: expected a rate in [0, 1], got {rate}")
    return faults


def _apps(value: Any, key: str) -> tuple[AppProfile, ...]:
    items = _check(value, list, key)
    apps = tuple(_build(AppProfile, item, f"{key}[{i}]", {}) for i, item in enumerate(items))
    for i, app in enumerate(apps):
        if app.sessions_per_day < 2:
            raise SimulatorConfigError(f"{key}[{i}].sessions_per_day: expected >= 2")
    return apps


def parse(table: Mapping[str, Any], *, source: str = "simulator") -> SimulatorSettings:
    """Build settings from the ``[simulator]`` table; raises ``SimulatorConfigError``."""
    settings: SimulatorSettings = _build(
        SimulatorSettings, table, source, {"faults": _faults, "apps": _apps}
    )
    for phrasing in settings.too_large_phrasings:
        if phrasing not in PHRASINGS:
            known = ", ".join(PHRASINGS)
            raise SimulatorConfigError(
                f"{source}.too_large_phrasings: unknown phrasing {phrasing!r} (known: {known})"
            )
    if settings.too_large_shape not in _SHAPES:
        raise SimulatorConfigError(
            f"{source}.too_large_shape: expected one of {_SHAPES}, got {settings.too_large_shape!r}"
        )
    return settings


def load(path: Path) -> SimulatorSettings:
    """Read the ``[simulator]`` table of a TOML file (the other tables are the engine's)."""
    try:
        document = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise SimulatorConfigError(f"{path}: {exc}") from exc
    return parse(document.get("simulator", {}), source=f"{path}: simulator")
