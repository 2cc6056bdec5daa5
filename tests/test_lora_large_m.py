"""LoRA linear at training sizes: dequantize-once + cuBLAS (backends/lora_dequant_mm.py) and the
CUDA backend's choice between it and the fused Triton kernels by token count.

Without a GPU the Triton kernels run in the interpreter on CPU tensors and torch's CPU GEMMs
stand in for cuBLAS; the threshold is lowered so that tiny shapes take each path. fp32 is
checked tightly against an fp64 reference; fp16/bf16 by the honest bound: the error against
fp64 within twice that of the same layer computed the usual way in that dtype (PEFT: every
matmul rounded to the dtype), plus a small slack.
"""

import os

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from helpers import lora_inputs, peft_like_lora  # noqa: E402
from qlora_kernels import reference  # noqa: E402
from qlora_kernels.backends import cuda as glue  # noqa: E402
from qlora_kernels.backends import lora_dequant_mm as dm  # noqa: E402
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight  # noqa: E402
from qlora_kernels.ops import lora as lora_ops  # noqa: E402
from qlora_kernels.reference.lora import lora_linear  # noqa: E402
from qlora_kernels.triton import lora as triton_lora  # noqa: E402
from qlora_kernels.triton.nf4_dequant import nf4_dequantize_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SEED = 4321
DTYPES = (torch.float32, torch.bfloat16, torch.float16)
DTYPE_IDS = ("fp32", "bf16", "fp16")


def _quantize(w, blocksize, double_quant):
    """The op's weight arguments (weight, packed, absmax, nested_absmax, nested_code, offset,
    blocksize, nested_blocksize) of an NF4 copy of w, on DEVICE."""
    packed, absmax = reference.nf4_quantize_blocks(w, blocksize)
    if not double_quant:
        return None, packed.to(DEVICE), absmax.to(DEVICE), None, None, None, blocksize, reference.NESTED_BLOCKSIZE
    offset = absmax.mean()
    code = reference.dynamic_code()
    absmax_q, nested = reference.quantize_blockwise_8bit(absmax - offset, code, reference.NESTED_BLOCKSIZE)
    return (None, packed.to(DEVICE), absmax_q.to(DEVICE), nested.to(DEVICE), code.to(DEVICE), offset.to(DEVICE),
            blocksize, reference.NESTED_BLOCKSIZE)


def _weight_args(weight_kind, w, dtype, blocksize):
    """(op weight arguments, W [N, K] in `dtype` as the kernels must multiply by it)."""
    if weight_kind == "dense":
        w = w.to(DEVICE, dtype)
        return (w, None, None, None, None, None, 0, 0), w
    args = _quantize(w.cpu(), blocksize, weight_kind == "nf4_dq")
    _, packed, absmax, nested_absmax, code, offset, bs, nbs = args
    N, K = w.shape
    return args, reference.nf4_dequantize(packed, absmax, bs, (N, K), dtype, nested_absmax, code, offset, nbs)


def _autograd(fn, dtype, inp, w, scaling, keep, p):
    """fn's output and its gradients (dx, dA, dB, dbias), inputs cast to `dtype`."""
    leaves = [None if t is None else t.detach().to(dtype).requires_grad_()
              for t in (inp["x"], inp["lora_A"], inp["lora_B"], inp["bias"])]
    x, lora_A, lora_B, bias = leaves
    y = fn(x, w.to(dtype), bias, lora_A, lora_B, scaling, keep, p)
    y.backward(inp["dy"].to(dtype))
    return [y.detach()] + [None if t is None else t.grad for t in leaves]


def _op(inp, args, N, scaling, p):
    """The CUDA backend's forward and backward as the ops call them: [y, dx, dA, dB, dbias], xa."""
    seed = torch.tensor([SEED])
    y, xa = glue.triton_lora_linear_fwd(inp["x"], *args, N, inp["bias"], inp["lora_A"], inp["lora_B"], scaling, p,
                                        seed)
    grads = glue.triton_lora_linear_bwd(inp["dy"], inp["x"], *args, inp["lora_A"], inp["lora_B"], scaling, p, seed,
                                        xa)
    return [y, *grads], xa


