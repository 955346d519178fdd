"""Configuration: one TOML file, checked whole before anything starts.

``parse(document, source=...)`` is pure: it turns the TOML mapping into frozen ``Settings`` or
raises ``ConfigError`` naming the file, the key, the value and what was expected (with a
did-you-mean for a misspelt key); each table has its own checker.  ``load(path)`` reads the
file, parses it and takes its relative paths as relative to the file's folder.  ``read_token``
reads the token (from the environment variable or the file the config names; never from the
command line) and ``check_writable`` checks that the output root and the ledger's folder can
be written.  ``[output] root`` may be an ``s3://``/``gs://`` URI (a ``str``; the ledger is then
named outside it, ``check_ledger_outside``).  ``[simulator]`` belongs to the simulator.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
import zoneinfo
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from backfill import cpus
from backfill.config_places import check_ledger, check_ledger_outside, masked
from backfill.config_toml import ABSENT, at_least, fail, hint, table, typed
from backfill.errors import ConfigError
from backfill.planner import HORIZON_DAYS
from backfill.policy import Policy

if TYPE_CHECKING:
    from collections.abc import Mapping

__all__ = [
    "ApiSettings",
    "AppSettings",
    "OutputSettings",
    "Settings",
    "WindowSettings",
    "anchored",
    "load",
    "parse",
    "check_writable",
    "masked",
    "read_token",
    "replace_api",
]

_API_KEY = re.compile(r"[A-Z0-9]{20}")


# The [api] keys that are the lifecycle's numbers: parsed straight into ``policy.Policy``.
POLICY_KEYS = (
    "poll_initial_s",
    "poll_min_s",
    "poll_max_s",
    "request_timeout_s",
    "max_attempts",
    "backoff_base_s",
    "backoff_cap_s",
)


@dataclass(frozen=True, slots=True, kw_only=True)
class ApiSettings:
    """The ``[api]`` table but for the policy's numbers (``POLICY_KEYS``, in ``Policy``)."""

    base_url: str = "https://rawdata.flurry.com/pulse/v1"
    token_env: str | None = None
    token_file: Path | None = None
    format: str = "JSON"
    max_in_flight: int = 4  # requests processing at Flurry at once, all apps
    max_in_flight_per_app: int = 0  # 0: no cap of its own beyond max_in_flight
    calls_per_minute: int = 120  # submit + status calls
    downloads_at_once: int = 4
    conversions_at_once: int = field(default_factory=lambda: min(cpus.usable(), 4))
    conversion_processes: bool = True  # small downloads convert in worker processes (Linux)
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0


@dataclass(frozen=True, slots=True, kw_only=True)
class WindowSettings:
    max_days: int = 30
    timezone: str = "UTC"
    history_days: int = HORIZON_DAYS
    lag_hours: int = 24
    lookback_days: int = 3
    heal_runs: int = 3  # run and sync take a retryable FAILED window back this many times


@dataclass(frozen=True, slots=True, kw_only=True)
class OutputSettings:
    # A local folder (Path) or an object-store URI (str: "s3://bucket/prefix", "gs://...").
    root: Path | str = Path("data/flurry")
    on_bad_rows: Literal["fail", "quarantine"] = "fail"
    min_repull_share: float = 0.5  # a re-pull under this share of the rows it replaces fails
    metrics_file: Path | None = None  # the Prometheus textfile a run writes (--metrics-file)
    staging: Path | None = None  # object root: the local work folder (default: beside the ledger)
    endpoint_url: str | None = None  # object root: an S3-compatible store's URL (MinIO, Ceph)
    region: str | None = None  # object root: the bucket's region


