"""The README and docs/ say what the repository does: their code runs and computes what it
claims, the commands they name exist, every figure is its committed record's, the support
matrix is the registry, and every file or link they point to is in the repository."""

import json
import math
import re
from pathlib import Path

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.bench.report import markdown_table
from qlora_kernels.cli import parser as cli_parser

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS, ROOT / "benchmarks" / "README.md"]
BENCH_BLOCK = re.compile(r"<!-- bench-table: (\S+) -->\n(.*?)\n<!-- /bench-table -->", re.S)
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.S | re.M)
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def _text(page: Path) -> str:
    return page.read_text()


def _blocks(page: Path, language: str) -> list[str]:
    return [body for lang, body in FENCE.findall(_text(page)) if lang == language]


def _code_spans(page: Path) -> list[str]:
    """The page's inline code spans and shell blocks."""
    text = _text(page)
    return re.findall(r"`([^`\n]+)`", FENCE.sub("", text)) + _blocks(page, "bash")


def _section(page: Path, heading: str) -> str:
    text = _text(page)
    start = text.index(f"\n## {heading}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end >= 0 else len(text)]


def _table_rows(text: str, first_header: str) -> list[list[str]]:
    """The body rows of the Markdown table whose first header cell is `first_header`, as cells."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([cell.strip() for cell in line.strip().strip("|").split("|")])
    return rows


def _code(cell: str) -> str:
    match = re.fullmatch(r"`([^`]+)`", cell)
    assert match, f"expected one `code` span, got {cell!r}"
    return match.group(1)


def _link_target(cell: str) -> Path:
    (target,) = LINK.findall(cell)
    return ROOT / target


def _ratio(value: float) -> str:
    return f"{value:.2f}×"


# --- the two commands -------------------------------------------------------------------

def _make_targets() -> set[str]:
    return set(re.findall(r"^([A-Za-z][\w-]*):", (ROOT / "Makefile").read_text(), re.M))


def test_the_two_commands_are_make_targets_that_do_what_the_readme_says():
    (commands,) = [b for b in _blocks(README, "bash") if "make demo" in b]
    assert re.search(r"^make demo\b", commands, re.M) and re.search(r"^make test\b", commands, re.M)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^demo:.*\n\t\$\(PY\) -m qlora_kernels finetune$", makefile, re.M), "make demo runs the main job"
    assert re.search(r"^test:.*\n\t\$\(PY\) -m pytest", makefile, re.M), "make test runs the tests"


def test_every_make_target_the_pages_name_exists():
    named = {target for page in PAGES for span in _code_spans(page) for target in re.findall(r"^make ([a-z][\w-]*)",
                                                                                              span, re.M)}
    assert {"demo", "test"} <= named
    assert named <= _make_targets(), f"not in the Makefile: {sorted(named - _make_targets())}"


# --- the quickstart runs and computes what it says ---------------------------------------

def test_quickstart_patch_routes_a_peft_model_through_the_kernels_with_the_same_logits():
    from peft import LoraConfig, get_peft_model

    from helpers import tiny_causal_lm

    (patch_block,) = [b for b in _blocks(README, "python") if "qlora_kernels.patch(model)" in b]
    model = get_peft_model(tiny_causal_lm("llama"), LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0,
                                                                target_modules="all-linear",
                                                                init_lora_weights=False))
    ids = torch.randint(0, 128, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # a left-padded row
    with torch.no_grad():
        stock = model(input_ids=ids, attention_mask=mask).logits

    namespace = {"model": model}
    exec(patch_block, namespace)
    report = qk.patch_report(namespace["model"])
    assert report is not None and report.family == "llama" and report.attention
    lora_layers = [m for m in model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")]
    assert len(report.lora_layers) == len(lora_layers) > 0
    with torch.no_grad():
        patched = namespace["model"](input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    torch.testing.assert_close(patched[keep], stock[keep], atol=1e-4, rtol=1e-4)


def test_quickstart_pieces_compute_what_their_comments_say():
    (pieces,) = [b for b in _blocks(README, "python") if "qk.flash_attention" in b]
    ns = {}
    exec(pieces, ns)
    # NF4 round trip: the dequantized weight is within half of NF4's largest gap per block
    assert ns["w"].dtype == torch.bfloat16 and ns["w"].shape == ns["weight"].shape
    W = qk.nf4_dequantize(ns["packed"], ns["state"]).double()
    assert (W - ns["weight"].double()).abs().max() <= ns["weight"].abs().max() * 0.2
    x, A, B = (ns[name].double() for name in ("x", "lora_A", "lora_B"))
    torch.testing.assert_close(ns["y"].double(), x @ W.T + 2.0 * (x @ A.T) @ B.T, atol=1e-3, rtol=1e-4)
    # causal attention over the 16 keys before each query and itself: masked softmax in fp64
    q, k, v = (ns[name].double() for name in ("q", "k", "v"))
    i = torch.arange(q.shape[2])[:, None]
    j = torch.arange(k.shape[2])[None, :]
    scores = (q @ k.transpose(-1, -2)) / math.sqrt(q.shape[-1])
    scores = scores.masked_fill(~((j <= i) & (j >= i - 16)), -math.inf)
    torch.testing.assert_close(ns["o"].double(), scores.softmax(-1) @ v, atol=1e-5, rtol=1e-5)


def test_every_python_block_of_the_pages_compiles():
    for page in PAGES:
        for n, block in enumerate(_blocks(page, "python")):
            compile(block, f"{page.name} python block {n}", "exec")


# --- the support matrix is the registry ----------------------------------------------------

@pytest.mark.parametrize("page, heading", [(README, "What is supported"), (ROOT / "docs" / "patching.md",
                                                                            "Model families")])
def test_support_matrix_lists_exactly_the_registered_families(page, heading):
    rows = _table_rows(_section(page, heading), "`model_type`")
    listed = [_code(row[0].split(" (")[0]) for row in rows]
    assert sorted(listed) == sorted(qk.patching.SUPPORTED)


# --- every figure is its record's, with the command that made it ---------------------------

def _cli_accepts(command: str) -> None:
    """`command` (qlora-kernels ... or python -m qlora_kernels ...) is a valid command line."""
    words = command.split()
    assert words[0] == "qlora-kernels" or words[:3] == ["python", "-m", "qlora_kernels"], command
    cli_parser().parse_args(words[1:] if words[0] == "qlora-kernels" else words[3:])  # exits on a bad one


def test_headline_finetune_figures_are_those_of_their_records():
    rows = _table_rows(_section(README, "Headline figures"), "command")
    assert rows
    for command_cell, tokens_cell, memory_cell, record_cell in rows:
        command = _code(command_cell)
        _cli_accepts(command)
        model = re.search(r"--model (\w+)", command).group(1)
        record = json.loads(_link_target(record_cell).read_text())
        config = record["config"]
        assert (config["family"], config["size"]) == (model, "tiny")
        # the run the table's caption describes: 50 steps of 4 x 256 tokens
        assert (config["steps"], config["batch_size"], config["seq_len"]) == (50, 4, 256)
        ratios = record["summary"]["patched_over_stock"]
        assert (tokens_cell, memory_cell) == (_ratio(ratios["tokens_per_s"]), _ratio(ratios["peak_mb"])), command


def test_headline_op_figures_are_those_of_the_bench_record():
    section = _section(README, "Headline figures")
    command = re.search(r"Ops against what users run today, from `([^`]+)`", section).group(1)
    _cli_accepts(command)
    record_path = ROOT / re.search(r"\[record\]\(([^)]+\.json)\)", section).group(1)
    record = json.loads(record_path.read_text())
    assert record["command"] == command and not record["quick"]
    rows = _table_rows(section, "op")
    assert rows
    for op_cell, baseline_cell, ratio_cell in rows:
        measured = [r for r in record["rows"] if r["op"] == _code(op_cell)]
        assert measured, f"{op_cell} is not a row of {record_path.name}"
        # where a suite times two forms of a baseline, each row's is the faster: the cell names those picked
        assert {r["baseline"] for r in measured} == set(baseline_cell.split(" or ")), op_cell
        low, high = min(r["ratio"] for r in measured), max(r["ratio"] for r in measured)
        expected = _ratio(low) if _ratio(low) == _ratio(high) else f"{_ratio(low)}–{_ratio(high)}"
        assert ratio_cell == expected, op_cell


def test_bench_tables_are_generated_from_the_committed_json(monkeypatch):
    monkeypatch.chdir(ROOT)  # the tables name their JSON relative to the repository
    blocks = [block for page in PAGES for block in BENCH_BLOCK.findall(_text(page))]
    assert blocks, "no generated benchmark table"
    for path, table in blocks:
        assert table == markdown_table(path), f"stale: regenerate with `qlora-kernels bench --markdown {path}`"


def test_finetune_result_tables_are_those_of_their_records():
    from qlora_kernels.finetune.report import format_table

    page = ROOT / "docs" / "finetune.md"
    results = re.findall(r"```\n(.*?)```\nRecord: \[[^\]]+\]\(([^)]+)\)", _text(page), re.S)
    assert len(results) == 3
    for block, target in results:
        record = json.loads((page.parent / target).read_text())
        title, *table = block.splitlines()
        config = record["config"]
        assert title == (f"{config['family']} {config['size']}, {config['steps']} steps x {config['batch_size']} x "
                         f"{config['seq_len']} tokens, {record['device']['name']}")
        # the job's own table of the record: header, stock, patched, patched/stock
        assert table == format_table(record["summary"], record["memory_measure"]).splitlines()[:4], target


def test_the_interleaved_step_script_the_docs_quote_runs():
    """docs/limits.md quotes `benchmarks/interleaved_step.py`: it must run against the package
    as it is (here at the smallest preset, one timed step per variant)."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "interleaved_step.py"), "--size", "test",
                           "--steps", "1"], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for variant in ("stock", "lora only", "attention only", "both"):
        assert re.search(rf"^{variant} +median", done.stdout, re.M), done.stdout


