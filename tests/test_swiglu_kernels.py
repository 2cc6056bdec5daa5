"""SwiGLU kernels: the C++ kernel (backends/swiglu.py through _C) and the Triton kernel (run by
the interpreter on CPU tensors) against reference/swiglu.py and against PyTorch's own silu /
gelu(tanh) with autograd in fp64: fp32 tightly, fp16 / bf16 within twice the error PyTorch makes
in that dtype; odd sizes, empty inputs, strided halves, transposed and broadcast inputs, the
packed (Phi-3) layout, gradients, the thread count, bad arguments (eager and fake), opcheck, and
that the forward keeps only gate and up for the backward."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import qlora_kernels as qk
from qlora_kernels._native import native
from qlora_kernels.backends import swiglu as backend
from qlora_kernels.ops import swiglu as ops
from qlora_kernels.reference import swiglu as ref

from helpers import num_threads

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
ACTIVATIONS = ("silu", "gelu_tanh")
_C = native()

# (forward, backward, packed forward, packed backward) of each kernel, called directly
IMPLS = {
    "cpp": (getattr(backend, "swiglu_fwd_cpu", None), getattr(backend, "swiglu_bwd_cpu", None),
            getattr(backend, "swiglu_packed_fwd_cpu", None), getattr(backend, "swiglu_packed_bwd_cpu", None)),
    "triton": (backend.triton_swiglu_fwd, backend.triton_swiglu_bwd, backend.triton_swiglu_packed_fwd,
               backend.triton_swiglu_packed_bwd),
}
IMPL_NAMES = [pytest.param("cpp", marks=pytest.mark.skipif(_C is None, reason="native module not built")), "triton"]
# last dims: 1, odd, one C++ chunk (512) and one past it, past a Triton block (1024)
SHAPES = ((1, 1), (3, 7), (2, 5, 513), (1041,), (2, 1, 3, 33))


def _inputs(shape, dtype, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    gate = (torch.randn(shape, generator=g) * scale)
    if gate.numel() >= 8:  # the tails of the activation (exp's clamp, sigmoid -> 0 / 1) and zero
        flat = gate.view(-1)
        flat[:6] = torch.tensor([0.0, -30.0, 30.0, -90.0, 90.0, -1e-3])
    return gate.to(dtype), torch.randn(shape, generator=g).to(dtype), torch.randn(shape, generator=g).to(dtype)


def _exact(gate, up, dout, activation):
    """fp64 (out, dgate, dup) of PyTorch's own activation, through autograd."""
    g64 = gate.double().requires_grad_()
    u64 = up.double().requires_grad_()
    out = (F.silu(g64) if activation == "silu" else F.gelu(g64, approximate="tanh")) * u64
    dg, du = torch.autograd.grad(out, (g64, u64), dout.double())
    return out.detach(), dg, du


