"""Rotary embeddings: the reference against transformers' apply_rotary_pos_emb of every family
(bit for bit), the C++ and Triton kernels against the reference, the op's autograd, checks
and fake implementation.

The kernels compute in fp32 and round once, so they equal `reference.rope.rotate` bit for bit
in every dtype, and in fp32 transformers' own result too; in bf16 / fp16 they also pass the
project's honest tolerance: the error against an fp64 evaluation is at most twice stock's
(which rounds each product to the dtype).
"""

import importlib
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import qlora_kernels as qk  # noqa: E402
from qlora_kernels.backends import rope as backends  # noqa: E402
from qlora_kernels.ops import rope as ops  # noqa: E402
from qlora_kernels.reference import rope as ref  # noqa: E402

from helpers import DTYPES, num_threads  # noqa: E402

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# modeling module of each family whose apply_rotary_pos_emb the reference must be
MODELING = {"llama": "llama", "mistral": "mistral", "qwen2": "qwen2", "qwen3": "qwen3", "gemma": "gemma",
            "gemma2": "gemma2", "gemma3_text": "gemma3", "phi3": "phi3"}
IMPLEMENTATIONS = {"cpu": ("cpu", backends.rope_cpu), "triton": (TRITON_DEVICE, backends.rope_triton_kernel)}


def stock_rope(family):
    module = MODELING[family]
    return importlib.import_module(f"transformers.models.{module}.modeling_{module}").apply_rotary_pos_emb


def rotary_tables(position_ids, rotary_dim, dtype=torch.float32, base=10000.0):
    """cos / sin [B, S, rotary_dim] as transformers' default rotary embedding computes them."""
    inv_freq = 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim))
    freqs = position_ids[..., None].float() * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos().to(dtype), emb.sin().to(dtype)


def make_inputs(B=2, Hq=4, Hk=2, S=7, D=16, rotary_dim=None, dtype=torch.float32, transposed=True, cos_batch=None,
                position_ids=None, device="cpu", seed=0):
    """q [B, Hq, S, D], k [B, Hk, S, D] (transformers' transposed [B, S, H, D] views by default),
    cos / sin of `position_ids` ([B, S], default 0 .. S - 1 shifted per row), batch cos_batch."""
    g = torch.Generator().manual_seed(seed)
    rotary_dim = rotary_dim or D

    def make(H):
        if transposed:
            return torch.randn(B, S, H, D, generator=g).to(device, dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g).to(device, dtype)

    if position_ids is None:
        position_ids = torch.arange(S)[None, :] + 3 * torch.arange(cos_batch or B)[:, None]
    cos, sin = rotary_tables(position_ids, rotary_dim, dtype)
    return make(Hq), make(Hk), cos.to(device), sin.to(device)


def packed_position_ids():
    """Two rows of packed documents: positions restart at every document's start."""
    return torch.tensor([[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2], [0, 1, 2, 3, 4, 5, 0, 1, 0, 1, 2]])


CASES = {
    "mha": dict(Hq=4, Hk=4),
    "gqa": dict(Hq=6, Hk=2),
    "mqa-odd-sizes": dict(B=3, Hq=5, Hk=1, S=13, D=24),
    "partial-rotary": dict(Hq=4, Hk=2, D=24, rotary_dim=12),
    "partial-rotary-odd-pass": dict(Hq=3, Hk=1, D=18, rotary_dim=8),
    "contiguous": dict(transposed=False),
    "broadcast-batch": dict(cos_batch=1),
    "packed": dict(S=11, position_ids=packed_position_ids()),
    "head-dim-2": dict(D=2, S=5),
    "many-heads": dict(B=1, Hq=40, Hk=8, S=3, D=8),
}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("family", list(MODELING))
def test_reference_is_transformers_bit_for_bit(family, dtype):
    q, k, cos, sin = make_inputs(dtype=dtype)
    stock = stock_rope(family)
    for unsqueeze_dim, (qq, kk) in ((1, (q, k)), (2, (q.transpose(1, 2), k.transpose(1, 2)))):
        expected = stock(qq, kk, cos, sin, unsqueeze_dim=unsqueeze_dim)
        got = ref.apply_rotary(qq, kk, cos, sin, unsqueeze_dim=unsqueeze_dim)
        assert all(torch.equal(a, b) for a, b in zip(got, expected))
    if family == "phi3":  # the only family whose formula takes rotary_dim < head_dim
        q, k, cos, sin = make_inputs(D=24, rotary_dim=12, dtype=dtype)
        assert all(torch.equal(a, b) for a, b in zip(ref.apply_rotary(q, k, cos, sin), stock(q, k, cos, sin)))


