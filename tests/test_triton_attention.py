"""Triton flash attention (forward, backward, varlen) and flash-decoding vs `reference.attention`.

fp32 is compared tightly against the reference. fp16 / bf16 get the honest tolerance: the
kernel's error against an fp64 reference may be at most twice the error of the same math
done in the low dtype (plus a small eps), the usual FlashAttention test criterion.
"""

import os

import numpy as np
import pytest
import torch

# Without a GPU the kernels run in Triton's interpreter, which must be chosen before
# triton (and any @triton.jit) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qlora_kernels.reference import attention as ref  # noqa: E402
from qlora_kernels.triton import _common, flash_attention  # noqa: E402
from qlora_kernels.triton.flash_attention import flash_attention_bwd_triton, flash_attention_fwd_triton  # noqa: E402
from qlora_kernels.triton.flash_decode import flash_decode_triton  # noqa: E402

from helpers import attention_in_dtype  # noqa: E402

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


def _per_sequence(attention, q, k, v, cu_seqlens, cu_seqlens_k=None, **kw):
    """Varlen [T, H, D] through a dense [1, H, S, D] attention, sequence by sequence."""
    bounds = cu_seqlens.tolist()
    bounds_k = bounds if cu_seqlens_k is None else cu_seqlens_k.tolist()
    outs = []
    for start, end, start_k, end_k in zip(bounds[:-1], bounds[1:], bounds_k[:-1], bounds_k[1:]):
        def seq(t, a, b):
            return t[a:b].transpose(0, 1).unsqueeze(0)

        out = attention(seq(q, start, end), seq(k, start_k, end_k), seq(v, start_k, end_k), **kw)
        outs.append((out[0] if isinstance(out, tuple) else out)[0].transpose(0, 1))
    return torch.cat(outs)


def _grads(fn, inputs, dout, dlse=None):
    """fn's first output (and, with dlse, its lse too) and the gradients of the inputs."""
    leaves = [t.detach().requires_grad_() for t in inputs]
    out = fn(*leaves)
    outs, grads = (out[:2], (dout, dlse)) if dlse is not None else (out[:1] if isinstance(out, tuple) else (out,),
                                                                     (dout,))
    grads = [g.to(o.dtype) for o, g in zip(outs, grads)]
    return outs[0], torch.autograd.grad(outs, leaves, grads)


def _max_err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _assert_honest(got, lowp, exact, what, eps=1e-4):
    err, base = _max_err(got, exact), _max_err(lowp, exact)
    assert err <= 2 * base + eps, f"{what}: kernel error {err:.3g} > 2 x {base:.3g} (low-precision math) + {eps}"


def _run(q, k, v, dout, dlse=None, **kw):
    """Kernel forward and backward: (out, lse, (dq, dk, dv, dsinks))."""
    out, lse = flash_attention_fwd_triton(q, k, v, **kw)
    return out, lse, flash_attention_bwd_triton(dout, q, k, v, out, lse, dlse=dlse, **kw)


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
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads[:3]) and grads[3] is None
    exact_out, exact_grads = _grads(lambda *t: ref.flash_attention(*t, **kw), [t.double() for t in (q, k, v)],
                                    dout.double())
    lowp_out, lowp_grads = _grads(lambda *t: attention_in_dtype(dtype, *t, **kw), (q, k, v), dout)
    _assert_honest(out, lowp_out, exact_out, "out")
    for got, lowp, exact, what in zip(grads, lowp_grads, exact_grads, ("dq", "dk", "dv")):
        _assert_honest(got, lowp, exact, what)


