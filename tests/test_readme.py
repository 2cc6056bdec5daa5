"""The README's benchmark tables are the committed results JSON, not numbers typed by hand."""

import re
from pathlib import Path

from qlora_kernels.bench.report import markdown_table

ROOT = Path(__file__).resolve().parents[1]
BLOCK = re.compile(r"<!-- bench-table: (\S+) -->\n(.*?)\n<!-- /bench-table -->", re.S)


def test_readme_bench_tables_are_generated_from_the_committed_json(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tables name their JSON relative to the repository
    blocks = BLOCK.findall(Path("README.md").read_text())
    assert blocks, "the README has no generated benchmark table"
    for path, table in blocks:
        assert table == markdown_table(path), f"stale: regenerate with `qlora-kernels bench --markdown {path}`"
