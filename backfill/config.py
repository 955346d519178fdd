"""Configuration: one TOML file, checked whole before anything starts.

``parse(document, source=...)`` is pure: it turns the TOML mapping into frozen ``Settings`` or
raises ``ConfigError`` naming the file, the key, the value and what was expected (with a
did-you-mean for a misspelt key).  ``load(path, env)`` is the one place that reads the file, the
token (from the environment variable or the file the config names; never from the command line)
and checks that the output root is writable.  The ``[simulator]`` table belongs to the simulator
and is skipped here.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tomllib
import zoneinfo
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from backfill.errors import ConfigError
from backfill.planner import HORIZON_DAYS
from backfill.policy import Policy

if TYPE_CHECKING:
    from collections.abc import Iterable, Mapping

__all__ = [
    "ApiSettings",
    "AppSettings",
    "OutputSettings",
    "Settings",
    "WindowSettings",
    "load",
    "parse",
    "check_writable",
    "read_token",
    "replace_api",
]

_API_KEY = re.compile(r"[A-Z0-9]{20}")


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    base_url: str = "https://rawdata.flurry.com/pulse/v1"
    token_env: str | None = None
    token_file: Path | None = None
    format: str = "JSON"
    max_in_flight: int = 4  # requests processing at Flurry at once, all apps
    max_in_flight_per_app: int = 0  # 0: no cap of its own beyond max_in_flight
    calls_per_minute: int = 120  # submit + status calls
    downloads_at_once: int = 4
    conversions_at_once: int = 1
    poll_initial_s: float = 30.0
    poll_min_s: float = 1.0
    poll_max_s: float = 300.0
    request_timeout_s: float = 6 * 3600.0
    max_attempts: int = 8  # retries of one step (5xx, 429, connection) before the window fails
    backoff_base_s: float = 1.0  # full-jitter backoff: uniform in [0, base * 2**retries] ...
    backoff_cap_s: float = 300.0  # ... never above this
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSettings:
    max_days: int = 30
    timezone: str = "UTC"
    history_days: int = HORIZON_DAYS
    lag_hours: int = 24
    lookback_days: int = 3


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSettings:
    root: Path = Path("data/flurry")
    on_bad_rows: str = "fail"  # fail | quarantine


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerSettings:
    path: Path | None = None  # default: {output.root}/_ledger.sqlite


@dataclass(frozen=True, slots=True, kw_only=True)
class AppSettings:
    name: str
    api_key: str
    app_versions: tuple[str, ...] = ()
    event_ids: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    api: ApiSettings = field(default_factory=ApiSettings)
    windows: WindowSettings = field(default_factory=WindowSettings)
    output: OutputSettings = field(default_factory=OutputSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    apps: tuple[AppSettings, ...] = ()
    source: str = "<config>"
    warnings: tuple[str, ...] = ()

    @property
    def ledger_path(self) -> Path:
        return self.ledger.path or self.output.root / "_ledger.sqlite"

    @property
    def policy(self) -> Policy:
        a = self.api
        return Policy(
            poll_initial_s=a.poll_initial_s,
            poll_min_s=a.poll_min_s,
            poll_max_s=a.poll_max_s,
            request_timeout_s=a.request_timeout_s,
            max_attempts=a.max_attempts,
            backoff_base_s=a.backoff_base_s,
            backoff_cap_s=a.backoff_cap_s,
        )

    def app(self, name: str) -> AppSettings:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)


# -- checking ------------------------------------------------------------------------------

_EXPECTED = {
    "str": "a string",
    "int": "an integer",
    "float": "a number",
    "bool": "true or false",
    "Path": "a path (string)",
    "tuple[str, ...]": "a list of strings",
}


def _fail(source: str, key: str, value: Any, expected: str) -> ConfigError:
    shown = "missing" if value is _MISSING else repr(value)
    return ConfigError(f"{source}: {key} = {shown}: expected {expected}")


_MISSING = object()


def _typed(source: str, key: str, value: Any, kind: str) -> Any:
    base = kind.replace(" | None", "")
    ok = {
        "str": isinstance(value, str),
        "Path": isinstance(value, str),
        "int": isinstance(value, int) and not isinstance(value, bool),
        "float": isinstance(value, (int, float)) and not isinstance(value, bool),
        "bool": isinstance(value, bool),
        "tuple[str, ...]": isinstance(value, list) and all(isinstance(v, str) for v in value),
    }[base]
    if not ok:
        raise _fail(source, key, value, _EXPECTED[base])
    if base == "Path":
        return Path(value).expanduser()
    if base == "float":
        return float(value)
    if base == "tuple[str, ...]":
        return tuple(value)
    return value


def _table(cls: type[Any], table: Any, source: str, prefix: str) -> Any:
    if not isinstance(table, dict):
        raise _fail(source, prefix, table, "a table")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in table.items():
        dotted = f"{prefix}.{key}"
        if key not in known:
            raise ConfigError(f"{source}: {dotted}: unknown key{_hint(key, known, '{!r}')}")
        values[key] = _typed(source, dotted, value, str(known[key].type))
    try:
        return cls(**values)
    except TypeError as exc:  # a required key is missing
        missing = [n for n, f in known.items() if n not in values and _required(f)]
        raise _fail(
            source, f"{prefix}.{missing[0]}" if missing else prefix, _MISSING, "a value"
        ) from exc


def _hint(name: str, known: Iterable[str], shape: str) -> str:
    """``; did you mean 'x'?`` for a near miss, else the list of what is known."""
    names = sorted(known)
    close = difflib.get_close_matches(name, names, n=1)
    return f"; did you mean {shape.format(close[0])}?" if close else f" (known: {', '.join(names)})"


def _required(f: Any) -> bool:
    return bool(f.default is MISSING and f.default_factory is MISSING)


def _at_least(source: str, key: str, value: float, low: float, high: float | None = None) -> None:
    if value < low or (high is not None and value > high):
        span = f"between {low} and {high}" if high is not None else f"at least {low}"
        raise _fail(source, key, value, f"a value {span}")


def parse(document: Mapping[str, Any], *, source: str = "<config>") -> Settings:
    """Check the whole document and build ``Settings``; raises ``ConfigError``."""
    sections = {"api", "windows", "output", "ledger", "apps", "simulator"}
    for key in document:
        if key not in sections:
            raise ConfigError(f"{source}: [{key}]: unknown table{_hint(key, sections, '[{}]')}")
    api: ApiSettings = _table(ApiSettings, document.get("api", {}), source, "api")
    windows: WindowSettings = _table(WindowSettings, document.get("windows", {}), source, "windows")
    output: OutputSettings = _table(OutputSettings, document.get("output", {}), source, "output")
    ledger: LedgerSettings = _table(LedgerSettings, document.get("ledger", {}), source, "ledger")
    warnings: list[str] = []

    if not api.base_url.startswith(("http://", "https://")):
        raise _fail(source, "api.base_url", api.base_url, "an http:// or https:// URL")
    if (api.token_env is None) == (api.token_file is None):
        raise ConfigError(
            f"{source}: api: expected exactly one of token_env or token_file "
            "(the token is never given on the command line)"
        )
    if api.format not in ("JSON", "CSV"):
        raise _fail(source, "api.format", api.format, '"JSON" or "CSV"')
    for key in (
        "max_in_flight",
        "calls_per_minute",
        "downloads_at_once",
        "conversions_at_once",
        "max_attempts",
    ):
        _at_least(source, f"api.{key}", getattr(api, key), 1)
    _at_least(source, "api.max_in_flight_per_app", api.max_in_flight_per_app, 0)
    for key in (
        "poll_initial_s",
        "poll_min_s",
        "poll_max_s",
        "request_timeout_s",
        "connect_timeout_s",
        "read_timeout_s",
    ):
        _at_least(source, f"api.{key}", getattr(api, key), 0.001)
    if api.poll_max_s < api.poll_min_s:
        raise _fail(
            source, "api.poll_max_s", api.poll_max_s, f"at least api.poll_min_s ({api.poll_min_s})"
        )

    _at_least(source, "windows.max_days", windows.max_days, 1, 30)
    _at_least(source, "windows.history_days", windows.history_days, 1)
    _at_least(source, "windows.lag_hours", windows.lag_hours, 0)
    _at_least(source, "windows.lookback_days", windows.lookback_days, 0, 30)
    try:
        zoneinfo.ZoneInfo(windows.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise _fail(
            source,
            "windows.timezone",
            windows.timezone,
            "an IANA zone such as UTC or Europe/Berlin",
        ) from exc
    if windows.history_days > HORIZON_DAYS:
        warnings.append(
            f"{source}: windows.history_days = {windows.history_days}: the API serves only "
            f"the last 2 years; clamped to {HORIZON_DAYS}"
        )
        windows = WindowSettings(
            **{f.name: getattr(windows, f.name) for f in fields(windows)}
            | {"history_days": HORIZON_DAYS}
        )
    if output.on_bad_rows not in ("fail", "quarantine"):
        raise _fail(source, "output.on_bad_rows", output.on_bad_rows, '"fail" or "quarantine"')

    raw_apps = document.get("apps", [])
    if not isinstance(raw_apps, list) or not raw_apps:
        raise _fail(
            source, "apps", raw_apps if raw_apps != [] else _MISSING, "at least one [[apps]] table"
        )
    apps = tuple(_table(AppSettings, item, source, f"apps[{i}]") for i, item in enumerate(raw_apps))
    names: dict[str, int] = {}
    keys: dict[str, int] = {}
    for i, app in enumerate(apps):
        if not app.name.strip() or any(ord(c) < 32 for c in app.name):
            raise _fail(
                source, f"apps[{i}].name", app.name, "a non-empty name without control characters"
            )
        if not _API_KEY.fullmatch(app.api_key):
            raise _fail(source, f"apps[{i}].api_key", app.api_key, "20 characters of A-Z and 0-9")
        if app.name in names:
            raise _fail(
                source,
                f"apps[{i}].name",
                app.name,
                f"a name not already used by apps[{names[app.name]}]",
            )
        if app.api_key in keys:
            raise _fail(
                source,
                f"apps[{i}].api_key",
                app.api_key,
                f"a key not already used by apps[{keys[app.api_key]}]",
            )
        names[app.name], keys[app.api_key] = i, i
        for key, items in (("app_versions", app.app_versions), ("event_ids", app.event_ids)):
            for value in items:
                if not value or "," in value:
                    raise _fail(
                        source, f"apps[{i}].{key}", list(items), "non-empty values without commas"
                    )
    return Settings(
        api=api,
        windows=windows,
        output=output,
        ledger=ledger,
        apps=apps,
        source=source,
        warnings=tuple(warnings),
    )


def replace_api(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with some ``[api]`` values replaced (command-line overrides, the demo's URL)."""
    return dataclasses.replace(settings, api=dataclasses.replace(settings.api, **changes))