def _stock_in_dtype(gate, up, dout, activation):
    """What transformers computes in the dtype: the baseline of the 2x rule."""
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = ref.swiglu(g, u, activation)
    dg, du = torch.autograd.grad(out, (g, u), dout)
    return out.detach(), dg, du


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_close_to_exact(got, stock, exact, dtype):
    for name, x, s, e in zip(("out", "dgate", "dup"), got, stock, exact):
        assert x.dtype == dtype and x.shape == e.shape, name
        if dtype == torch.float32:
            torch.testing.assert_close(x.double(), e, rtol=2e-6, atol=2e-6, msg=name)
        else:
            ours, theirs = _max_err(x, e), _max_err(s, e)
            # + a hair for the exp's clamp: sigmoid(-90) is 1e-38 there, about 1e-39 in PyTorch
            assert ours <= 2 * theirs + 1e-30, (name, ours, theirs)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_forward_and_backward_match_pytorch(impl, activation, dtype, shape):
    fwd, bwd, _, _ = IMPLS[impl]
    gate, up, dout = _inputs(shape, dtype)
    got = (fwd(gate, up, activation), *bwd(dout, gate, up, activation))
    _assert_close_to_exact(got, _stock_in_dtype(gate, up, dout, activation), _exact(gate, up, dout, activation),
                           dtype)
    # the executable spec too: same rounding of act(gate) as transformers, so the forward agrees to
    # the activation's last bits (fp16 / bf16: at most one ulp of the result where a rounding differs)
    want = ref.swiglu(gate, up, activation)
    torch.testing.assert_close(got[0], want, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)
    for g, w in zip(got[1:], ref.swiglu_backward(dout, gate, up, activation)):
        torch.testing.assert_close(g, w, rtol=2e-6 if dtype == torch.float32 else 1e-2, atol=1e-5)


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_bf16_forward_keeps_transformers_rounding(impl, activation):
    # act(gate) rounded to bf16 before the product, as transformers does: computed that way
    # from the fp32 activation, the kernels' results agree but where the two fp32 activations
    # straddle a rounding boundary; rounded once instead, a third of them would differ.
    # (Against PyTorch's own bf16 gelu(tanh) itself more differ: its 0.5 x (1 + tanh) cancels
    # for gate below about -4, where the kernels' sigmoid form stays exact to fp32.)
    gate, up, _ = _inputs((64, 257), torch.bfloat16, seed=3)
    out = IMPLS[impl][0](gate, up, activation)
    act32, _ = ref.activation_and_derivative(gate.float(), activation)
    double_rounding = (act32.to(torch.bfloat16).float() * up.float()).to(torch.bfloat16)
    single_rounding = (act32 * up.float()).to(torch.bfloat16)
    assert (out != double_rounding).float().mean().item() < 0.01
    assert (single_rounding != double_rounding).float().mean().item() > 0.05


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("shape", ((0, 5), (4, 0), (0,)), ids=str)
def test_empty(impl, shape):
    fwd, bwd, pfwd, pbwd = IMPLS[impl]
    gate = torch.empty(shape)
    assert fwd(gate, gate, "silu").shape == shape
    assert [t.shape for t in bwd(gate, gate, gate, "silu")] == [shape, shape]
    packed = torch.empty((*shape[:-1], 2 * shape[-1]))
    assert pfwd(packed, "silu").shape == shape and pbwd(gate, packed, "silu").shape == packed.shape


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_packed_halves_match_two_tensors(impl, dtype, activation):
    fwd, bwd, pfwd, pbwd = IMPLS[impl]
    gate, up, dout = _inputs((2, 3, 37), dtype, seed=1)
    gate_up = torch.cat([gate, up], dim=-1)
    out = pfwd(gate_up, activation)
    assert torch.equal(out, fwd(gate, up, activation))
    dgate_up = pbwd(dout, gate_up, activation)
    assert dgate_up.shape == gate_up.shape and dgate_up.is_contiguous()
    assert torch.equal(dgate_up, torch.cat(bwd(dout, gate, up, activation), dim=-1))


def _layouts(gate):
    """Views of gate's values in other memory layouts: a half of a wider tensor (Phi-3), a
    transpose (no unit column stride: copied), rows every other row, a broadcast row."""
    wide = torch.cat([gate, torch.full_like(gate, 7.0)], dim=-1)
    yield "half of gate_up", wide[..., :gate.shape[-1]]
    yield "transposed", gate.transpose(-1, -2).contiguous().transpose(-1, -2)
    yield "every other row", torch.stack([gate, gate + 1], dim=-2)[..., 0, :]


