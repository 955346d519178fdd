"""How many CPUs this process may use: its affinity, and its control group's CPU quota.

Theory of operation.  ``os.cpu_count()`` counts the host's CPUs.  In a container given two CPUs
on a 64-CPU host it says 64, so a default of one conversion per CPU would run four at once on
two CPUs' time, each holding its memory.  ``usable()`` takes the CPUs the process may be
scheduled on (``sched_getaffinity``: a cpuset, ``taskset``) and caps them by the CPU quota of
its cgroup or any cgroup above it (v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` over
``cpu.cfs_period_us``), rounded up: 1.5 CPUs of quota keep two conversions busy.  Whatever
cannot be read (not Linux, no cgroup file system, a garbled file) sets no cap.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from collections.abc import Callable

__all__ = ["usable"]

_ROOT = Path("/sys/fs/cgroup")
_MINE = Path("/proc/self/cgroup")


def usable(root: Path = _ROOT, mine: Path = _MINE) -> int:
    """The CPUs this process may use, at least 1."""
    try:
        count = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        count = os.cpu_count() or 1
    try:
        quota = _quota(root, mine)
    except Exception:  # unforeseen trouble reading cgroups: no cap; the config still loads
        quota = None
    if quota is not None:
        count = min(count, quota)
    return max(1, count)


def _quota(root: Path, mine: Path) -> int | None:
    """The tightest CPU quota on this process's cgroups, in CPUs rounded up; None if none."""
    try:
        lines = mine.read_text().splitlines()
    except (OSError, ValueError):  # ValueError: not text
        return None
    quotas: list[int] = []
    for line in lines:
        number, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if number == "0" and not controllers:  # v2: one hierarchy, cpu.max in each cgroup
            quotas += _along(root, path, _v2)
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            # Mounted under its controllers' names, ``cpu`` often a link to ``cpu,cpuacct``.
            for name in dict.fromkeys((controllers, "cpu", "cpu,cpuacct", "cpuacct,cpu")):
                if (root / name).is_dir():
                    quotas += _along(root / name, path, _v1)
                    break
    return min(quotas, default=None)


def _along(base: Path, path: str, read: Callable[[Path], int | None]) -> list[int]:
    """The quotas ``read`` finds in the cgroup at ``path`` under ``base`` and every one above it
    (a container sees its own cgroup as the root, whatever ``path`` says).  A path that climbs
    above the root (``..``: a cgroup outside this namespace) is not seen: no cap from it."""
    parts = path.strip().split("/")
    if ".." in parts:
        return []
    found: list[int] = []
    here = Path("/", *(part for part in parts if part not in ("", ".")))
    for folder in [here, *here.parents]:
        quota = read(base / folder.relative_to("/"))
        if quota is not None:
            found.append(quota)
    return found


def _v2(folder: Path) -> int | None:
    try:
        limit, period = (folder / "cpu.max").read_text().split()
        if limit == "max":
            return None
        return _ratio(int(limit), int(period))
    except (OSError, ValueError):
        return None


def _v1(folder: Path) -> int | None:
    try:
        limit = int((folder / "cpu.cfs_quota_us").read_text())
        period = int((folder / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None
    return _ratio(limit, period)


def _ratio(limit: int, period: int) -> int | None:
    """CPUs of quota, rounded up (integers: a limit of any size); none for a limit or period
    that is not positive (v1 writes -1 for none)."""
    return -(-limit // period) if limit > 0 and period > 0 else None
