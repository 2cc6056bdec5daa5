"""Microbenchmarks against what users run today (how they measure: docs/benchmarks.md).

`run(what)` checks each op against its baseline, times both side by side on one device,
prints the ratios and writes benchmarks/results/<device>-<yyyymmdd>.json plus a PNG.
"""

from .runner import run

__all__ = ["run"]