@pytest.mark.parametrize("impl", IMPL_NAMES)
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_strided_inputs_read_in_place_or_copied(impl, dtype):
    fwd, bwd, _, _ = IMPLS[impl]
    gate, up, dout = _inputs((4, 6, 21), dtype, seed=2)
    want = fwd(gate, up, "silu")
    want_grads = bwd(dout, gate, up, "silu")
    # each layout for both inputs, and gate and up in different layouts
    pairs = list(zip(_layouts(gate), _layouts(up)))
    pairs.append((pairs[0][0], pairs[1][1]))
    for (name, g), (up_name, u) in pairs:
        assert torch.equal(fwd(g, u, "silu"), want), (name, up_name)
        for got, w in zip(bwd(dout, g, u, "silu"), want_grads):
            assert torch.equal(got, w) and got.is_contiguous(), (name, up_name)
    # one row broadcast over many (stride 0)
    row = gate[:1, :1]
    expanded = row.expand(4, 6, 21)
    assert torch.equal(fwd(expanded, up, "silu"), fwd(expanded.contiguous(), up, "silu"))
    # a packed gate_up that is itself a view (every other token of a batch)
    gate_up = torch.cat([gate, up], dim=-1)
    _, _, pfwd, pbwd = IMPLS[impl]
    strided = torch.stack([gate_up, gate_up * 0], dim=1)[:, 0]
    assert torch.equal(pfwd(strided, "silu"), want)
    assert torch.equal(pbwd(dout, strided, "silu"), torch.cat(want_grads, dim=-1))


@pytest.mark.skipif(_C is None, reason="native module not built")
def test_cpp_threads_give_the_same_bits():
    gate, up, dout = _inputs((40, 700), torch.bfloat16, seed=4)  # enough work for several threads
    with num_threads(1):
        one = (backend.swiglu_fwd_cpu(gate, up, "gelu_tanh"), *backend.swiglu_bwd_cpu(dout, gate, up, "gelu_tanh"))
    with num_threads(4):
        many = (backend.swiglu_fwd_cpu(gate, up, "gelu_tanh"), *backend.swiglu_bwd_cpu(dout, gate, up, "gelu_tanh"))
    assert all(torch.equal(a, b) for a, b in zip(one, many))


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("packed", (False, True))
def test_public_function_gradients(activation, packed):
    gate, up, dout = _inputs((3, 5, 40), torch.float32, seed=5)
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    if packed:
        gu = torch.cat([g, u], dim=-1).detach().requires_grad_()
        out = qk.swiglu_packed(gu, activation)
        out.backward(dout)
        dg, du = gu.grad.chunk(2, dim=-1)
    else:
        out = qk.swiglu(g, u, activation)
        out.backward(dout)
        dg, du = g.grad, u.grad
    exact = _exact(gate, up, dout, activation)
    for got, want in zip((out.detach(), dg, du), exact):
        torch.testing.assert_close(got.double(), want, rtol=2e-6, atol=2e-6)


