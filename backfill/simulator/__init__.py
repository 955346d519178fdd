"""The built-in Flurry Data Download API simulator: server, data, ground truth and faults.

``serve(settings)`` starts it on loopback; ``ground_truth(settings, api_key, start, end)`` gives,
without a server, the exact rows it serves for that window.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from backfill.simulator import data
from backfill.simulator.server import API_PREFIX, CallRecord, Simulator, serve
from backfill.simulator.settings import (
    AppProfile,
    Faults,
    SimulatorConfigError,
    SimulatorSettings,
    load,
    parse,
)

if TYPE_CHECKING:
    from collections.abc import Sequence

__all__ = [
    "API_PREFIX",
    "AppProfile",
    "CallRecord",
    "Faults",
    "Simulator",
    "SimulatorConfigError",
    "SimulatorSettings",
    "ground_truth",
    "load",
    "parse",
    "serve",
]


def ground_truth(
    settings: SimulatorSettings,
    api_key: str,
    start_ms: int,
    end_ms: int,
    *,
    app_versions: Sequence[str] | None = None,
    event_ids: Sequence[str] | None = None,
) -> list[dict[str, Any]]:
    """The exact rows the simulator serves for ``[start_ms, end_ms)`` of ``api_key``."""
    profile = settings.app(api_key)
    if profile is None:
        raise KeyError(f"no simulated app has api key {api_key!r}")
    return list(
        data.rows(
            settings.seed,
            profile.data,
            start_ms,
            end_ms,
            app_versions=app_versions,
            event_ids=event_ids,
        )
    )