@dataclass(frozen=True, slots=True, kw_only=True)
class LedgerSettings:
    path: Path | None = None  # default: {output.root}/_ledger.sqlite
    url: str | None = None  # postgresql://...: one ledger many workers share (no password here)
    password_env: str | None = None  # the variable holding the PostgreSQL password, if any
    lease_s: float = 60.0  # a worker's hold on a window; another takes it over after this


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
    policy: Policy = field(default_factory=Policy)  # the [api] keys of POLICY_KEYS
    apps: tuple[AppSettings, ...] = ()
    source: str = "<config>"
    warnings: tuple[str, ...] = ()

    @property
    def ledger_path(self) -> Path:
        if self.ledger.path is not None:
            return self.ledger.path
        if isinstance(self.output.root, str):  # parse() refuses this: a ledger is named
            raise ConfigError(f"{self.source}: an object-store root needs [ledger] path")
        return self.output.root / "_ledger.sqlite"

    @property
    def staging_path(self) -> Path:
        """The local work folder of an object-store root (downloads and staged Parquet)."""
        if self.output.staging is not None:
            return self.output.staging
        if self.ledger.url is None:
            return self.ledger_path.parent / "staging"
        cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
        return Path(cache) / "backfill" / "staging"

    @property
    def ledger_shown(self) -> str:
        """The ledger as messages show it: its path, or its URL with no password."""
        return str(self.ledger_path) if self.ledger.url is None else masked(self.ledger.url)

    def ledger_exists(self) -> bool:
        """Whether there is a ledger to read (a PostgreSQL one always is; it is made on open)."""
        return self.ledger.url is not None or self.ledger_path.exists()

    def app(self, name: str) -> AppSettings:
        for app in self.apps:
            if app.name == name:
                return app
        raise KeyError(name)


# -- checking ------------------------------------------------------------------------------


def parse(document: Mapping[str, Any], *, source: str = "<config>") -> Settings:
    """Check the whole document and build ``Settings``; raises ``ConfigError``.

    The first problem found is the one reported: unknown tables, then each table's keys and
    types, then the values of ``[api]``, ``[windows]`` and ``[output]``, then the apps.
    """
    sections = {"api", "windows", "output", "ledger", "apps", "simulator"}
    for key in document:
        if key not in sections:
            raise ConfigError(f"{source}: [{key}]: unknown table{hint(key, sections, '[{}]')}")
    api, policy = _api_tables(document.get("api", {}), source)
    windows: WindowSettings = table(WindowSettings, document.get("windows", {}), source, "windows")
    output = _output_table(document.get("output", {}), source)
    ledger: LedgerSettings = table(LedgerSettings, document.get("ledger", {}), source, "ledger")
    _check_api(api, policy, source)
    windows, warnings = _check_windows(windows, source)
    _check_output(output, source)
    check_ledger(ledger, source)
    check_ledger_outside(output, document.get("ledger", {}), source)
    return Settings(
        api=api,
        policy=policy,
        windows=windows,
        output=output,
        ledger=ledger,
        apps=_apps(document.get("apps", []), source),
        source=source,
        warnings=warnings,
    )


_COUNTS = ("max_in_flight", "calls_per_minute", "downloads_at_once", "conversions_at_once")
_DURATIONS = ("connect_timeout_s", "read_timeout_s")
_POLICY_DURATIONS = ("poll_initial_s", "poll_min_s", "poll_max_s", "request_timeout_s")


def _api_tables(value: Any, source: str) -> tuple[ApiSettings, Policy]:
    """``[api]`` as the connection's settings and the policy's numbers, every key known."""
    if isinstance(value, dict):
        known = {f.name for f in dataclasses.fields(ApiSettings)} | set(POLICY_KEYS)
        for key in value:
            if key not in known:
                raise ConfigError(f"{source}: api.{key}: unknown key{hint(key, known, '{!r}')}")
        numbers = {k: v for k, v in value.items() if k in POLICY_KEYS}
        value = {k: v for k, v in value.items() if k not in POLICY_KEYS}
        return table(ApiSettings, value, source, "api"), table(Policy, numbers, source, "api")
    return table(ApiSettings, value, source, "api"), Policy()


def _check_api(api: ApiSettings, policy: Policy, source: str) -> None:
    """The ``[api]`` values: a web URL, one token source, a known format, sane limits."""
    if not api.base_url.startswith(("http://", "https://")):
        raise fail(source, "api.base_url", api.base_url, "an http:// or https:// URL")
    if (api.token_env is None) == (api.token_file is None):
        raise ConfigError(
            f"{source}: api: expected exactly one of token_env or token_file "
            "(the token is never given on the command line)"
        )
    if api.format not in ("JSON", "CSV"):
        raise fail(source, "api.format", api.format, '"JSON" or "CSV"')
    for key in _COUNTS:
        at_least(source, f"api.{key}", getattr(api, key), 1)
    at_least(source, "api.max_in_flight_per_app", api.max_in_flight_per_app, 0)
    at_least(source, "api.max_attempts", policy.max_attempts, 1)
    for key in _DURATIONS:
        at_least(source, f"api.{key}", getattr(api, key), 0.001)
    for key in _POLICY_DURATIONS:
        at_least(source, f"api.{key}", getattr(policy, key), 0.001)
    if policy.poll_max_s < policy.poll_min_s:
        raise fail(source, "api.poll_max_s", policy.poll_max_s,
                   f"at least api.poll_min_s ({policy.poll_min_s})")  # fmt: skip


