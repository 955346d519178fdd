"""Contract tests: the simulator over real HTTP on loopback, one per row of flurry-api.md."""

from __future__ import annotations

import csv
import gzip
import io
import zlib

import aiohttp
import orjson
import pytest

from backfill.simulator import Faults, ground_truth
from backfill.simulator.data import FIELDS, MAP_FIELDS, event_catalogue
from tests.simkit import DAY, LARGE, SMALL, TOKEN, FakeClock, body, running, settings, today_ms

START = today_ms() - 40 * DAY


# -- 1. create a request -------------------------------------------------------------------


async def test_post_is_acknowledged_with_the_docs_body_and_growing_string_ids() -> None:
    async with running(settings()) as (_, api):
        status, headers, raw = await api.post(body(str(START), str(START + DAY - 1)))
        assert status == 200
        assert headers["Content-Type"].startswith("application/vnd.api+json")
        assert raw == (
            b'{"data":{"type":"rawData","id":"26","attributes":'
            b'{"requestStatus":"Acknowledged","s3URI":null}}}'
        )
        second = await api.submit(START, START + DAY)
        assert second == "27"


async def test_post_accepts_numeric_times_and_both_filters() -> None:
    async with running(settings()) as (_, api):
        status, _, raw = await api.post(
            body(START, START + DAY - 1, app_versions="1.0.0,2.0.0", eventIds="123,456")
        )
        assert status == 200, raw


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer wrong-token"},
        {"Authorization": TOKEN},
    ],
)
async def test_bad_or_missing_token_is_401_verbatim(headers: dict[str, str]) -> None:
    async with running(settings()) as (_, api):
        status, _, raw = await api.post(body(str(START), str(START + DAY - 1)), headers=headers)
        assert (status, raw) == (401, b'{"code":401,"message":"Unauthorized"}')
        status, _, raw = await api.get(f"{api.base}/rawData/26", headers=headers)
        assert (status, raw) == (401, b'{"code":401,"message":"Unauthorized"}')


async def test_token_without_access_to_the_app_is_401() -> None:
    async with running(settings()) as (_, api):
        status, _, raw = await api.post(
            body(str(START), str(START + DAY - 1), "NOTMINE0000000000000")
        )
        assert (status, raw) == (401, b'{"code":401,"message":"Unauthorized"}')


async def test_window_over_31_days_is_refused_verbatim_and_31_days_is_accepted() -> None:
    async with running(settings()) as (_, api):
        too_long = body(str(START), str(START + 31 * DAY))
        status, _, raw = await api.post(too_long)
        assert status == 400
        assert raw == b'{"errors":["Cannot request report for a period greater than 31 days"]}'
        status, _, _ = await api.post(body(str(START), str(START + 31 * DAY - 1)))
        assert status == 200


async def test_data_older_than_two_years_is_refused() -> None:
    async with running(settings()) as (_, api):
        old = today_ms() - 731 * DAY
        status, _, raw = await api.post(body(str(old), str(old + DAY - 1)))
        assert (status, raw) == (400, b'{"errors":["Cannot request data older than 2 years"]}')
        edge = today_ms() - 730 * DAY
        status, _, _ = await api.post(body(str(edge), str(edge + DAY - 1)))
        assert status == 200


@pytest.mark.parametrize(
    "payload",
    [b"not json", b'{"data": {}}', body("abc", "def"), body(str(START), str(START - 5))],
)
async def test_malformed_bodies_are_400_with_an_errors_list(payload: bytes) -> None:
    async with running(settings()) as (_, api):
        status, _, raw = await api.post(payload)
        assert status == 400
        assert isinstance(orjson.loads(raw)["errors"], list)


# -- 2. poll its status --------------------------------------------------------------------


async def test_status_is_acknowledged_then_success_with_a_fresh_link_each_time() -> None:
    clock = FakeClock()
    async with running(settings(latency_base_s=120.0), clock) as (_, api):
        request_id = await api.submit(START, START + DAY)
        status, _, raw = await api.status(request_id)
        assert status == 200
        assert orjson.loads(raw) == {
            "data": {
                "type": "rawData",
                "id": request_id,
                "attributes": {"requestStatus": "Acknowledged", "s3URI": None},
            }
        }
        clock.advance(120)
        first, second = await api.link(request_id), await api.link(request_id)
        assert first.startswith("http://127.0.0.1:") and "X-Amz-Signature=" in first
        assert first != second


