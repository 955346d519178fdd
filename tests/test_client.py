"""The client against canned HTTP answers (aioresponses): each answer becomes the right value or error.

No server runs: ``aioresponses`` patches aiohttp's session, answers from a table, and records
what was sent (URL, headers, body), so each test asserts both the translation and the request.
"""

from __future__ import annotations

import functools
import gc
import inspect
import json
import re
import threading
import warnings
from typing import TYPE_CHECKING, Any
from urllib.parse import unquote

import aiohttp
import anyio
import pytest
from aioresponses import aioresponses
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from backfill import client, protocol
from backfill.client import FlurryClient, Secret, safe_url
from backfill.errors import (
    AuthError,
    LinkExpiredError,
    RateLimitedError,
    RequestFailedError,
    RequestRejectedError,
    ResultsExpiredError,
    ServerError,
    TooLargeError,
    TransportError,
)
from backfill.models import DAY_MS, HOUR_MS, WEEK_MS, Window

if TYPE_CHECKING:
    from collections.abc import AsyncIterator, Iterator
    from pathlib import Path

BASE = "https://api.flurry.test/pulse/v1"
TOKEN = "tok-SECRET-0123456789"
SIGNATURE = "X-Amz-Signature=deadbeefcafe"
LINK = f"https://s3.flurry.test/bucket/26.json.gz?X-Amz-Expires=900&{SIGNATURE}"
WINDOW = Window(app="small", start=1_767_225_600_000, end=1_767_225_600_000 + DAY_MS)
STATUS_URL = re.compile(re.escape(f"{BASE}/rawData/26") + r"\?")


class _NoUpload:
    """What aiohttp 3.14's response asks of the request's writer: its size, once sent."""

    output_size = 0


