"""The writer: real files in, real Parquet out, read back with pyarrow and DuckDB."""

from __future__ import annotations

import datetime as dt
import gzip
import io
import json
import os
import zipfile
from typing import TYPE_CHECKING, Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from backfill.errors import BadDataError
from backfill.layout import download_owner, manifest_owner, part_name, part_owner, partition_value
from backfill.schema import SCHEMA, Limits
from backfill.simulator import ground_truth
from backfill.simulator.data import encode_csv, encode_json, gzip_members
from backfill.store import LocalStore
from tests.simkit import LARGE, SMALL, settings

if TYPE_CHECKING:
    from pathlib import Path

    from tests.storekit import Store, Stores

DAY = 86_400_000
START = 20_000 * DAY  # 2024-10-04
SIM = settings()
MAPS = ("deviceIdentifiers", "eventParameters", "sessionProperties")


def truth(api_key: str = SMALL.api_key, days: int = 3) -> list[dict[str, Any]]:
    return ground_truth(SIM, api_key, START, START + days * DAY)


def expected(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        item = dict(row)
        item["sessionTimestamp"] = dt.datetime.fromtimestamp(row["sessionTimestamp"] / 1000, dt.UTC)
        item["eventTimestamp"] = dt.datetime.fromtimestamp(
            (row["sessionTimestamp"] + row["eventOffset"]) / 1000, dt.UTC
        )
        for name in MAPS:
            item[name] = list(row[name].items())
        out.append(item)
    return out


def landed(root: Path) -> list[dict[str, Any]]:
    table = ds.dataset(root / "events", format="parquet", partitioning="hive").to_table()
    rows: list[dict[str, Any]] = table.to_pylist()
    return rows


def _key(row: dict[str, Any]) -> str:
    return json.dumps(
        {k: row[k] for k in sorted(row) if k not in ("app", "dt")}, default=str, sort_keys=True
    )


def stage_publish(
    writer: Store,
    source: Path,
    app: str = "quest",
    window_id: int = 1,
    attempt: int = 0,
    days: int = 3,
) -> Any:
    manifest = writer.stage(
        app=app,
        window_id=window_id,
        attempt=attempt,
        start_ms=START,
        end_ms=START + days * DAY,
        source=source,
    )
    writer.publish(manifest)
    return manifest


def write(path: Path, payload: bytes) -> Path:
    path.write_bytes(payload)
    return path


@pytest.mark.parametrize(
    "encoding",
    [
        "json-gzip",
        "csv-gzip",
        "json-multi-member",
        "csv-multi-member",
        "json-plain",
        "csv-zip",
        "json-crlf",
    ],
)
def test_round_trip_equals_the_ground_truth(tmp_path: Path, stores: Stores, encoding: str) -> None:
    rows = truth(LARGE.api_key, days=4)
    text = encode_json(rows) if encoding.startswith("json") else encode_csv(rows)
    if encoding == "json-crlf":
        text = text.replace(b"\n", b"\r\n")
    if encoding.endswith("multi-member"):
        payload = gzip_members(text, 3)
    elif encoding.endswith(("plain", "crlf")):
        payload = text
    elif encoding.endswith("zip"):
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
            archive.writestr("report.csv", text)
        payload = buffer.getvalue()
    else:
        payload = gzip.compress(text)
    source = write(tmp_path / "download", payload)
    # Small blocks, so that records cross block boundaries many times.
    writer = stores.make(limits=Limits(block_bytes=64 << 10))
    manifest = stage_publish(writer, source, days=4)
    assert manifest.rows == len(rows) and manifest.rejected == 0
    got = stores.landed(writer)
    assert sorted(map(_key, got)) == sorted(map(_key, expected(rows)))
    for row in got:
        assert row["dt"] == row["sessionTimestamp"].strftime("%Y-%m-%d")
        assert row["app"] == "quest"


def test_files_have_the_one_schema_sorted_zstd_with_statistics(
    tmp_path: Path, stores: Stores
) -> None:
    rows = truth(LARGE.api_key, days=3)
    rows.reverse()  # arrive unsorted: the writer sorts within each file
    writer = stores.make(limits=Limits(block_bytes=32 << 10))
    manifest = stage_publish(writer, write(tmp_path / "d.gz", gzip.compress(encode_json(rows))))
    assert {f.partition for f in manifest.files} == {
        "dt=2024-10-04",
        "dt=2024-10-05",
        "dt=2024-10-06",
    }
    for item in manifest.files:
        path = pa.BufferReader(stores.read(writer, f"events/app=quest/{item.path}"))
        meta = pq.read_metadata(path)
        assert meta.schema.to_arrow_schema().equals(SCHEMA)
        column = meta.row_group(0).column(0)
        assert column.compression == "ZSTD"
        assert column.statistics is not None and column.statistics.has_min_max
        stamps = pq.read_table(path).column("sessionTimestamp").to_pylist()
        assert stamps == sorted(stamps)
        assert meta.num_rows == item.rows


def test_the_first_and_last_millisecond_land_in_their_own_day(
    tmp_path: Path, stores: Stores
) -> None:
    rows = truth(SMALL.api_key, days=2)
    writer = stores.make()
    stage_publish(writer, write(tmp_path / "d.gz", gzip.compress(encode_json(rows))), days=2)
    got = stores.landed(writer)
    edges = {(r["sessionTimestamp"].isoformat(), r["dt"]) for r in got}
    assert ("2024-10-04T23:59:59.999000+00:00", "2024-10-04") in edges
    assert ("2024-10-05T00:00:00+00:00", "2024-10-05") in edges


def test_duckdb_reads_the_output_with_hive_partitions_and_map_lookups(tmp_path: Path) -> None:
    rows = truth(LARGE.api_key, days=2)
    stage_publish(
        LocalStore(tmp_path / "out"),
        write(tmp_path / "d.gz", gzip.compress(encode_csv(rows))),
        days=2,
    )
    key, value = next(
        (k, v) for r in rows for k, v in r["eventParameters"].items() if "," in v or '"' in v
    )
    want = sum(1 for r in rows if r["eventParameters"].get(key) == value)
    glob = f"{tmp_path}/out/events/*/*/*.parquet"
    db = duckdb.connect()
    got = db.execute(
        f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true) "
        "WHERE app = 'quest' AND eventParameters[?] = ?",
        [key, value],
    ).fetchone()
    assert got is not None and got[0] == want > 0
    nulls = db.execute(
        f"SELECT count(*) FROM read_parquet('{glob}', hive_partitioning = true) WHERE userId IS NULL"
    ).fetchone()
    assert nulls is not None and nulls[0] == sum(1 for r in rows if r["userId"] is None)


