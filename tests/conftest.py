"""Test-wide setup: quiet logs (tests that check log events capture them themselves)."""

from __future__ import annotations

import pytest

from backfill import logs


@pytest.fixture(autouse=True, scope="session")
def _quiet_logs() -> None:
    logs.configure(fmt="json", level="warning")