@pytest.mark.parametrize(
    "query", ["?fields[rawData]=requestStatus,s3URI", "?fields%5BrawData%5D=requestStatus%2Cs3URI"]
)
async def test_fields_may_arrive_raw_or_percent_encoded(query: str) -> None:
    async with running(settings()) as (_, api):
        request_id = await api.submit(START, START + DAY)
        _, _, raw = await api.status(request_id, query)
        assert set(orjson.loads(raw)["data"]["attributes"]) == {"requestStatus", "s3URI"}


async def test_missing_fields_returns_every_attribute() -> None:
    async with running(settings()) as (_, api):
        request_id = await api.submit(START, START + DAY)
        _, _, raw = await api.status(request_id, "")
        attributes = orjson.loads(raw)["data"]["attributes"]
        assert attributes["startTime"] == str(START)
        assert attributes["endTime"] == str(START + DAY - 1)
        assert attributes["outputFormat"] == "JSON"
        assert attributes["requestStatus"] == "Success"


async def test_unknown_id_is_404_verbatim() -> None:
    async with running(settings()) as (_, api):
        status, _, raw = await api.status("123")
        assert (status, raw) == (404, b'{"errors":["Request 123 not found"]}')


async def test_failure_fault_reports_failure() -> None:
    async with running(settings(faults=Faults(failure=1.0))) as (_, api):
        request_id = await api.submit(START, START + DAY)
        _, _, raw = await api.status(request_id)
        assert orjson.loads(raw)["data"]["attributes"]["requestStatus"] == "Failure"


# -- 3. download ---------------------------------------------------------------------------


async def test_download_is_gzip_without_content_encoding_and_equals_ground_truth() -> None:
    sim_settings = settings()
    async with running(sim_settings) as (_, api):
        request_id = await api.submit(START, START + 2 * DAY)
        status, headers, raw = await api.get(await api.link(request_id))
        assert status == 200
        assert raw[:2] == b"\x1f\x8b"
        assert "Content-Encoding" not in headers
        assert int(headers["Content-Length"]) == len(raw)
        served = [orjson.loads(line) for line in gzip.decompress(raw).splitlines()]
        assert served == ground_truth(sim_settings, SMALL.api_key, START, START + 2 * DAY)


async def test_download_with_the_bearer_header_is_refused_like_s3() -> None:
    async with running(settings()) as (_, api):
        link = await api.link(await api.submit(START, START + DAY))
        status, _, raw = await api.get(link, headers={"Authorization": f"Bearer {TOKEN}"})
        assert status == 400
        assert b"<Code>InvalidArgument</Code>" in raw


async def test_expired_link_is_403_with_s3_xml_and_a_new_poll_gives_a_working_one() -> None:
    clock = FakeClock()
    async with running(settings(link_ttl_s=600.0), clock) as (_, api):
        request_id = await api.submit(START, START + DAY)
        link = await api.link(request_id)
        clock.advance(600)
        status, headers, raw = await api.get(link)
        assert status == 403
        assert headers["Content-Type"].startswith("application/xml")
        assert b"<Code>AccessDenied</Code><Message>Request has expired</Message>" in raw
        status, _, _ = await api.get(await api.link(request_id))
        assert status == 200


async def test_results_past_retention_say_expired_uri() -> None:
    clock = FakeClock()
    async with running(settings(retention_s=30 * 86_400.0), clock) as (_, api):
        request_id = await api.submit(START, START + DAY)
        clock.advance(30 * 86_400)
        _, _, raw = await api.status(request_id)
        attributes = orjson.loads(raw)["data"]["attributes"]
        assert attributes == {
            "requestStatus": "Success",
            "s3URI": "Expired URI. Please resubmit request",
        }


