"""The Flurry wire format: bodies built, and every response variant parsed."""

from __future__ import annotations

import json
from typing import Any

import pytest

from backfill import errors, protocol
from backfill.models import DAY_MS, HOUR_MS, WEEK_MS, Window
from backfill.protocol import Processing, Ready

W = Window(app="quest", start=1_511_136_000_000, end=1_511_222_400_000)


def _j(value: Any) -> bytes:
    return json.dumps(value).encode()


def _status(state: str, uri: Any = None, **extra: Any) -> bytes:
    attributes = {"requestStatus": state, "s3URI": uri} | extra
    return _j({"data": {"type": "rawData", "id": "26", "attributes": attributes}})


def test_submit_body_sends_string_times_inclusive_end_and_comma_filters() -> None:
    body = json.loads(
        protocol.build_submit(
            W,
            api_key="AAAA1111BBBB2222CCCC",
            app_versions=["11111", "22222"],
            event_ids=["44444444", "55555555"],
        )  # fmt: skip
    )
    assert body == {
        "data": {
            "type": "rawData",
            "attributes": {
                "startTime": "1511136000000",
                "endTime": "1511222399999",
                "outputFormat": "JSON",
                "apiKey": "AAAA1111BBBB2222CCCC",
                "app_versions": "11111,22222",
                "eventIds": "44444444,55555555",
            },
        }
    }
    bare = json.loads(protocol.build_submit(W, api_key="K", output_format="CSV"))["data"][
        "attributes"
    ]
    assert "app_versions" not in bare and "eventIds" not in bare and bare["outputFormat"] == "CSV"


def test_status_path_encodes_the_fields_brackets() -> None:
    assert protocol.status_path("26") == "/rawData/26?fields%5BrawData%5D=requestStatus%2Cs3URI"


ACK = {
    "data": {
        "type": "rawData",
        "id": "26",
        "attributes": {"requestStatus": "Acknowledged", "s3URI": None},
    }
}
ACK_NUMERIC = {
    "data": {"type": "rawData", "id": 27, "attributes": {"requestStatus": "Acknowledged"}}
}
HTML_502 = b"<html><head><title>502</title></head><body><h1>502 Bad Gateway</h1></body></html>"

# (what, status, headers, body, expected value or error class, extra check)
SUBMIT_CASES: list[tuple[str, int, dict[str, str], bytes, Any]] = [
    ("accepted, string id", 200, {}, _j(ACK), "26"),
    ("accepted, numeric id", 200, {}, _j(ACK_NUMERIC), "27"),
    ("accepted with 201", 201, {}, _j(ACK), "26"),
    ("accepted with 202", 202, {}, _j(ACK), "26"),
    ("2xx but not Acknowledged", 200, {}, _status("Failure"), errors.RequestFailedError),
    ("2xx without id", 200, {}, _j({"data": {"attributes": {"requestStatus": "Acknowledged"}}}), errors.ServerError),
    ("2xx invalid JSON", 200, {}, b"{not json", errors.ServerError),
    ("2xx HTML instead of JSON", 200, {}, b"<html>hello</html>", errors.ServerError),
    ("401 doc body", 401, {}, b'{"code":401,"message":"Unauthorized"}', errors.AuthError),
    ("31-day window", 400, {}, b'{"errors":["Cannot request report for a period greater than 31 days"]}',
     errors.RequestRejectedError),
    ("older than 2 years", 400, {}, b'{"errors":["Cannot request data older than 2 years"]}',
     errors.RequestRejectedError),
    ("429 with headers", 429, {"Retry-After": "7", "X-RateLimit-RefillPerMinute": "2",
                               "X-RateLimit-Remaining": "0", "X-RateLimit-Limit": "4"},
     b'{"code":429,"message":"Too Many Requests"}', errors.RateLimitedError),
    ("500 HTML", 500, {}, HTML_502, errors.ServerError),
    ("502 HTML", 502, {}, HTML_502, errors.ServerError),
    ("503 with Retry-After", 503, {"Retry-After": "3"}, b"", errors.ServerError),
    ("too large, canonical", 400, {},
     b'{"errors":["Requested data is too large for this window. Please retry with a window of 1 week"]}',
     errors.TooLargeError),
    ("too large, as an object", 400, {},
     _j({"errors": [{"status": "400", "title": "Bad Request", "detail": "Result too large: use P1D"}]}),
     errors.TooLargeError),
    ("other 400", 400, {}, b'{"errors":["apiKey is malformed"]}', errors.RequestRejectedError),
    ("422", 422, {}, b"", errors.RequestRejectedError),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "status", "headers", "body", "expected"),
    SUBMIT_CASES,
    ids=[c[0] for c in SUBMIT_CASES],
)
def test_parse_submit(
    what: str, status: int, headers: dict[str, str], body: bytes, expected: Any
) -> None:
    if isinstance(expected, str):
        assert protocol.parse_submit(status, headers, body, app="quest") == expected
        return
    with pytest.raises(expected) as caught:
        protocol.parse_submit(status, headers, body, app="quest", window=W.label)
    if isinstance(caught.value, errors.WindowError):
        assert caught.value.app == "quest" and caught.value.window == W.label