class _Response(aiohttp.ClientResponse):
    """aioresponses 0.7.9 builds responses without aiohttp 3.14's ``stream_writer``; supply it."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        if "stream_writer" in inspect.signature(aiohttp.ClientResponse.__init__).parameters:
            kwargs.setdefault("stream_writer", _NoUpload())
        super().__init__(method, url, **kwargs)


class _Mock(aioresponses):
    """aioresponses whose answers are built by ``_Response``."""

    def add(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("response_class", _Response)
        super().add(*args, **kwargs)


@pytest.fixture
def http() -> Iterator[aioresponses]:
    with _Mock() as mocked:
        yield mocked


@pytest.fixture
async def api() -> AsyncIterator[FlurryClient]:
    async with FlurryClient(base_url=BASE + "/", token=Secret(TOKEN), chunk_bytes=4) as client:
        yield client


def _sent(http: aioresponses, method: str) -> list[tuple[str, dict[str, Any]]]:
    """Every request of ``method`` that reached the mock, in order: (URL, the call's kwargs)."""
    calls = [
        (index, str(url), call.kwargs)
        for (verb, url), made in http.requests.items()
        for index, call in enumerate(made)
        if verb == method
    ]
    return [(url, kwargs) for _, url, kwargs in sorted(calls, key=lambda c: c[0])]


def _accepted(request_id: Any = "26", state: str = "Acknowledged", **extra: Any) -> dict[str, Any]:
    attributes = {"requestStatus": state, **extra}
    return {"data": {"type": "rawData", "id": request_id, "attributes": attributes}}


def _status(state: str, **extra: Any) -> dict[str, Any]:
    return _accepted("26", state, **extra)


def _clean(error: BaseException) -> None:
    """Neither the token nor a link's signature shows in the error's text or repr."""
    for text in (str(error), repr(error)):
        assert TOKEN not in text
        assert "deadbeefcafe" not in text


# -- submit ----------------------------------------------------------------------------------


async def test_submit_posts_the_window_with_the_token_and_returns_the_request_id(
    http: aioresponses, api: FlurryClient
) -> None:
    http.post(f"{BASE}/rawData", payload=_accepted(26))  # a numeric id is read as a string
    request_id = await api.submit(WINDOW, api_key="KEY1", app_versions=("1.0", "1.1"))
    assert request_id == "26"
    [(url, sent)] = _sent(http, "POST")
    assert url == f"{BASE}/rawData"
    assert sent["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert sent["headers"]["Accept"] == sent["headers"]["Content-Type"] == protocol.JSON_API
    assert json.loads(sent["data"])["data"] == {
        "type": "rawData",
        "attributes": {
            "startTime": str(WINDOW.start),
            "endTime": str(WINDOW.end - 1),  # the API's end is inclusive
            "outputFormat": "JSON",
            "apiKey": "KEY1",
            "app_versions": "1.0,1.1",
        },
    }
    assert (api.calls.submit, api.calls.status, api.calls.rate_limited) == (1, 0, 0)


@pytest.mark.parametrize("status", [401, 403])
async def test_a_refused_token_is_an_auth_error(
    http: aioresponses, api: FlurryClient, status: int
) -> None:
    http.post(f"{BASE}/rawData", status=status, payload={"errors": [{"detail": "Unauthorized"}]})
    with pytest.raises(AuthError, match=f"refused the token \\({status}: Unauthorized\\)") as err:
        await api.submit(WINDOW, api_key="KEY1")
    _clean(err.value)


async def test_429_is_rate_limited_with_the_numbers_of_its_headers(
    http: aioresponses, api: FlurryClient
) -> None:
    headers = {
        "Retry-After": "7",
        "X-RateLimit-Limit": "100",
        "X-RateLimit-Remaining": "0",
        "X-RateLimit-RefillPerMinute": "20",
    }
    http.post(f"{BASE}/rawData", status=429, headers=headers, payload={"errors": ["slow down"]})
    with pytest.raises(RateLimitedError) as err:
        await api.submit(WINDOW, api_key="KEY1")
    e = err.value
    assert (e.retry_after_s, e.refill_per_minute, e.remaining, e.limit) == (7.0, 20.0, 0, 100)
    assert (e.app, e.window, e.request_id) == ("small", WINDOW.label, None)
    assert "slow down" in e.message
    assert api.calls.rate_limited == 1


async def test_429_without_headers_leaves_the_numbers_unknown(
    http: aioresponses, api: FlurryClient
) -> None:
    http.post(f"{BASE}/rawData", status=429, body=b"")
    with pytest.raises(RateLimitedError) as err:
        await api.submit(WINDOW, api_key="KEY1")
    e = err.value
    assert (e.retry_after_s, e.refill_per_minute, e.remaining, e.limit) == (None, None, None, None)


@pytest.mark.parametrize(
    ("status", "headers", "retry_after"),
    [(500, {}, None), (502, {}, None), (503, {"Retry-After": "3"}, 3.0)],
)
async def test_5xx_is_a_server_error(
    http: aioresponses,
    api: FlurryClient,
    status: int,
    headers: dict[str, str],
    retry_after: float | None,
) -> None:
    http.post(f"{BASE}/rawData", status=status, headers=headers, body="<html>Bad Gateway</html>")
    with pytest.raises(ServerError, match=f"server error {status}: Bad Gateway") as err:
        await api.submit(WINDOW, api_key="KEY1")
    assert err.value.retry_after_s == retry_after
    assert err.value.app == "small"


@pytest.mark.parametrize(
    "failure",
    [
        aiohttp.ClientConnectionError("Connection reset by peer"),
        aiohttp.ServerDisconnectedError(),
        TimeoutError(),
        ConnectionRefusedError(111, "Connection refused"),
    ],
    ids=["reset", "disconnected", "timeout", "refused"],
)
async def test_a_connection_failure_is_a_transport_error(
    http: aioresponses, api: FlurryClient, failure: Exception
) -> None:
    http.post(f"{BASE}/rawData", exception=failure)
    with pytest.raises(TransportError, match=f"POST {re.escape(BASE)}/rawData failed: ") as err:
        await api.submit(WINDOW, api_key="KEY1")
    assert err.value.__cause__ is failure
    assert type(failure).__name__ in err.value.message
    assert (err.value.app, err.value.window) == ("small", WINDOW.label)
    _clean(err.value)


@pytest.mark.parametrize(
    ("answer", "message"),
    [
        ("<html><body>Service Unavailable</body></html>", "unexpected response body: Service Unavailable"),
        ("", r"unexpected response body: \(empty body\)"),
        (json.dumps({"data": {"type": "rawData", "attributes": {"requestStatus": "Acknowledged"}}}), "no request id"),
        (json.dumps({"data": []}), "unexpected response body"),
    ],
    ids=["html", "empty", "no-id", "no-attributes"],
)  # fmt: skip
async def test_a_200_that_is_not_the_expected_json_is_a_server_error(
    http: aioresponses, api: FlurryClient, answer: str, message: str
) -> None:
    http.post(f"{BASE}/rawData", status=200, body=answer, content_type="text/html")
    with pytest.raises(ServerError, match=message):
        await api.submit(WINDOW, api_key="KEY1")


@pytest.mark.parametrize(
    ("body", "suggested"),
    [
        ({"errors": ["The report is too large. Please request it weekly instead"]}, WEEK_MS),
        ({"errors": [{"detail": "Too much data: the 30 days you asked are too large, use 7 days"}]}, 7 * DAY_MS),
        ({"errors": [{"title": "Data volume exceeded", "detail": "Try a window of 6 hours"}]}, 6 * HOUR_MS),
        ({"message": "Requested window exceeds the size limit; maximum window is P1D"}, DAY_MS),
        ({"errors": ["Data too large, reduce the window to 3600000 ms"]}, HOUR_MS),
        ({"errors": ["Too large: please request a smaller window"]}, None),
    ],
    ids=["adverb", "days", "hours", "iso", "millis", "no-size"],
)  # fmt: skip
async def test_a_too_large_400_in_any_wording_is_too_large_with_the_suggested_size(
    http: aioresponses, api: FlurryClient, body: dict[str, Any], suggested: int | None
) -> None:
    http.post(f"{BASE}/rawData", status=400, payload=body)
    with pytest.raises(TooLargeError) as err:
        await api.submit(WINDOW, api_key="KEY1")
    assert err.value.suggested_ms == suggested
    assert (err.value.app, err.value.window) == ("small", WINDOW.label)


async def test_another_400_is_a_rejected_window(http: aioresponses, api: FlurryClient) -> None:
    text = "Cannot request report for a period greater than 31 days"
    http.post(f"{BASE}/rawData", status=400, payload={"errors": [text]})
    with pytest.raises(RequestRejectedError, match=f"rejected the window \\(400: {text}\\)"):
        await api.submit(WINDOW, api_key="KEY1")


async def test_an_accepted_post_whose_state_is_failure_is_failed_or_too_large(
    http: aioresponses, api: FlurryClient
) -> None:
    http.post(f"{BASE}/rawData", payload=_accepted("27", "Failure", message="internal"))
    with pytest.raises(RequestFailedError, match="did not go through \\(internal\\)") as failed:
        await api.submit(WINDOW, api_key="KEY1")
    assert failed.value.request_id == "27"
    http.post(f"{BASE}/rawData", payload=_accepted("28", "Failure", message="Too large: use 1 day"))
    with pytest.raises(TooLargeError) as too_large:
        await api.submit(WINDOW, api_key="KEY1")
    assert (too_large.value.suggested_ms, too_large.value.request_id) == (DAY_MS, "28")


# -- status ----------------------------------------------------------------------------------


async def test_status_asks_for_the_two_fields_and_reads_processing_then_success(
    http: aioresponses, api: FlurryClient
) -> None:
    http.get(STATUS_URL, payload=_status("Acknowledged"))
    http.get(STATUS_URL, payload=_status("Success", s3URI=LINK))
    assert await api.status("26", window=WINDOW) == protocol.Processing()
    assert await api.status("26", window=WINDOW) == protocol.Ready(LINK)
    sent = _sent(http, "GET")
    assert len(sent) == 2 and all(url.startswith(f"{BASE}/rawData/26?") for url, _ in sent)
    query = sent[0][0].split("?", 1)[1]
    assert unquote(query) == "fields[rawData]=requestStatus,s3URI"
    assert sent[0][1]["headers"]["Authorization"] == f"Bearer {TOKEN}"
    assert api.calls.status == 2


@pytest.mark.parametrize(
    ("answer", "error", "message"),
    [
        (_status("Failure", message="internal error"), RequestFailedError, "reported Failure: internal error"),
        (_status("Failure"), RequestFailedError, "reported Failure \\("),
        (_status("Success", s3URI="Expired URI. Please resubmit request"), ResultsExpiredError, "results expired"),
        (_status("Success"), ServerError, "Success without a download link"),
        (_status("Exploded"), ServerError, "unknown requestStatus 'Exploded'"),
    ],
    ids=["failure", "failure-bare", "expired", "no-link", "unknown"],
)  # fmt: skip
async def test_status_failure_expiry_and_nonsense_are_typed_errors(
    http: aioresponses,
    api: FlurryClient,
    answer: dict[str, Any],
    error: type[Exception],
    message: str,
) -> None:
    http.get(STATUS_URL, payload=answer)
    with pytest.raises(error, match=message) as err:
        await api.status("26", window=WINDOW)
    assert getattr(err.value, "request_id", None) == "26"


async def test_status_failure_that_says_too_large_is_too_large(
    http: aioresponses, api: FlurryClient
) -> None:
    http.get(STATUS_URL, payload=_status("Failure", message="Too much data, use 2 days"))
    with pytest.raises(TooLargeError) as err:
        await api.status("26", window=WINDOW)
    assert (err.value.suggested_ms, err.value.request_id) == (2 * DAY_MS, "26")


async def test_status_errors_404_429_and_401(http: aioresponses, api: FlurryClient) -> None:
    http.get(STATUS_URL, status=404, payload={"errors": ["not found"]})
    http.get(STATUS_URL, status=429, headers={"Retry-After": "2"}, body=b"")
    http.get(STATUS_URL, status=401, body=b"")
    with pytest.raises(ResultsExpiredError, match="unknown to the API"):
        await api.status("26", window=WINDOW)
    with pytest.raises(RateLimitedError) as limited:
        await api.status("26", window=WINDOW)
    assert (limited.value.retry_after_s, limited.value.request_id) == (2.0, "26")
    with pytest.raises(AuthError):
        await api.status("26", window=WINDOW)
    assert (api.calls.status, api.calls.rate_limited) == (3, 1)


async def test_a_request_id_is_quoted_into_the_status_path(
    http: aioresponses, api: FlurryClient
) -> None:
    http.get(re.compile(".*"), payload=_status("Acknowledged"))
    await api.status("a/b c", window=WINDOW)
    [(url, _)] = _sent(http, "GET")
    assert url.startswith(f"{BASE}/rawData/a%2Fb%20c?")


# -- download --------------------------------------------------------------------------------

DATA = b"0123456789"


async def test_a_download_streams_to_the_file_without_the_token(
    http: aioresponses, api: FlurryClient, tmp_path: Path
) -> None:
    http.get(LINK, body=DATA, headers={"Content-Length": "10"}, content_type="binary/octet-stream")
    target = tmp_path / "deep" / "26.json.gz"
    size = await api.download(LINK, target, window=WINDOW, request_id="26")
    assert (size, target.read_bytes()) == (10, DATA)
    [(url, sent)] = _sent(http, "GET")
    assert url == LINK  # the signature goes to the download host, where it belongs
    assert "Authorization" not in sent["headers"] and "Range" not in sent["headers"]
    assert TOKEN not in json.dumps(sent["headers"])
    assert (api.calls.download, api.calls.resumed) == (1, 0)


async def test_a_download_cancelled_while_its_file_opens_leaves_no_file_open(
    http: aioresponses, api: FlurryClient, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The file is opened on a thread; a run cancelled meanwhile (a full disk elsewhere) must
    still close it, not leave it to the garbage collector (it was a flaky ResourceWarning)."""
    http.get(LINK, body=DATA, headers={"Content-Length": "10"})
    opening, release = threading.Event(), threading.Event()
    real = client._no_follow

    def slow(path: str, flags: int) -> int:
        opening.set()
        release.wait(10)
        return real(path, flags)

    monkeypatch.setattr(client, "_no_follow", slow)
    target = tmp_path / "26.json.gz"
    fetch = functools.partial(api.download, LINK, target, window=WINDOW, request_id="26")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ResourceWarning)
        async with anyio.create_task_group() as tasks:
            tasks.start_soon(fetch)
            await anyio.to_thread.run_sync(opening.wait)
            tasks.cancel_scope.cancel()
            release.set()
        await anyio.sleep(0.2)  # the thread's open returns
        gc.collect()
    assert not [w for w in caught if issubclass(w.category, ResourceWarning)]
    assert not target.exists()  # and the file opened late is removed with the rest


async def test_an_empty_download_is_an_error_not_an_empty_window(
    http: aioresponses, api: FlurryClient, tmp_path: Path
) -> None:
    http.get(LINK, body=b"", headers={"Content-Length": "0"})
    with pytest.raises(ServerError, match="empty") as caught:
        await api.download(LINK, tmp_path / "26.json.gz", window=WINDOW, request_id="26")
    assert caught.value.request_id == "26" and "X-Amz-Signature" not in str(caught.value)


async def test_a_cut_download_resumes_with_range_and_if_range(
    http: aioresponses, api: FlurryClient, tmp_path: Path
) -> None:
    etag = '"v1"'
    http.get(LINK, body=DATA[:4], headers={"Content-Length": "10", "ETag": etag})  # cut at 4
    http.get(LINK, exception=aiohttp.ClientConnectionError("reset"))  # the resume fails too
    tail = {"Content-Range": "bytes 4-9/10", "Content-Length": "6", "ETag": etag}
    http.get(LINK, status=206, body=DATA[4:], headers=tail)
    target = tmp_path / "26.json.gz"
    assert await api.download(LINK, target, window=WINDOW, request_id="26") == 10
    assert target.read_bytes() == DATA
    sent = [headers for _, kwargs in _sent(http, "GET") for headers in [kwargs["headers"]]]
    assert sent == [
        {},
        {"Range": "bytes=4-", "If-Range": etag},
        {"Range": "bytes=4-", "If-Range": etag},
    ]
    assert (api.calls.download, api.calls.resumed) == (3, 2)


async def test_a_resume_answered_with_200_starts_the_file_over(
    http: aioresponses, api: FlurryClient, tmp_path: Path
) -> None:
    http.get(LINK, body=b"old-", headers={"Content-Length": "10", "ETag": '"v1"'})
    changed = b"a changed object"
    http.get(LINK, body=changed, headers={"Content-Length": str(len(changed)), "ETag": '"v2"'})
    target = tmp_path / "26.json.gz"
    assert await api.download(LINK, target, window=WINDOW, request_id="26") == len(changed)
    assert target.read_bytes() == changed


async def test_a_download_cut_more_than_max_resumes_is_a_transport_error(
    http: aioresponses, tmp_path: Path
) -> None:
    http.get(LINK, body=DATA[:2], headers={"Content-Length": "10"})
    http.get(LINK, status=206, body=DATA[2:4], headers={"Content-Range": "bytes 2-9/10"})
    http.get(LINK, status=206, body=DATA[4:6], headers={"Content-Range": "bytes 4-9/10"})
    async with FlurryClient(base_url=BASE, token=Secret(TOKEN), max_resumes=2) as api:
        with pytest.raises(TransportError, match="failed after 6 bytes") as err:
            await api.download(LINK, tmp_path / "26.gz", window=WINDOW, request_id="26")
        assert api.calls.resumed == 2
    assert err.value.request_id == "26"
    assert safe_url(LINK) in err.value.message
    _clean(err.value)


async def test_a_connection_failure_before_any_byte_is_not_resumed(
    http: aioresponses, api: FlurryClient, tmp_path: Path
) -> None:
    http.get(LINK, exception=aiohttp.ClientConnectionError("refused"))
    with pytest.raises(
        TransportError, match="failed after 0 bytes: ClientConnectionError: refused"
    ):
        await api.download(LINK, tmp_path / "26.gz", window=WINDOW, request_id="26")
    assert api.calls.resumed == 0


@pytest.mark.parametrize(
    ("status", "body", "error", "message"),
    [
        (403, "<Error><Code>AccessDenied</Code><Message>Request has expired</Message></Error>", LinkExpiredError, "link was refused \\(AccessDenied Request has expired\\)"),
        (404, "<Error><Code>NoSuchKey</Code></Error>", ResultsExpiredError, "download is gone"),
        (500, "<Error><Code>InternalError</Code></Error>", ServerError, "download answered 500: InternalError"),
    ],
    ids=["expired-link", "gone", "s3-error"],
)  # fmt: skip
async def test_a_download_refused_is_a_typed_error(
    http: aioresponses,
    api: FlurryClient,
    tmp_path: Path,
    status: int,
    body: str,
    error: type[Exception],
    message: str,
) -> None:
    http.get(LINK, status=status, body=body, content_type="application/xml")
    with pytest.raises(error, match=message) as err:
        await api.download(LINK, tmp_path / "26.gz", window=WINDOW, request_id="26")
    assert getattr(err.value, "request_id", None) == "26"
    _clean(err.value)


def _redirect_loop() -> Exception:
    info = aiohttp.RequestInfo(URL(LINK), "GET", CIMultiDictProxy(CIMultiDict()), URL(LINK))
    return aiohttp.TooManyRedirects(info, ())


@pytest.mark.parametrize(
    "failure", [aiohttp.InvalidURL(LINK), _redirect_loop()], ids=["invalid-url", "redirects"]
)
async def test_an_aiohttp_error_naming_the_link_does_not_leak_its_signature(
    http: aioresponses, api: FlurryClient, tmp_path: Path, failure: Exception
) -> None:
    # aiohttp's own texts carry the full URL, signature and all: the client cuts the query.
    assert "deadbeefcafe" in str(failure)
    http.get(LINK, exception=failure)
    with pytest.raises(TransportError) as err:
        await api.download(LINK, tmp_path / "26.gz", window=WINDOW, request_id="26")
    assert safe_url(LINK) in err.value.message
    assert type(failure).__name__ in err.value.message
    _clean(err.value)


def test_the_token_never_shows_in_a_repr() -> None:
    secret = Secret(TOKEN)
    assert secret.reveal() == TOKEN
    assert TOKEN not in repr(secret) and TOKEN not in str(secret) and TOKEN not in f"{secret}"
    client = FlurryClient(base_url=BASE, token=secret)
    assert TOKEN not in repr(vars(client) if hasattr(client, "__dict__") else client)
