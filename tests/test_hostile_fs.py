"""Hostile filesystem state: symbolic links planted below the output root.

Nothing backfill deletes, moves or writes may be reached through a link: the start-up sweep,
the downloads' sweep, recovery (``finish``), ``remove``, ``discard_staging`` and ``forget``
refuse with an ``IntegrityError`` naming the link (exit 5 through the CLI) before they delete
anything, and every file outside the root stays as it was.  Once the link is gone, a clean
run of the same config finishes every window.  The API is the loopback server of
``tests.hostile``, answering well (every window an empty file).
"""

from __future__ import annotations

import os
import sqlite3
import sys
from typing import TYPE_CHECKING

import anyio
import pytest

from backfill.errors import IntegrityError
from backfill.manifest import Manifest, ManifestFile
from backfill.store import LocalStore
from tests.enginekit import APPS, ROOT, write_config
from tests.hostile import TOKEN, serve

if TYPE_CHECKING:
    from pathlib import Path

ENV = os.environ | {"FLURRY_TOKEN": TOKEN}
SMALL = APPS[0]


async def _cli(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "backfill.cli", *args], cwd=ROOT, env=ENV, check=False
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _states(tmp_path: Path) -> set[str]:
    with sqlite3.connect(tmp_path / "out" / "_ledger.sqlite") as db:
        return {state for (state,) in db.execute("SELECT state FROM windows")}


def _outside(tmp_path: Path, *names: str) -> Path:
    """A folder outside the root holding ``names`` (each a file with its own name as content)."""
    folder = tmp_path / "elsewhere"
    folder.mkdir()
    for name in names:
        (folder / name).write_text(name)
    return folder


def _intact(folder: Path, *names: str) -> None:
    assert sorted(p.name for p in folder.iterdir()) == sorted(names)
    assert all((folder / name).read_text() == name for name in names)


# -- through the CLI -------------------------------------------------------------------------


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    ("linked", "names"),
    [
        ("events/app=small/dt=2020-01-01", ("part-999-1-0.parquet", "part-1-1-0.parquet")),
        ("events/app=small", ("dt=2020-01-01",)),
        ("_downloads/small", ("1.1.gz", "backup.gz", "2.7.gz")),
        ("_manifests/small", ("999.1.json", "1.1.json.tmp")),
        ("_rejects/small", ("999.1.ndjson",)),
        ("_staging", ("1.1", "keep.txt")),
    ],
)
async def test_a_run_refuses_a_root_holding_a_link_and_touches_nothing_outside(
    tmp_path: Path, linked: str, names: tuple[str, ...]
) -> None:
    outside = _outside(tmp_path, *names)
    link = tmp_path / "out" / linked
    link.parent.mkdir(parents=True)
    link.symlink_to(outside, target_is_directory=True)
    async with serve(SMALL.api_key) as hostile:
        config = str(write_config(tmp_path, hostile.base, history_days=3, apps=APPS[:2]))
        code, out, err = await _cli("run", "--config", config, "--quiet")
        assert code == 5, (out, err)
        assert f"{link}" in err and "symbolic link" in err, err
        assert "Traceback" not in err
        _intact(outside, *names)
        assert not any(c.startswith("POST") for c in hostile.calls), "nothing was submitted"

        code, out, _ = await _cli("verify", "--config", config)
        assert code == 5 and f"{link}: a symbolic link below the output root" in out, out

        link.unlink()  # the link gone, the same config finishes every window
        code, out, err = await _cli("run", "--config", config, "--quiet")
        assert code == 0, (out, err)
        assert _states(tmp_path) == {"COMMITTED"}
        _intact(outside, *names)


@pytest.mark.timeout(120)
async def test_forget_refuses_a_linked_folder_of_the_app_and_deletes_nothing(
    tmp_path: Path,
) -> None:
    async with serve(SMALL.api_key) as hostile:
        config = str(write_config(tmp_path, hostile.base, history_days=3, apps=APPS[:2]))
        code, out, err = await _cli("run", "--config", config, "--quiet")
        assert code == 0, (out, err)
    outside = _outside(tmp_path, "1.1.gz", "precious.txt")
    link = tmp_path / "out" / "_downloads" / "small"
    if link.exists():
        for leftover in link.iterdir():
            leftover.unlink()
        link.rmdir()
    link.parent.mkdir(parents=True, exist_ok=True)
    link.symlink_to(outside, target_is_directory=True)
    manifests = sorted((tmp_path / "out" / "_manifests").rglob("*.json"))
    assert manifests

    code, _, err = await _cli("forget", "--config", config, "--app", "small", "--yes")
    assert code == 5 and f"{link}" in err and "symbolic link" in err, err
    _intact(outside, "1.1.gz", "precious.txt")
    assert sorted((tmp_path / "out" / "_manifests").rglob("*.json")) == manifests
    assert _states(tmp_path) == {"COMMITTED"}, "the ledger rows stay with the files"

    link.unlink()
    code, out, err = await _cli("forget", "--config", config, "--app", "small", "--yes")
    assert code == 0 and "forgot small" in out, err
    assert not (tmp_path / "out" / "_manifests" / "small").exists()
    _intact(outside, "1.1.gz", "precious.txt")