@pytest.mark.parametrize("payload", [b"", gzip.compress(b""), gzip.compress(encode_csv([]))])
def test_an_empty_window_lands_no_file_and_a_zero_manifest(
    tmp_path: Path, stores: Stores, payload: bytes
) -> None:
    writer = stores.make()
    manifest = stage_publish(writer, write(tmp_path / "d.gz", payload))
    assert (manifest.rows, manifest.files) == (0, ())
    assert writer.load("quest", 1, 0) == manifest
    assert not [f for f in stores.files(writer) if f.startswith("events/")]


def _corrupt_crc(data: bytes) -> bytes:
    raw = bytearray(gzip.compress(data))
    raw[-8] ^= 0xFF
    return bytes(raw)


GOOD = encode_json(truth())
BAD_INPUTS: list[tuple[str, bytes, str]] = [
    ("truncated gzip", gzip.compress(GOOD)[:-100], "truncated gzip"),
    ("bad crc", _corrupt_crc(GOOD), "corrupt gzip"),
    ("garbage", os.urandom(5000), "neither JSON lines nor a Flurry CSV header|corrupt|not valid"),
    (
        "garbage after gzip",
        gzip.compress(GOOD) + b"trailing junk",
        "garbage after the last gzip member",
    ),
    (
        "bomb",
        gzip.compress(GOOD.splitlines(keepends=True)[0] + b"\n" * (100 << 20)),
        "refused as a bomb",
    ),
    (
        "long line",
        gzip.compress(
            b'{"sessionTimestamp": 1, "x": "' + os.urandom(1 << 20).hex().encode() + b'"}\n'
        ),
        "line 1 is longer than",
    ),
    (
        "wrong type",
        gzip.compress(GOOD + b'{"sessionTimestamp": "yesterday", "eventOffset": 1}\n'),
        r"line \d+: field 'sessionTimestamp' is not an integer: \"yesterday\"",
    ),
    (
        "map not an object",
        gzip.compress(GOOD + b'{"sessionTimestamp": 1, "eventParameters": [1, 2]}\n'),
        "field 'eventParameters' is not an object",
    ),
    ("not json", gzip.compress(GOOD + b"{this is not json}\n"), "not valid JSON"),
    (
        "missing timestamp",
        gzip.compress(b'{"eventName": "x"}\n'),
        "field 'sessionTimestamp' is missing",
    ),
    (
        "bad csv header",
        gzip.compress(b"a,b,c\n1,2,3\n"),
        "neither JSON lines nor a Flurry CSV header",
    ),
    ("csv wrong type", gzip.compress(encode_csv(truth()) + b"12x,1.0,5\n"), "line \\d+: "),
    ("zip of two files", b"", "exactly one file"),
]


