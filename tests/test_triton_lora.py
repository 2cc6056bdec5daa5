"""Triton fused LoRA linear (forward and backward, dense or NF4 W) vs `reference.lora.lora_linear`.

fp32 is checked tightly against an fp64 reference. For fp16/bf16 the bound is honest rather
than fixed: the kernel's error against fp64 must stay within twice the error of the same
computation done the usual way in that dtype (PEFT: every matmul rounded to the dtype),
plus a small slack.
"""

import os

import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter, which must be chosen before
# triton (and any @triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import lora_inputs, peft_like_lora  # noqa: E402
from qlora_kernels import reference  # noqa: E402
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight  # noqa: E402
from qlora_kernels.reference.lora import lora_linear  # noqa: E402
from qlora_kernels.triton.lora import (  # noqa: E402
    lora_backward_triton,
    lora_dropout_keep,
    lora_forward_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 1234


def _nf4_weight(w, blocksize, double_quant, dtype):
    """(NF4Weight on DEVICE, the dequantized W in `dtype` the kernels must multiply by)."""
    N, K = w.shape
    packed, absmax = reference.nf4_quantize_blocks(w, blocksize)
    nested = {}
    if double_quant:
        offset = absmax.mean()
        code = reference.dynamic_code()
        absmax, nested_absmax = reference.quantize_blockwise_8bit(absmax - offset, code, reference.NESTED_BLOCKSIZE)
        nested = dict(nested_absmax_=nested_absmax, nested_code=code, offset=offset)
    w_ref = reference.nf4_dequantize(packed, absmax, blocksize, (N, K), dtype, **nested)
    on = {k: v.to(DEVICE) for k, v in nested.items()}
    state = NF4Weight(packed.to(DEVICE), NF4QuantState(absmax.to(DEVICE), (N, K), w.dtype, blocksize,
                                                       offset=on.get("offset"), nested_absmax=on.get("nested_absmax_"),
                                                       nested_code=on.get("nested_code")))
    return state, w_ref.to(DEVICE)


def _forward_backward(fn, dtype, inp, w, scaling, keep, p):
    """fn's output and (dx, dA, dB, dbias) by autograd, inputs cast to `dtype` first."""
    leaves = [inp["x"], inp["lora_A"], inp["lora_B"], inp["bias"]]
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_() for t in leaves]
    x, lora_A, lora_B, bias = leaves
    y = fn(x, w.to(dtype), bias, lora_A, lora_B, scaling, keep, p)
    y.backward(inp["dy"].to(dtype))
    return y.detach(), [None if t is None else t.grad for t in leaves]


def _run(M, N, K, r, dtype, weight_kind, has_bias, p, scaling, blocksize=64):
    inp = lora_inputs(M, N, K, r, dtype, has_bias, DEVICE, seed=M * N + K + r)
    if weight_kind == "dense":
        weight, nf4_state, w_ref = inp["w"].to(dtype), None, inp["w"].to(dtype)
    else:
        weight = None
        nf4_state, w_ref = _nf4_weight(inp["w"].cpu(), blocksize, weight_kind == "nf4_dq", dtype)
    keep = lora_dropout_keep(SEED, p, M, K, DEVICE) if p > 0 else None

    y, xa = lora_forward_triton(inp["x"], weight, nf4_state, inp["bias"], inp["lora_A"], inp["lora_B"], scaling, p,
                                SEED)
    grads = lora_backward_triton(inp["dy"], inp["x"], weight, nf4_state, inp["lora_A"], inp["lora_B"], scaling, p,
                                 SEED, xa, True, True, True, has_bias)
    assert y.dtype == dtype and y.shape == (M, N) and xa.shape == (M, r)
    got = [y] + list(grads)

    y64, grads64 = _forward_backward(lora_linear, torch.float64, inp, w_ref, scaling, keep, p)
    want = [y64] + grads64
    if dtype == torch.float32:
        for name, g, w in zip(("y", "dx", "dA", "dB", "dbias"), got, want):
            if w is None:
                assert g is None, name
                continue
            assert g.dtype == dtype and g.shape == w.shape, name
            err = (g.double() - w).abs().max().item()
            assert err <= 2e-5 * (1 + w.abs().max().item()), f"{name}: max error {err}"
        return

    ylow, grads_low = _forward_backward(peft_like_lora, dtype, inp, w_ref, scaling, keep, p)
    for name, g, w, base in zip(("y", "dx", "dA", "dB", "dbias"), got, want, [ylow] + grads_low):
        if w is None:
            assert g is None, name
            continue
        assert g.dtype == dtype and g.shape == w.shape, name
        err = (g.double() - w).abs().max().item()
        base_err = (base.double() - w).abs().max().item()
        slack = 1e-3 * w.abs().max().item()
        assert err <= 2 * base_err + slack, f"{name}: error {err} vs {dtype} baseline {base_err}"


