"""Conversion benchmark: a Flurry window file → partitioned Parquet, ours against baselines.

For each size and format it generates one gzip file of Flurry-like rows (30 days, sorted by
session, the simulator's row shapes), then converts it, each engine in its own subprocess so that
peak RSS is each one's own:

- ``ours``: ``backfill.store.LocalStore.stage`` + ``publish`` (the code ``backfill run`` uses);
- ``duckdb``: ``read_json``/``read_csv`` with MAP columns → ``COPY ... PARTITION_BY (dt)``;
- ``polars``: ``scan_csv`` → ``str.json_decode`` to ``Map`` → ``sink_parquet`` partitioned by
  ``dt`` (the ``bench`` extra installs Polars);
- ``naive``: a per-line ``orjson.loads`` (or ``csv``) + ``pa.Table.from_pylist`` script, the shape
  of the public Flurry scripts (run only up to ``--naive-max`` rows: it holds everything in memory).

Peak RSS is the child's own high-water mark (``getrusage``'s ``ru_maxrss``, i.e. ``VmHWM``).
``ours`` and ``polars`` run ``--repeat`` times, alternating, and the medians are shown (the
machine is shared: only ratios from the same run mean much).  It prints rows/s, MB/s
(uncompressed input), peak RSS, and each baseline's time as a ratio to ours.  Usage::

    python benchmarks/convert.py --rows 2000000 8000000 --formats json csv --repeat 3
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from collections.abc import Iterable

ROOT = Path(__file__).resolve().parent.parent
DAY_MS = 86_400_000
DAY0 = 20_300 * DAY_MS  # 2025-07-31
DAYS = 30


def generate(path: Path, rows: int, fmt: str) -> int:
    """Write ``rows`` rows over 30 days: one simulated base day, shifted to each day."""
    from isal import igzip

    per_day = -(-rows // DAYS)
    pieces, head, header = base_day(per_day, fmt)
    written = 0
    with igzip.open(path, "wb", compresslevel=1) as out:  # type: ignore[no-untyped-call]  # igzip.open is unannotated
        out.write(header)
        for day in range(DAYS):
            start = DAY0 + day * DAY_MS
            take = min(per_day, rows - written)
            for i in range(0, take, 20_000):
                out.write(
                    b"".join(
                        b"%s%d%s" % (head, start + off, rest)
                        for off, rest in pieces[i : min(i + 20_000, take)]
                    )
                )
            written += take
    return written


def base_day(per_day: int, fmt: str) -> tuple[list[tuple[int, bytes]], bytes, bytes]:
    """One simulated day of ``per_day`` rows, sorted by session: (offset in the day, the row's
    text after its timestamp) each; the text before a timestamp; the file's header."""
    from backfill.simulator import data

    app = data.AppData(
        api_key="BENCH000000000000APP", sessions_per_day=max(2, per_day // 4), events_per_session=4
    )
    base = list(data.rows(7, app, DAY0, DAY0 + DAY_MS))
    while len(base) < per_day:  # top up with the next day's sessions, folded into the same day
        base += [
            dict(r, sessionTimestamp=r["sessionTimestamp"] - DAY_MS)
            for r in data.rows(7, app, DAY0 + DAY_MS, DAY0 + 2 * DAY_MS)
        ]
        base.sort(key=lambda r: r["sessionTimestamp"])
    base = base[:per_day]
    encode = data.encode_json if fmt == "json" else lambda rs: data.encode_csv(rs, header=False)
    pieces = []
    for row in base:
        line = encode([row])
        comma = line.index(b",", 1 if fmt == "csv" else len(b'{"sessionTimestamp":'))
        pieces.append((row["sessionTimestamp"] - DAY0, line[comma:]))
    head = b'{"sessionTimestamp":' if fmt == "json" else b""
    return pieces, head, data.encode_csv([]) if fmt == "csv" else b""


# -- the engines, each run in a child process ------------------------------------------------


def run_ours(source: Path, out: Path) -> int:
    from backfill.store import LocalStore

    writer = LocalStore(out)
    manifest = writer.stage(
        app="bench",
        window_id=1,
        attempt=0,
        start_ms=DAY0,
        end_ms=DAY0 + DAYS * DAY_MS,
        source=source,
    )
    writer.publish(manifest)
    return manifest.rows


_COLUMNS = {
    "sessionTimestamp": "BIGINT", "appVersion": "VARCHAR", "sessionDuration": "BIGINT",
    "eventOffset": "BIGINT", "deviceIdentifiers": "MAP(VARCHAR, VARCHAR)", "deviceModel": "VARCHAR",
    "deviceSubModel": "VARCHAR", "countryISO": "VARCHAR", "eventName": "VARCHAR",
    "eventParameters": "MAP(VARCHAR, VARCHAR)", "userId": "VARCHAR", "gender": "VARCHAR",
    "birthYear": "INTEGER", "latitude": "DOUBLE", "longitude": "DOUBLE",
    "sessionProperties": "MAP(VARCHAR, VARCHAR)",
}  # fmt: skip
_MAPS = ("deviceIdentifiers", "eventParameters", "sessionProperties")


def run_duckdb(source: Path, out: Path, fmt: str) -> int:
    import duckdb

    db = duckdb.connect()
    if fmt == "json":
        columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in _COLUMNS.items()) + "}"
        scan = f"read_json('{source}', format = 'newline_delimited', columns = {columns})"
        select = "*"
    else:
        types = {k: ("VARCHAR" if k in _MAPS else v) for k, v in _COLUMNS.items()}
        columns = "{" + ", ".join(f"'{k}': '{v}'" for k, v in types.items()) + "}"
        scan = f"read_csv('{source}', header = true, columns = {columns})"
        select = ", ".join(
            f"""json_transform({k}, '"MAP(VARCHAR, VARCHAR)"') AS {k}""" if k in _MAPS else k
            for k in _COLUMNS
        )
    query = f"""
        COPY (
            SELECT epoch_ms(sessionTimestamp) AS sessionTimestamp,
                   epoch_ms(sessionTimestamp + eventOffset) AS eventTimestamp,
                   * EXCLUDE (sessionTimestamp),
                   strftime(epoch_ms(sessionTimestamp), '%Y-%m-%d') AS dt
            FROM (SELECT {select} FROM {scan})
        ) TO '{out}' (FORMAT PARQUET, PARTITION_BY (dt), COMPRESSION zstd)
    """
    db.execute(query)
    row = db.execute(f"SELECT count(*) FROM read_parquet('{out}/*/*.parquet')").fetchone()
    return int(row[0]) if row else 0


