"""Each fault knob fires at about its configured rate (fixed seed, binomial tolerance)."""

from __future__ import annotations

import math
import time
import zlib

import aiohttp
import orjson

from backfill.simulator import Faults
from tests.simkit import DAY, LARGE, FakeClock, body, running, settings, today_ms

START = today_ms() - 40 * DAY
RATE = 0.25
TRIALS = 160


def _assert_about(hits: int, trials: int = TRIALS, rate: float = RATE) -> None:
    sigma = math.sqrt(trials * rate * (1 - rate))
    assert abs(hits - trials * rate) <= 4 * sigma, f"{hits}/{trials} fired, expected ~{rate:.0%}"


def _members(raw: bytes) -> int:
    count = 0
    while raw:
        decoder = zlib.decompressobj(wbits=31)
        decoder.decompress(raw)
        raw = decoder.unused_data
        count += 1
    return count


async def test_server_error_rate() -> None:
    async with running(settings(faults=Faults(server_error=RATE))) as (_, api):
        statuses = [
            (await api.post(body(str(START), str(START + DAY - 1))))[0] for _ in range(TRIALS)
        ]
    _assert_about(sum(s >= 500 for s in statuses))


async def test_rate_limit_burst_rate() -> None:
    async with running(settings(faults=Faults(rate_limit_burst=RATE))) as (_, api):
        statuses = [
            (await api.post(body(str(START), str(START + DAY - 1))))[0] for _ in range(TRIALS)
        ]
    _assert_about(statuses.count(429))


async def test_failure_and_expired_results_rates() -> None:
    async with running(settings(faults=Faults(failure=RATE))) as (_, api):
        failures = 0
        for _ in range(TRIALS):
            _, _, raw = await api.status(await api.submit(START, START + DAY))
            failures += orjson.loads(raw)["data"]["attributes"]["requestStatus"] == "Failure"
    _assert_about(failures)
    async with running(settings(faults=Faults(expired_results=RATE))) as (_, api):
        expired = 0
        for _ in range(TRIALS):
            _, _, raw = await api.status(await api.submit(START, START + DAY))
            expired += orjson.loads(raw)["data"]["attributes"]["s3URI"].startswith("Expired URI")
    _assert_about(expired)


async def test_too_large_at_poll_rate() -> None:
    async with running(settings(faults=Faults(too_large_at_poll=RATE))) as (_, api):
        statuses = [
            (await api.post(body(str(START), str(START + 30 * DAY - 1), LARGE.api_key)))[0]
            for _ in range(TRIALS)
        ]
    _assert_about(statuses.count(200))


async def test_download_fault_rates() -> None:
    faults = Faults(cut_download=RATE, expired_link=RATE, multi_member=RATE, slow_download=RATE)
    clock = FakeClock()
    async with running(settings(faults=faults, slow_chunk_delay_s=0.03), clock) as (_, api):
        expired = cut = multi = slow = 0
        for _ in range(TRIALS):
            link = await api.link(await api.submit(START, START + 2 * DAY))
            began = time.monotonic()
            async with api.http.get(link, auto_decompress=False) as response:
                if response.status == 403:
                    expired += 1
                    continue
                try:
                    raw = await response.read()
                except aiohttp.ClientPayloadError:
                    cut += 1
                    continue
            slow += time.monotonic() - began > 0.15
            multi += _members(raw) > 1
        downloads = TRIALS - expired
    _assert_about(expired)
    # A cut or slow roll happens only for links that were not expired; count per download.
    assert downloads > 0
    _assert_about(cut, downloads)
    _assert_about(slow, downloads - cut)
    _assert_about(multi, downloads - cut)