def test_activation_formulas_are_pytorchs():
    # the sigmoid forms the kernels use, and their derivatives, against PyTorch's silu and
    # tanh gelu through fp64 autograd
    x = torch.linspace(-12, 12, 2001, dtype=torch.float64, requires_grad=True)
    for activation, fn in (("silu", F.silu), ("gelu_tanh", lambda t: F.gelu(t, approximate="tanh"))):
        value, derivative = ref.activation_and_derivative(x.detach(), activation)
        (want_derivative,) = torch.autograd.grad(fn(x).sum(), x)
        torch.testing.assert_close(value, fn(x.detach()), rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(derivative, want_derivative, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("packed", (False, True))
def test_forward_saves_only_its_inputs(packed):
    gate = torch.randn(4, 16, requires_grad=True)
    up = torch.randn(4, 16, requires_grad=True)
    saved = []

    def pack(t):
        saved.append(t)
        return t

    gate_up = torch.cat([gate, up], dim=-1)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = qk.swiglu_packed(gate_up) if packed else qk.swiglu(gate, up)
    inputs = (gate_up,) if packed else (gate, up)
    assert len(saved) == len(inputs)
    assert all(s.data_ptr() == t.data_ptr() and s.shape == t.shape for s, t in zip(saved, inputs))
    out.sum().backward()
    # the stock expression keeps act(gate) as well: what this test tells apart
    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        ref.swiglu(gate, up)
    assert len(saved) > 2


@pytest.mark.parametrize("make_bad, error, match", [
    (lambda g, u: (g, u[:, :-1], "silu"), ValueError, r"up must have gate's shape \[3, 8\], got \[3, 7\]"),
    (lambda g, u: (g, u.half(), "silu"), ValueError, "up must have gate's dtype torch.float32, got torch.float16"),
    (lambda g, u: (g.double(), u.double(), "silu"), ValueError, "gate must be float32, float16 or bfloat16"),
    (lambda g, u: (g.int(), u, "silu"), ValueError, "gate must be float32, float16 or bfloat16, got torch.int32"),
    (lambda g, u: (g, u.to("meta"), "silu"), ValueError, "up must be on gate's device cpu, got meta"),
    (lambda g, u: (g, u, "gelu"), ValueError, "activation must be one of silu, gelu_tanh .* got 'gelu'"),
    (lambda g, u: (g[0, 0], u[0, 0], "silu"), ValueError, "at least one dimension"),
    (lambda g, u: (g, [1.0], "silu"), TypeError, "up must be a torch.Tensor, got list"),
])
def test_bad_arguments_are_refused_clearly(make_bad, error, match):
    gate, up = torch.randn(3, 8), torch.randn(3, 8)
    args = make_bad(gate, up)
    with pytest.raises(error, match=match):
        qk.swiglu(*args)
    if error is TypeError:  # the dispatcher refuses a non-tensor before the op's own check
        return
    with pytest.raises(error, match=match):
        ops.swiglu_fwd(*args)
    # the fake implementation (meta tensors) refuses the same, bar the device mismatch
    if isinstance(args[1], torch.Tensor) and args[1].device.type != "meta":
        with pytest.raises(error, match=match):
            ops.swiglu_fwd(args[0].to("meta"), args[1].to("meta"), args[2])
    if isinstance(args[1], torch.Tensor) and args[0].shape == args[1].shape:
        with pytest.raises(error, match=match):
            ops.swiglu_bwd(args[0], *args)


def test_bad_packed_arguments():
    with pytest.raises(ValueError, match="gate_up's last dim holds gate then up and must be even, got 7"):
        qk.swiglu_packed(torch.randn(3, 7))
    with pytest.raises(ValueError, match="gate_up's last dim .* even"):
        ops.swiglu_packed_fwd(torch.randn(3, 7, device="meta"), "silu")
    with pytest.raises(ValueError, match="activation must be one of"):
        qk.swiglu_packed(torch.randn(3, 8), "relu")
    with pytest.raises(ValueError, match=r"dout must be \[3, 4\]"):
        ops.swiglu_packed_bwd(torch.randn(3, 8), torch.randn(3, 8), "silu")
    with pytest.raises(ValueError, match="dout must be torch.float32 on cpu, got torch.bfloat16"):
        ops.swiglu_packed_bwd(torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(3, 8), "silu")


def test_meta_shapes():
    gate = torch.empty(2, 9, 11, device="meta", dtype=torch.bfloat16)
    out = qk.swiglu(gate, gate)
    assert out.shape == gate.shape and out.dtype == gate.dtype and out.device.type == "meta"
    packed = qk.swiglu_packed(torch.empty(2, 9, 22, device="meta"))
    assert packed.shape == (2, 9, 11)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_opcheck(dtype):
    gate, up, dout = _inputs((3, 37), dtype, seed=6)
    gate.requires_grad_()
    up.requires_grad_()
    for activation in ACTIVATIONS:
        torch.library.opcheck(ops.swiglu_fwd, (gate, up, activation))
        torch.library.opcheck(ops.swiglu_bwd, (dout, gate.detach(), up.detach(), activation))
        gate_up = torch.cat([gate, up], dim=-1).detach().requires_grad_()
        torch.library.opcheck(ops.swiglu_packed_fwd, (gate_up, activation))
        torch.library.opcheck(ops.swiglu_packed_bwd, (dout, gate_up.detach(), activation))


def test_backends_report_the_kernels():
    ops_report = qk.backends()["ops"]
    for name in ("swiglu_fwd", "swiglu_bwd", "swiglu_packed_fwd", "swiglu_packed_bwd"):
        assert ops_report[name]["cpu"] == ("C++" if _C is not None else "reference (PyTorch)")
        assert ops_report[name]["cuda"].startswith("Triton")


@pytest.mark.parametrize("packed", (False, True))
def test_compiles_fullgraph_forward_and_backward(packed):
    # the fake implementations and the autograd registration let dynamo and AOTAutograd trace
    # the ops without a graph break (aot_eager: no inductor code generation, seconds)
    gate, up, dout = _inputs((4, 24), torch.float32, seed=7)

    def step(g, u):
        return qk.swiglu_packed(torch.cat([g, u], dim=-1)) if packed else qk.swiglu(g, u, "gelu_tanh")

    g1, u1 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    g2, u2 = gate.clone().requires_grad_(), up.clone().requires_grad_()
    torch.compile(step, backend="aot_eager", fullgraph=True)(g1, u1).backward(dout)
    step(g2, u2).backward(dout)
    assert torch.equal(g1.grad, g2.grad) and torch.equal(u1.grad, u2.grad)


def _isa_supported(level: str) -> bool:
    from test_baseline_isa import _supported

    return _supported(level)


@pytest.mark.skipif(_C is None, reason="native module not built")
@pytest.mark.parametrize("isa", ["baseline", "avx2"])
def test_cpp_narrower_isa_paths(isa):
    # the C++ steps compiled for the baseline x86-64 ISA (pre-AVX2 CPUs) and for AVX2 (8 lanes)
    # are not taken by themselves on an AVX-512 CPU: the forward / backward tests again in a
    # process that names the level (read when _C loads)
    if not _isa_supported(isa):
        pytest.fail(f"this CPU lacks {isa}")  # every x86-64 CI machine has AVX2
    import os
    import subprocess
    import sys
    from pathlib import Path

    tests = Path(__file__).resolve().parent
    code = ("import sys, pytest; from qlora_kernels._native import native; "
            f"assert native().build_info['cpu_isa'] == {isa!r}; "
            f"sys.exit(pytest.main(['-q', '-p', 'no:cacheprovider', {str(Path(__file__))!r}, "
            "'-k', 'cpp and (match_pytorch or rounding or packed)']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, QLORA_KERNELS_CPU_ISA=isa))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert " passed" in proc.stdout and "skipped" not in proc.stdout


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_cuda_triton_through_the_ops(dtype, activation):
    # on a GPU the ops dispatch to the Triton kernels: the same criteria as on the CPU, the
    # packed layout and the gradients through autograd included
    gate, up, dout = (t.cuda() for t in _inputs((3, 7, 3001), dtype, seed=8))
    g, u = gate.clone().requires_grad_(), up.clone().requires_grad_()
    out = qk.swiglu(g, u, activation)
    out.backward(dout)
    exact = tuple(t.cpu() for t in _exact(gate, up, dout, activation))
    stock = tuple(t.cpu() for t in _stock_in_dtype(gate, up, dout, activation))
    _assert_close_to_exact((out.detach().cpu(), g.grad.cpu(), u.grad.cpu()), stock, exact, dtype)
    gate_up = torch.cat([gate, up], dim=-1).requires_grad_()
    packed = qk.swiglu_packed(gate_up, activation)
    packed.backward(dout)
    assert torch.equal(packed, out) and torch.equal(gate_up.grad, torch.cat([g.grad, u.grad], dim=-1))