@pytest.fixture
def paths(monkeypatch):
    """The LoRA paths the CUDA backend takes, in call order ("fused" / "dequant_once", fwd / bwd)."""
    taken = []

    def spy(module, name, label):
        real = getattr(module, name)

        def run(*args, **kwargs):
            taken.append(label)
            return real(*args, **kwargs)
        monkeypatch.setattr(module, name, run)

    spy(glue, "lora_forward_dequant_mm", ("dequant_once", "fwd"))
    spy(glue, "lora_backward_dequant_mm", ("dequant_once", "bwd"))
    spy(triton_lora, "lora_forward_triton", ("fused", "fwd"))
    spy(triton_lora, "lora_backward_triton", ("fused", "bwd"))
    return taken


def _check(M, N, K, r, dtype, weight_kind, has_bias, p, scaling, monkeypatch, blocksize=64, min_tokens=8):
    """The CUDA backend's results against the fp64 reference, with the threshold at min_tokens."""
    monkeypatch.setattr(glue, "LORA_DEQUANT_ONCE_MIN_TOKENS", min_tokens)
    inp = lora_inputs(M, N, K, r, dtype, has_bias, DEVICE, seed=M + N + K + r)
    args, w_ref = _weight_args(weight_kind, inp["w"], dtype, blocksize)
    got, xa = _op(inp, args, N, scaling, p)
    keep = triton_lora.lora_dropout_keep(SEED, p, M, K, DEVICE) if p > 0 else None
    assert xa.dtype == torch.float32 and xa.shape == (M, r)

    want = _autograd(lora_linear, torch.float64, inp, w_ref, scaling, keep, p)
    low = _autograd(peft_like_lora, dtype, inp, w_ref, scaling, keep, p) if dtype != torch.float32 else want
    for name, g, w, base in zip(("y", "dx", "dA", "dB", "dbias"), got, want, low):
        if w is None:  # no bias: dbias is returned but unused
            continue
        assert g.dtype == dtype and g.shape == w.shape, name
        err = (g.double() - w).abs().max().item()
        if dtype == torch.float32:
            assert err <= 2e-5 * (1 + w.abs().max().item()), f"{name}: max error {err}"
        else:
            base_err = (base.double() - w).abs().max().item()
            assert err <= 2 * base_err + 1e-3 * w.abs().max().item(), f"{name}: error {err} vs {dtype} {base_err}"


@pytest.mark.parametrize("weight_kind", ("dense", "nf4", "nf4_dq"))
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_dequant_once_matches_reference(dtype, weight_kind, monkeypatch, paths):
    _check(20, 40, 128, 8, dtype, weight_kind, True, 0.25, 0.5, monkeypatch)
    assert paths == [("dequant_once", "fwd"), ("dequant_once", "bwd")]


@pytest.mark.parametrize(("blocksize", "K"), ((64, 70), (32, 96), (32, 70)))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_dequant_once_nf4_layouts(dtype, blocksize, K, monkeypatch, paths):
    # blocksize 32, and K not a multiple of the blocksize (blocks straddle rows)
    _check(17, 24, K, 16, dtype, "nf4_dq", True, 0.1, 2.0, monkeypatch, blocksize=blocksize)
    assert paths == [("dequant_once", "fwd"), ("dequant_once", "bwd")]