def test_rotate_is_stock_in_fp32():
    # the kernels' spec (fp32 math) is transformers' result in fp32, partial rotary included
    for case in ({}, dict(D=24, rotary_dim=12)):
        q, k, cos, sin = make_inputs(**case)
        expected = stock_rope("phi3")(q, k, cos, sin)
        assert all(torch.equal(a, b) for a, b in zip(ref.apply_rotary_fp32(q, k, cos, sin), expected))


@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "bwd"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_kernel_is_reference_bit_for_bit(impl, case, dtype, backward):
    device, run = IMPLEMENTATIONS[impl]
    q, k, cos, sin = make_inputs(**CASES[case], dtype=dtype, device=device)
    q_out, k_out = run(q, k, cos, sin, backward)
    q_ref, k_ref = ref.apply_rotary_fp32(q.cpu(), k.cpu(), cos.cpu(), sin.cpu(), backward)
    assert torch.equal(q_out.cpu(), q_ref) and torch.equal(k_out.cpu(), k_ref)
    # laid out like the inputs (what the fake implementation says)
    assert q_out.stride() == ops.out_like(q).stride() and k_out.stride() == ops.out_like(k).stride()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_low_precision_within_twice_stock_error(impl, dtype):
    device, run = IMPLEMENTATIONS[impl]
    q, k, cos, sin = make_inputs(B=2, Hq=4, Hk=2, S=32, D=32, dtype=dtype, device=device)
    exact = ref.apply_rotary(*(t.cpu().double() for t in (q, k, cos, sin)))
    stock = ref.apply_rotary(*(t.cpu() for t in (q, k, cos, sin)))
    ours = run(q, k, cos, sin, False)
    for o, s, e in zip(ours, stock, exact):
        ours_err, stock_err = (o.cpu().double() - e).abs().max(), (s.double() - e).abs().max()
        assert ours_err <= 2 * stock_err + 1e-6, (ours_err, stock_err)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_mixed_cos_dtype(dtype):
    # fp32 tables with a bf16 / fp16 q are read as fp32: one rounding at the end
    q, k, cos, sin = make_inputs(dtype=dtype)
    cos32, sin32 = rotary_tables(torch.arange(7)[None, :] + 3 * torch.arange(2)[:, None], 16)
    expected = ref.apply_rotary_fp32(q, k, cos32, sin32)
    for device, run in IMPLEMENTATIONS.values():
        got = run(*(t.to(device) for t in (q, k, cos32, sin32)), False)
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))


def test_cpu_kernel_threads_agree():
    q, k, cos, sin = make_inputs(B=2, Hq=8, Hk=4, S=256, D=64, dtype=torch.bfloat16)
    with num_threads(1):
        one = backends.rope_cpu(q, k, cos, sin, False)
    with num_threads(4):
        four = backends.rope_cpu(q, k, cos, sin, False)
    assert all(torch.equal(a, b) for a, b in zip(one, four))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_strided_and_broadcast_tables(impl):
    # cos / sin as views: a slice of a longer table (seq stride > rotary_dim) and an expanded batch
    device, run = IMPLEMENTATIONS[impl]
    q, k, _, _ = make_inputs(B=3, S=5, device=device)
    cos_full, sin_full = rotary_tables(torch.arange(20)[None, :], 32)
    cos, sin = cos_full[:, 2:7, :16].to(device), sin_full[:, 2:7, :16].to(device)
    for c, s in ((cos, sin), (cos.expand(3, 5, 16), sin.expand(3, 5, 16))):
        got = run(q, k, c, s, False)
        expected = ref.apply_rotary_fp32(q.cpu(), k.cpu(), c.cpu(), s.cpu())
        assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))


@pytest.mark.parametrize("impl", list(IMPLEMENTATIONS))
def test_head_dim_not_unit_stride_and_empty(impl):
    device, run = IMPLEMENTATIONS[impl]
    q, k, cos, sin = make_inputs(device=device)
    q_t = q.transpose(2, 3).contiguous().transpose(2, 3)  # head dim stride S
    got = run(q_t, k, cos, sin, True)
    expected = ref.apply_rotary_fp32(q.cpu(), k.cpu(), cos.cpu(), sin.cpu(), True)
    assert all(torch.equal(a.cpu(), b) for a, b in zip(got, expected))
    q0, k0, cos0, sin0 = make_inputs(S=0, device=device)
    assert [t.shape for t in run(q0, k0, cos0, sin0, False)] == [q0.shape, k0.shape]