async def test_byte_ranges_work_as_on_s3() -> None:
    async with running(settings()) as (_, api):
        link = await api.link(await api.submit(START, START + 3 * DAY))
        _, _, whole = await api.get(link)
        status, headers, part = await api.get(link, {"Range": "bytes=100-"})
        assert status == 206
        assert part == whole[100:]
        assert headers["Content-Range"] == f"bytes 100-{len(whole) - 1}/{len(whole)}"
        status, _, middle = await api.get(link, {"Range": "bytes=10-19"})
        assert (status, middle) == (206, whole[10:20])
        status, _, _ = await api.get(link, {"Range": f"bytes={len(whole)}-"})
        assert status == 416


async def test_multi_member_gzip_decodes_to_the_same_rows() -> None:
    sim_settings = settings(faults=Faults(multi_member=1.0))
    async with running(sim_settings) as (_, api):
        link = await api.link(await api.submit(START, START + 3 * DAY))
        _, _, raw = await api.get(link)
        first = zlib.decompressobj(wbits=31)
        first.decompress(raw)
        assert first.unused_data[:2] == b"\x1f\x8b"  # a second member follows the first
        served = [orjson.loads(line) for line in gzip.decompress(raw).splitlines()]
        assert served == ground_truth(sim_settings, SMALL.api_key, START, START + 3 * DAY)


async def test_cut_download_delivers_less_than_content_length() -> None:
    async with running(settings(faults=Faults(cut_download=1.0))) as (_, api):
        link = await api.link(await api.submit(START, START + 3 * DAY))
        async with api.http.get(link, auto_decompress=False) as response:
            length = int(response.headers["Content-Length"])
            received = b""
            with pytest.raises(aiohttp.ClientPayloadError):
                async for piece in response.content.iter_any():
                    received += piece
        assert 0 < len(received) < length


# -- 4. the data ---------------------------------------------------------------------------


async def test_csv_parses_with_a_real_csv_parser_and_equals_ground_truth() -> None:
    sim_settings = settings()
    async with running(sim_settings) as (_, api):
        request_id = await api.submit(START, START + 2 * DAY, outputFormat="CSV")
        _, _, raw = await api.get(await api.link(request_id))
    reader = csv.reader(io.StringIO(gzip.decompress(raw).decode(), newline=""))
    header, *records = list(reader)
    assert tuple(header) == FIELDS
    truth = ground_truth(sim_settings, SMALL.api_key, START, START + 2 * DAY)
    assert len(records) == len(truth)
    for record, row in zip(records, truth, strict=True):
        for name, cell in zip(header, record, strict=True):
            value = row[name]
            if value is None:
                assert cell == ""
            elif name in MAP_FIELDS:
                assert orjson.loads(cell) == value
            else:
                assert cell == str(value)


async def test_windows_split_at_a_boundary_serve_every_row_exactly_once() -> None:
    sim_settings = settings()
    async with running(sim_settings) as (_, api):
        whole = await api.fetch_rows(START, START + 2 * DAY)
        left = await api.fetch_rows(START, START + DAY)
        right = await api.fetch_rows(START + DAY, START + 2 * DAY)
    assert left + right == whole
    assert any(r["sessionTimestamp"] == START + DAY for r in right)
    assert any(r["sessionTimestamp"] == START + DAY - 1 for r in left)
    assert all(START <= r["sessionTimestamp"] < START + DAY for r in left)


async def test_filters_really_filter() -> None:
    sim_settings = settings()
    events = event_catalogue(sim_settings.seed, SMALL.api_key)
    wanted = {events[0].event_id, events[1].event_id}
    async with running(sim_settings) as (_, api):
        rows = await api.fetch_rows(
            START, START + 10 * DAY, eventIds=",".join(wanted), app_versions="1.0.0"
        )
        empty_id = await api.submit(START, START + DAY, eventIds="1")
        _, _, empty = await api.get(await api.link(empty_id))
        csv_id = await api.submit(START, START + DAY, eventIds="1", outputFormat="CSV")
        _, _, header_only = await api.get(await api.link(csv_id))
    assert rows, "the filters should leave some rows"
    assert {r["eventName"] for r in rows} <= {events[0].name, events[1].name}
    assert {r["appVersion"] for r in rows} == {"1.0.0"}
    assert rows == ground_truth(
        sim_settings,
        SMALL.api_key,
        START,
        START + 10 * DAY,
        app_versions=["1.0.0"],
        event_ids=list(wanted),
    )
    assert gzip.decompress(empty) == b""
    assert gzip.decompress(header_only) == (",".join(FIELDS) + "\r\n").encode()


