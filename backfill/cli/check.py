"""``backfill check`` and the preflight that ``run``, ``sync``, ``retry`` and ``refresh`` do first.

The preflight asks the API for the status of a request id that cannot exist (``rawData/0``):
it starts no report, and its answer tells three things apart: 404 (the API is there and the
token is good), 401/403 (the token is refused: ``AuthError``, exit 3) and no answer at all
(unreachable: ``TransportError``, exit 75, within seconds: a few quick tries with short
timeouts, never the run's long backoff).  Any other answer (a 5xx, a proxy's page) proves
nothing about the token: the run goes on as without a probe.  Once the token is known good,
a 401 at a POST is about the app's ``api_key`` alone (``backfill.appkeys``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import anyio

from backfill import config, logs
from backfill.cli import session
from backfill.cli.exits import EXIT_AUTH, EXIT_INTEGRITY, EXIT_OK, EXIT_TRANSIENT, EXIT_USAGE
from backfill.errors import AuthError, BackfillError, ConfigError, StorageError, TransportError

if TYPE_CHECKING:
    import argparse
    from collections.abc import Mapping

    from backfill.config import Settings

__all__ = ["PROBE_PAUSES_S", "PROBE_TIMEOUT_S", "check", "preflight"]

PROBE_TIMEOUT_S = 5.0  # one probe, start to end (connect: at most 3 s)
PROBE_PAUSES_S = (0.5, 1.0)  # between the tries: three tries in all, a few seconds at most


def _token_source(settings: Settings) -> str:
    api = settings.api
    if api.token_env is not None:
        return f"the token of ${api.token_env} ([api].token_env)"
    return f"the token in {api.token_file} ([api].token_file)"


async def preflight(settings: Settings, token: str) -> bool:
    """Probe the API with ``token``; True when the token is known good (the probe's 404).

    Raises ``AuthError`` (refused: 401/403) or ``TransportError`` (no answer after every try);
    False when the API answered something that proves nothing about the token.
    """
    from backfill.client import FlurryClient, Secret, Timeouts, safe_url

    timeouts = Timeouts(
        connect_s=min(3.0, settings.api.connect_timeout_s),
        read_s=PROBE_TIMEOUT_S,
        api_total_s=PROBE_TIMEOUT_S,
    )
    where = safe_url(settings.api.base_url)
    base = settings.api.base_url
    async with FlurryClient(base_url=base, token=Secret(token), timeouts=timeouts) as api:
        for pause in (*PROBE_PAUSES_S, None):
            try:
                status = await api.probe()
                break
            except TransportError as exc:
                if pause is None:
                    raise TransportError(
                        f"the API at {where} is unreachable ({len(PROBE_PAUSES_S) + 1} tries): "
                        f"{exc.message}; nothing was submitted"
                    ) from exc
                await anyio.sleep(pause)
    if status in (401, 403):
        raise AuthError(f"the API at {where} refused {_token_source(settings)} ({status})")
    if status != 404:
        logs.get("cli").warning(
            "api.probe.inconclusive",
            status=status,
            hint="the token is not proven; a refused POST stops the run",
        )
    return status == 404


async def check(args: argparse.Namespace, env: Mapping[str, str]) -> int:
    """``backfill check``: the config, the output root, the ledger and the token, one line each.

    Exits with the code of the first check that failed: 2 (config, root), 5 (ledger), 3 (token
    refused), 75 (API unreachable); 0 when all pass.
    """
    try:
        settings = session.load(args, env)
    except ConfigError as exc:
        return _line("config", exc, EXIT_USAGE)
    _line("config", f"{settings.source} ({len(settings.apps)} apps)")
    codes = [await _root(settings), await _ledger(settings), await _token(settings, env)]
    return next((code for code in codes if code != EXIT_OK), EXIT_OK)


def _line(name: str, result: str | BaseException, code: int = EXIT_OK, *, note: str = "ok") -> int:
    """Print one check's line (``ok`` and what was checked, or the problem); returns ``code``."""
    text = f"{note}: {result}" if code == EXIT_OK else f"FAILED: {logs.scrub(str(result))}"
    print(f"{name + ':':8} {text}", flush=True)
    return code


async def _root(settings: Settings) -> int:
    from backfill.objstore import check_output

    try:
        check_output(settings)
    except ConfigError as exc:
        return _line("root", exc, EXIT_USAGE)
    except StorageError as exc:
        return _line("root", exc, EXIT_TRANSIENT)
    return _line("root", f"{settings.output.root} (writable)")


async def _ledger(settings: Settings) -> int:
    path = settings.ledger_shown
    if not settings.ledger_exists():
        return _line("ledger", f"{path} (none yet: the first run creates it)")
    try:
        async with session.open_ledger(settings):
            pass  # opening it checks its schema and migrates it
    except BackfillError as exc:
        return _line("ledger", exc, EXIT_INTEGRITY)
    return _line("ledger", f"{path} (opens; schema current)")


async def _token(settings: Settings, env: Mapping[str, str]) -> int:
    from backfill.client import safe_url

    try:
        token = config.read_token(settings, env)
        logs.register_secret(token)
        proven = await preflight(settings, token)
    except ConfigError as exc:
        return _line("token", exc, EXIT_USAGE)
    except AuthError as exc:
        return _line("token", exc, EXIT_AUTH)
    except TransportError as exc:
        return _line("token", exc, EXIT_TRANSIENT)
    where = safe_url(settings.api.base_url)
    if not proven:
        return _line("token", f"the API at {where} answered, but not 404 for an unknown "
                     "request: the token is not proven", note="warning")  # fmt: skip
    return _line("token", f"the API at {where} accepts {_token_source(settings)}")
