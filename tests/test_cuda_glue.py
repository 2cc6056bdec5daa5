"""The CUDA backend's glue to the Triton kernels (argument order, layouts, dtypes), run on
CPU tensors through Triton's interpreter; on a GPU the same functions run natively."""

import os

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from qlora_kernels import reference as R  # noqa: E402
from qlora_kernels.backends import cuda as glue  # noqa: E402
from qlora_kernels.ops import attention as attention_ops  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.parametrize("seq_q", [3, 24])
def test_attention_glue_matches_reference(seq_q):
    torch.manual_seed(0)
    q = torch.randn(2, 4, seq_q, 32, device=DEVICE)
    k, v = (torch.randn(2, 2, 300, 32, device=DEVICE) for _ in range(2))  # 300 keys: seq_q 3 takes decode
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False
    slopes = torch.rand(4, device=DEVICE)
    out, lse = glue.triton_flash_attention_fwd(q, k, v, True, 0.2, slopes, mask, None, 0)
    want, want_lse = R.attention.flash_attention(q, k, v, True, 0.2, slopes, mask)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # a transposed view, like HF's
    grads = glue.triton_flash_attention_bwd(dout, qt, k, v, out, lse, True, 0.2, slopes, mask, None, 0)
    assert grads[0].stride() == qt.stride()
    for g, w in zip(grads, R.attention.flash_attention_backward(dout, q, k, v, True, 0.2, slopes, mask)):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("nf4", [False, True])
def test_lora_glue_matches_reference(nf4):
    torch.manual_seed(0)
    M, K, N, r = 5, 128, 40, 8
    x = torch.randn(M, K, device=DEVICE)
    w = torch.randn(N, K, device=DEVICE)
    bias = torch.randn(N, device=DEVICE)
    A, B = torch.randn(r, K, device=DEVICE), torch.randn(N, r, device=DEVICE)
    seed = torch.tensor([7])
    if nf4:
        packed, absmax = R.nf4_quantize_blocks(w, 64)
        offset = absmax.mean()
        absmax_q, nested = R.quantize_blockwise_8bit(absmax - offset, R.dynamic_code(), 256)
        code = R.dynamic_code(DEVICE)
        args = (None, packed, absmax_q, nested, code, offset, 64, 256)
        dense = R.nf4_dequantize(packed, absmax_q, 64, (N, K), torch.float32, nested, code, offset)
    else:
        args, dense = (w, None, None, None, None, None, 0, 0), w
    y, xa = glue.triton_lora_linear_fwd(x, *args, N, bias, A, B, 0.5, 0.0, seed)
    torch.testing.assert_close(y, R.lora.lora_linear(x, dense, bias, A, B, 0.5), atol=1e-4, rtol=1e-4)
    assert xa.dtype == torch.float32
    dy = torch.randn_like(y)
    dx, dA, dB, dbias = glue.triton_lora_linear_bwd(dy, x, *args, A, B, 0.5, 0.0, seed, xa)
    xr, Ar, Br, br = (t.clone().requires_grad_() for t in (x, A, B, bias))
    R.lora.lora_linear(xr, dense, br, Ar, Br, 0.5).backward(dy)
    for got, want in ((dx, xr.grad), (dA, Ar.grad), (dB, Br.grad), (dbias, br.grad)):
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_grads_like_inputs_keeps_strides():
    t = torch.randn(2, 5, 3, 4).transpose(1, 2)
    (g,) = attention_ops.grads_like_inputs((t,), (torch.randn(2, 3, 5, 4),))
    assert g.stride() == t.stride()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 4, 16])
def test_lora_decode_gemv_path_matches_reference(M):
    import qlora_kernels as qk

    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 4096, device="cuda", dtype=torch.bfloat16)
    layer = qk.NF4Linear.from_linear(linear, quant_storage=torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16)
    A = torch.randn(16, 4096, device="cuda", dtype=torch.bfloat16) * 0.02
    B = torch.randn(4096, 16, device="cuda", dtype=torch.bfloat16) * 0.02
    with torch.no_grad():
        y = qk.lora_linear(x, layer, linear.bias, A, B, 2.0)
        want = R.lora.lora_linear(x.double(), layer.dequantize(torch.float32).double(), linear.bias, A, B, 2.0)
        stock = R.lora.lora_linear(x, layer.dequantize(torch.bfloat16), linear.bias, A, B, 2.0)
    ours_err = (y.double() - want).abs().max()
    stock_err = (stock.double() - want).abs().max()
    assert ours_err <= 2 * stock_err + 1e-3