def test_rate_limit_headers_are_read() -> None:
    headers = {"retry-after": "7", "X-RateLimit-RefillPerMinute": "2", "X-RateLimit-Remaining": "0"}
    with pytest.raises(errors.RateLimitedError) as caught:
        protocol.parse_submit(429, headers, b"{}")
    assert (caught.value.retry_after_s, caught.value.refill_per_minute, caught.value.remaining) == (
        7,
        2,
        0,
    )


STATUS_CASES: list[tuple[str, int, bytes, Any]] = [
    ("acknowledged", 200, _status("Acknowledged"), Processing()),
    ("acknowledged, no s3URI", 200, _j({"data": {"id": "26", "attributes": {"requestStatus": "Acknowledged"}}}), Processing()),
    ("success with a link", 200, _status("Success", "https://bucket.s3.amazonaws.com/f.gz?X-Amz-Signature=s"),
     Ready("https://bucket.s3.amazonaws.com/f.gz?X-Amz-Signature=s")),
    ("success, extra attributes", 200, _status("Success", "http://127.0.0.1:1/x.gz", startTime="1"),
     Ready("http://127.0.0.1:1/x.gz")),
    ("success, expired URI", 200, _status("Success", "Expired URI. Please resubmit request"),
     errors.ResultsExpiredError),
    ("success, null link", 200, _status("Success", None), errors.ServerError),
    ("failure", 200, _status("Failure"), errors.RequestFailedError),
    ("failure with a message", 200, _status("Failure", message="Internal error"), errors.RequestFailedError),
    ("failure, too large", 200, _status("Failure", message="Requested data is too large for this window. "
                                        "Please retry with a window of 1 day"), errors.TooLargeError),
    ("unknown status", 200, _status("Exploded"), errors.ServerError),
    ("404 unknown id", 404, b'{"errors":["Request 123 not found"]}', errors.ResultsExpiredError),
    ("401", 401, b'{"code":401,"message":"Unauthorized"}', errors.AuthError),
    ("429", 429, b"", errors.RateLimitedError),
    ("504 HTML", 504, HTML_502, errors.ServerError),
    ("invalid JSON", 200, b"\x00\xff garbage", errors.ServerError),
    ("JSON without data", 200, b'{"meta": {}}', errors.ServerError),
]  # fmt: skip


@pytest.mark.parametrize(
    ("what", "status", "body", "expected"), STATUS_CASES, ids=[c[0] for c in STATUS_CASES]
)
def test_parse_status(what: str, status: int, body: bytes, expected: Any) -> None:
    if isinstance(expected, (Processing, Ready)):
        assert protocol.parse_status(status, {}, body, request_id="26") == expected
        return
    with pytest.raises(expected) as caught:
        protocol.parse_status(status, {}, body, request_id="26", app="quest")
    if isinstance(caught.value, errors.WindowError):
        assert caught.value.request_id == "26"