# -- the store's deleting methods, one by one ------------------------------------------------


def _manifest(window_id: int = 1, attempt: int = 1) -> Manifest:
    item = ManifestFile(
        path="dt=2026-01-01/part-1-1-0.parquet", size=4, sha256="0" * 64, rows=1,
        partition="dt=2026-01-01",
    )  # fmt: skip
    return Manifest(
        app="small", window_id=window_id, attempt=attempt, start_ms=0, end_ms=1, rows=1,
        rejected=0, size=4, files=(item,),
    )  # fmt: skip


def test_remove_through_a_linked_partition_is_refused(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    outside = _outside(tmp_path, "part-1-1-0.parquet")
    (tmp_path / "out" / "events" / "app=small").mkdir(parents=True)
    (tmp_path / "out" / "events" / "app=small" / "dt=2026-01-01").symlink_to(outside)
    with pytest.raises(IntegrityError, match=r"dt=2026-01-01 is a symbolic link"):
        store.remove(_manifest())
    _intact(outside, "part-1-1-0.parquet")


def test_finish_does_not_move_a_staged_link_into_place(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    outside = _outside(tmp_path, "part-1-1-0.parquet")
    staged = store.layout.stage_dir("small", 1, 1)
    staged.mkdir(parents=True)
    (staged / "dt=2026-01-01").symlink_to(outside)
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.finish(_manifest())
    _intact(outside, "part-1-1-0.parquet")
    assert not (tmp_path / "out" / "events").exists()


def test_discard_staging_unlinks_a_link_inside_without_entering_it(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    outside = _outside(tmp_path, "part-1-1-0.parquet")
    staged = store.layout.stage_dir("small", 1, 1)
    staged.mkdir(parents=True)
    (staged / "dt=2026-01-01").symlink_to(outside)
    (staged / "own.parquet").write_bytes(b"x")
    store.discard_staging()
    assert not store.layout.staging.exists()
    _intact(outside, "part-1-1-0.parquet")


def test_a_sweep_meeting_a_link_refuses_before_deleting_anything(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    orphan = tmp_path / "out" / "events" / "app=small" / "dt=2026-01-01" / "part-5-1-0.parquet"
    orphan.parent.mkdir(parents=True)
    orphan.write_bytes(b"orphan")
    outside = _outside(tmp_path, "7.1.json")
    (tmp_path / "out" / "_manifests").mkdir()
    (tmp_path / "out" / "_manifests" / "small").symlink_to(outside)
    with pytest.raises(IntegrityError, match=r"_manifests/small -> .*elsewhere"):
        store.sweep(live=set())
    assert orphan.exists(), "nothing is deleted once a link is found"
    _intact(outside, "7.1.json")
    (tmp_path / "out" / "_manifests" / "small").unlink()
    assert store.sweep(live=set()) == [orphan]


def test_a_linked_file_among_downloads_is_refused_not_followed(tmp_path: Path) -> None:
    store = LocalStore(tmp_path / "out")
    outside = _outside(tmp_path, "backup.gz")
    folder = tmp_path / "out" / "_downloads" / "small"
    folder.mkdir(parents=True)
    (folder / "3.1.gz").symlink_to(outside / "backup.gz")
    (folder / "4.1.gz").write_bytes(b"stale")
    with pytest.raises(IntegrityError, match="3.1.gz"):
        store.sweep_downloads(keep=set(), apps=["small"])
    assert (folder / "4.1.gz").exists()
    with pytest.raises(IntegrityError, match="symbolic link"):
        store.download_path("small", 3, 1)
    _intact(outside, "backup.gz")


def test_inside_refuses_a_way_out_and_names_the_first_link(tmp_path: Path) -> None:
    from backfill.layout import Layout

    root = tmp_path / "out"
    (root / "events" / "a").mkdir(parents=True)
    (root / "events" / "file").write_text("x")
    layout = Layout(root=root)
    # No link on the way, spelled from the root: fine, even where nothing exists yet.
    assert layout.inside(root / "events" / "a" / "new" / "x") == root / "events" / "a" / "new" / "x"
    assert layout.inside(root / "events" / "file" / "below")  # a file on the way: no link either
    assert layout.inside(root / "events" / ".." / "events")  # ".." that stays under the root
    with pytest.raises(IntegrityError, match="outside the output root"):
        layout.inside(root / "events" / ".." / ".." / "elsewhere")
    with pytest.raises(IntegrityError, match="outside the output root"):
        layout.inside(tmp_path / "elsewhere")
    (root / "events" / "a" / "link").symlink_to(tmp_path)
    with pytest.raises(IntegrityError, match=r"a/link is a symbolic link"):
        layout.inside(root / "events" / "a" / "link" / "deeper" / "x")
