"""``python -m benchmarks.run``: the per-layer benchmark, :mod:`lorafuse.bench.run` (in the package, so
that ``lorafuse bench`` works from an installed wheel), plus what this folder's other benchmarks
share: the committed results folder and the run's environment helpers."""

from __future__ import annotations

import sys
from pathlib import Path

from lorafuse.bench.load import cpu_ticks
from lorafuse.bench.run import (CSV_FIELDS, GATES, ISSUE_CPU, RANKS, SHAPES, append_rows, build_parser, device_name,
                                git_commit,
                                main, measure_peaks, other_cpu_share, peak_memory, plan, run, run_case, sync, time_cpu,
                                time_gpu, triton_version)

RESULTS = Path(__file__).resolve().parent / "results"  # the committed results (results.csv, NOTES.md)

# the names this folder's scripts used before the runner moved into the package
_cpu_ticks, _device_name, _git_commit, _sync, _triton_version = cpu_ticks, device_name, git_commit, sync, triton_version

__all__ = [
    "CSV_FIELDS", "GATES", "ISSUE_CPU", "RANKS", "RESULTS", "SHAPES", "append_rows", "build_parser", "cpu_ticks", "device_name",
    "git_commit", "main", "measure_peaks", "other_cpu_share", "peak_memory", "plan", "run", "run_case", "sync",
    "time_cpu", "time_gpu", "triton_version",
]

if __name__ == "__main__":
    sys.exit(main())
