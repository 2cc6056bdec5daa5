"""The CUDA backend's glue to the Triton kernels (argument order, layouts, dtypes), run on
CPU tensors through Triton's interpreter; on a GPU the same functions run natively."""

import os
import weakref
from types import SimpleNamespace

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from torch._subclasses.fake_tensor import FakeTensorMode  # noqa: E402

from qlora_kernels import reference as R  # noqa: E402
from qlora_kernels.backends import cuda as glue  # noqa: E402
from qlora_kernels.nf4_weight import NF4QuantState, NF4Weight  # noqa: E402
from qlora_kernels.ops import attention as attention_ops  # noqa: E402
from qlora_kernels.triton import flash_attention, flash_decode  # noqa: E402
from qlora_kernels.triton import lora as triton_lora  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


NO_FEATURES = (None, 0, -1, -1, 0.0, None)  # cu_seqlens_k, max_seqlen_k, window (left, right), softcap, sinks


@pytest.mark.parametrize("seq_q", [3, 24])
def test_attention_glue_matches_reference(seq_q):
    torch.manual_seed(0)
    q = torch.randn(2, 4, seq_q, 32, device=DEVICE)
    k, v = (torch.randn(2, 2, 300, 32, device=DEVICE) for _ in range(2))  # 300 keys: seq_q 3 takes decode
    mask = torch.ones(2, 300, dtype=torch.bool, device=DEVICE)
    mask[1, :7] = False
    slopes = torch.rand(4, device=DEVICE)
    out, lse = glue.triton_flash_attention_fwd(q, k, v, True, 0.2, slopes, mask, None, 0, *NO_FEATURES)
    want, want_lse = R.attention.flash_attention(q, k, v, True, 0.2, slopes, mask)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-4)
    dout = torch.randn_like(out)
    qt = q.transpose(1, 2).contiguous().transpose(1, 2)  # a transposed view, like HF's
    grads = glue.triton_flash_attention_bwd(dout, None, qt, k, v, out, lse, True, 0.2, slopes, mask, None, 0,
                                            *NO_FEATURES)
    assert grads[0].stride() == qt.stride()
    assert grads[3].shape == (0,) and grads[3].dtype == torch.float32  # no sinks, no gradient for them
    for g, w in zip(grads, R.attention.flash_attention_backward(dout, q, k, v, True, 0.2, slopes, mask)[:3]):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-3)


@pytest.mark.parametrize("varlen", [False, True], ids=["dense", "varlen"])
def test_attention_glue_passes_every_feature(varlen):
    # window, softcap, sinks (bf16, as a model may hold them), ALiBi without the causal mask, a
    # gradient into lse and keys packed apart from queries reach the kernels, in the op's order
    g = torch.Generator().manual_seed(0)
    Hq, Hkv, D = 4, 2, 32
    if varlen:
        cu_seqlens = torch.tensor([0, 5, 17], dtype=torch.int32, device=DEVICE)
        cu_seqlens_k = torch.tensor([0, 9, 19], dtype=torch.int32, device=DEVICE)
        q = torch.randn(17, Hq, D, generator=g).to(DEVICE)
        k, v = (torch.randn(19, Hkv, D, generator=g).to(DEVICE) for _ in range(2))
        packing = (cu_seqlens, 12, cu_seqlens_k, 10)
        lse_shape = (Hq, 17)
    else:
        q = torch.randn(2, Hq, 12, D, generator=g).to(DEVICE)
        k, v = (torch.randn(2, Hkv, 20, D, generator=g).to(DEVICE) for _ in range(2))
        packing = (None, 0, None, 0)
        lse_shape = (2, Hq, 12)
    cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k = packing
    slopes = torch.rand(Hq, generator=g).to(DEVICE)
    sinks = torch.randn(Hq, generator=g).to(DEVICE, torch.bfloat16)
    args = (False, 0.2, slopes, None, cu_seqlens, max_seqlen, cu_seqlens_k, max_seqlen_k, 6, 2, 1.5, sinks)
    out, lse = glue.triton_flash_attention_fwd(q, k, v, *args)
    want, want_lse = attention_ops.reference_forward(q, k, v, *args)
    torch.testing.assert_close(out, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=1e-4)
    dout, dlse = torch.randn(out.shape, generator=g).to(DEVICE), torch.randn(lse_shape, generator=g).to(DEVICE)
    grads = glue.triton_flash_attention_bwd(dout, dlse, q, k, v, out, lse, *args)
    wants = attention_ops.reference_backward(dout, dlse, q, k, v, out, lse, *args)
    for got, want, what in zip(grads, wants, ("dq", "dk", "dv", "dsinks")):
        assert got.dtype == want.dtype == torch.float32, what
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-3, msg=what)


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