@pytest.mark.parametrize("p", (0.0, 0.3))
@pytest.mark.parametrize("has_bias", (True, False), ids=("bias", "nobias"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_dequant_once_bias_and_dropout(dtype, has_bias, p, monkeypatch, paths):
    _check(19, 33, 64, 4, dtype, "nf4", has_bias, p, 1.5, monkeypatch)
    assert paths == [("dequant_once", "fwd"), ("dequant_once", "bwd")]


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
def test_below_threshold_takes_the_fused_kernels(dtype, monkeypatch, paths):
    _check(7, 40, 128, 8, dtype, "nf4_dq", True, 0.25, 0.5, monkeypatch, min_tokens=8)
    assert paths == [("fused", "fwd"), ("fused", "bwd")]


def test_threshold_boundary(monkeypatch, paths):
    # at the threshold dequantize-once, one token below it the fused kernels
    _check(8, 24, 64, 4, torch.bfloat16, "nf4", True, 0.0, 1.0, monkeypatch, min_tokens=8)
    _check(8, 24, 64, 4, torch.bfloat16, "nf4", True, 0.0, 1.0, monkeypatch, min_tokens=9)
    assert [path for path, _ in paths] == ["dequant_once", "dequant_once", "fused", "fused"]


def test_fp32_takes_dequant_once_at_any_m(monkeypatch, paths):
    # the fused kernels' fp32 variants spill registers on the GPU: fp32 never takes them
    _check(3, 24, 64, 4, torch.float32, "nf4_dq", True, 0.2, 1.0, monkeypatch, min_tokens=512)
    assert paths == [("dequant_once", "fwd"), ("dequant_once", "bwd")]


@pytest.mark.parametrize("weight_kind", ("dense", "nf4_dq"))
def test_same_dropout_mask_and_results_as_the_fused_path(weight_kind):
    # the two paths draw the mask from the seed each; a different draw would move y, dx and dA
    # by O(1), far beyond fp32 rounding
    M, N, K, r, p, scaling = 21, 40, 70, 8, 0.4, 1.3
    inp = lora_inputs(M, N, K, r, torch.float32, True, DEVICE, seed=3)
    args, _ = _weight_args(weight_kind, inp["w"], torch.float32, 64)
    state = lora_ops.nf4_base(*args, N, K, torch.float32)
    weight = args[0]
    common = (weight, state, inp["lora_A"], inp["lora_B"], scaling, p, SEED)
    fused_y, fused_xa = triton_lora.lora_forward_triton(inp["x"], weight, state, inp["bias"], *common[2:])
    once_y, once_xa = dm.lora_forward_dequant_mm(inp["x"], weight, state, inp["bias"], *common[2:])
    assert torch.equal(once_xa, fused_xa)
    torch.testing.assert_close(once_y, fused_y, rtol=1e-5, atol=1e-5)
    fused = triton_lora.lora_backward_triton(inp["dy"], inp["x"], *common, fused_xa, True, True, True, True)
    once = dm.lora_backward_dequant_mm(inp["dy"], inp["x"], *common, once_xa)
    for name, a, b in zip(("dx", "dA", "dB", "dbias"), once, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


def test_dense_weight_is_not_dequantized(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a dense W went through the dequantize")

    monkeypatch.setattr(dm, "nf4_dequantize_into", refuse)
    _check(12, 24, 64, 4, torch.float32, "dense", True, 0.2, 1.0, monkeypatch)


def _nf4_state(N, K, blocksize=64):
    args = _quantize(torch.randn(N, K), blocksize, True)
    return lora_ops.nf4_base(*args, N, K, torch.bfloat16)


def test_workspace_is_reused_and_grows_only_for_a_larger_weight(monkeypatch):
    monkeypatch.setattr(dm, "_workspaces", {})
    device = torch.device(DEVICE)
    big, same, small, larger = _nf4_state(48, 64), _nf4_state(48, 64), _nf4_state(16, 70), _nf4_state(64, 128)
    ws = dm.workspace(device)
    assert ws.buffer is None
    with dm.dequantized(big, torch.bfloat16, device) as w:
        ptr, buffer = w.data_ptr(), ws.buffer
        torch.testing.assert_close(w, big.dequantize_reference(torch.bfloat16).to(DEVICE), rtol=0, atol=0)
    for state, dtype in ((same, torch.bfloat16), (small, torch.bfloat16), (small, torch.float32)):
        with dm.dequantized(state, dtype, device) as w:
            assert w.data_ptr() == ptr and ws.buffer is buffer
            assert w.shape == state.shape and w.dtype == dtype and w.is_contiguous()
            torch.testing.assert_close(w, state.dequantize_reference(dtype).to(DEVICE), rtol=0, atol=0)
    with dm.dequantized(larger, torch.bfloat16, device) as w:
        assert ws.buffer.numel() == 64 * 128 * 2 and w.data_ptr() == ws.buffer.data_ptr()
        torch.testing.assert_close(w, larger.dequantize_reference(torch.bfloat16).to(DEVICE), rtol=0, atol=0)
    assert dm.workspace(device) is ws


def test_forward_and_backward_reuse_one_workspace(monkeypatch):
    monkeypatch.setattr(dm, "_workspaces", {})
    monkeypatch.setattr(glue, "LORA_DEQUANT_ONCE_MIN_TOKENS", 8)
    N, K = 32, 64
    inp = lora_inputs(9, N, K, 4, torch.bfloat16, True, DEVICE)
    args, _ = _weight_args("nf4_dq", inp["w"], torch.bfloat16, 64)
    _op(inp, args, N, 1.0, 0.1)
    ws = dm.workspace(DEVICE)
    buffer, ptr = ws.buffer, ws.buffer.data_ptr()
    assert buffer.numel() == N * K * 2
    for _ in range(2):
        _op(inp, args, N, 1.0, 0.1)
        assert ws.buffer is buffer and ws.buffer.data_ptr() == ptr


def test_rejects_bad_arguments():
    inp = lora_inputs(4, 8, 64, 2, torch.float32, False, DEVICE)
    state = _nf4_state(8, 64)
    x, A, B = inp["x"], inp["lora_A"], inp["lora_B"]
    with pytest.raises(ValueError, match="exactly one"):
        dm.lora_forward_dequant_mm(x, None, None, None, A, B, 1.0, 0.0, SEED)
    with pytest.raises(ValueError, match=r"weight must be \[8, 64\] torch.float32"):
        dm.lora_forward_dequant_mm(x, torch.zeros(8, 64, dtype=torch.float16, device=DEVICE), None, None, A, B, 1.0,
                                   0.0, SEED)
    with pytest.raises(ValueError, match=r"nf4_state is \[8, 64\], the LoRA factors need \[8, 32\]"):
        dm.lora_forward_dequant_mm(x[:, :32], None, state, None, A[:, :32], B, 1.0, 0.0, SEED)
    with pytest.raises(ValueError, match="lora_A must be"):
        dm.lora_forward_dequant_mm(x, None, state, None, A.half(), B, 1.0, 0.0, SEED)
    with pytest.raises(ValueError, match="dropout_p"):
        dm.lora_forward_dequant_mm(x, None, state, None, A, B, 1.0, 1.0, SEED)
    with pytest.raises(ValueError, match=r"dy2d must be \[4, 8\]"):
        dm.lora_backward_dequant_mm(inp["dy"][:3], x, None, state, A, B, 1.0, 0.0, SEED, torch.zeros(4, 2))
    with pytest.raises(ValueError, match="out must be a contiguous"):
        dm.nf4_dequantize_into(state, torch.empty(64, 8, device=DEVICE).t())


def test_triton_dequantize_into_out():
    state = _nf4_state(6, 70, blocksize=32)
    out = torch.full((6, 70), float("nan"), dtype=torch.bfloat16, device=DEVICE)
    got = nf4_dequantize_triton(state, torch.bfloat16, out=out)
    assert got is out
    assert torch.equal(out, state.dequantize_reference(torch.bfloat16).to(DEVICE))
    for bad in (torch.empty(6, 70, device=DEVICE), torch.empty(70, 6, dtype=torch.bfloat16, device=DEVICE).t(),
                torch.empty(6, 71, dtype=torch.bfloat16, device=DEVICE)):
        with pytest.raises(ValueError, match=r"out must be a contiguous torch.bfloat16 tensor of shape \[6, 70\]"):
            nf4_dequantize_triton(state, torch.bfloat16, out=bad)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("weight_kind", ("nf4_dq", "dense"))
def test_training_size_bf16_on_gpu(weight_kind, monkeypatch, paths):
    # the default threshold, a Llama-7B attention projection's shape at 2 x 512 tokens
    M = glue.LORA_DEQUANT_ONCE_MIN_TOKENS * 2
    _check(M, 4096, 4096, 16, torch.bfloat16, weight_kind, True, 0.1, 2.0, monkeypatch,
           min_tokens=glue.LORA_DEQUANT_ONCE_MIN_TOKENS)
    assert paths == [("dequant_once", "fwd"), ("dequant_once", "bwd")]


def test_cuda_dequantize_checks_sizes_before_the_pointers_go_out():
    from qlora_kernels.ops import nf4 as nf4_ops

    with FakeTensorMode():  # CUDA tensors without a GPU: the checks run, no kernel could
        packed = torch.empty(32, dtype=torch.uint8, device="cuda:0")
        absmax = torch.empty(2, device="cuda:0")
        with pytest.raises(ValueError, match=r"packed holds 32 bytes but a weight of shape \(8, 16\) needs 64"):
            NF4Weight(packed, NF4QuantState(torch.empty(2, device="cuda:0"), (8, 16), torch.bfloat16, 64))
        with pytest.raises(ValueError, match="absmax has 2 elements, expected 4"):
            nf4_ops.nf4_dequantize(packed, absmax, None, None, None, 32, 256, [8, 16], torch.bfloat16)
        with pytest.raises(ValueError, match="blocksize"):
            nf4_ops.nf4_dequantize(packed, absmax, None, None, None, 48, 256, [8, 8], torch.bfloat16)