def run_naive(source: Path, out: Path, fmt: str) -> int:
    import csv
    import gzip
    import io

    import orjson
    import pyarrow as pa
    import pyarrow.parquet as pq

    from backfill.schema import SCHEMA

    rows = []
    with gzip.open(source, "rb") as handle:
        records: Iterable[dict[str, Any]]
        if fmt == "json":
            records = (orjson.loads(line) for line in handle)
        else:
            records = csv.DictReader(io.TextIOWrapper(handle, encoding="utf-8", newline=""))
        for record in records:
            row: dict[str, Any] = {}
            for field in SCHEMA.names:
                if field == "eventTimestamp":
                    continue
                value: Any = record.get(field)
                if fmt == "csv":
                    value = None if value == "" else value
                    if value is not None and field in _MAPS:
                        value = orjson.loads(value)
                    elif value is not None and field in (
                        "sessionTimestamp",
                        "sessionDuration",
                        "eventOffset",
                        "birthYear",
                    ):
                        value = int(value)
                    elif value is not None and field in ("latitude", "longitude"):
                        value = float(value)
                if field in _MAPS and value is not None:
                    value = list(value.items())
                row[field] = value
            row["eventTimestamp"] = row["sessionTimestamp"] + (row["eventOffset"] or 0)
            row["dt"] = time.strftime("%Y-%m-%d", time.gmtime(row["sessionTimestamp"] / 1000))
            rows.append(row)
    table = pa.Table.from_pylist(rows, schema=SCHEMA.append(pa.field("dt", pa.string())))
    pq.write_to_dataset(table, out, partition_cols=["dt"], compression="zstd")
    return int(table.num_rows)


def run_polars(source: Path, out: Path, fmt: str) -> int:
    """Polars' streaming engine: scan, ``str.json_decode`` the maps to ``Map``, sink partitioned.

    JSON lines are scanned as one text column and decoded whole: ``scan_ndjson`` with ``Map``
    fields takes gigabytes, and with ``String`` fields it re-serialises objects as broken JSON.
    """
    import polars as pl

    mapped = pl.Map(pl.String, pl.String)
    plain = {"BIGINT": pl.Int64, "INTEGER": pl.Int32, "DOUBLE": pl.Float64, "VARCHAR": pl.String}
    types = {k: mapped if k in _MAPS else plain[v] for k, v in _COLUMNS.items()}
    if fmt == "csv":
        scan = pl.scan_csv(
            source, schema={k: (pl.String if k in _MAPS else v) for k, v in types.items()}
        )
        scan = scan.with_columns([pl.col(k).str.json_decode(mapped) for k in _MAPS])
    else:
        scan = pl.scan_csv(
            source, has_header=False, separator="\x01", quote_char=None, schema={"line": pl.String}
        )
        scan = scan.select(pl.col("line").str.json_decode(pl.Struct(types))).unnest("line")
    session = pl.col("sessionTimestamp")
    stamp = pl.Datetime("ms", "UTC")
    scan = scan.with_columns(
        session.cast(stamp),
        (session + pl.col("eventOffset").fill_null(0)).cast(stamp).alias("eventTimestamp"),
        session.cast(stamp).dt.strftime("%Y-%m-%d").alias("dt"),
    )
    scan.sink_parquet(pl.PartitionBy(out, key="dt"), compression="zstd", mkdir=True)
    return int(pl.scan_parquet(out / "**" / "*.parquet").select(pl.len()).collect().item())