def _check_windows(windows: WindowSettings, source: str) -> tuple[WindowSettings, tuple[str, ...]]:
    """The ``[windows]`` values, with ``history_days`` clamped to the API's horizon (warned)."""
    at_least(source, "windows.max_days", windows.max_days, 1, 30)
    at_least(source, "windows.history_days", windows.history_days, 1)
    at_least(source, "windows.lag_hours", windows.lag_hours, 0)
    at_least(source, "windows.lookback_days", windows.lookback_days, 0, 30)
    at_least(source, "windows.heal_runs", windows.heal_runs, 0)
    try:
        zoneinfo.ZoneInfo(windows.timezone)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
        raise fail(
            source,
            "windows.timezone",
            windows.timezone,
            "an IANA zone such as UTC or Europe/Berlin",
        ) from exc
    if windows.history_days <= HORIZON_DAYS:
        return windows, ()
    warning = (
        f"{source}: windows.history_days = {windows.history_days}: the API serves only "
        f"the last 2 years; clamped to {HORIZON_DAYS}"
    )
    return dataclasses.replace(windows, history_days=HORIZON_DAYS), (warning,)


_OBJECT_ROOT = re.compile(r"(s3|gs)://([a-z0-9][a-z0-9.\-_]*[a-z0-9])(/.*)?")
_ANY_URI = re.compile(r"[A-Za-z][A-Za-z0-9+.\-]*:/")


def _output_table(value: Any, source: str) -> OutputSettings:
    """``[output]``, its ``root`` a ``Path`` or, for ``s3://``/``gs://``, the URI (a ``str``)."""
    raw = dict(value) if isinstance(value, dict) else value
    root = raw.pop("root", ABSENT) if isinstance(raw, dict) else ABSENT
    output: OutputSettings = table(OutputSettings, raw, source, "output")
    if isinstance(root, str) and _OBJECT_ROOT.fullmatch(root.rstrip("/")):
        return dataclasses.replace(output, root=root.rstrip("/"))
    if root is not ABSENT:
        path = typed(source, "output.root", root, "Path")
        if _ANY_URI.match(str(root)):
            raise fail(source, "output.root", root, "a local folder, or s3://BUCKET/PREFIX or "
                       "gs://BUCKET/PREFIX (a bucket name of a-z, 0-9, '.', '-', '_')")  # fmt: skip
        output = dataclasses.replace(output, root=path)
    return output


def _check_output(output: OutputSettings, source: str) -> None:
    """The ``[output]`` values: ``on_bad_rows`` is one of the writer's two policies; an
    object-store root has a prefix without ``.``/``..``/empty segments."""
    if output.on_bad_rows not in ("fail", "quarantine"):
        raise fail(source, "output.on_bad_rows", output.on_bad_rows, '"fail" or "quarantine"')
    at_least(source, "output.min_repull_share", output.min_repull_share, 0.0, 1.0)
    if isinstance(output.root, str):
        prefix = (_OBJECT_ROOT.fullmatch(output.root) or [None] * 4)[3] or ""
        if any(part in ("", ".", "..") for part in prefix.split("/")[1:]):
            raise fail(source, "output.root", output.root,
                       "a prefix without empty, '.' or '..' segments")  # fmt: skip
    if output.endpoint_url is not None and not output.endpoint_url.startswith(
        ("http://", "https://")
    ):
        raise fail(source, "output.endpoint_url", output.endpoint_url, "an http(s):// URL")