@pytest.mark.parametrize("causal", (True, False), ids=("causal", "full"))
def test_fully_padded_row_is_zero_not_nan(causal):
    B, H, S, D = 2, 2, 20, 32
    q, k, v = _qkv(B, H, H, S, S, D, torch.bfloat16)
    mask = _padding(B, S)
    dout = torch.randn(B, H, S, D, device=DEVICE, dtype=torch.bfloat16)
    out, lse, (dq, dk, dv, _) = _run(q, k, v, dout, causal=causal, key_padding_mask=mask)
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
        lowp_out, lowp_grads = _grads(lambda *t: _per_sequence(lambda *s, **a: attention_in_dtype(dtype, *s, **a), *t,
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
        _assert_honest(out, attention_in_dtype(dtype, q, k, v, True, **kw), exact, "out")
    torch.testing.assert_close(lse, want_lse, atol=2e-5, rtol=0)


def test_decode_no_visible_key():
    q, k, v = _qkv(2, 2, 1, 3, 40, 32, torch.float32)
    mask = _padding(2, 40)
    out, lse = flash_decode_triton(q, k, v, key_padding_mask=mask, num_splits=2)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and lse[0].isneginf().all()
    torch.testing.assert_close(out[1], ref.flash_attention(q, k, v, True, key_padding_mask=mask)[0][1],
                               atol=2e-5, rtol=0)


def _sinks(Hq, seed=4):
    return (2 * torch.randn(Hq, generator=torch.Generator().manual_seed(seed))).to(DEVICE)


def _ref_kw(kw):
    """The kernel launcher's keyword arguments as the reference names them."""
    kw = dict(kw)
    kw["window_size"] = (kw.pop("window_left", -1), kw.pop("window_right", -1))
    return kw


# (B, Hq, Hkv, Sq, Sk, D, kernel keyword arguments, with a gradient into lse)
FEATURES = {
    "window-causal": (1, 2, 2, 48, 48, 32, dict(window_left=5), False),
    "window-left-full": (1, 2, 1, 40, 50, 32, dict(causal=False, window_left=7), True),
    "window-right-full": (1, 2, 2, 40, 30, 32, dict(causal=False, window_right=4), False),
    "window-both-full": (2, 2, 2, 40, 50, 32, dict(causal=False, window_left=6, window_right=3), True),
    "window-0-0": (1, 2, 2, 20, 33, 16, dict(causal=False, window_left=0, window_right=0), False),
    # windows wider than a tile: blocks inside the window take the unmasked path
    "window-wide-causal": (1, 2, 2, 100, 100, 32, dict(window_left=55, softcap=2.0), True),
    "window-wide-full": (1, 2, 1, 90, 110, 32, dict(causal=False, window_left=50, window_right=45,
                                                   alibi_slopes="alibi"), False),
    "window-sq>sk": (1, 2, 2, 40, 24, 32, dict(window_left=3), True),  # rows that see no key
    "softcap": (1, 2, 2, 33, 33, 32, dict(softcap=1.5), False),
    "softcap-full-dlse": (1, 2, 1, 20, 37, 64, dict(causal=False, softcap=2.0), True),
    "sinks": (2, 4, 2, 30, 30, 32, dict(sinks="sinks"), False),
    "sinks-empty-rows-dlse": (2, 2, 2, 40, 24, 32, dict(sinks="sinks", key_padding_mask="padding"), True),
    "alibi-full": (1, 4, 2, 30, 45, 32, dict(causal=False, alibi_slopes="alibi"), False),
    "alibi-full-sq>sk": (1, 2, 2, 40, 24, 32, dict(causal=False, alibi_slopes="alibi"), True),
    "dlse": (1, 2, 2, 25, 40, 32, dict(), True),
    "all-causal-gqa": (2, 4, 2, 45, 45, 32, dict(window_left=9, softcap=3.0, sinks="sinks", alibi_slopes="alibi",
                                                 key_padding_mask="padding"), True),
    "all-full-d80": (1, 4, 1, 30, 41, 80, dict(causal=False, window_left=8, window_right=5, softcap=2.5,
                                               sinks="sinks", alibi_slopes="alibi"), True),
}


def _feature_case(name, dtype, transposed=False):
    B, Hq, Hkv, Sq, Sk, D, kw, with_dlse = FEATURES[name]
    q, k, v = _qkv(B, Hq, Hkv, Sq, Sk, D, dtype, transposed)
    side = {"sinks": _sinks(Hq), "alibi": _slopes(Hq), "padding": _padding(B, Sk)}
    kw = {key: side[value] if isinstance(value, str) else value for key, value in kw.items()}
    g = torch.Generator().manual_seed(1)
    dout = torch.randn(B, Hq, Sq, D, generator=g).to(DEVICE, dtype)
    dlse = torch.randn(B, Hq, Sq, generator=g).to(DEVICE) if with_dlse else None
    return q, k, v, dout, dlse, kw


def _exact(q, k, v, dout, dlse, kw):
    """fp64 reference: out, lse and the gradients of q, k, v (and sinks)."""
    inputs = [t.double() for t in (q, k, v)] + ([kw["sinks"].double()] if "sinks" in kw else [])

    def attention(q, k, v, *sinks):
        return ref.flash_attention(q, k, v, **dict(_ref_kw(kw), sinks=sinks[0] if sinks else None))

    out, grads = _grads(attention, inputs, dout.double(), None if dlse is None else dlse.double())
    return out, attention(*inputs)[1], grads


def _check_lse(lse, want, atol):
    assert torch.equal(lse.isneginf(), want.isneginf())
    torch.testing.assert_close(lse.double().nan_to_num(neginf=0.0), want.nan_to_num(neginf=0.0), atol=atol, rtol=0)


@pytest.mark.parametrize("name", list(FEATURES))
def test_features_fp32_match_fp64_reference(name):
    q, k, v, dout, dlse, kw = _feature_case(name, torch.float32, transposed=name.startswith("all"))
    out, lse, (dq, dk, dv, dsinks) = _run(q, k, v, dout, dlse, **kw)
    want_out, want_lse, want_grads = _exact(q, k, v, dout, dlse, kw)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    _check_lse(lse, want_lse, 2e-5)
    for got, want, what in zip((dq, dk, dv, dsinks), want_grads, ("dq", "dk", "dv", "dsinks")):
        assert got.dtype == torch.float32, what
        torch.testing.assert_close(got.double(), want, atol=1e-4, rtol=1e-4, msg=what)
    assert (dsinks is None) == ("sinks" not in kw)


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("name", ("window-both-full", "softcap-full-dlse", "sinks-empty-rows-dlse", "all-causal-gqa",
                                  "all-full-d80"))
def test_features_half_honest_tolerance(name, dtype):
    q, k, v, dout, dlse, kw = _feature_case(name, dtype)
    out, lse, (dq, dk, dv, dsinks) = _run(q, k, v, dout, dlse, **kw)
    assert out.dtype == dtype and dq.dtype == dk.dtype == dv.dtype == dtype
    exact_out, exact_lse, exact_grads = _exact(q, k, v, dout, dlse, kw)
    _check_lse(lse, exact_lse, 1e-3)
    sinks = [kw["sinks"]] if "sinks" in kw else []
    rest = {key: value for key, value in _ref_kw(kw).items() if key != "sinks"}

    def lowp(q, k, v, *sinks):
        out = attention_in_dtype(dtype, q, k, v, sinks=sinks[0] if sinks else None, **rest)
        # the baseline's lse: the reference's, which has the same gradient path for dlse
        return out, ref.flash_attention(q, k, v, sinks=sinks[0] if sinks else None, **rest)[1]

    lowp_out, lowp_grads = _grads(lowp, [q, k, v, *sinks], dout, dlse)
    _assert_honest(out, lowp_out, exact_out, "out")
    for got, low, exact, what in zip((dq, dk, dv, dsinks), lowp_grads, exact_grads, ("dq", "dk", "dv", "dsinks")):
        _assert_honest(got, low, exact, what)


def test_rows_without_keys_give_the_sink():
    # Sq > Sk under the causal mask: the first rows see no key; with key padding, batch row 0 sees none
    q, k, v, dout, dlse, kw = _feature_case("sinks-empty-rows-dlse", torch.float32)
    out, lse, grads = _run(q, k, v, dout, dlse, **kw)
    sinks = kw["sinks"].view(1, -1, 1).expand_as(lse)
    empty = torch.zeros_like(lse, dtype=torch.bool)
    empty[0] = True
    empty[:, :, :16] = True
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[empty], sinks[empty])
    assert torch.equal(grads[0][empty], torch.zeros_like(grads[0][empty]))
    # dsinks is a sum done by torch over per-row terms: the same bits every run
    assert torch.equal(_run(q, k, v, dout, dlse, **kw)[2][3], grads[3])


def _offsets(lengths):
    return torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
@pytest.mark.parametrize("features", ("causal", "window-softcap-sinks-alibi-full"))
def test_varlen_keys_packed_apart(dtype, features):
    # per sequence Sq < Sk, Sq > Sk, no queries, no keys (its rows see nothing), Sq = Sk
    lengths_q, lengths_k = (3, 20, 0, 6, 9), (17, 7, 5, 0, 9)
    Hq, Hkv, D = 4, 2, 32
    cu_seqlens, cu_seqlens_k = _offsets(lengths_q), _offsets(lengths_k)
    g = torch.Generator().manual_seed(3)
    q = torch.randn(sum(lengths_q), Hq, D, generator=g).to(DEVICE, dtype)
    k, v = (torch.randn(sum(lengths_k), Hkv, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    dout = torch.randn(sum(lengths_q), Hq, D, generator=g).to(DEVICE, dtype)
    dlse = torch.randn(Hq, sum(lengths_q), generator=g).to(DEVICE)
    if features == "causal":
        kw = dict(causal=True)
    else:
        kw = dict(causal=False, window_left=4, window_right=2, softcap=2.0, sinks=_sinks(Hq), alibi_slopes=_slopes(Hq))
    varlen = dict(cu_seqlens=cu_seqlens, max_seqlen=max(lengths_q), cu_seqlens_k=cu_seqlens_k,
                  max_seqlen_k=max(lengths_k))
    out, lse, (dq, dk, dv, dsinks) = _run(q, k, v, dout, dlse, **varlen, **kw)
    assert out.shape == q.shape and lse.shape == (Hq, q.shape[0]) and dk.shape == k.shape
    # the longest lengths are optional
    no_max = dict(varlen, max_seqlen=None, max_seqlen_k=None)
    torch.testing.assert_close(flash_attention_fwd_triton(q, k, v, **no_max, **kw)[0], out, atol=0, rtol=0)

    rkw = _ref_kw(kw)
    sinks = [rkw.pop("sinks")] if "sinks" in rkw else []

    def reference(q, k, v, *sinks):
        return ref.flash_attention_varlen(q, k, v, cu_seqlens, cu_seqlens_k=cu_seqlens_k,
                                          sinks=sinks[0] if sinks else None, **rkw)

    exact_inputs = [t.double() for t in (q, k, v, *sinks)]
    exact_out, exact_grads = _grads(reference, exact_inputs, dout.double(), dlse.double())
    _check_lse(lse, reference(*exact_inputs)[1], 2e-5 if dtype == torch.float32 else 1e-3)
    got = (dq, dk, dv, dsinks)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact_out, atol=2e-5, rtol=0)
        for g_, want, what in zip(got, exact_grads, ("dq", "dk", "dv", "dsinks")):
            torch.testing.assert_close(g_.double(), want, atol=1e-4, rtol=1e-4, msg=what)
        return

    def lowp(q, k, v, *sinks):
        out = _per_sequence(lambda *s, **a: attention_in_dtype(dtype, *s, **a), q, k, v, cu_seqlens, cu_seqlens_k,
                            sinks=sinks[0] if sinks else None, **rkw)
        return out, reference(q, k, v, *sinks)[1]

    lowp_out, lowp_grads = _grads(lowp, [q, k, v, *sinks], dout, dlse)
    _assert_honest(out, lowp_out, exact_out, "out")
    for g_, low, exact, what in zip(got, lowp_grads, exact_grads, ("dq", "dk", "dv", "dsinks")):
        _assert_honest(g_, low, exact, what)


def _recorded_tiles(monkeypatch, run):
    """Every score tile the kernels compute while `run()` runs, as (kind, first query
    position, first key, masked): forward and dQ tiles are [queries, keys], dK/dV's
    [keys, queries]."""
    seen = []
    scores = _common._scores

    def record(qk, pos_q, pos_k, *args):
        positions, keys = (np.asarray(t.handle.data) for t in (pos_q, pos_k))
        kind = "dkdv" if keys.shape[1] == 1 else "fwd/dq"
        seen.append((kind, int(positions.min()), int(keys.min()), bool(args[-6])))  # args[-6]: MASK
        return scores(qk, pos_q, pos_k, *args)

    # the forward's loop lives in _common, the backward's in flash_attention: each calls its module's name
    for module in (_common, flash_attention):
        monkeypatch.setattr(module, "_scores", record)
    run()
    monkeypatch.undo()
    return seen


def _tiles_with_visible_keys(keep, block_m, block_n, keys_must_exist):
    """(visited, unmasked): the (first row, first key) of the tiles holding a visible key, and
    of those every valid row sees entirely (keys_must_exist: whole key blocks only)."""
    Sq, Sk = keep.shape
    visited, unmasked = set(), set()
    for m in range(0, Sq, block_m):
        for n in range(0, Sk, block_n):
            tile = keep[m:m + block_m, n:n + block_n]
            if tile.any():
                visited.add((m, n))
            if tile.all() and (n + block_n <= Sk or not keys_must_exist):
                unmasked.add((m, n))
    return visited, unmasked


SKIPPING = {
    "causal": (70, 70, dict()),
    "window-causal": (200, 200, dict(window_left=10)),
    "window-full": (60, 90, dict(causal=False, window_left=7, window_right=3)),
    "window-sq>sk": (80, 50, dict(window_left=12)),
    "window-right-full": (50, 70, dict(causal=False, window_right=5)),
    "full": (40, 50, dict(causal=False)),
    "window-wide-causal": (130, 130, dict(window_left=60)),
    "window-wide-full": (100, 120, dict(causal=False, window_left=50, window_right=40)),
}


@pytest.mark.skipif(torch.cuda.is_available(), reason="reads the tiles Triton's interpreter computes")
@pytest.mark.parametrize("name", list(SKIPPING))
def test_only_tiles_with_visible_keys_are_computed(name, monkeypatch):
    # Work outside the window is skipped, not masked: each kernel computes exactly the tiles
    # that hold a key some row sees, and masks only those that some row does not see entirely.
    Sq, Sk, kw = SKIPPING[name]
    q, k, v = _qkv(1, 1, 1, Sq, Sk, 16, torch.float32)
    keep = ref.keep_mask(Sq, Sk, kw.get("causal", True), (kw.get("window_left", -1), kw.get("window_right", -1)))
    out, lse = flash_attention_fwd_triton(q, k, v, **kw)
    fwd = _recorded_tiles(monkeypatch, lambda: flash_attention_fwd_triton(q, k, v, **kw))
    bwd = _recorded_tiles(monkeypatch, lambda: flash_attention_bwd_triton(torch.ones_like(q), q, k, v, out, lse, **kw))
    configs = flash_attention._INTERPRETER_CONFIGS
    for kind, tiles, cfg, transposed in (("fwd", fwd, configs["fwd"], False),
                                         ("dq", [t for t in bwd if t[0] == "fwd/dq"], configs["dq"], False),
                                         ("dkdv", [t for t in bwd if t[0] == "dkdv"], configs["dkdv"], True)):
        got = [(pos - (Sk - Sq), key, masked) for _, pos, key, masked in tiles]
        assert len(set(got)) == len(got), f"{kind}: a tile computed twice"
        visited, unmasked = _tiles_with_visible_keys(keep, cfg.BLOCK_M, cfg.BLOCK_N, keys_must_exist=not transposed)
        assert {(m, n) for m, n, _ in got} == visited, kind
        assert {(m, n) for m, n, masked in got if not masked} == unmasked, kind
        assert unmasked or "wide" not in name, f"{kind}: no tile inside the window to test the unmasked path with"
    if name == "window-causal":  # 11 keys of 200: tiles grow with S·W, not the S² / 2 of causal
        causal = _tiles_with_visible_keys(ref.keep_mask(Sq, Sk, True), configs["fwd"].BLOCK_M, configs["fwd"].BLOCK_N,
                                          True)[0]
        assert len(fwd) <= len(causal) // 2


# Real sizes, GPU only: the reference materializes [B, H, S, S] fp32 scores (a few GiB).


def _gpu_check(B, Hq, Hkv, S, D, causal=True, padding=False, alibi=False, **features):
    """features: the launcher's window_left, window_right, softcap, sinks."""
    q, k, v = _qkv(B, Hq, Hkv, S, S, D, torch.bfloat16, transposed=True)
    dout = torch.randn(B, Hq, S, D, device=DEVICE, dtype=torch.bfloat16)
    kw = dict(causal=causal, alibi_slopes=_slopes(Hq) if alibi else None,
              key_padding_mask=_padding(B, S) if padding else None)
    out, lse, grads = _run(q, k, v, dout, **kw, **features)
    kw = _ref_kw(dict(kw, **features))
    exact_out, exact_grads = _grads(lambda *t: ref.flash_attention(*t, **kw), [t.float() for t in (q, k, v)],
                                    dout.float())
    exact_lse = ref.flash_attention(q.float(), k.float(), v.float(), **kw)[1]
    torch.testing.assert_close(lse, exact_lse, atol=1e-3, rtol=0)
    lowp_out, lowp_grads = _grads(lambda *t: attention_in_dtype(torch.bfloat16, *t, **kw), (q, k, v), dout)
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


@pytest.mark.parametrize("D", (64, 128, 256))
@needs_gpu
def test_gpu_window_softcap_sinks(D):
    # Mistral / Gemma 2 style: a 512-key window, softcap, sinks, over 2048 tokens
    _gpu_check(1, 8, 2, 2048, D, alibi=True, window_left=511, softcap=30.0, sinks=_sinks(8))


@needs_gpu
def test_gpu_decode_long_cache():
    q, k, v = _qkv(4, 32, 8, 4, 8192, 128, torch.bfloat16, transposed=True)
    out, lse = flash_decode_triton(q, k, v)
    exact_out, exact_lse = ref.flash_attention(q.float(), k.float(), v.float(), True)
    _assert_honest(out, attention_in_dtype(torch.bfloat16, q, k, v, True), exact_out, "out")
    torch.testing.assert_close(lse, exact_lse, atol=1e-3, rtol=0)