# -- 5. errors -----------------------------------------------------------------------------


async def test_too_large_at_post_suggests_a_week_or_a_day() -> None:
    async with running(settings()) as (_, api):
        # 30 days of the large app is always too much; which size fits depends on the spikes.
        status, _, raw = await api.post(body(str(START), str(START + 30 * DAY - 1), LARGE.api_key))
        assert status == 400
        message = orjson.loads(raw)["errors"][0]
        assert message.startswith("Requested data is too large for this window.")
        assert message.endswith(("1 week", "1 day"))
        # A single day is guaranteed to work.
        status, _, _ = await api.post(body(str(START), str(START + DAY - 1), LARGE.api_key))
        assert status == 200


async def test_too_large_suggestion_matches_the_data() -> None:
    sim_settings = settings()
    async with running(sim_settings) as (_, api):
        seen = set()
        for offset in range(0, 60, 6):
            start = START - offset * DAY
            status, _, raw = await api.post(
                body(str(start), str(start + 14 * DAY - 1), LARGE.api_key)
            )
            if status == 200:
                continue
            suggestion = orjson.loads(raw)["errors"][0].rsplit(" ", 1)[-1]
            seen.add(suggestion)
            weeks = [
                len(ground_truth(sim_settings, LARGE.api_key, s, s + 7 * DAY))
                for s in (start, start + 7 * DAY)
            ]
            assert (suggestion == "week") == all(n <= LARGE.too_large_rows for n in weeks)
        assert seen == {"week", "day"}


async def test_too_large_at_poll_is_a_failure_with_the_message() -> None:
    sim_settings = settings(faults=Faults(too_large_at_poll=1.0), too_large_shape="objects")
    async with running(sim_settings) as (_, api):
        request_id = await api.submit(START, START + 30 * DAY, LARGE.api_key)
        _, _, raw = await api.status(request_id)
        attributes = orjson.loads(raw)["data"]["attributes"]
        assert attributes["requestStatus"] == "Failure"
        assert "too large" in attributes["message"]


async def test_too_large_errors_may_come_as_objects() -> None:
    async with running(settings(too_large_shape="objects", too_large_phrasings=("iso",))) as (
        _,
        api,
    ):
        status, _, raw = await api.post(body(str(START), str(START + 30 * DAY - 1), LARGE.api_key))
        assert status == 400
        error = orjson.loads(raw)["errors"][0]
        assert error["title"] == "Bad Request"
        assert error["detail"].endswith(("P7D", "P1D"))


async def test_more_requests_than_the_cap_is_429_with_rate_limit_headers() -> None:
    clock = FakeClock()
    async with running(
        settings(max_processing=2, latency_base_s=60.0, refill_per_minute=5), clock
    ) as (_, api):
        await api.submit(START, START + DAY)
        await api.submit(START, START + DAY)
        status, headers, raw = await api.post(body(str(START), str(START + DAY - 1)))
        assert status == 429, raw
        assert headers["X-RateLimit-Limit"] == "2"
        assert headers["X-RateLimit-Remaining"] == "0"
        assert headers["X-RateLimit-RefillPerMinute"] == "5"
        assert int(headers["Retry-After"]) >= 1
        clock.advance(60)  # both finish: the cap frees up
        status, _, _ = await api.post(body(str(START), str(START + DAY - 1)))
        assert status == 200


async def test_server_trouble_is_5xx_with_an_html_body() -> None:
    async with running(settings(faults=Faults(server_error=1.0))) as (_, api):
        status, headers, raw = await api.post(body(str(START), str(START + DAY - 1)))
        assert 500 <= status < 600
        assert headers["Content-Type"].startswith("text/html")
        assert raw.startswith(b"<html>")