# --- nothing outside the repository, no broken link ----------------------------------------

OUTSIDE = re.compile(r"DESIGN\.md|BENCHMARKS\.md|STYLE\.md|\.\./shared|\bshared/|/work/")
PATH_WORD = re.compile(r"^\.?[A-Za-z_][\w.*-]*(/[\w.*-]*)+$")


def _code_words(page: Path) -> list[str]:
    """Path-like words of the page's inline code and shell blocks (Python blocks hold hub ids)."""
    words = [word.rstrip(".,:;)") for span in _code_spans(page) for word in span.split()]
    return [word for word in words if PATH_WORD.match(word)]


def _exists(word: str, page: Path) -> bool:
    """A repository path, relative to the root, the page, or the package (`ops/nf4.py`)."""
    for base in (ROOT, page.parent, ROOT / "python" / "qlora_kernels"):
        if any(ch in word for ch in "*?[") and list(base.glob(word)):
            return True
        if (base / word).exists():
            return True
    return False


def _outputs() -> tuple[str, ...]:
    """The folders builds and jobs write (`dist/`, `runs/`, ...): the top-level ones .gitignore lists."""
    ignore = ROOT / ".gitignore"
    lines = ignore.read_text().splitlines() if ignore.exists() else []
    return tuple(line.lstrip("/") for line in lines if re.fullmatch(r"/?[\w.-]+/", line))


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_pages_name_no_file_outside_the_repository(page):
    assert not OUTSIDE.findall(_text(page))
    # absolute paths are the system's (/usr/local/cuda/bin), not the repository's
    missing = [w for w in _code_words(page) if not w.startswith(("/", *_outputs())) and not _exists(w, page)]
    assert not missing, f"{page.name} names paths that are not in the repository: {missing}"


def _anchors(page: Path) -> set[str]:
    """GitHub's anchors of the page's headings."""
    headings = re.findall(r"^#+ (.+)$", FENCE.sub("", _text(page)), re.M)
    return {re.sub(r"[^\w\- ]", "", h.lower()).replace(" ", "-") for h in headings}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_points_to_an_existing_file(page):
    for target in LINK.findall(_text(page)):
        if re.match(r"[a-z]+://", target):
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        assert file.exists() and ROOT in file.parents, f"{page.name}: broken link {target}"
        if anchor:
            assert anchor in _anchors(file), f"{page.name}: no heading #{anchor} in {file.name}"