@pytest.mark.parametrize(("what", "payload", "message"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_inputs_fail_clearly_and_leave_nothing(
    tmp_path: Path, what: str, payload: bytes, message: str
) -> None:
    if what == "zip of two files":
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("a.json", GOOD)
            archive.writestr("b.json", GOOD)
        payload = buffer.getvalue()
    writer = LocalStore(
        tmp_path / "out",
        limits=Limits(max_line_bytes=1 << 20, ratio_grace_bytes=1 << 20, block_bytes=256 << 10),
    )
    with pytest.raises(BadDataError, match=message) as caught:
        writer.stage(
            app="quest",
            window_id=1,
            attempt=0,
            start_ms=START,
            end_ms=START + DAY,
            source=write(tmp_path / "d", payload),
        )
    assert caught.value.app == "quest"
    leftovers = [p for p in (tmp_path / "out").rglob("*") if p.is_file()]
    assert leftovers == [], "a failed stage leaves no file"


def test_quarantine_keeps_good_rows_and_counts_the_rejects(tmp_path: Path, stores: Stores) -> None:
    rows = truth()
    bad = [
        b'{"sessionTimestamp": "soon"}',
        b"not json at all",
        b'{"sessionTimestamp": 5, "birthYear": "old"}',
    ]
    lines = encode_json(rows).splitlines()
    mixed = b"\n".join(lines[:10] + bad[:2] + lines[10:] + bad[2:]) + b"\n"
    writer = stores.make(on_bad_rows="quarantine", limits=Limits(block_bytes=16 << 10))
    manifest = stage_publish(writer, write(tmp_path / "d.gz", gzip.compress(mixed)))
    assert manifest.rows == len(rows) and manifest.rejected == 3
    assert manifest.rows + manifest.rejected == len(lines) + len(bad)
    rejects = [
        json.loads(line)
        for line in stores.read(writer, "_rejects/quest/1.0.ndjson").decode().splitlines()
    ]
    assert [r["line"] for r in rejects] == [11, 12, len(lines) + 3]
    assert "sessionTimestamp" in rejects[0]["reason"] and rejects[1]["raw"] == "not json at all"
    assert sorted(map(_key, stores.landed(writer))) == sorted(map(_key, expected(rows)))


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("puzzle-quest", "puzzle-quest"),
        ("../../etc", "%2E.%2F..%2Fetc"),
        ("..", "%2E."),
        ("a/b", "a%2Fb"),
        ("_hidden", "%5Fhidden"),
        ("app=x", "app%3Dx"),
        ("café ☕", "caf%C3%A9%20%E2%98%95"),
        ("nul\x00byte", "nul%00byte"),
    ],
)
def test_hostile_app_names_become_safe_partition_values(
    tmp_path: Path, stores: Stores, name: str, value: str
) -> None:
    assert partition_value(name) == value
    writer = stores.make()
    stage_publish(
        writer,
        write(tmp_path / "d.gz", gzip.compress(encode_json(truth(days=1)))),
        app=name,
        days=1,
    )
    files = stores.files(writer)  # every file (object) there is, relative to the root
    assert files and all(f.startswith(("events/", "_manifests/", "_staging/")) for f in files)
    assert any(f.startswith(f"events/app={value}/dt=") for f in files)
    assert f"_manifests/{value}/1.0.json" in files