def load(path: Path) -> Settings:
    """Read and check the config file at ``path``; raises ``ConfigError``."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    # Relative paths in the file are relative to the current directory, as on a command line.
    return parse(document, source=str(path))


def read_token(settings: Settings, env: Mapping[str, str]) -> str:
    """The API token from the configured environment variable or file; raises ``ConfigError``."""
    api = settings.api
    if api.token_env is not None:
        token = env.get(api.token_env, "")
        if not token.strip():
            raise ConfigError(
                f"{settings.source}: api.token_env = {api.token_env!r}: "
                f"the environment variable {api.token_env} is not set or empty"
            )
        return token.strip()
    assert api.token_file is not None
    try:
        token = api.token_file.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ConfigError(
            f"{settings.source}: api.token_file = '{api.token_file}': cannot read it "
            f"({exc.strerror or exc})"
        ) from exc
    if not token:
        raise ConfigError(
            f"{settings.source}: api.token_file = '{api.token_file}': the file is empty"
        )
    return token


def check_writable(settings: Settings) -> None:
    """The output root and the ledger's folder can be created and written, or ``ConfigError``."""
    for key, folder in (
        ("output.root", settings.output.root),
        ("ledger.path", settings.ledger_path.parent),
    ):
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".backfill-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"{settings.source}: {key} = '{folder}': not writable ({exc.strerror or exc})"
            ) from exc
