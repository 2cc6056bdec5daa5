"""Triton flash attention (forward, backward, varlen) and flash-decoding vs `reference.attention`.

fp32 is compared tightly against the reference. fp16 / bf16 get the honest tolerance: the
kernel's error against an fp64 reference may be at most twice the error of the same math
done in the low dtype (plus a small eps), the usual FlashAttention test criterion.
"""

import math
import os

import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter, which must be chosen before
# triton (and any @triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qlora_kernels.reference import attention as ref  # noqa: E402
from qlora_kernels.triton.flash_attention import flash_attention_bwd_triton, flash_attention_fwd_triton  # noqa: E402
from qlora_kernels.triton.flash_decode import flash_decode_triton  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def needs_gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")(test))


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, transposed=False, seed=0):
    """q / k / v on DEVICE; `transposed` gives HF's [B, S, H, D].transpose(1, 2) views."""
    g = torch.Generator().manual_seed(seed)

    def make(H, S):
        if transposed:
            return torch.randn(B, S, H, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
        return torch.randn(B, H, S, D, generator=g).to(DEVICE, dtype)

    return make(Hq, Sq), make(Hkv, Sk), make(Hkv, Sk)


def _padding(B, Sk, seed=0):
    """Random key padding, batch row 0 fully padded (its queries see no key at all)."""
    g = torch.Generator().manual_seed(seed)
    mask = torch.rand(B, Sk, generator=g) > 0.3
    mask[0] = False
    return mask.to(DEVICE)


def _slopes(Hq):
    return torch.tensor([2.0 ** (-8.0 * (h + 1) / Hq) for h in range(Hq)], device=DEVICE)


def _attention_in(dtype, q, k, v, causal=True, softmax_scale=None, alibi_slopes=None, key_padding_mask=None):
    """The reference's math carried out in `dtype` (matmuls and softmax), differentiable:
    the low-precision baseline of the honest tolerance."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(Hq // Hkv, 1), v.to(dtype).repeat_interleave(Hq // Hkv, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    row = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    col = torch.arange(Sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        scores = scores + (alibi_slopes.view(1, Hq, 1, 1) * (col - row)).to(dtype)
    keep = (col <= row) if causal else torch.ones(Sq, Sk, dtype=torch.bool, device=q.device)
    keep = keep.view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.view(B, 1, 1, Sk)
    keep = keep.expand(B, Hq, Sq, Sk)
    any_key = keep.any(-1, keepdim=True)
    scores = torch.where(keep, scores, torch.full_like(scores, -math.inf))
    scores = torch.where(any_key, scores, torch.zeros_like(scores))
    return torch.matmul(torch.softmax(scores, -1) * any_key, v)


def _per_sequence(attention, q, k, v, cu_seqlens, **kw):
    """Varlen [T, H, D] through a dense [1, H, S, D] attention, sequence by sequence."""
    bounds = cu_seqlens.tolist()
    outs = []
    for start, end in zip(bounds[:-1], bounds[1:]):
        def seq(t):
            return t[start:end].transpose(0, 1).unsqueeze(0)

        out = attention(seq(q), seq(k), seq(v), **kw)
        outs.append((out[0] if isinstance(out, tuple) else out)[0].transpose(0, 1))
    return torch.cat(outs)


def _grads(fn, inputs, dout):
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    out = out[0] if isinstance(out, tuple) else out
    return out, torch.autograd.grad(out, leaves, dout.to(out.dtype))


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_honest(got, lowp, exact, what, eps=1e-4):
    err, base = _max_err(got, exact), _max_err(lowp, exact)
    assert err <= 2 * base + eps, f"{what}: kernel error {err:.3g} > 2 x {base:.3g} (low-precision math) + {eps}"


def _run(q, k, v, dout, **kw):
    out, lse = flash_attention_fwd_triton(q, k, v, **kw)
    return out, lse, flash_attention_bwd_triton(dout, q, k, v, out, lse, **kw)


# (B, Hq, Hkv, Sq, Sk, D, causal, alibi, padding, transposed)
CASES = {
    "square": (2, 2, 2, 48, 48, 64, True, False, False, False),
    "sq<sk": (1, 2, 2, 17, 50, 64, True, False, False, False),
    "sq<sk-full": (1, 2, 2, 17, 50, 32, False, False, False, False),
    "sq>sk": (1, 2, 2, 40, 24, 32, True, False, False, False),  # first rows see no key
    "gqa4/2": (1, 4, 2, 33, 33, 32, True, False, False, False),
    "mqa4/1": (1, 4, 1, 20, 45, 32, False, False, False, False),
    "alibi": (1, 4, 2, 30, 40, 32, True, True, False, False),
    "padding": (2, 2, 1, 24, 37, 32, False, False, True, False),
    "padding-causal-alibi": (2, 2, 2, 24, 37, 32, True, True, True, False),
    "transposed": (2, 4, 2, 25, 25, 64, True, False, False, True),
    "d16": (1, 2, 2, 33, 33, 16, True, False, False, False),
    "d80": (1, 2, 1, 21, 30, 80, True, True, False, True),
}


def _case(name, dtype):
    B, Hq, Hkv, Sq, Sk, D, causal, alibi, padding, transposed = CASES[name]
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, transposed)
    kw = dict(causal=causal, alibi_slopes=_slopes(Hq) if alibi else None,
              key_padding_mask=_padding(B, Sk) if padding else None)
    dout = torch.randn(B, Hq, Sq, D, generator=torch.Generator().manual_seed(1)).to(DEVICE, dtype)
    return q, k, v, dout, kw


@pytest.mark.parametrize("name", list(CASES))
def test_fp32_matches_reference(name):
    q, k, v, dout, kw = _case(name, torch.float32)
    out, lse, grads = _run(q, k, v, dout, **kw)
    want_out, want_grads = _grads(lambda *t: ref.flash_attention(*t, **kw), (q, k, v), dout)
    want_lse = ref.flash_attention(q, k, v, **kw)[1]
    assert out.shape == q.shape and out.is_contiguous() and lse.dtype == torch.float32
    torch.testing.assert_close(out, want_out, atol=2e-5, rtol=0)
    assert torch.equal(lse.isneginf(), want_lse.isneginf())
    torch.testing.assert_close(lse.nan_to_num(neginf=0.0), want_lse.nan_to_num(neginf=0.0), atol=2e-5, rtol=0)
    for got, want, what in zip(grads, want_grads, ("dq", "dk", "dv")):
        assert got.shape == want.shape and got.dtype == want.dtype, what
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=what)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("name", ("square", "padding-causal-alibi", "d80"))
def test_half_honest_tolerance(name, dtype):
    q, k, v, dout, kw = _case(name, dtype)
    out, lse, grads = _run(q, k, v, dout, **kw)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    exact_out, exact_grads = _grads(lambda *t: ref.flash_attention(*t, **kw), [t.double() for t in (q, k, v)],
                                    dout.double())
    lowp_out, lowp_grads = _grads(lambda *t: _attention_in(dtype, *t, **kw), (q, k, v), dout)
    _assert_honest(out, lowp_out, exact_out, "out")
    for got, lowp, exact, what in zip(grads, lowp_grads, exact_grads, ("dq", "dk", "dv")):
        _assert_honest(got, lowp, exact, what)


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
def test_fully_padded_row_is_zero_not_nan(causal):
    B, H, S, D = 2, 2, 20, 32
    q, k, v = _qkv(B, H, H, S, S, D, torch.bfloat16)
    mask = _padding(B, S)
    dout = torch.randn(B, H, S, D, device=DEVICE, dtype=torch.bfloat16)
    out, lse, (dq, dk, dv) = _run(q, k, v, dout, causal=causal, key_padding_mask=mask)
    assert torch.equal(out[0], torch.zeros_like(out[0]))
    assert lse[0].isneginf().all() and not lse[1].isinf().any()
    for g in (dq, dk, dv):
        assert g.isfinite().all()
        assert torch.equal(g[0], torch.zeros_like(g[0]))
    # padded keys of the other batch row get no gradient either
    assert torch.equal(dk[1][:, ~mask[1]], torch.zeros_like(dk[1][:, ~mask[1]]))
    assert torch.equal(dv[1][:, ~mask[1]], torch.zeros_like(dv[1][:, ~mask[1]]))


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("causal,alibi", ((True, False), (False, True)), ids=("causal", "full-alibi"))
def test_varlen(dtype, causal, alibi):
    lengths, Hq, Hkv, D = (1, 9, 20), 4, 2, 32
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    T = sum(lengths)
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(T, H, D, generator=g).to(DEVICE, dtype) for H in (Hq, Hkv, Hkv))
    dout = torch.randn(T, Hq, D, generator=g).to(DEVICE, dtype)
    kw = dict(causal=causal, alibi_slopes=_slopes(Hq) if alibi else None)
    out, lse, grads = _run(q, k, v, dout, cu_seqlens=cu_seqlens, max_seqlen=max(lengths), **kw)
    assert out.shape == (T, Hq, D) and lse.shape == (Hq, T)
    # max_seqlen is optional
    torch.testing.assert_close(flash_attention_fwd_triton(q, k, v, cu_seqlens=cu_seqlens, **kw)[0], out, atol=0, rtol=0)

    def reference(*t):
        return ref.flash_attention_varlen(*t, cu_seqlens, **kw)

    if dtype == torch.float32:
        want_out, want_grads = _grads(reference, (q, k, v), dout)
        torch.testing.assert_close(out, want_out, atol=2e-5, rtol=0)
        torch.testing.assert_close(lse, reference(q, k, v)[1], atol=2e-5, rtol=0)
        for got, want in zip(grads, want_grads):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    else:
        exact_out, exact_grads = _grads(reference, [t.double() for t in (q, k, v)], dout.double())
        lowp_out, lowp_grads = _grads(lambda *t: _per_sequence(lambda *s, **a: _attention_in(dtype, *s, **a), *t,
                                                               cu_seqlens, **kw), (q, k, v), dout)
        _assert_honest(out, lowp_out, exact_out, "out")
        for got, lowp, exact, what in zip(grads, lowp_grads, exact_grads, ("dq", "dk", "dv")):
            _assert_honest(got, lowp, exact, what)


@pytest.mark.parametrize("num_splits", (None, 3), ids=("auto", "3splits"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("seq_q", (1, 3))
def test_decode(seq_q, dtype, num_splits):
    B, Hq, Hkv, Sk, D = 2, 4, 2, 70, 80
    q, k, v = _qkv(B, Hq, Hkv, seq_q, Sk, D, dtype, transposed=True)
    mask = _padding(B, Sk)
    mask[0, :5] = True  # batch row 0 keeps 5 keys: the later splits hold none of them
    kw = dict(alibi_slopes=_slopes(Hq), key_padding_mask=mask)
    out, lse = flash_decode_triton(q, k, v, num_splits=num_splits, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    want_out, want_lse = ref.flash_attention(q, k, v, True, **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(out, want_out, atol=2e-5, rtol=0)
    else:
        exact = ref.flash_attention(q.double(), k.double(), v.double(), True, **kw)[0]
        _assert_honest(out, _attention_in(dtype, q, k, v, True, **kw), exact, "out")
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=0)


def test_decode_no_visible_key():
    q, k, v = _qkv(2, 2, 1, 3, 40, 32, torch.float32)
    mask = _padding(2, 40)
    out, lse = flash_decode_triton(q, k, v, key_padding_mask=mask, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and lse[0].isneginf().all()
    torch.testing.assert_close(out[1], ref.flash_attention(q, k, v, True, key_padding_mask=mask)[0][1],
                               atol=2e-5, rtol=0)


def test_rejects_bad_inputs():
    q, k, v = _qkv(1, 3, 2, 8, 8, 32, torch.float32)
    with pytest.raises(ValueError, match="multiple"):
        flash_attention_fwd_triton(q, k, v)
    q, k, v = _qkv(1, 2, 2, 8, 8, 512, torch.float32)
    with pytest.raises(ValueError, match="head dim"):
        flash_attention_fwd_triton(q, k, v)


# Real sizes, GPU only: the reference materializes [B, H, S, S] fp32 scores (a few GiB).


def _gpu_check(B, Hq, Hkv, S, D, causal=True, padding=False, alibi=False):
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, torch.bfloat16, transposed=True)
    dout = torch.randn(B, Hq, S, D, device=DEVICE, dtype=torch.bfloat16)
    kw = dict(causal=causal, alibi_slopes=_slopes(Hq) if alibi else None,
              key_padding_mask=_padding(B, S) if padding else None)
    out, lse, grads = _run(q, k, v, dout, **kw)
    exact_out, exact_grads = _grads(lambda *t: ref.flash_attention(*t, **kw), [t.float() for t in (q, k, v)],
                                    dout.float())
    exact_lse = ref.flash_attention(q.float(), k.float(), v.float(), **kw)[1]
    torch.testing.assert_close(lse, exact_lse, atol=1e-3, rtol=0)
    lowp_out, lowp_grads = _grads(lambda *t: _attention_in(torch.bfloat16, *t, **kw), (q, k, v), dout)
    _assert_honest(out, lowp_out, exact_out, "out")
    for got, lowp, exact, what in zip(grads, lowp_grads, exact_grads, ("dq", "dk", "dv")):
        _assert_honest(got, lowp, exact, what)


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
@needs_gpu
def test_gpu_llama_size(causal):
    _gpu_check(1, 32, 8, 2048, 128, causal=causal)


@pytest.mark.parametrize("D", (64, 80, 96, 128, 256))
@needs_gpu
def test_gpu_head_dims(D):
    _gpu_check(2, 8, 2, 640, D, padding=True, alibi=True)


@needs_gpu
def test_gpu_decode_long_cache():
    q, k, v = _qkv(4, 32, 8, 4, 8192, 128, torch.bfloat16, transposed=True)
    out, lse = flash_decode_triton(q, k, v)
    exact_out, exact_lse = ref.flash_attention(q.float(), k.float(), v.float(), True)
    _assert_honest(out, _attention_in(torch.bfloat16, q, k, v, True), exact_out, "out")
    torch.testing.assert_close(lse, exact_lse, atol=1e-3, rtol=0)