def test_sweep_removes_what_no_live_attempt_owns(tmp_path: Path, stores: Stores) -> None:
    writer = stores.make()
    source = write(tmp_path / "d.gz", gzip.compress(encode_json(truth(days=2))))
    stage_publish(writer, source, window_id=1, attempt=0, days=2)
    stage_publish(writer, source, window_id=1, attempt=1, days=2)
    stage_publish(writer, source, window_id=2, attempt=0, days=2)
    stores.write(writer, "events/app=quest/dt=2024-10-04/notes.txt", b"not ours")
    removed = writer.sweep({(1, 1)})
    names = sorted(f.rsplit("/", 1)[1] for f in stores.files(writer) if f.endswith(".parquet"))
    assert names == ["part-1-1-0.parquet", "part-1-1-1.parquet"]
    assert {str(p).rsplit("/", 1)[1] for p in removed} >= {"1.0.json", "2.0.json"}
    assert "events/app=quest/dt=2024-10-04/notes.txt" in stores.files(writer)


def test_load_gives_the_published_manifest_of_that_attempt_only(
    tmp_path: Path, stores: Stores
) -> None:
    writer = stores.make()
    source = write(tmp_path / "d.gz", gzip.compress(encode_json(truth(days=1))))
    manifest = stage_publish(writer, source, window_id=3, attempt=1, days=1)
    assert writer.load("quest", 3, 1) == manifest
    assert writer.load("quest", 3, 0) is None
    assert writer.load("other", 3, 1) is None


@pytest.mark.parametrize(
    ("name", "owner"),
    [
        (part_name(12, 3, 0), (12, 3)),
        ("part-12-3-7.parquet", (12, 3)),
        ("part-12-3.parquet", None),
        ("part-12-3-7.parquet.tmp", None),
        ("notes.txt", None),
    ],
)
def test_part_file_names_parse_back_to_their_attempt(
    name: str, owner: tuple[int, int] | None
) -> None:
    assert part_owner(name) == owner


def test_manifest_and_download_names_parse_back_to_their_attempt() -> None:
    assert manifest_owner("12.3.json") == (12, 3)
    assert manifest_owner("12.3.json.tmp") is None
    assert manifest_owner("x.3.json") is None
    assert download_owner("12.3.gz") == (12, 3)
    assert download_owner("12.gz") is None


def test_rows_outside_the_window_fail_it_or_are_set_aside(tmp_path: Path, stores: Stores) -> None:
    rows = truth(days=3)  # the window asked for is only the first two days
    source = write(tmp_path / "d.gz", gzip.compress(encode_json(rows)))
    strict = stores.make("strict")
    with pytest.raises(BadDataError, match="outside the requested window"):
        stage_publish(strict, source, days=2)
    assert not [f for f in stores.files(strict) if f.endswith(".parquet")]
    lenient = stores.make(on_bad_rows="quarantine")
    manifest = stage_publish(lenient, source, days=2)
    inside = [r for r in rows if r["sessionTimestamp"] < START + 2 * DAY]
    assert manifest.rows == len(inside) and manifest.rejected == len(rows) - len(inside) > 0
    assert sorted(map(_key, stores.landed(lenient))) == sorted(map(_key, expected(inside)))


def test_sweep_removes_quarantine_files_of_dead_attempts(stores: Stores) -> None:
    store = stores.make()
    for name in ("1.0.ndjson", "1.1.ndjson", "notes.txt"):
        stores.write(store, f"_rejects/quest/{name}", b"{}\n")
    store.sweep({(1, 1)})
    assert stores.files(store) == ["_rejects/quest/1.1.ndjson", "_rejects/quest/notes.txt"]


def test_sweeping_downloads_leaves_other_apps_alone(stores: Stores) -> None:
    store = stores.make()
    for app in ("a", "b"):
        path = store.download_path(app, 1, 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    assert store.sweep_downloads(set(), ["a"]) == 1
    assert not store.download_path("a", 1, 0).exists() and store.download_path("b", 1, 0).exists()


def test_verify_reports_a_file_whose_rows_lie_outside_its_window(
    tmp_path: Path, stores: Stores
) -> None:
    store = stores.make()
    source = write(tmp_path / "d.gz", gzip.compress(encode_json(truth(days=3))))
    manifest = stage_publish(store, source, days=3)
    path = store.manifest_path("quest", 1, 0)
    assert store.check_manifest(path, manifest.rows) == []
    document = json.loads(stores.read(store, "_manifests/quest/1.0.json"))
    document["end_ms"] = START + 2 * DAY  # as if the window were two days: its third is a stray
    stores.write(store, "_manifests/quest/1.0.json", json.dumps(document).encode())
    problems = store.check_manifest(path, manifest.rows)
    assert len(problems) == 1 and "outside its window" in problems[0]
