"""``mapjson.decode`` against DuckDB's ``json_transform_strict`` to a MAP, row by row.

The fast path must give exactly what DuckDB gives for the rows it takes, send every other row
to the general decoder (whose error stands), and take the flat string maps real downloads have.
"""

from __future__ import annotations

import json
import random
from typing import Any

import duckdb
import pyarrow as pa
import pytest

from backfill import mapjson

AWKWARD = ["", "a", 'say "hi"', "back\\slash", "tab\there", "nl\nx", "café ☕", "🎮", "/", "a,b",
           "{", "}", ":", '\\"', "\\\\", "end\\", "\x01ctl", "k", "ab_group"]  # fmt: skip
ODD_ROWS = [
    "null", "5", '"text"', "[]", '{"a":"b"', '{"a":"b",}', '{"a":"\\x"}', '{"a":"x\ty"}',
    '{"a":"\\ud83c\\udfae"}', '{"a":"\\u00e9"}', '{"a":1}', '{"a":null}', '{"a":true}',
    '{"a":{"b":"c"}}', '{"a":["b","c"]}', '{ "a":"b"}', '{"a" :"b"}', '{"a":"b" }',
    '{"a":"b","a":"c"}', '{"\\u0061":"x","a":"y"}', '{"a":"b"}x', '{"a":"b"}{"c":"d"}',
    '{"a":"b\\"}', '{"a""b"}', '{"a":"b":"c"}', "{}", "{ }", "", '{"":""}', '{"a":"\\/"}',
]  # fmt: skip


def _duckdb(db: duckdb.DuckDBPyConnection, text: pa.Array) -> pa.Array:
    db.register("t", pa.table({"m": text}))
    try:
        got = db.sql("""SELECT json_transform_strict(m, '"MAP(VARCHAR, VARCHAR)"') FROM t""")
        return got.to_arrow_table().column(0).combine_chunks().cast(mapjson.MAP)
    finally:
        db.unregister("t")


def _row(rng: random.Random) -> str | None:
    roll = rng.random()
    if roll < 0.05:
        return None
    if roll < 0.15:
        return rng.choice(ODD_ROWS)
    entries: list[tuple[str, Any]] = []
    for _ in range(rng.randint(0, 5)):
        value: Any = rng.choice(AWKWARD)
        if rng.random() < 0.05:
            value = rng.choice([1, 2.5, True, None, [1], {"x": "y"}])
        entries.append((rng.choice(AWKWARD) + str(rng.randint(0, 3)), value))
    if rng.random() < 0.03 and entries:
        entries.append(entries[0])  # a key twice
    ascii_only = rng.random() < 0.3
    spaced = rng.random() < 0.05
    colon, comma = (": ", ", ") if spaced else (":", ",")
    body = comma.join(
        json.dumps(k, ensure_ascii=ascii_only) + colon + json.dumps(v, ensure_ascii=ascii_only)
        for k, v in entries
    )
    return "{" + body + "}"


def _reference(db: duckdb.DuckDBPyConnection, rows: list[str | None]) -> list[Any]:
    """Each row's map by DuckDB, or the exception it raises on that row alone."""
    out: list[Any] = []
    for row in rows:
        try:
            out.append(_duckdb(db, pa.array([row], pa.string())).to_pylist()[0])
        except duckdb.Error as exc:
            out.append(exc)
    return out


@pytest.mark.parametrize("seed", range(4))
def test_decode_equals_duckdb_row_by_row(seed: int) -> None:
    rng = random.Random(seed)
    db = duckdb.connect()
    rows = [_row(rng) for _ in range(2000)]
    expected = _reference(db, rows)
    good = [r for r, e in zip(rows, expected, strict=True) if not isinstance(e, Exception)]
    bad = [r for r, e in zip(rows, expected, strict=True) if isinstance(e, Exception)]
    assert bad and len(good) > 1300  # both kinds are exercised
    slowed: list[int] = []

    def slow(text: pa.Array) -> pa.Array:
        slowed.append(len(text))
        return _duckdb(db, text)

    got = mapjson.decode(pa.array(good, pa.string()), slow)
    assert got.type == mapjson.MAP
    assert got.to_pylist() == [e for e in expected if not isinstance(e, Exception)]
    assert sum(slowed) < len(good) / 2  # most rows take the fast path (\\u escapes do not)
    for row in bad:  # a bad row among good ones: the general decoder's error stands
        column = pa.array([*good[:50], row, *good[50:100]], pa.string())
        with pytest.raises(duckdb.Error):
            mapjson.decode(column, lambda text: _duckdb(db, text))


def test_flat_string_maps_never_go_slow() -> None:
    """The shape of real downloads (and DuckDB's JSON text): all on the fast path."""
    rows = [
        json.dumps({f"k{i}": v for i, v in enumerate(AWKWARD[: n % 7])}, separators=(",", ":"),
                   ensure_ascii=False)
        for n in range(500)
    ] + [None, "{}"]  # fmt: skip
    rows = [r for r in rows if r is None or "\\u" not in r]

    def slow(text: pa.Array) -> pa.Array:
        raise AssertionError(f"{len(text)} rows went slow: {text.to_pylist()[:3]}")

    got = mapjson.decode(pa.array(rows, pa.string()), slow)
    expected = [None if r is None else list(json.loads(r).items()) for r in rows]
    assert got.to_pylist() == expected


def test_sliced_chunked_and_large_inputs() -> None:
    """Offsets into a shared buffer, several chunks and ``large_string`` decode the same."""
    rows = ['{"a":"1"}', '{"b":"x\\"y"}', None, '{"c":"\\\\"}', "{}", '{"d":"e","f":"g"}']
    expected = [None if r is None else list(json.loads(r).items()) for r in rows]
    whole = pa.array(["{}", *rows, '{"z":"z"}'], pa.string()).slice(1, len(rows))
    chunked = pa.chunked_array([pa.array(rows[:2]), pa.array(rows[2:])])
    large = pa.array(rows, pa.large_string())
    for column in (whole, chunked, large):
        assert mapjson.decode(column, lambda t: pytest.fail("went slow")).to_pylist() == expected
    assert (
        mapjson.decode(pa.array([], pa.string()), lambda t: pytest.fail("slow")).to_pylist() == []
    )


def test_escapes_undone_apart_next_to_plain_strings_and_slow_rows() -> None:
    """Strings with escapes sit among plain ones, end in an escaped backslash right before a
    string that begins with one, or only in rows the fast path leaves to ``slow``."""
    rows = [
        '{"a\\\\":"\\\\b","c":"d"}',  # a key ending in \\, a value beginning with \\
        '{"p":"q"}',
        '{"x":1,"y":"\\t"}',  # not all strings: slow, its escape must not disturb the others
        '{"e":"f\\"g\\\\","h\\n":"i"}',
        '{"j":"k"}',
    ]
    db = duckdb.connect()
    slowed: list[str] = []

    def slow(text: pa.Array) -> pa.Array:
        slowed.extend(text.to_pylist())
        return _duckdb(db, text)

    got = mapjson.decode(pa.array(rows, pa.string()), slow)
    assert got.to_pylist() == _duckdb(db, pa.array(rows, pa.string())).to_pylist()
    assert got.to_pylist()[0] == [("a\\", "\\b"), ("c", "d")]
    assert slowed == [rows[2]]
