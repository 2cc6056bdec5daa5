"""RMSNorm: the reference against transformers' RMSNorm modules (every family's class, both
roundings), and the C++ and Triton (interpreter) kernels against the reference: fp32 tight,
fp16 / bf16 within twice the error the reference makes in that dtype (against fp64), forward
and gradients of x and weight, odd sizes, non-contiguous and 1-D / 3-D inputs, a frozen weight,
the op's checks (eager and fake) and its registration."""

import importlib

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.backends import norm as backend
from qlora_kernels.ops import norm as ops
from qlora_kernels.reference import norm as ref

from helpers import num_threads

EPS = 1e-6
LLAMA, GEMMA = (0.0, True), (1.0, False)  # (offset, cast_before_weight)
MODES = {"llama": LLAMA, "gemma": GEMMA}

# model_type -> (module, class, Gemma's rounding)
CLASSES = [("llama", "LlamaRMSNorm", False), ("mistral", "MistralRMSNorm", False), ("qwen2", "Qwen2RMSNorm", False),
           ("qwen3", "Qwen3RMSNorm", False), ("gemma", "GemmaRMSNorm", True), ("gemma2", "Gemma2RMSNorm", True),
           ("gemma3", "Gemma3RMSNorm", True), ("phi3", "Phi3RMSNorm", False)]


def _module(family, name, H, dtype, weight_dtype=None):
    cls = getattr(importlib.import_module(f"transformers.models.{family}.modeling_{family}"), name)
    m = cls(H, eps=EPS)
    with torch.no_grad():
        m.weight.copy_(torch.randn(H) * 0.5 + (0.0 if name.startswith("Gemma") else 1.0))
    return m.to(weight_dtype or dtype)


@pytest.mark.parametrize(("family", "name", "gemma"), CLASSES, ids=[c[0] for c in CLASSES])
@pytest.mark.parametrize(("dtype", "weight_dtype"), [(torch.float32, None), (torch.bfloat16, None),
                                                     (torch.float16, None), (torch.bfloat16, torch.float32)],
                         ids=["fp32", "bf16", "fp16", "bf16-x-fp32-weight"])
def test_reference_is_transformers_bit_for_bit(family, name, gemma, dtype, weight_dtype):
    H = 48
    m = _module(family, name, H, dtype, weight_dtype)
    x = (torch.randn(3, 5, H) * 3).to(dtype)
    offset, cast_before_weight = GEMMA if gemma else LLAMA
    want = m(x)
    got = ref.rms_norm(x, m.weight, EPS, offset, cast_before_weight)
    assert got.dtype == want.dtype  # a bf16 x with an fp32 weight: fp32 in Llama's rounding, bf16 in Gemma's
    assert torch.equal(got, want)
    # and through the op (C++ on the CPU) in fp32, where only the summation order differs
    if dtype == torch.float32:
        torch.testing.assert_close(qk.rms_norm(x, m.weight, EPS, offset, cast_before_weight), want, rtol=2e-6,
                                   atol=2e-6)


@pytest.mark.parametrize("mode", MODES)
def test_reference_backward_is_autograd(mode):
    offset, cbw = MODES[mode]
    x = torch.randn(4, 6, 33, dtype=torch.float64, requires_grad=True)
    w = torch.randn(33, dtype=torch.float64, requires_grad=True)
    dy = torch.randn(4, 6, 33, dtype=torch.float64)
    ref.rms_norm(x, w, EPS, offset, cbw).backward(dy)
    _, rstd = ref.rms_norm_forward(x.detach(), w.detach(), EPS, offset, cbw)
    dx, dw = ref.rms_norm_backward(dy, x.detach(), w.detach(), rstd, offset, cbw, True)
    torch.testing.assert_close(dx, x.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dw, w.grad, rtol=1e-12, atol=1e-12)


def test_gradcheck_through_the_op():
    for offset, cbw in MODES.values():
        x = torch.randn(3, 7, dtype=torch.float64, requires_grad=True)
        w = torch.randn(7, dtype=torch.float64, requires_grad=True)
        assert torch.autograd.gradcheck(lambda a, b: qk.rms_norm(a, b, 1e-5, offset, cbw), (x, w))


IMPLS = {
    "cpp": (backend.cpu_rms_norm_fwd, backend.cpu_rms_norm_bwd),
    "triton": (backend.triton_rms_norm_fwd, backend.triton_rms_norm_bwd),
}


def _run(impl, x, w, dy, offset, cbw, weight_grad=True):
    fwd, bwd = IMPLS[impl]
    y, rstd = fwd(x, w, EPS, offset, cbw)
    assert rstd.dtype == torch.float32 and rstd.shape == x.shape[:-1]
    dx, dw = bwd(dy, x, w, rstd, offset, cbw, weight_grad)
    return y, dx, dw