def _apps(raw: Any, source: str) -> tuple[AppSettings, ...]:
    """The ``[[apps]]`` tables: at least one, each valid, no name or API key used twice."""
    if not isinstance(raw, list) or not raw:
        raise fail(source, "apps", raw if raw != [] else ABSENT, "at least one [[apps]] table")
    apps = tuple(table(AppSettings, item, source, f"apps[{i}]") for i, item in enumerate(raw))
    names: dict[str, int] = {}
    keys: dict[str, int] = {}
    for i, app in enumerate(apps):
        _check_app(app, source, f"apps[{i}]")
        if app.name in names:
            raise fail(
                source,
                f"apps[{i}].name",
                app.name,
                f"a name not already used by apps[{names[app.name]}]",
            )
        if app.api_key in keys:
            raise fail(
                source,
                f"apps[{i}].api_key",
                app.api_key,
                f"a key not already used by apps[{keys[app.api_key]}]",
            )
        names[app.name], keys[app.api_key] = i, i
        _check_filters(app, source, f"apps[{i}]")
    return apps


def _check_app(app: AppSettings, source: str, prefix: str) -> None:
    """One app's name and API key, on their own."""
    if not app.name.strip() or any(ord(c) < 32 for c in app.name):
        raise fail(
            source, f"{prefix}.name", app.name, "a non-empty name without control characters"
        )
    if not _API_KEY.fullmatch(app.api_key):
        raise fail(source, f"{prefix}.api_key", app.api_key, "20 characters of A-Z and 0-9")


def _check_filters(app: AppSettings, source: str, prefix: str) -> None:
    """One app's filters: each value non-empty and free of the commas the API splits on."""
    for key, items in (("app_versions", app.app_versions), ("event_ids", app.event_ids)):
        for value in items:
            if not value or "," in value:
                raise fail(
                    source, f"{prefix}.{key}", list(items), "non-empty values without commas"
                )


def replace_api(settings: Settings, **changes: Any) -> Settings:
    """``settings`` with some ``[api]`` values replaced (command-line overrides, the demo's URL)."""
    return dataclasses.replace(settings, api=dataclasses.replace(settings.api, **changes))


def load(path: Path) -> Settings:
    """Read the TOML file at ``path`` and ``parse`` it, naming ``path`` in every message.

    Relative paths in the file (``[output].root`` and ``.metrics_file``, ``[ledger].path``,
    ``[api].token_file``) are relative to the file's folder, not to the working directory
    (``anchored``).  Raises ``ConfigError`` when the file cannot be read, is not TOML, or fails
    a check.  It reads no token and creates nothing: ``read_token`` and ``check_writable`` do
    that.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}") from exc
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from exc
    return anchored(parse(document, source=str(path)), path.parent)


def anchored(settings: Settings, folder: Path) -> Settings:
    """``settings`` with a relative ``[output].root``, ``[output].metrics_file``,
    ``[ledger].path`` and ``[api].token_file`` taken as relative to ``folder`` (the config
    file's): cron, a systemd unit or a shell in another directory all find the same ledger,
    output, metrics file and token."""

    def under(value: Path) -> Path:
        return value if value.is_absolute() else folder / value

    api = settings.api
    if api.token_file is not None:
        api = dataclasses.replace(api, token_file=under(api.token_file))
    ledger = settings.ledger
    if ledger.path is not None:
        ledger = dataclasses.replace(ledger, path=under(ledger.path))
    output = settings.output
    metrics = None if output.metrics_file is None else under(output.metrics_file)
    staging = None if output.staging is None else under(output.staging)
    root = output.root if isinstance(output.root, str) else under(output.root)
    output = dataclasses.replace(output, root=root, metrics_file=metrics, staging=staging)
    return dataclasses.replace(settings, api=api, ledger=ledger, output=output)


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
    """The output root and the ledger's folder can be created and written, or ``ConfigError``.

    For an object-store root, the local folders only (the ledger's, the staging folder):
    ``objstore.check_output`` probes the bucket."""
    root = settings.output.root
    folders = (
        [("output.staging", settings.staging_path)]
        if isinstance(root, str)
        else [("output.root", root)]
    )
    if settings.ledger.url is None:
        folders.append(("ledger.path", settings.ledger_path.parent))
    for key, folder in folders:
        try:
            folder.mkdir(parents=True, exist_ok=True)
            probe = folder / f".backfill-write-test-{os.getpid()}"
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            raise ConfigError(
                f"{settings.source}: {key} = '{folder}': not writable ({exc.strerror or exc})"
            ) from exc