# ---- every kernel runs on its inputs' device ----

@pytest.fixture
def current_device(monkeypatch):
    """torch.cuda.device replaced by a recorder: the stack of devices made current."""
    stack = []

    class Device:
        def __init__(self, device):
            self.device = torch.device(device)

        def __enter__(self):
            stack.append(self.device)

        def __exit__(self, *exc):
            stack.pop()

    monkeypatch.setattr(torch.cuda, "device", Device)
    return stack


def _on_cuda1(*shapes, dtype=torch.bfloat16):
    """Tensors that say they live on cuda:1 (fake tensors: shapes and devices, no data)."""
    with FakeTensorMode():
        return [torch.empty(shape, dtype=dtype, device="cuda:1") for shape in shapes]


def test_on_input_device_makes_the_first_tensors_device_current(current_device):
    seen = []
    run = glue.on_input_device(lambda *args, **kwargs: seen.append(list(current_device)))
    (t,) = _on_cuda1((2,))
    run(3, t, torch.zeros(1))
    run(scale=2.0, x=t)
    run(torch.zeros(2), t)  # a CPU tensor first: the interpreter's case, nothing to switch
    run(None)
    assert seen == [[torch.device("cuda:1")]] * 2 + [[]] * 2
    assert current_device == []


def _recording(seen, current_device, result):
    def launcher(*args, **kwargs):
        seen.append(list(current_device))
        return result(*args) if callable(result) else result
    return launcher


def test_triton_attention_launches_on_the_inputs_device(current_device, monkeypatch):
    seen = []
    monkeypatch.setattr(flash_attention, "flash_attention_fwd_triton", _recording(seen, current_device, "fwd"))
    monkeypatch.setattr(flash_decode, "flash_decode_triton", _recording(seen, current_device, "decode"))
    monkeypatch.setattr(flash_attention, "flash_attention_bwd_triton",
                        _recording(seen, current_device, lambda dout, q, k, v, *rest: (q, k, v, None)))
    monkeypatch.setattr(attention_ops, "grads_like_inputs", lambda inputs, grads: grads)
    q, k, v = _on_cuda1((1, 2, 24, 16), (1, 2, 300, 16), (1, 2, 300, 16))
    q1 = _on_cuda1((1, 2, 1, 16))[0]
    (lse,) = _on_cuda1((1, 2, 24), dtype=torch.float32)
    assert glue.triton_flash_attention_fwd(q, k, v, True, 0.25, None, None, None, 0, *NO_FEATURES) == "fwd"
    assert glue.triton_flash_attention_fwd(q1, k, v, True, 0.25, None, None, None, 0, *NO_FEATURES) == "decode"
    glue.triton_flash_attention_bwd(q, None, q, k, v, q, lse, True, 0.25, None, None, None, 0, *NO_FEATURES)
    assert seen == [[torch.device("cuda:1")]] * 3


@pytest.mark.parametrize("M", [4, 1024])  # the fused kernels, dequantize-once
def test_triton_lora_launches_on_the_inputs_device(M, current_device, monkeypatch):
    seen = []
    grads = (torch.zeros(1),) * 4
    for module, name, result in ((triton_lora, "lora_forward_triton", ("y", "xa")),
                                 (glue, "lora_forward_dequant_mm", ("y", "xa")),
                                 (triton_lora, "lora_backward_triton", grads),
                                 (glue, "lora_backward_dequant_mm", grads)):
        monkeypatch.setattr(module, name, _recording(seen, current_device, result))
    x, w, A, B, dy = _on_cuda1((M, 64), (32, 64), (8, 64), (32, 8), (M, 32))
    seed = torch.tensor([3])
    dense = (w, None, None, None, None, None, 0, 0)
    glue.triton_lora_linear_fwd(x, *dense, 32, None, A, B, 1.0, 0.1, seed)
    glue.triton_lora_linear_bwd(dy, x, *dense, A, B, 1.0, 0.1, seed, x)
    assert seen == [[torch.device("cuda:1")]] * 2