def child(engine: str, source: Path, out: Path, fmt: str) -> None:
    # Imports are not part of the measurement: load each engine's modules first.
    import duckdb  # noqa: F401
    import orjson  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import backfill.store  # noqa: F401

    if engine == "polars":
        import polars  # noqa: F401

    began = time.perf_counter()
    if engine == "ours":
        rows = run_ours(source, out)
    elif engine == "duckdb":
        rows = run_duckdb(source, out, fmt)
    elif engine == "polars":
        rows = run_polars(source, out, fmt)
    else:
        rows = run_naive(source, out, fmt)
    seconds = time.perf_counter() - began
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"rows": rows, "seconds": seconds, "peak_mb": peak_mb}))


def measure(engine: str, source: Path, fmt: str, work: Path) -> dict[str, Any]:
    """One engine's run in a child process.  ``ours@DIR`` is ours with the ``backfill`` package
    found in ``DIR`` (an older checkout, say: ``git archive <commit> backfill | tar -x -C DIR``)."""
    engine, _, code = engine.partition("@")
    # A folder of its own: a run left over from an interrupted benchmark must not write into it.
    out = Path(tempfile.mkdtemp(prefix=f"out-{engine}-", dir=work))
    command = [sys.executable, __file__, "--child", engine, str(source), str(out), fmt]
    try:
        return run_child(command, code or str(ROOT))
    finally:
        shutil.rmtree(out, ignore_errors=True)


def run_child(command: list[str], pythonpath: str) -> dict[str, Any]:
    """Run a benchmark's child process; the JSON object its last line prints, or
    ``{"error": <its last line of stderr>}`` if it failed."""
    done = subprocess.run(
        command,
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
        env=os.environ | {"PYTHONPATH": pythonpath},
    )
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def measure_all(
    engines: list[str], source: Path, fmt: str, work: Path, repeat: int = 1
) -> dict[str, dict[str, Any]]:
    """Each engine on ``source``; the first two ``repeat`` times, alternating, as medians."""
    runs: dict[str, list[dict[str, Any]]] = {e: [] for e in engines}
    for round_ in range(max(1, repeat)):
        for engine in engines if round_ == 0 else engines[:2]:
            runs[engine].append(measure(engine, source, fmt, work))
    return {engine: median(results) for engine, results in runs.items()}


def median(results: list[dict[str, Any]]) -> dict[str, Any]:
    """The median of every figure of the runs, and each run's seconds (the first failure, if
    any failed)."""
    failed = [r for r in results if "error" in r]
    if failed:
        return failed[0]
    middle = len(results) // 2
    return {key: sorted(r[key] for r in results)[middle] for key in results[0]} | {
        "runs": [round(r["seconds"], 2) for r in results]
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rows", type=int, nargs="+", default=[2_000_000, 8_000_000])
    parser.add_argument("--formats", nargs="+", default=["json", "csv"], choices=["json", "csv"])
    parser.add_argument("--engines", nargs="+", default=["ours", "polars", "duckdb", "naive"])
    parser.add_argument("--repeat", type=int, default=3, help="runs of ours and polars (median)")
    parser.add_argument(
        "--naive-max", type=int, default=2_000_000, help="skip the naive script above this"
    )
    parser.add_argument("--work", type=Path, default=ROOT / "data" / "bench")
    parser.add_argument(
        "--child", nargs=4, metavar=("ENGINE", "SOURCE", "OUT", "FORMAT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.child:
        engine, source, out, fmt = args.child
        child(engine, Path(source), Path(out), fmt)
        return
    args.work.mkdir(parents=True, exist_ok=True)
    header = (
        f"{'rows':>9} {'fmt':4} {'engine':7} {'seconds':>8} {'rows/s':>10} {'MB/s':>7} "
        f"{'peak MB':>8} {'time vs ours':>13}  runs"
    )
    print(header)
    print("-" * len(header))
    for rows in args.rows:
        for fmt in args.formats:
            source = args.work / f"bench-{rows}.{fmt}.gz"
            if not source.exists():
                generate(source, rows, fmt)
            raw_mb = _uncompressed_mb(source)
            engines = [e for e in args.engines if e != "naive" or rows <= args.naive_max]
            results = measure_all(engines, source, fmt, args.work, args.repeat)
            ours = results.get("ours", {}).get("seconds")
            for engine, r in results.items():
                if "error" in r:
                    print(f"{rows:>9} {fmt:4} {engine:7} failed: {r['error']}")
                    continue
                ratio = f"{r['seconds'] / ours:.2f}x" if ours else "-"
                print(
                    f"{r['rows']:>9} {fmt:4} {engine:7} {r['seconds']:>8.1f} "
                    f"{r['rows'] / r['seconds']:>10,.0f} {raw_mb / r['seconds']:>7.1f} "
                    f"{r['peak_mb']:>8.0f} {ratio:>13}  {r.get('runs', '')}",
                    flush=True,
                )


def _uncompressed_mb(path: Path) -> float:
    from isal import igzip

    total = 0
    with igzip.open(path, "rb") as handle:  # type: ignore[no-untyped-call]  # igzip.open is unannotated
        while piece := handle.read(16 << 20):
            total += len(piece)
    return total / 1e6


if __name__ == "__main__":
    main()
