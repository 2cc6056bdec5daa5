"""NF4 quantize / dequantize: ours vs bitsandbytes on the same device."""

from __future__ import annotations

from collections.abc import Iterator

import torch

from .. import nf4_dequantize, nf4_quantize
from ..patching.quantize import bnb_state_from_nf4
from .case import Case, bandwidth

# (out_features, in_features) of the projections listed in docs/benchmarks.md
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
BLOCKSIZE = 64


def cases(device: torch.device, quick: bool) -> Iterator[Case]:
    for name in QUICK if quick else SHAPES:
        yield from _layer_cases(name, SHAPES[name], device)


def _layer_cases(name: str, shape: tuple[int, int], device: torch.device) -> Iterator[Case]:
    import bitsandbytes.functional as bnb

    w = torch.randn(shape, dtype=torch.bfloat16, device=device)
    ours_quantize = lambda: nf4_quantize(w, BLOCKSIZE, True, torch.bfloat16)  # noqa: E731
    bnb_quantize = lambda: bnb.quantize_4bit(w, blocksize=BLOCKSIZE, compress_statistics=True,  # noqa: E731
                                             quant_type="nf4", quant_storage=torch.bfloat16)
    packed, state = ours_quantize()
    b_packed, b_state = bnb_quantize()
    ours_dequantize = lambda: nf4_dequantize(packed, state)  # noqa: E731
    bnb_dequantize = lambda: bnb.dequantize_4bit(b_packed, b_state, quant_type="nf4")  # noqa: E731

    # The format's bytes are those of bitsandbytes' CPU quantizer, which ours reproduce on every
    # device. Its CUDA quantizer rounds otherwise in places: built with --use_fast_math, it scales
    # by an approximate reciprocal, and it picks the double-quant codes by a search over the code
    # rather than by its CPU backend's bins. On a GPU ours is checked against our CPU bytes and
    # the bytes that differ from bitsandbytes' CUDA ones are counted in the row.
    oracle_packed, oracle_state = ((b_packed, b_state) if device.type == "cpu"
                                   else nf4_quantize(w.cpu(), BLOCKSIZE, True, torch.bfloat16))
    info = {"name": name, "blocksize": BLOCKSIZE}
    unlike = {} if device.type == "cpu" else {
        "bytes_unlike_baseline": int((packed.view(torch.uint8) != b_packed.view(torch.uint8)).sum()),
        "absmax_codes_unlike_baseline": int((state.absmax != b_state.absmax).sum())}

    def same_bytes():
        if not (torch.equal(packed.view(torch.uint8).cpu(), oracle_packed.view(torch.uint8).cpu())
                and torch.equal(state.absmax.cpu(), oracle_state.absmax.cpu())):
            raise AssertionError("our NF4 bytes differ from bitsandbytes' CPU quantizer's")

    def same_values():  # bitsandbytes dequantizing our bytes
        theirs = bnb.dequantize_4bit(packed, bnb_state_from_nf4(state), quant_type="nf4")
        if not torch.equal(ours_dequantize(), theirs):
            raise AssertionError("our dequantize differs from bitsandbytes'")

    n = w.numel()
    state_bytes = sum(t.numel() * t.element_size() for t in state.tensors().values())
    common = dict(shape=list(shape), dtype="bfloat16", baseline_name="bitsandbytes")
    yield Case("nf4_quantize (double quant)", ours=ours_quantize, baseline=bnb_quantize, check=same_bytes,
               roofline=_read_mostly(2 * n + n // 2 + state_bytes),  # read bf16, write packed + state
               info={**info, **unlike}, **common)
    yield Case("nf4_dequantize -> bf16", ours=ours_dequantize, baseline=bnb_dequantize, check=same_values,
               roofline=_write_mostly(n // 2 + state_bytes + 2 * n),  # read packed + state, write bf16
               info=info, **common)
    yield _into_out(packed, state, b_packed, b_state, name, shape)


def _into_out(packed, state, b_packed, b_state, name: str, shape: tuple[int, int]) -> Case:
    """Dequantize into a given buffer, as into a reused workspace: against copying the output's
    bytes into an existing buffer (the least any writer of them costs) and, on a GPU, against
    bitsandbytes' dequantize_4bit(out=) (bitsandbytes has no CPU kernel for out=)."""
    import bitsandbytes.functional as bnb

    gpu = packed.device.type == "cuda"
    out, b_out, src, dst = (torch.empty(shape, dtype=torch.bfloat16, device=packed.device) for _ in range(4))
    ours = lambda: nf4_dequantize(packed, state, out=out)  # noqa: E731
    theirs = lambda: bnb.dequantize_4bit(b_packed, b_state, quant_type="nf4", out=b_out if gpu else None)  # noqa: E731
    copy = lambda: dst.copy_(src)  # noqa: E731

    def same_values():  # bitsandbytes dequantizing our bytes
        if not torch.equal(ours(), bnb.dequantize_4bit(packed, bnb_state_from_nf4(state), quant_type="nf4")):
            raise AssertionError("our dequantize into out differs from bitsandbytes'")

    def roofline(ms: dict[str, float], read_gbps: float) -> dict:
        return {"time_vs_copy": round(ms["ours"] / ms["baseline"], 3),
                "roofline": f"{ms['ours'] / ms['baseline']:.2f}x the time of copying the output bytes"}

    return Case("nf4_dequantize -> bf16 into out", list(shape), "bfloat16", ours=ours, baseline=copy,
                baseline_name="copy of the output bytes into a buffer", check=same_values, roofline=roofline,
                also={"bitsandbytes_out": theirs} if gpu else {},
                other_baselines={"bitsandbytes_out": "bitsandbytes (out=)"} if gpu else {},
                info={"name": name, "blocksize": BLOCKSIZE})


def _read_mostly(nbytes: int):
    """GB/s of bytes read + written, and its share of the measured read bandwidth."""
    return lambda ms, read_gbps: bandwidth(nbytes, ms["ours"], read_gbps)


def _write_mostly(nbytes: int):
    """GB/s of bytes read + written; no ceiling: the read bandwidth is none for a kernel that
    writes four times what it reads."""
    def roofline(ms: dict[str, float], read_gbps: float) -> dict:
        gbps = nbytes / ms["ours"] / 1e6
        return {"ours_GBps": round(gbps, 1), "roofline": f"{gbps:.1f} GB/s"}
    return roofline
