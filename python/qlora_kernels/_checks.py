"""Argument checks that hold in eager mode, under torch.compile and on the meta device.

A check on a size known only at run time (a SymBool while tracing) becomes a runtime
assertion (`torch._check`) instead of a guard; a concrete failure raises ValueError naming
the argument. The validators of `nf4_weight.py` and `ops/attention.py` are written with it.
"""

from __future__ import annotations

import torch


def require(ok, message: str) -> None:
    """Raise ValueError(message) unless ok (a SymBool becomes `torch._check`)."""
    if isinstance(ok, torch.SymBool):
        torch._check(ok, lambda: message)
    elif not ok:
        raise ValueError(message)


def is_fake(t: torch.Tensor) -> bool:
    """A tensor without values: on the meta device or a FakeTensor of torch.compile."""
    return t.device.type == "meta" or isinstance(t, torch._subclasses.FakeTensor)
