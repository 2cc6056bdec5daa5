"""A benchmark case: one op on one shape, ours against what a user would otherwise run.

The suites (nf4, lora, attention) yield cases from `cases(device, quick)`; `qlora-kernels bench`
(runner.py) and the pytest-benchmark scripts in benchmarks/ both check and time them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

Roofline = Callable[[dict[str, float], float], dict]  # (median ms by name, copy GB/s) -> row keys


@dataclass(frozen=True)
class Case:
    """`ours` and `baseline` are what is timed (a call, or a training step from `step`);
    `roofline` turns the medians into the row's roofline figure."""

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

    @property
    def label(self) -> str:
        return f"{self.op} {shape_label(self.shape)}"


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
