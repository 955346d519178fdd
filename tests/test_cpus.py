"""The CPUs a run may use: affinity, capped by the cgroup CPU quota a container sets.

The cgroup trees are real files under ``tmp_path``; the affinity is faked at 64 CPUs (but in the
last test), so that each cap shows whatever machine runs the tests.
"""

from __future__ import annotations

import subprocess
import sys
from typing import TYPE_CHECKING

import pytest

from backfill import cpus
from backfill.config import ApiSettings

if TYPE_CHECKING:
    from pathlib import Path

HOST = 64


@pytest.fixture
def host(monkeypatch: pytest.MonkeyPatch) -> None:
    """A process that may run on 64 CPUs."""
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(HOST)))


def _tree(root: Path, files: dict[str, str], mine: str) -> Path:
    """A cgroup file system under ``root`` holding ``files``; the process's cgroup list."""
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    listing = root / "self-cgroup"
    listing.write_text(mine)
    return listing


def _v1(quota: int, period: int = 100000) -> dict[str, str]:
    return {"cpu.cfs_quota_us": f"{quota}\n", "cpu.cfs_period_us": f"{period}\n"}


@pytest.mark.usefixtures("host")
@pytest.mark.parametrize(("limit", "want"), [(150000, 2), (100000, 1), (1000, 1), (400000, 4)])
def test_a_v2_quota_is_rounded_up_to_whole_cpus(tmp_path: Path, limit: int, want: int) -> None:
    mine = _tree(tmp_path, {"pod/box/cpu.max": f"{limit} 100000\n"}, "0::/pod/box\n")
    assert cpus.usable(tmp_path, mine) == want


@pytest.mark.usefixtures("host")
def test_the_tightest_quota_on_the_way_up_counts(tmp_path: Path) -> None:
    """A systemd slice's ``CPUQuota=300%`` above a service's 800 %."""
    files = {"cpu.max": "max 100000\n", "work.slice/cpu.max": "300000 100000\n",
             "work.slice/backfill.service/cpu.max": "800000 100000\n"}  # fmt: skip
    mine = _tree(tmp_path, files, "0::/work.slice/backfill.service\n")
    assert cpus.usable(tmp_path, mine) == 3


@pytest.mark.usefixtures("host")
def test_no_quota_leaves_the_affinity(tmp_path: Path) -> None:
    mine = _tree(tmp_path, {"cpu.max": "max 100000\n"}, "0::/\n")
    assert cpus.usable(tmp_path, mine) == HOST


@pytest.mark.usefixtures("host")
def test_a_container_sees_its_quota_at_the_root_whatever_its_path(tmp_path: Path) -> None:
    """Without a cgroup namespace the list names the host's path, absent from the mount."""
    mine = _tree(tmp_path, {"cpu.max": "200000 100000\n"}, "0::/kubepods.slice/pod-1/cri-1\n")
    assert cpus.usable(tmp_path, mine) == 2


@pytest.mark.usefixtures("host")
@pytest.mark.parametrize("mount", ["cpu,cpuacct", "cpuacct,cpu", "cpu", "cpu,cpuacct,cpuset"])
def test_a_v1_cpu_controller_quota_counts_wherever_it_is_mounted(
    tmp_path: Path, mount: str
) -> None:
    files = {f"{mount}/docker/{name}": text for name, text in _v1(100000).items()}
    files |= {f"{mount}/{name}": text for name, text in _v1(-1).items()}
    mine = _tree(tmp_path, files, f"5:memory:/docker\n4:{mount}:/docker\n0::/\n")
    assert cpus.usable(tmp_path, mine) == 1


@pytest.mark.usefixtures("host")
def test_a_v1_quota_behind_a_link_on_a_hybrid_host(tmp_path: Path) -> None:
    """``cpu`` a link to ``cpu,cpuacct``, v2 mounted beside it under ``unified`` (no cpu.max)."""
    files = {f"cpu,cpuacct/{name}": text for name, text in _v1(250000).items()}
    mine = _tree(tmp_path, files | {"unified/cgroup.procs": ""}, "4:cpu:/\n0::/\n")
    (tmp_path / "cpu").symlink_to(tmp_path / "cpu,cpuacct")
    assert cpus.usable(tmp_path, mine) == 3


@pytest.mark.usefixtures("host")
@pytest.mark.parametrize(
    "text", ["", "garbage", "100000\n", "0 0\n", "abc 100000\n", "max\n", "-5 100000\n"]
)
def test_a_garbled_cpu_max_sets_no_cap(tmp_path: Path, text: str) -> None:
    mine = _tree(tmp_path, {"box/cpu.max": text}, "0::/box\n")
    assert cpus.usable(tmp_path, mine) == HOST


@pytest.mark.usefixtures("host")
def test_a_huge_quota_is_no_cap_and_no_error(tmp_path: Path) -> None:
    files = {"a/cpu.max": f"{'9' * 400} 100000\n"}
    files |= {f"cpu/a/{name}": text for name, text in _v1(int("9" * 400)).items()}
    mine = _tree(tmp_path, files, "4:cpu:/a\n0::/a\n")
    assert cpus.usable(tmp_path, mine) == HOST


@pytest.mark.usefixtures("host")
def test_no_cgroup_file_system_sets_no_cap(tmp_path: Path) -> None:
    assert cpus.usable(tmp_path / "absent", tmp_path / "absent-too") == HOST


@pytest.mark.usefixtures("host")
def test_a_cgroup_list_that_is_not_text_sets_no_cap(tmp_path: Path) -> None:
    mine = _tree(tmp_path, {"cpu.max": "100000 100000\n"}, "")
    mine.write_bytes(b"0::/\xff\xfe\n")
    assert cpus.usable(tmp_path, mine) == HOST


@pytest.mark.usefixtures("host")
@pytest.mark.parametrize(("line", "want"), [("0::box\n", 1), ("0::\n", 1), ("garbage\n", HOST),
                                            ("\n", HOST), ("0::/../sibling\n", HOST)])  # fmt: skip
def test_an_odd_cgroup_list(tmp_path: Path, line: str, want: int) -> None:
    """A cgroup outside this namespace (``..``) is not seen: its quota is unknown, so no cap."""
    mine = _tree(tmp_path, {"cpu.max": "100000 100000\n"}, line)
    assert cpus.usable(tmp_path, mine) == want


def test_an_error_reading_the_cgroups_sets_no_cap(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever goes wrong reading them (here ``is_dir`` raising, as Python 3.11's does on a
    folder it may not search), the count stands and the config still loads."""
    mine = _tree(tmp_path, {"cpu/cpu.cfs_quota_us": "100000\n"}, "4:cpu:/\n")

    def refused(self: Path) -> bool:
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr("pathlib.Path.is_dir", refused)
    monkeypatch.setattr("os.sched_getaffinity", lambda _pid: set(range(HOST)))
    assert cpus.usable(tmp_path, mine) == HOST


def test_a_run_pinned_to_one_cpu_converts_one_window_at_a_time_by_default() -> None:
    """A real process whose affinity is one CPU (as ``taskset`` or a cpuset makes it): the
    default ``conversions_at_once`` is 1 there; here it is what this machine allows, at most 4."""
    code = (
        "import os; os.sched_setaffinity(0, {min(os.sched_getaffinity(0))}); "
        "from backfill.config import ApiSettings; print(ApiSettings().conversions_at_once)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "1"
    assert ApiSettings().conversions_at_once == min(cpus.usable(), 4)