def test_lora_dropout_refuses_a_capturing_stream(current_device, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: True)
    monkeypatch.setattr(triton_lora, "lora_forward_triton", lambda *args: ("y", "xa"))
    x, w, A, B = _on_cuda1((4, 64), (32, 64), (8, 64), (32, 8))
    dense = (w, None, None, None, None, None, 0, 0)
    with pytest.raises(RuntimeError, match=r"dropout \(dropout_p=0.1\) cannot be captured in a CUDA graph"):
        glue.triton_lora_linear_fwd(x, *dense, 32, None, A, B, 1.0, 0.1, torch.tensor([3]))
    # without dropout nothing is drawn on the host: capture is fine
    assert glue.triton_lora_linear_fwd(x, *dense, 32, None, A, B, 1.0, 0.0, torch.tensor([0])) == ("y", "xa")


def test_triton_dequantize_launches_on_the_inputs_device(current_device, monkeypatch):
    seen = []
    monkeypatch.setattr(glue, "nf4_dequantize_into", _recording(seen, current_device, "out"))
    (packed,), (absmax,) = _on_cuda1((64,), dtype=torch.uint8), _on_cuda1((2,), dtype=torch.float32)
    assert glue.cuda_nf4_dequantize(packed, absmax, None, None, None, 64, 256, (2, 64), torch.bfloat16) == "out"
    assert seen == [[torch.device("cuda:1")]]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
@pytest.mark.parametrize("M", [4, 40, 1024])  # GEMV, fused, dequantize-once
def test_layer_on_the_second_gpu_with_the_first_current(M):
    import qlora_kernels as qk

    linear = torch.nn.Linear(256, 192, device="cuda:1", dtype=torch.bfloat16)
    layer = qk.NF4Linear.from_linear(linear, quant_storage=torch.bfloat16)
    x = torch.randn(M, 256, device="cuda:1", dtype=torch.bfloat16, requires_grad=True)
    A = (torch.randn(16, 256, device="cuda:1") * 0.05).to(torch.bfloat16).requires_grad_()
    B = (torch.randn(192, 16, device="cuda:1") * 0.05).to(torch.bfloat16).requires_grad_()
    q, k, v = (torch.randn(1, 4, M, 64, device="cuda:1", dtype=torch.bfloat16) for _ in range(3))
    with torch.cuda.device(0):
        y = qk.lora_linear(x, layer, linear.bias, A, B, 2.0)
        y.sum().backward()
        out = qk.flash_attention(q, k, v, causal=True)
        torch.cuda.synchronize(1)
    W = layer.dequantize(torch.float32).double()
    xr, Ar, Br = (t.detach().double().requires_grad_() for t in (x, A, B))
    want = R.lora.lora_linear(xr, W, linear.bias.double(), Ar, Br, 2.0)
    want.sum().backward()
    torch.testing.assert_close(y.double(), want, atol=0.05, rtol=0.02)
    for got, ref in ((x.grad, xr.grad), (A.grad, Ar.grad), (B.grad, Br.grad)):
        torch.testing.assert_close(got.double(), ref, atol=0.05, rtol=0.02)
    sdpa = torch.nn.functional.scaled_dot_product_attention(q.double(), k.double(), v.double(), is_causal=True)
    torch.testing.assert_close(out.double(), sdpa, atol=0.02, rtol=0.02)


# ---- the decode GEMV's inputs ----