def _exact(x, w, dy, offset, cbw):
    """y, dx, dw of the fp64 reference (no rounding anywhere) by autograd."""
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    y = ref.rms_norm(x64, w64, EPS, offset, cbw)
    y.backward(dy.double())
    return y.detach(), x64.grad, w64.grad


def _in_dtype(x, w, dy, offset, cbw):
    """y, dx, dw of the reference run in the inputs' dtypes by autograd: transformers' own error."""
    x_ = x.detach().clone().requires_grad_()
    w_ = w.detach().clone().requires_grad_()
    y = ref.rms_norm(x_, w_, EPS, offset, cbw)
    y.backward(dy)
    return y.detach(), x_.grad, w_.grad


def _err(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _inputs(shape, dtype, weight_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    H = shape[-1]
    x = (torch.randn(shape, generator=g) * 2).to(dtype)
    w = (torch.randn(H, generator=g) * 0.5 + 1).to(weight_dtype or dtype)
    return x, w, g


SHAPES = [(1, 1), (3, 37), (17, 64), (2, 5, 129), (300,)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("shape", SHAPES, ids=["x".join(map(str, s)) for s in SHAPES])
def test_kernel_matches_reference(impl, mode, dtype, shape):
    offset, cbw = MODES[mode]
    x, w, g = _inputs(shape, dtype)
    y_dtype = ref.output_dtype(x.dtype, w.dtype, cbw)
    dy = torch.randn(shape, generator=g).to(y_dtype)
    y, dx, dw = _run(impl, x, w, dy, offset, cbw)
    assert (y.dtype, dx.dtype, dw.dtype) == (y_dtype, x.dtype, w.dtype)
    assert y.shape == x.shape and dx.shape == x.shape and dw.shape == w.shape
    ey, edx, edw = _exact(x, w, dy, offset, cbw)
    if dtype == torch.float32:
        for got, want in ((y, ey), (dx, edx), (dw, edw)):
            torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)
        return
    sy, sdx, sdw = _in_dtype(x, w, dy, offset, cbw)
    for name, got, stock, want in (("y", y, sy, ey), ("dx", dx, sdx, edx), ("dweight", dw, sdw, edw)):
        assert _err(got, want) <= 2 * _err(stock, want) + 1e-6, (name, _err(got, want), _err(stock, want))


@pytest.mark.parametrize("impl", IMPLS)
def test_kernel_forward_bits_match_transformers_rounding(impl):
    # bf16 Llama rounding: n rounded to bf16 before the weight, the product rounded once; an
    # implementation that skipped the first rounding would differ in many elements
    x, w, _ = _inputs((16, 40), torch.bfloat16)
    y, _ = IMPLS[impl][0](x, w, EPS, *LLAMA)
    stock = ref.rms_norm(x, w, EPS, *LLAMA)
    assert (y != stock).float().mean() < 0.02  # only rstd's last bit may differ, rarely
    skipped = (ref.rms_norm(x.float(), w.float(), EPS, *LLAMA)).to(torch.bfloat16)
    assert (skipped != stock).any()


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("mode", MODES)
def test_mixed_dtypes_bf16_x_fp32_weight(impl, mode):
    # PEFT's prepare_model_for_kbit_training keeps the norms' weights in fp32 ahead of bf16 layers
    offset, cbw = MODES[mode]
    x, w, g = _inputs((6, 48), torch.bfloat16, torch.float32)
    y_dtype = ref.output_dtype(x.dtype, w.dtype, cbw)
    assert y_dtype == (torch.float32 if cbw else torch.bfloat16)
    dy = torch.randn(6, 48, generator=g).to(y_dtype)
    y, dx, dw = _run(impl, x, w, dy, offset, cbw)
    assert (y.dtype, dx.dtype, dw.dtype) == (y_dtype, torch.bfloat16, torch.float32)
    sy, sdx, sdw = _in_dtype(x, w, dy, offset, cbw)
    ey, edx, edw = _exact(x, w, dy, offset, cbw)
    for got, stock, want in ((y, sy, ey), (dx, sdx, edx), (dw, sdw, edw)):
        assert _err(got, want) <= 2 * _err(stock, want) + 1e-6


@pytest.mark.parametrize("impl", IMPLS)
def test_non_contiguous_x(impl):
    base, w, g = _inputs((2, 9, 80), torch.float32)
    # a slice of wider rows, a transpose, every other row, one row expanded (row stride 0)
    for x in (base[..., 5:69], base.transpose(0, 1), base[:, ::2], base[0, :1].expand(7, 80)):
        assert not x.is_contiguous()
        w_ = w[: x.shape[-1]]
        dy = torch.randn(x.shape, generator=g)
        for offset, cbw in MODES.values():
            y, dx, dw = _run(impl, x, w_, dy, offset, cbw)
            ey, edx, edw = _exact(x, w_, dy, offset, cbw)
            assert y.is_contiguous() and dx.shape == x.shape
            for got, want in ((y, ey), (dx, edx), (dw, edw)):
                torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("impl", IMPLS)
def test_frozen_weight_gets_no_gradient(impl):
    x, w, g = _inputs((5, 24), torch.bfloat16)
    dy = torch.randn(5, 24, generator=g).to(torch.bfloat16)
    y, dx, dw = _run(impl, x, w, dy, *GEMMA, weight_grad=False)
    assert dw.numel() == 0
    _, dx_full, _ = _run(impl, x, w, dy, *GEMMA)
    assert torch.equal(dx, dx_full)


def test_autograd_weight_grad_only_when_required(monkeypatch):
    calls = []
    real = ops.rms_norm_bwd

    def spy(*args):
        calls.append(args[-1])
        return real(*args)

    monkeypatch.setattr(ops, "rms_norm_bwd", spy)
    x = torch.randn(4, 16, requires_grad=True)
    w = torch.randn(16)
    qk.rms_norm(x, w).sum().backward()
    assert w.grad is None and calls == [False] and x.grad is not None
    w.requires_grad_()
    x.grad = None
    qk.rms_norm(x, w).sum().backward()
    assert calls == [False, True] and w.grad is not None and x.grad is not None
    # weight only: x needs no gradient
    qk.rms_norm(x.detach(), w).sum().backward()
    assert calls[-1] is True


def test_public_function_runs_the_registered_kernels():
    assert qk.backends()["ops"]["rms_norm_fwd"]["cpu"] in ("C++", "Triton (interpreter)")
    x = torch.randn(3, 4, 50, requires_grad=True)
    w = torch.randn(50, requires_grad=True)
    dy = torch.randn(3, 4, 50)
    for offset, cbw in MODES.values():
        y = qk.rms_norm(x, w, 1e-5, offset, cbw)
        y.backward(dy)
        x64, w64 = x.detach().double().requires_grad_(), w.detach().double().requires_grad_()
        ref.rms_norm(x64, w64, 1e-5, offset, cbw).backward(dy.double())
        torch.testing.assert_close(y.double(), ref.rms_norm(x64, w64, 1e-5, offset, cbw).detach(), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(x.grad.double(), x64.grad, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(w.grad.double(), w64.grad, rtol=1e-5, atol=1e-5)
        x.grad = w.grad = None


def test_cpp_many_rows_and_deterministic_dweight():
    # more rows than the backward's 64 row blocks; dweight's bits do not depend on the thread count
    x, w, g = _inputs((1037, 96), torch.bfloat16)
    dy = torch.randn(1037, 96, generator=g).to(torch.bfloat16)
    results = []
    for n in (1, 2, 3):
        with num_threads(n):
            results.append(_run("cpp", x, w, dy, *LLAMA))
    for y, dx, dw in results[1:]:
        assert torch.equal(y, results[0][0]) and torch.equal(dx, results[0][1]) and torch.equal(dw, results[0][2])
    ey, edx, edw = _exact(x, w, dy, *LLAMA)
    sy, sdx, sdw = _in_dtype(x, w, dy, *LLAMA)
    for got, stock, want in zip(results[0], (sy, sdx, sdw), (ey, edx, edw)):
        assert _err(got, want) <= 2 * _err(stock, want) + 1e-6


def test_empty_rows():
    for impl in IMPLS:
        x, w = torch.empty(0, 8), torch.randn(8)
        y, dx, dw = _run(impl, x, w, torch.empty(0, 8), *LLAMA)
        assert y.shape == (0, 8) and dx.shape == (0, 8) and torch.equal(dw, torch.zeros(8))


def test_opcheck():
    x = torch.randn(3, 5, 20, requires_grad=True)
    w = torch.randn(20, requires_grad=True)
    for offset, cbw in MODES.values():
        torch.library.opcheck(ops.rms_norm_fwd, (x, w, EPS, offset, cbw))
        y, rstd = ops.rms_norm_fwd(x.detach(), w.detach(), EPS, offset, cbw)
        torch.library.opcheck(ops.rms_norm_bwd, (torch.randn_like(y), x.detach(), w.detach(), rstd, offset, cbw, True))


BAD = [
    (lambda: (torch.randn(3, 8), torch.randn(7)), {}, ValueError, "weight has 7 elements, x's last dimension is 8"),
    (lambda: (torch.randn(3, 8), torch.randn(2, 8)), {}, ValueError, "weight must be 1-D"),
    (lambda: (torch.randn(3, 8).int(), torch.randn(8)), {}, ValueError, "x has dtype torch.int32"),
    (lambda: (torch.randn(3, 8), torch.randn(8).to(torch.int64)), {}, ValueError, "weight has dtype torch.int64"),
    (lambda: (torch.tensor(1.0), torch.randn(1)), {}, ValueError, "at least one dimension"),
    (lambda: (torch.randn(3, 0), torch.randn(0)), {}, ValueError, "must not be empty"),
    (lambda: (torch.randn(3, 8), torch.randn(8, device="meta")), {}, ValueError, "on one device"),
    (lambda: (torch.randn(3, 8), torch.randn(8)), {"eps": -1.0}, ValueError, "eps must be a finite number >= 0"),
    (lambda: (torch.randn(3, 8), torch.randn(8)), {"eps": float("nan")}, ValueError, "eps must be"),
    (lambda: (torch.randn(3, 8), torch.randn(8)), {"offset": float("inf")}, ValueError, "offset must be"),
]


@pytest.mark.parametrize(("make", "kwargs", "error", "match"), BAD, ids=range(len(BAD)))
def test_bad_inputs_raise(make, kwargs, error, match):
    x, w = make()
    with pytest.raises(error, match=match):
        qk.rms_norm(x, w, **kwargs)
    # the fake implementation refuses them too (meta tensors)
    if x.device.type == w.device.type:
        with pytest.raises(error, match=match):
            ops.rms_norm_fwd(x.to("meta"), w.to("meta"), kwargs.get("eps", EPS), kwargs.get("offset", 0.0), True)


def test_bad_types_and_backward_arguments():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        qk.rms_norm([1.0, 2.0], torch.randn(2))
    with pytest.raises(TypeError, match="cast_before_weight must be a bool"):
        qk.rms_norm(torch.randn(2, 2), torch.randn(2), cast_before_weight=1)
    x, w = torch.randn(3, 8, dtype=torch.bfloat16), torch.randn(8, dtype=torch.bfloat16)
    y, rstd = ops.rms_norm_fwd(x, w, EPS, 0.0, True)
    with pytest.raises(ValueError, match="dy must be the forward output's gradient"):
        ops.rms_norm_bwd(y.float(), x, w, rstd, 0.0, True, True)
    with pytest.raises(ValueError, match="rstd must be the forward's"):
        ops.rms_norm_bwd(y, x, w, rstd[:2], 0.0, True, True)
    for impl in IMPLS:
        with pytest.raises(ValueError, match="rstd must be the forward's"):
            IMPLS[impl][1](y, x, w, rstd.double(), 0.0, True, True)


def test_fake_shapes_and_dtypes():
    x = torch.empty(2, 3, 40, dtype=torch.bfloat16, device="meta")
    w = torch.empty(40, dtype=torch.float32, device="meta")
    y, rstd = ops.rms_norm_fwd(x, w, EPS, 0.0, True)
    assert (y.shape, y.dtype, rstd.shape, rstd.dtype) == ((2, 3, 40), torch.float32, (2, 3), torch.float32)
    y, _ = ops.rms_norm_fwd(x, w, EPS, 1.0, False)
    assert y.dtype == torch.bfloat16
    dx, dw = ops.rms_norm_bwd(y, x, w, rstd, 1.0, False, False)
    assert dx.shape == x.shape and dw.shape == (0,)


def test_triton_refuses_rows_above_its_limit_and_the_backend_falls_back():
    from qlora_kernels.triton import rms_norm as triton_norm

    assert triton_norm.MAX_HIDDEN == backend.TRITON_MAX_HIDDEN
    x = torch.randn(2, triton_norm.MAX_HIDDEN + 1)
    w = torch.randn(x.shape[-1])
    with pytest.raises(ValueError, match="at most 8192"):
        triton_norm.rms_norm_fwd_triton(x, w, EPS, 0.0, True, torch.float32)
    y, _ = backend.triton_rms_norm_fwd(x, w, EPS, 0.0, True)
    torch.testing.assert_close(y, ref.rms_norm(x, w, EPS), rtol=0, atol=0)


def test_compile_fullgraph_traces_forward_and_backward():
    x = torch.randn(2, 3, 24, requires_grad=True)
    w = torch.randn(24, requires_grad=True)

    def step(x, w):
        return qk.rms_norm(x, w, 1e-5, 1.0, cast_before_weight=False).square().sum()

    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    compiled(x, w).backward()
    gx, gw = x.grad.clone(), w.grad.clone()
    x.grad = w.grad = None
    step(x, w).backward()
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, w.grad)
