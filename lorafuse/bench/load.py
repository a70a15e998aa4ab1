"""How busy the machine was during a timing: other processes' share of the CPU, from /proc."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["cpu_ticks", "other_cpu_share"]


def cpu_ticks() -> tuple[int, int] | None:
    """(busy ticks of the whole machine, ticks of this process) from /proc, or None elsewhere."""
    try:
        cpu = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
        own = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        busy = sum(cpu[:3]) + sum(cpu[5:8])  # user nice system (idle iowait) irq softirq steal
        return busy, int(own[11]) + int(own[12])  # utime + stime
    except (OSError, ValueError, IndexError):
        return None


def other_cpu_share(before, after, seconds: float) -> float | None:
    """Fraction of the machine's CPU time that other processes used between two :func:`cpu_ticks`
    (None where /proc is missing; then the 1-minute load average is the fallback)."""
    if before is None or after is None or seconds <= 0:
        return None
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    others = (after[0] - before[0]) - (after[1] - before[1])
    return max(0.0, others / (seconds * hz * (os.cpu_count() or 1)))