def test_gemv_gets_every_operand_in_its_dtype_alive_at_launch(monkeypatch):
    """The GEMV reads bias and lora_B as x's dtype and xa as fp32 through raw pointers: each pointer
    it gets must belong to a tensor of that dtype still alive when the launch is made."""
    owners = {}
    real_data_ptr = torch.Tensor.data_ptr

    def data_ptr(self):
        ptr = real_data_ptr(self)
        owners[ptr] = (weakref.ref(self), self.dtype)
        return ptr

    launched = {}

    def lora_gemv_nf4_cuda(x, dtype, M, K, packed, absmax, absmax_q, nested_absmax, nested_code, offset,
                           nested_blocksize, blocksize, N, bias, xa, lora_B, rank, scaling, y, stream):
        for name, ptr in (("x", x), ("bias", bias), ("xa", xa), ("lora_B", lora_B), ("y", y), ("absmax", absmax)):
            tensor, ptr_dtype = owners[ptr]
            launched[name] = (tensor() is not None, ptr_dtype)
        launched["rank"] = rank

    monkeypatch.setattr(torch.Tensor, "data_ptr", data_ptr)
    monkeypatch.setattr(glue, "_C", SimpleNamespace(lora_gemv_nf4_cuda=lora_gemv_nf4_cuda))
    monkeypatch.setattr(glue, "_stream", lambda device: 0)
    N, K, r = 24, 64, 4
    packed, absmax = R.nf4_quantize_blocks(torch.randn(N, K), 64)
    state = NF4Weight(packed, NF4QuantState(absmax, (N, K), torch.bfloat16, 64))
    x = torch.randn(3, K, dtype=torch.bfloat16)
    bias = torch.randn(2 * N)[::2]  # fp32 and strided: two conversions
    lora_B = torch.randn(r, N).t()  # fp32, transposed
    xa = torch.randn(3, r, dtype=torch.bfloat16)
    y = glue.lora_gemv_cuda(x, state, bias, xa, lora_B, 2.0)
    alive_as = {"x": torch.bfloat16, "bias": torch.bfloat16, "lora_B": torch.bfloat16, "xa": torch.float32,
                "y": torch.bfloat16, "absmax": torch.float32}
    assert launched == {**{name: (True, dtype) for name, dtype in alive_as.items()}, "rank": r}
    assert y.shape == (3, N) and y.dtype == torch.bfloat16