@pytest.mark.parametrize("weight_kind", ("dense", "nf4", "nf4_dq"))
@pytest.mark.parametrize("r", (1, 8, 16))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_odd_shapes(dtype, r, weight_kind):
    _run(5, 37, 70, r, dtype, weight_kind, has_bias=True, p=0.0, scaling=2.0)


@pytest.mark.parametrize("p", (0.0, 0.25))
@pytest.mark.parametrize("has_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16), ids=("fp32", "bf16", "fp16"))
def test_dropout_and_bias(dtype, has_bias, p):
    _run(5, 37, 70, 8, dtype, "nf4_dq", has_bias, p, scaling=0.5)


@pytest.mark.parametrize("blocksize", (32, 64))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_nf4_blocks_aligned_with_rows(dtype, blocksize):
    # K a multiple of the blocksize: a W tile loads one absmax per row when its K extent fits
    # in a block, else one per element (the interpreter's forward tile is 64 wide along K)
    _run(6, 40, 96 if blocksize == 32 else 128, 16, dtype, "nf4_dq", True, 0.25, scaling=1.7, blocksize=blocksize)


def test_rslora_scaling_large_rank_split_m():
    # rsLoRA: alpha / sqrt(r); rank above one 64-wide chunk; M over several dA splits
    r = 80
    _run(40, 24, 70, r, torch.float32, "nf4", False, 0.25, scaling=16 / r**0.5)


def test_only_requested_gradients():
    inp = lora_inputs(5, 37, 70, 8, torch.float32, True, DEVICE)
    w = inp["w"]
    _, xa = lora_forward_triton(inp["x"], w, None, inp["bias"], inp["lora_A"], inp["lora_B"], 2.0, 0.1, SEED)
    dx, dA, dB, dbias = lora_backward_triton(inp["dy"], inp["x"], w, None, inp["lora_A"], inp["lora_B"], 2.0, 0.1,
                                             SEED, xa, True, False, True, False)
    assert dx is not None and dB is not None and dA is None and dbias is None


def test_dropout_mask():
    p = 0.25
    keep = lora_dropout_keep(SEED, p, 256, 256, DEVICE)
    assert keep.dtype == torch.bool and keep.shape == (256, 256)
    assert abs(keep.float().mean().item() - (1 - p)) <= 0.03
    assert torch.equal(keep, lora_dropout_keep(SEED, p, 256, 256, DEVICE))
    assert not torch.equal(keep, lora_dropout_keep(SEED + 1, p, 256, 256, DEVICE))
    assert lora_dropout_keep(SEED, 0.0, 8, 8, DEVICE).all()


def test_rejects_bad_arguments():
    inp = lora_inputs(5, 37, 70, 8, torch.float32, False, DEVICE)
    args = (inp["x"], inp["w"], None, None, inp["lora_A"], inp["lora_B"], 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        lora_forward_triton(*args, 1.0, SEED)
    with pytest.raises(ValueError, match="exactly one"):
        lora_forward_triton(inp["x"], None, None, None, inp["lora_A"], inp["lora_B"], 1.0, 0.0, SEED)
    with pytest.raises(ValueError, match="dtype"):
        lora_forward_triton(inp["x"], inp["w"], None, None, inp["lora_A"].double(), inp["lora_B"], 1.0, 0.0, SEED)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_kind", ("nf4_dq", "dense"))
def test_llama_size_bf16(weight_kind):
    _run(512, 4096, 4096, 16, torch.bfloat16, weight_kind, True, 0.1, scaling=2.0)
