"""A committed results JSON as the Markdown table the README shows (`bench --markdown FILE`)."""

from __future__ import annotations

import json
from pathlib import Path

from .case import other_ratios


def _ms(value) -> str:
    return "-" if value is None else f"{value:.3f}"


def _shape(row: dict) -> str:
    shape = row["shape"]
    return "x".join(map(str, shape)) if isinstance(shape, list) else str(shape)


def markdown_table(path: str | Path) -> str:
    """The rows of one `bench` results JSON, with its device, date and command."""
    results = json.loads(Path(path).read_text())
    lines = [
        f"{results['device']}, {results['date']}, `{results['command']}` → `{Path(path).as_posix()}`",
        "",
        "| op | shape | dtype | ours ms | baseline | baseline ms | baseline / ours | roofline / note |",
        "| --- | --- | --- | ---: | --- | ---: | ---: | --- |",
    ]
    for r in results["rows"]:
        lines.append(f"| {r['op']} | {_shape(r)} | {r['dtype']} | {_ms(r['ours_ms'])} | {r['baseline']} | "
                     f"{_ms(r['baseline_ms'])} | {r['ratio']:.2f}× | {r.get('roofline', '')}{other_ratios(r, '×')} |")
    return "\n".join(lines)