def test_too_large_at_poll_carries_the_suggestion() -> None:
    body = _status("Failure", message="Too much data requested; use a window of 7 days or less")
    with pytest.raises(errors.TooLargeError) as caught:
        protocol.parse_status(200, {}, body, request_id="26")
    assert caught.value.suggested_ms == WEEK_MS


@pytest.mark.parametrize(
    ("status", "body", "expected"),
    [
        (
            403,
            b"<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>",
            errors.LinkExpiredError,
        ),
        (403, b"<Error><Code>SignatureDoesNotMatch</Code></Error>", errors.LinkExpiredError),
        (404, b"<Error><Code>NoSuchKey</Code></Error>", errors.ResultsExpiredError),
        (500, b"<Error><Code>InternalError</Code></Error>", errors.ServerError),
        (416, b"", errors.ServerError),
    ],
)
def test_download_errors(status: int, body: bytes, expected: type[Exception]) -> None:
    error = protocol.parse_download_error(status, {}, body, request_id="26")
    assert isinstance(error, expected)


PHRASINGS: list[tuple[str, int | None]] = [
    ("Requested data is too large for this window. Please retry with a window of 1 week", WEEK_MS),
    ("Requested data is too large for this window. Please retry with a window of 1 day", DAY_MS),
    ("Too much data requested; use a window of 7 days or less", WEEK_MS),
    ("Too much data requested; use a window of 24 hours or less", DAY_MS),
    ("The report is too large. Please request it weekly instead", WEEK_MS),
    ("The report is too large. Please request it daily instead", DAY_MS),
    ("Data volume exceeds the limit for this period, try a week", WEEK_MS),
    ("Data volume exceeds the limit for this period, try a day", DAY_MS),
    ("Result too large: maximum window for this app is P7D", WEEK_MS),
    ("Result too large: maximum window for this app is P1D", DAY_MS),
    ("Result too large; retry with PT6H windows", 6 * HOUR_MS),
    ("Response size too large. Suggested window: 604800000", WEEK_MS),
    ("Response size too large. Suggested window: 86400000 ms", DAY_MS),
    ("Your 30 days window is too big, use 7 days", WEEK_MS),
    ("TOO LARGE. ONE WEEK.", WEEK_MS),
    ("too much data (1200000 rows); please use a smaller window", None),
    ("Request exceeds the size limit", None),
    ("The window is too large, please use a 1-day window", DAY_MS),
    ("Too large: try P1W", WEEK_MS),
]


@pytest.mark.parametrize(("text", "size"), PHRASINGS)
def test_too_large_is_recognised_and_its_size_read_in_any_phrasing(
    text: str, size: int | None
) -> None:
    assert protocol.is_too_large(text)
    assert protocol.suggested_ms(text) == size
    with pytest.raises(errors.TooLargeError) as caught:
        protocol.parse_submit(400, {}, _j({"errors": [text]}))
    assert caught.value.suggested_ms == size


@pytest.mark.parametrize(
    "text",
    ["Cannot request report for a period greater than 31 days", "Cannot request data older than 2 years",
     "Unauthorized", "apiKey is malformed"],
)  # fmt: skip
def test_other_errors_are_not_too_large(text: str) -> None:
    assert not protocol.is_too_large(text)


def test_error_text_reads_every_shape() -> None:
    assert protocol.error_text(b'{"errors":["a","b"]}') == "a; b"
    assert protocol.error_text(_j({"errors": [{"title": "T", "detail": "D"}]})) == "D; T"
    assert protocol.error_text(b'{"code":401,"message":"Unauthorized"}') == "Unauthorized"
    assert protocol.error_text(HTML_502) == "502 502 Bad Gateway"
    assert protocol.error_text(b"") == "(empty body)"