@pytest.mark.parametrize("case", ["gqa", "partial-rotary", "packed", "broadcast-batch"])
def test_apply_rotary_forward_and_grads_match_stock(case):
    q, k, cos, sin = make_inputs(**CASES[case])
    stock = stock_rope("phi3")  # the partial form, which is every family's for rotary_dim == head_dim
    dq, dk = torch.randn(q.shape), torch.randn(k.shape)
    results = []
    for fn in (stock, qk.apply_rotary):
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = fn(qq, kk, cos, sin)
        torch.autograd.backward((q_out, k_out), (dq, dk))
        results.append((q_out.detach(), k_out.detach(), qq.grad, kk.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_apply_rotary_seq_major_layout():
    # unsqueeze_dim=2: q / k [B, S, H, D]
    q, k, cos, sin = make_inputs()
    qs, ks = q.transpose(1, 2), k.transpose(1, 2)
    got = qk.apply_rotary(qs, ks, cos, sin, unsqueeze_dim=2)
    expected = stock_rope("llama")(qs, ks, cos, sin, unsqueeze_dim=2)
    assert all(torch.equal(a, b) and a.shape == b.shape for a, b in zip(got, expected))


def test_apply_rotary_saves_only_cos_and_sin():
    q, k, cos, sin = make_inputs(S=64, D=32)
    q.requires_grad_(), k.requires_grad_()
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q_out, k_out = qk.apply_rotary(q, k, cos, sin)
    assert [id(t) for t in saved] == [id(cos), id(sin)]


def test_double_backward():
    # the backward is the op itself, so it is differentiable again
    q, k, cos, sin = make_inputs(dtype=torch.float32)
    qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_out, k_out = qk.apply_rotary(qq, kk, cos, sin)
    dq, = torch.autograd.grad((q_out * q_out).sum(), qq, create_graph=True)
    ddq, = torch.autograd.grad(dq.sum(), qq)
    qs, ks = q.detach().requires_grad_(), k.detach().requires_grad_()
    q_s, _ = stock_rope("llama")(qs, ks, cos, sin)
    dq_s, = torch.autograd.grad((q_s * q_s).sum(), qs, create_graph=True)
    ddq_s, = torch.autograd.grad(dq_s.sum(), qs)
    assert torch.allclose(dq, dq_s, atol=1e-6) and torch.allclose(ddq, ddq_s, atol=1e-5)


def test_cos_requiring_grad_runs_stock_formula():
    q, k, cos, sin = make_inputs()
    cos, sin = cos.clone().requires_grad_(), sin.clone().requires_grad_()
    q_out, k_out = qk.apply_rotary(q, k, cos, sin)
    (q_out.sum() + k_out.sum()).backward()
    cs, ss = cos.detach().clone().requires_grad_(), sin.detach().clone().requires_grad_()
    q_s, k_s = stock_rope("llama")(q, k, cs, ss)
    (q_s.sum() + k_s.sum()).backward()
    assert torch.equal(q_out, q_s) and torch.equal(cos.grad, cs.grad) and torch.equal(sin.grad, ss.grad)


def test_promoting_dtypes_give_stock_result():
    # stock promotes bf16 q with fp32 tables to an fp32 result; so does apply_rotary
    q, k, _, _ = make_inputs(dtype=torch.bfloat16)
    cos, sin = rotary_tables(torch.arange(7)[None, :].expand(2, 7), 16)
    got = qk.apply_rotary(q, k, cos, sin)
    expected = stock_rope("llama")(q, k, cos, sin)
    assert all(a.dtype == torch.float32 and torch.equal(a, b) for a, b in zip(got, expected))


def test_opcheck():
    q, k, cos, sin = make_inputs(Hq=4, Hk=2, D=8, S=3, rotary_dim=6)
    q.requires_grad_(), k.requires_grad_()
    for backward in (False, True):
        torch.library.opcheck(torch.ops.qlora_kernels.rope.default, (q, k, cos, sin, backward))


def test_meta_tensors():
    q, k, cos, sin = (t.to("meta") for t in make_inputs())
    q_out, k_out = torch.ops.qlora_kernels.rope(q, k, cos, sin, False)
    assert q_out.shape == q.shape and q_out.stride() == q.stride() and k_out.device.type == "meta"
    with pytest.raises(ValueError, match="rotary_dim"):
        torch.ops.qlora_kernels.rope(q, k, cos[..., :15], sin[..., :15], False)


def _bad(**change):
    q, k, cos, sin = make_inputs()
    args = dict(q=q, k=k, cos=cos, sin=sin)
    args.update(change)
    return args


@pytest.mark.parametrize(("change", "error", "match"), [
    (lambda a: dict(q=a["q"].double()), ValueError, "q has dtype torch.float64; rotary embeddings take"),
    (lambda a: dict(k=a["k"].int()), ValueError, "k has dtype torch.int32"),
    (lambda a: dict(k=a["k"].half()), ValueError, "q and k must share a dtype"),
    (lambda a: dict(sin=a["sin"].half()), ValueError, "cos and sin must share a dtype"),
    (lambda a: dict(q=a["q"][0]), ValueError, r"q and k must be \[batch, heads, seq, head_dim\]"),
    (lambda a: dict(k=a["k"][:1]), ValueError, "must share batch, seq and head_dim"),
    (lambda a: dict(k=a["k"][..., :8]), ValueError, "must share batch, seq and head_dim"),
    (lambda a: dict(cos=a["cos"][0]), ValueError, r"cos and sin must be \[batch or 1, seq, rotary_dim\]"),
    (lambda a: dict(cos=a["cos"][..., :8]), ValueError, "cos and sin must be .* of one shape"),
    (lambda a: dict(cos=a["cos"][..., :15], sin=a["sin"][..., :15]), ValueError, "must be even and >= 2, got 15"),
    (lambda a: dict(cos=torch.ones(2, 7, 18), sin=torch.ones(2, 7, 18)), ValueError, r"exceeds head_dim \(16\)"),
    (lambda a: dict(cos=a["cos"][:, :5], sin=a["sin"][:, :5]), ValueError, "cos / sin have 5 positions, q and k 7"),
    (lambda a: dict(cos=torch.ones(3, 7, 16), sin=torch.ones(3, 7, 16)), ValueError, r"batch \(3\) must be q's"),
    (lambda a: dict(cos=a["cos"].to("meta")), ValueError, "must be on one device"),
    (lambda a: dict(q=a["q"].numpy()), TypeError, "q must be a torch.Tensor, got ndarray"),
])
@pytest.mark.parametrize("entry", ["op", "apply_rotary", "cpu", "triton"])
def test_bad_inputs_raise_clearly(entry, change, error, match):
    args = _bad()
    args.update(change(args))
    call = {"op": lambda a: torch.ops.qlora_kernels.rope(a["q"], a["k"], a["cos"], a["sin"], False),
            "apply_rotary": lambda a: qk.apply_rotary(a["q"], a["k"], a["cos"], a["sin"]),
            "cpu": lambda a: backends.rope_cpu(a["q"], a["k"], a["cos"], a["sin"], False),
            "triton": lambda a: backends.rope_triton_kernel(a["q"], a["k"], a["cos"], a["sin"], False)}[entry]
    if entry == "op" and error is TypeError:
        error = (TypeError, RuntimeError)  # the dispatcher refuses a non-tensor before the checks
        match = "Tensor"
    with pytest.raises(error, match=match):
        call(args)


@pytest.mark.parametrize("value", [0, 3, -1, True, "1"])
def test_bad_unsqueeze_dim(value):
    q, k, cos, sin = make_inputs()
    with pytest.raises(ValueError, match="unsqueeze_dim must be 1 .* or 2"):
        qk.apply_rotary(q, k, cos, sin, unsqueeze_dim=value)


def test_backward_flag_must_be_bool():
    q, k, cos, sin = make_inputs()
    with pytest.raises(TypeError, match="backward must be a bool"):
        ops.check_args(q, k, cos, sin, 1)


def test_registered_backends():
    from qlora_kernels.backends.common import REGISTERED

    assert REGISTERED["rope"]["cpu"] in ("C++", "Triton (interpreter)")
    assert REGISTERED["rope"]["cuda"] == "Triton"


def test_traces_under_torch_compile_fullgraph():
    # the fake implementation and the autograd let torch.compile trace forward and backward
    # without a graph break (aot_eager: the op itself runs, no code generated)
    q, k, cos, sin = make_inputs(D=24, rotary_dim=12)
    compiled = torch.compile(qk.apply_rotary, backend="aot_eager", fullgraph=True)
    results = []
    for fn in (compiled, qk.apply_rotary):
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        q_out, k_out = fn(qq, kk, cos, sin)
        (q_out.square().sum() + k_out.sum()).backward()
        results.append((q_out.detach(), k_out.detach(), qq.grad, kk.grad))
    for a, b in zip(*results):
        assert torch.equal(a, b)