def test_gemv_rejects_mismatched_operands():
    N, K = 24, 64
    packed, absmax = R.nf4_quantize_blocks(torch.randn(N, K), 64)
    state = NF4Weight(packed, NF4QuantState(absmax, (N, K), torch.bfloat16, 64))
    x, xa, B = torch.randn(2, K), torch.randn(2, 4), torch.randn(N, 4)
    with pytest.raises(ValueError, match=r"bias must be \[24\], got \(25,\)"):
        glue.lora_gemv_cuda(x, state, torch.randn(N + 1), xa, B, 1.0)
    with pytest.raises(ValueError, match=r"lora_B must be \[24, r\] and xa \[2, r\]"):
        glue.lora_gemv_cuda(x, state, None, xa, torch.randn(N, 5), 1.0)
    with pytest.raises(ValueError, match="x has 32 features"):
        glue.lora_gemv_cuda(x[:, :32], state, None, xa, B, 1.0)
    with pytest.raises(ValueError, match="x must be 2-D fp32/fp16/bf16"):
        glue.lora_gemv_cuda(x.double(), state, None, xa, B, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gemv_with_an_fp32_strided_bias_and_bf16_x():
    import qlora_kernels as qk

    if not glue.has_cuda_kernels():
        pytest.fail("the CUDA kernels were not built (nvcc missing at install time): the GEMV cannot run")
    linear = torch.nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    layer = qk.NF4Linear.from_linear(linear, quant_storage=torch.bfloat16)
    state = layer.nf4_weight
    x = torch.randn(4, 4096, device="cuda", dtype=torch.bfloat16)
    A = (torch.randn(16, 4096, device="cuda") * 0.02).to(torch.bfloat16)
    B = (torch.randn(1024, 16, device="cuda") * 0.02).to(torch.bfloat16)
    bias = torch.randn(2048, device="cuda")[::2]  # fp32, strided
    assert glue._gemv_applies(x, state, 0.0)
    xa = x.float() @ A.float().t()
    y = glue.lora_gemv_cuda(x, state, bias, xa, B, 2.0)
    torch.cuda.synchronize()
    W = layer.dequantize(torch.float32)
    want = R.lora.lora_linear(x.double(), W.double(), bias.double(), A.double(), B.double(), 2.0)
    stock = R.lora.lora_linear(x, W.to(torch.bfloat16), bias.to(torch.bfloat16), A, B, 2.0)
    assert (y.double() - want).abs().max() <= 2 * (stock.double() - want).abs().max() + 1e-3


# ---- the NF4 linear (NF4Linear's op): GEMV at rank 0 for a few tokens, dequantize-once above ----

def _nf4_linear_args(N=40, K=128, double_quant=True):
    w = torch.randn(N, K)
    packed, absmax = R.nf4_quantize_blocks(w, 64)
    if not double_quant:
        return NF4Weight(packed, NF4QuantState(absmax, (N, K), torch.float32, 64))
    offset = absmax.mean()
    absmax_q, nested = R.quantize_blockwise_8bit(absmax - offset, R.dynamic_code(), 256)
    return NF4Weight(packed, NF4QuantState(absmax_q, (N, K), torch.float32, 64, offset=offset,
                                           nested_absmax=nested, nested_code=R.dynamic_code()))


@pytest.mark.parametrize("double_quant", [True, False])
def test_nf4_linear_glue_dequantizes_once_into_the_workspace(double_quant):
    """Where the GEMV does not apply: W dequantized by Triton (interpreter) into the device's
    workspace, reused by the next call, and cuBLAS's (here torch's) product."""
    from qlora_kernels.backends import lora_dequant_mm

    state = _nf4_linear_args(double_quant=double_quant)
    N, K = state.shape
    x, dy, bias = torch.randn(20, K), torch.randn(20, N), torch.randn(N)
    W = state.dequantize_reference(torch.float32)
    y = glue.cuda_nf4_linear(x, *state.op_args(), N, bias)
    torch.testing.assert_close(y, x @ W.t() + bias, atol=1e-4, rtol=1e-4)
    buffer = lora_dequant_mm.workspace(x.device).buffer.data_ptr()
    dx = glue.cuda_nf4_linear_bwd(dy, *state.op_args(), K)
    torch.testing.assert_close(dx, dy @ W, atol=1e-4, rtol=1e-4)
    assert lora_dequant_mm.workspace(x.device).buffer.data_ptr() == buffer


@pytest.mark.parametrize("gemv", [True, False])
def test_nf4_linear_glue_takes_the_gemv_where_it_applies(gemv, monkeypatch):
    """The GEMV (rank 0: no xa, no lora_B) exactly where `_gemv_applies` says, the workspace path
    otherwise; the predicate itself is the LoRA forward's, tested on a GPU."""
    calls = []
    monkeypatch.setattr(glue, "_gemv_applies", lambda x, state, dropout_p: gemv and dropout_p == 0.0)
    monkeypatch.setattr(glue, "lora_gemv_cuda", lambda *args: calls.append(("gemv", args[2:])) or "gemv")
    monkeypatch.setattr(glue, "nf4_linear_dequant_mm", lambda x, state, bias: calls.append(("dequant", ())) or "mm")
    state = _nf4_linear_args()
    bias = torch.randn(40)
    out = glue.cuda_nf4_linear(torch.randn(3, 128), *state.op_args(), 40, bias)
    assert out == ("gemv" if gemv else "mm")
    assert calls == ([("gemv", (bias, None, None, 0.0))] if gemv else [("dequant", ())])


def test_nf4_linear_launches_on_the_inputs_device(current_device, monkeypatch):
    seen = []
    monkeypatch.setattr(glue, "_gemv_applies", lambda *args: False)
    monkeypatch.setattr(glue, "nf4_linear_dequant_mm", _recording(seen, current_device, "y"))
    monkeypatch.setattr(glue, "nf4_linear_dx_dequant_mm", _recording(seen, current_device, "dx"))
    monkeypatch.setattr(glue, "nf4_dequantize_into", _recording(seen, current_device, "out"))
    x, dy = _on_cuda1((4, 64), (4, 32))
    (packed,), (absmax,) = _on_cuda1((1024,), dtype=torch.uint8), _on_cuda1((32,), dtype=torch.float32)
    (out,) = _on_cuda1((32, 64))
    assert glue.cuda_nf4_linear(x, packed, absmax, None, None, None, 64, 256, 32, None) == "y"
    assert glue.cuda_nf4_linear_bwd(dy, packed, absmax, None, None, None, 64, 256, 64) == "dx"
    assert glue.cuda_nf4_dequantize_out(packed, absmax, None, None, None, 64, 256, [32, 64], out) is None
    assert seen == [[torch.device("cuda:1")]] * 3


def test_gemv_rank_zero_passes_no_adapter(monkeypatch):
    launched = {}

    def lora_gemv_nf4_cuda(x, dtype, M, K, packed, absmax, absmax_q, nested_absmax, nested_code, offset,
                           nested_blocksize, blocksize, N, bias, xa, lora_B, rank, scaling, y, stream):
        launched.update(xa=xa, lora_B=lora_B, rank=rank, bias=bias != 0)

    monkeypatch.setattr(glue, "_C", SimpleNamespace(lora_gemv_nf4_cuda=lora_gemv_nf4_cuda))
    monkeypatch.setattr(glue, "_stream", lambda device: 0)
    state = _nf4_linear_args(24, 64)
    y = glue.lora_gemv_cuda(torch.randn(2, 64), state, torch.randn(24), None, None, 0.0)
    assert launched == {"xa": 0, "lora_B": 0, "rank": 0, "bias": True} and y.shape == (2, 24)
    with pytest.raises(ValueError, match="pass both xa and lora_B"):
        glue.lora_gemv_cuda(torch.randn(2, 64), state, None, torch.randn(2, 4), None, 1.0)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("M", [1, 16, 17, 600])  # the GEMV (rank 0), dequantize-once + cuBLAS
def test_nf4_linear_on_the_gpu_within_twice_the_references_error(M):
    import qlora_kernels as qk

    torch.manual_seed(0)
    linear = torch.nn.Linear(4096, 1024, device="cuda", dtype=torch.bfloat16)
    layer = qk.NF4Linear.from_linear(linear, quant_storage=torch.bfloat16)
    x = torch.randn(M, 4096, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(M, 1024, device="cuda", dtype=torch.bfloat16)
    y = layer(x)
    (dx,) = torch.autograd.grad(y, x, dy)
    W = layer.dequantize(torch.bfloat16)
    exact_y = x.detach().double() @ W.double().t() + linear.bias.double()
    stock_y = torch.nn.functional.linear(x.detach(), W, linear.bias)
    for got, stock, exact in ((y, stock_y, exact_y), (dx, dy @ W, dy.double() @ W.double())):
        assert (got.double() - exact).abs().max() <= 2 * (stock.double() - exact).abs().max() + 1e-3


@pytest.mark.parametrize("gemv", [True, False])
def test_nf4_linear_direct_inference_is_the_ops_gemv(gemv, current_device, monkeypatch):
    """NF4Linear's inference path without the op's dispatch: the op's own GEMV call where
    `_gemv_applies`, on the inputs' device; None (the op runs) where it does not."""
    seen = []
    monkeypatch.setattr(glue, "_gemv_applies", lambda x, state, dropout_p: gemv and dropout_p == 0.0)
    monkeypatch.setattr(glue, "lora_gemv_cuda", _recording(seen, current_device, lambda *args: ("gemv", args[2:])))
    x, bias = _on_cuda1((2, 128), (40,))
    out = glue.direct_nf4_linear(x, _nf4_linear_args(), bias)
    assert out == (("gemv", (bias, None, None, 0.0)) if gemv else None)
    assert seen == ([[torch.device("cuda:1")]] if gemv else [])
    assert glue.nf4_linear_ops.DIRECT_INFERENCE["cuda"] is glue.direct_nf4_linear
