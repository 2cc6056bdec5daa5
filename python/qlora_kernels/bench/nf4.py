"""NF4 quantize / dequantize: ours vs bitsandbytes on the same device."""

from __future__ import annotations

import torch

from .. import nf4_dequantize, nf4_quantize
from .timing import median_ms

# (out_features, in_features) of the projections in BENCHMARKS.md
SHAPES = {
    "llama-7b q/o 4096x4096": (4096, 4096),
    "llama-7b gate/up 11008x4096": (11008, 4096),
    "llama-7b down 4096x11008": (4096, 11008),
    "llama-3-8b gate/up 14336x4096": (14336, 4096),
    "llama-3-8b down 4096x14336": (4096, 14336),
    "llama-3-8b k/v 1024x4096": (1024, 4096),
    "bloom-560m qkv 3072x1024": (3072, 1024),
    "bloom-560m mlp 4096x1024": (4096, 1024),
    "opt-2.7b 2560x2560": (2560, 2560),
    "opt-2.7b fc1 10240x2560": (10240, 2560),
}
QUICK = ("llama-7b q/o 4096x4096", "llama-3-8b k/v 1024x4096", "bloom-560m qkv 3072x1024")


def _bnb():
    import bitsandbytes.functional as F

    return F


def bench(device: torch.device, quick: bool, copy_gbps: float) -> list[dict]:
    F = _bnb()
    rows = []
    names = QUICK if quick else tuple(SHAPES)
    for name in names:
        shape = SHAPES[name]
        w = torch.randn(shape, dtype=torch.bfloat16, device=device)
        packed, state = nf4_quantize(w, 64, True, torch.bfloat16)
        b_packed, b_state = F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                            quant_storage=torch.bfloat16)
        if not (torch.equal(packed.view(torch.uint8), b_packed.view(torch.uint8))
                and torch.equal(state.absmax, b_state.absmax)):
            raise AssertionError(f"{name}: our NF4 bytes differ from bitsandbytes'")
        out = nf4_dequantize(packed, state)
        if not torch.equal(out, F.dequantize_4bit(b_packed, b_state, quant_type="nf4")):
            raise AssertionError(f"{name}: our dequantize differs from bitsandbytes'")

        n = w.numel()
        state_bytes = sum(t.numel() * t.element_size() for t in state.tensors().values())
        quant_bytes = 2 * n + n // 2 + state_bytes  # read bf16, write packed + state
        dequant_bytes = n // 2 + state_bytes + 2 * n  # read packed + state, write bf16
        for op, ours, theirs, nbytes in (
            ("nf4_quantize (double quant)",
             lambda: nf4_quantize(w, 64, True, torch.bfloat16),
             lambda: F.quantize_4bit(w, blocksize=64, compress_statistics=True, quant_type="nf4",
                                     quant_storage=torch.bfloat16),
             quant_bytes),
            ("nf4_dequantize -> bf16",
             lambda: nf4_dequantize(packed, state),
             lambda: F.dequantize_4bit(b_packed, b_state, quant_type="nf4"),
             dequant_bytes),
        ):
            ours_ms = median_ms(ours, device, quick)
            base_ms = median_ms(theirs, device, quick)
            gbps = nbytes / ours_ms / 1e6
            rows.append({
                "op": op, "shape": list(shape), "name": name, "dtype": "bfloat16", "blocksize": 64,
                "ours_ms": round(ours_ms, 4), "baseline": "bitsandbytes", "baseline_ms": round(base_ms, 4),
                "ratio": round(base_ms / ours_ms, 3), "ours_GBps": round(gbps, 1),
                "pct_of_copy_bandwidth": round(100 * gbps / copy_gbps, 1),
                "roofline": f"{gbps:.1f} GB/s, {100 * gbps / copy_gbps:.0f}% of copy",
            })
    return rows
