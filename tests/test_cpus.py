"""The CPUs a run may use: affinity, capped by the cgroup CPU quota a container sets."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from backfill import cpus
from backfill.config import ApiSettings

if TYPE_CHECKING:
    from pathlib import Path

AFFINITY = len(os.sched_getaffinity(0))


def _tree(root: Path, files: dict[str, str], mine: str) -> Path:
    """A cgroup file system under ``root`` holding ``files``; the process's cgroup list."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    listing = root / "self-cgroup"
    listing.write_text(mine)
    return listing


def test_a_v2_quota_of_one_and_a_half_cpus_allows_two(tmp_path: Path) -> None:
    mine = _tree(tmp_path, {"pod/box/cpu.max": "150000 100000\n"}, "0::/pod/box\n")
    assert cpus.usable(tmp_path, mine) == min(AFFINITY, 2)


def test_the_tightest_quota_on_the_way_up_counts(tmp_path: Path) -> None:
    files = {"cpu.max": "max 100000\n", "pod/cpu.max": "100000 100000\n",
             "pod/box/cpu.max": "400000 100000\n"}  # fmt: skip
    assert cpus.usable(tmp_path, _tree(tmp_path, files, "0::/pod/box\n")) == 1


def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    mine = _tree(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cpus.usable(tmp_path, mine) == AFFINITY


def test_a_v1_cpu_controller_quota_counts(tmp_path: Path) -> None:
    files = {"cpu,cpuacct/docker/cpu.cfs_quota_us": "100000\n",
             "cpu,cpuacct/docker/cpu.cfs_period_us": "100000\n",
             "cpu,cpuacct/cpu.cfs_quota_us": "-1\n", "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}  # fmt: skip
    mine = _tree(tmp_path, files, "5:memory:/docker\n4:cpu,cpuacct:/docker\n0::/\n")
    assert cpus.usable(tmp_path, mine) == 1


@pytest.mark.parametrize(
    "text", ["", "garbage", "100000\n", "0 0\n", "abc 100000\n", "max\n", "-5 100000\n"]
)
def test_a_garbled_cpu_max_sets_no_cap(tmp_path: Path, text: str) -> None:
    mine = _tree(tmp_path, {"box/cpu.max": text}, "0::/box\n")
    assert cpus.usable(tmp_path, mine) == AFFINITY


def test_no_cgroup_file_system_sets_no_cap(tmp_path: Path) -> None:
    assert cpus.usable(tmp_path / "absent", tmp_path / "absent-too") == AFFINITY


def test_a_cgroup_list_that_is_not_text_sets_no_cap(tmp_path: Path) -> None:
    mine = _tree(tmp_path, {"cpu.max": "100000 100000\n"}, "")
    mine.write_bytes(b"0::/\xff\xfe\n")
    assert cpus.usable(tmp_path, mine) == AFFINITY


@pytest.mark.parametrize("line", ["0::box\n", "0::\n", "garbage\n", "0::/../..\n", "\n"])
def test_an_odd_cgroup_list_still_finds_the_quota_at_the_root(tmp_path: Path, line: str) -> None:
    """A container sees its own cgroup as the root, whatever path its list names."""
    mine = _tree(tmp_path, {"cpu.max": "100000 100000\n"}, line)
    assert cpus.usable(tmp_path, mine) == (AFFINITY if line.strip() in ("garbage", "") else 1)


def test_a_run_pinned_to_one_cpu_converts_one_window_at_a_time_by_default() -> None:
    """A real process whose affinity is one CPU (as ``taskset`` or a cpuset makes it): the
    default ``conversions_at_once`` is 1 there, not one per CPU of the host."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from backfill.config import ApiSettings; print(ApiSettings().conversions_at_once)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
    assert ApiSettings().conversions_at_once == min(AFFINITY, 4)
