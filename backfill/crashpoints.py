"""A fault-injection seam: named I/O steps that a test can make the process die at.

Code calls ``hit("ledger.split")`` at each step worth crashing at.  Unarmed (always, in
production) it only counts.  ``arm("ledger.split:2")`` makes the second hit of that step send
SIGKILL to the process itself; ``arm("7")`` does it at the seventh hit of any step.  The CLI arms
it from ``BACKFILL_CRASH_AT``, so crash tests drive a real ``backfill`` subprocess.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

__all__ = ["arm", "counts", "hit"]

_counts: Counter[str] = Counter()
_total = 0
_target: tuple[str | None, int] | None = None


def arm(spec: str | None) -> None:
    """Arm (``"name:k"`` or ``"k"``) or disarm (None or empty); resets the counts."""
    global _target, _total
    _counts.clear()
    _total = 0
    if not spec:
        _target = None
        return
    name, _, k = spec.rpartition(":")
    _target = (name or None, int(k))


def hit(name: str) -> None:
    """Count one step named ``name``; die here if this is the armed step."""
    global _total
    _counts[name] += 1
    _total += 1
    if _target is None:
        return
    target, k = _target
    if (target is None and _total == k) or (target == name and _counts[name] == k):
        os.kill(os.getpid(), signal.SIGKILL)


def counts() -> dict[str, int]:
    """How many times each step was hit since the last ``arm``."""
    return dict(_counts)
