"""Microbenchmarks against what users run today (how they measure: docs/benchmarks.md).

`run(what)` checks each op against its baseline, times both side by side on one device,
prints the ratios and writes runs/bench-<device>-<yyyymmdd>.json plus a PNG (`out_dir` chooses
another folder).
"""

from .runner import run

__all__ = ["run"]
