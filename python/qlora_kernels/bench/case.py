"""A benchmark case: one op on one shape, ours against what a user would otherwise run.

The suites (nf4, lora, attention, decode, loss) yield cases from `cases(device, quick)`; `qlora-kernels bench`
(runner.py) and the pytest-benchmark scripts in benchmarks/ both check and time them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Roofline = Callable[[dict[str, float], float], dict]  # (median ms by name, read GB/s) -> row keys


@dataclass(frozen=True)
class Case:
    """`ours` and `baseline` are what is timed (a call, or a training step from `step`);
    `roofline` turns the medians into the row's roofline figure.

    `baseline_variants` are other ways a user runs the same baseline (by name): each is timed,
    and the row's baseline is the fastest of them and `baseline`. `other_baselines` names the
    `also` timings that are baselines in their own right (name -> what it is): the row gets a
    ratio against each."""

    op: str
    shape: str | list[int]
    dtype: str
    ours: Callable[[], object]
    baseline: Callable[[], object]
    baseline_name: str
    check: Callable[[], None]  # raises AssertionError when ours differs from the baseline; runs before timing
    roofline: Roofline | None = None
    also: dict[str, Callable[[], object]] = field(default_factory=dict)  # timed too, reported as "<name>_ms"
    info: dict = field(default_factory=dict)  # more row keys that name the case
    peak_memory: bool = False  # also report the CUDA peak MB of ours and of the baseline
    # (setup, ours, baseline) statements: on a CPU, the peak RSS of ours and of the baseline, each
    # measured in a fresh process after setup (bench/memory.cpu_peak_mb); None: no CPU peak
    cpu_peak: tuple[str, str, str] | None = None
    baseline_variants: dict[str, Callable[[], object]] = field(default_factory=dict)
    other_baselines: dict[str, str] = field(default_factory=dict)

    def __post_init__(self):
        unknown = set(self.other_baselines) - set(self.also)
        if unknown:
            raise ValueError(f"{self.label}: other_baselines {sorted(unknown)} are not timed in also "
                             f"{sorted(self.also)}")
        if self.baseline_name in self.baseline_variants:
            raise ValueError(f"{self.label}: baseline variant {self.baseline_name!r} has the baseline's name")

    @property
    def label(self) -> str:
        return f"{self.op} {shape_label(self.shape)}"

    @property
    def sides(self) -> dict[str, Callable[[], object]]:
        """What is compared, by name: ours, the baseline ("baseline"), its variants and the other baselines."""
        return {"ours": self.ours, "baseline": self.baseline, **self.baseline_variants,
                **{name: self.also[name] for name in self.other_baselines}}


def shape_label(shape: str | list[int]) -> str:
    return "x".join(map(str, shape)) if isinstance(shape, list) else shape


def step(fn: Callable[[], torch.Tensor], grad_of: Sequence[torch.Tensor] = ()) -> Callable[[], object]:
    """What is timed: fn(), or with grad_of a training step, fn() and a backward of ones into
    those tensors, whose gradients are then cleared."""
    if not grad_of:
        return fn

    def train_step():
        out = fn()
        out.backward(torch.ones_like(out))
        for t in grad_of:
            t.grad = None
    return train_step


def close_check(ours: Callable[[], torch.Tensor], baseline: Callable[[], torch.Tensor],
                ours_grad_of: Sequence[torch.Tensor] = (), baseline_grad_of: Sequence[torch.Tensor] = (),
                rtol: float = 2e-2, atol: float = 0.0) -> Callable[[], None]:
    """A check that ours' output, and for a training step the gradients, match the baseline's:
    largest error within rtol of the baseline's largest magnitude, plus atol."""
    def check():
        pairs = zip(_output_and_grads(ours, ours_grad_of), _output_and_grads(baseline, baseline_grad_of))
        for i, (got, want) in enumerate(pairs):
            err = (got.float() - want.float()).abs().max().item()
            scale = want.float().abs().max().item()
            if not err <= rtol * scale + atol:
                what = f"gradient of input {i - 1}" if i else "output"
                raise AssertionError(f"ours' {what} differs from the baseline's by {err:.3g} (scale {scale:.3g})")
    return check


def _output_and_grads(fn, grad_of):
    if not grad_of:
        with torch.no_grad():
            return [fn()]
    out = fn()
    out.backward(torch.ones_like(out))
    grads = [t.grad for t in grad_of]
    for t in grad_of:
        t.grad = None
    return [out.detach(), *grads]


def bandwidth(nbytes: int, ms: float, read_gbps: float) -> dict:
    """Row keys for a read-mostly kernel that moves `nbytes` in `ms`: GB/s and its share of the
    measured read bandwidth. Above that ceiling the bytes came from a cache, not from memory,
    and no share is claimed."""
    gbps = nbytes / ms / 1e6
    pct = 100 * gbps / read_gbps
    if pct > 100:
        return {"ours_GBps": round(gbps, 1), "pct_of_read_bandwidth": None,
                "roofline": f"{gbps:.1f} GB/s, above the {read_gbps:.1f} GB/s memory read ceiling (cached bytes)"}
    return {"ours_GBps": round(gbps, 1), "pct_of_read_bandwidth": round(pct, 1),
            "roofline": f"{gbps:.1f} GB/s, {pct:.0f}% of read bandwidth"}


def other_baseline_ratios(other_baselines: dict[str, str], ms: dict[str, float]) -> dict:
    """Row keys of the baselines besides the row's own: what each is and baseline / ours for each."""
    if not other_baselines:
        return {}
    return {"other_baselines": dict(other_baselines),
            **{f"ratio_vs_{name}": round(ms[name] / ms["ours"], 3) for name in other_baselines}}


def other_ratios(row: dict, times: str = "x") -> str:
    """The row's ratios against its other baselines, as the tables print them ("" when none)."""
    return "".join(f"; {row[f'ratio_vs_{name}']:.2f}{times} vs {what}"
                   for name, what in row.get("other_baselines", {}).items())
