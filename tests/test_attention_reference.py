"""reference/attention.py against plain definitions, and the op's one validator (ops.attention.check_args).

The reference is what every kernel is tested against, so it is tested here against what the
field computes: eager softmax attention with an explicit mask (transformers' eager path),
Gemma 2's softcap, gpt-oss's sinks, flash-attn's window and symmetric ALiBi; its written-out
backward against autograd through its forward (fp64).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels.ops import attention as ops
from qlora_kernels.reference import attention as ref


def _qkv(B=2, Hq=4, Hkv=2, Sq=7, Sk=9, D=8, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(*shape, generator=g, dtype=dtype)
                 for shape in ((B, Hq, Sq, D), (B, Hkv, Sk, D), (B, Hkv, Sk, D)))


def _eager(q, k, v, allowed, scale, softcap=0.0, bias=None, sinks=None):
    """transformers' eager attention: repeat kv, scores, softcap, additive mask, sinks column."""
    group = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)
    s = q @ k.transpose(-1, -2) * scale
    if softcap:
        s = torch.tanh(s / softcap) * softcap
    if bias is not None:
        s = s + bias
    s = s.masked_fill(~allowed, -math.inf)
    if sinks is not None:
        s = torch.cat([s, sinks.view(1, -1, 1, 1).expand(*s.shape[:3], 1)], -1)
    p = torch.softmax(s, -1)[..., :k.shape[2]].nan_to_num(0.0)
    return p @ v


def _allowed(Sq, Sk, causal, left, right):
    i = torch.arange(Sq)[:, None] + Sk - Sq
    j = torch.arange(Sk)[None, :]
    ok = torch.ones(Sq, Sk, dtype=torch.bool)
    if causal:
        ok &= j <= i
    if left >= 0:
        ok &= j >= i - left
    if right >= 0:
        ok &= j <= i + right
    return ok


@pytest.mark.parametrize("causal,window", [(True, (-1, -1)), (True, (3, 0)), (False, (2, 1)), (False, (-1, 2)),
                                           (True, (0, -1))])
def test_window_matches_explicit_mask(causal, window):
    q, k, v = _qkv()
    out, _ = ref.flash_attention(q, k, v, causal, 0.3, window_size=window)
    want = _eager(q, k, v, _allowed(7, 9, causal, *window), 0.3)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)


def test_softcap_and_sinks_match_eager():
    q, k, v = _qkv()
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], dtype=torch.float64)
    out, lse = ref.flash_attention(q, k, v, True, 0.5, softcap=2.0, sinks=sinks)
    want = _eager(q, k, v, _allowed(7, 9, True, -1, -1), 0.5, softcap=2.0, sinks=sinks)
    torch.testing.assert_close(out, want, rtol=1e-12, atol=1e-12)
    # lse counts the sink: exp(sink - lse) is the probability mass the sink took
    s = torch.tanh(q @ k.repeat_interleave(2, 1).transpose(-1, -2) * 0.5 / 2.0) * 2.0
    s = s.masked_fill(~_allowed(7, 9, True, -1, -1), -math.inf)
    want_lse = torch.logaddexp(torch.logsumexp(s, -1), sinks.view(1, -1, 1))
    torch.testing.assert_close(lse, want_lse, rtol=1e-12, atol=1e-12)


def test_alibi_is_symmetric_without_causal_and_bloom_with_it():
    q, k, v = _qkv()
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625], dtype=torch.float64)
    i = torch.arange(7)[:, None] + 2
    j = torch.arange(9)[None, :]
    bias = -slopes.view(1, -1, 1, 1) * (j - i).abs()
    out, _ = ref.flash_attention(q, k, v, False, 0.3, slopes)
    torch.testing.assert_close(out, _eager(q, k, v, _allowed(7, 9, False, -1, -1), 0.3, bias=bias))
    bloom = slopes.view(1, -1, 1, 1) * j  # Bloom adds slope * key position to every row
    out, _ = ref.flash_attention(q, k, v, True, 0.3, slopes)
    torch.testing.assert_close(out, _eager(q, k, v, _allowed(7, 9, True, -1, -1), 0.3, bias=bloom))


def test_row_with_no_key():
    q, k, v = _qkv(Sq=3, Sk=3)
    sinks = torch.zeros(4, dtype=torch.float64)
    mask = torch.tensor([[False, False, True], [True, True, True]])
    out, lse = ref.flash_attention(q, k, v, True, 0.3, key_padding_mask=mask, sinks=sinks)
    assert out[0, :, :2].abs().max() == 0 and torch.equal(lse[0, :, :2], torch.zeros(4, 2, dtype=torch.float64))
    out, lse = ref.flash_attention(q, k, v, True, 0.3, key_padding_mask=mask)
    assert out[0, :, :2].abs().max() == 0 and torch.isinf(lse[0, :, :2]).all()


@pytest.mark.parametrize("features", [
    dict(),
    dict(window_size=(2, -1)),
    dict(window_size=(1, 2), causal=False),
    dict(softcap=1.5),
    dict(sinks=True),
    dict(softcap=3.0, sinks=True, window_size=(3, 0), alibi=True),
    dict(alibi=True, causal=False),
])
@pytest.mark.parametrize("with_dlse", [False, True])
def test_written_out_backward_is_autograd(features, with_dlse):
    q, k, v = _qkv()
    features = dict(features)
    causal = features.pop("causal", True)
    alibi = torch.tensor([0.5, 0.25, 0.1, 0.05], dtype=torch.float64) if features.pop("alibi", False) else None
    sinks = torch.tensor([0.3, -0.2, 1.0, 0.1], dtype=torch.float64) if features.pop("sinks", False) else None
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[0, :3] = False
    leaves = [t.clone().requires_grad_() for t in (q, k, v)] + ([sinks.clone().requires_grad_()] if sinks is not None
                                                                 else [])
    out, lse = ref.flash_attention(*leaves[:3], causal, 0.4, alibi, mask, sinks=leaves[3] if sinks is not None else None,
                                   **features)
    dout, dlse = torch.randn_like(out), torch.randn_like(lse) if with_dlse else None
    loss = (out * dout).sum() + ((torch.where(torch.isfinite(lse), lse, 0) * dlse).sum() if with_dlse else 0)
    want = torch.autograd.grad(loss, leaves)
    got = ref.flash_attention_backward(dout, q, k, v, causal, 0.4, alibi, mask, sinks=sinks, dlse=dlse, **features)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-10)
    assert (got[3] is None) == (sinks is None)


def test_varlen_with_keys_packed_apart():
    # two sequences: 3 queries over 5 keys, 2 queries over 2 keys (decode over a packed cache)
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(n, h, 8, generator=g, dtype=torch.float64) for n, h in ((5, 4), (7, 2), (7, 2)))
    cu_q, cu_k = torch.tensor([0, 3, 5], dtype=torch.int32), torch.tensor([0, 5, 7], dtype=torch.int32)
    sinks = torch.tensor([0.1, 0.2, 0.3, 0.4], dtype=torch.float64)
    out, lse = ref.flash_attention_varlen(q, k, v, cu_q, True, 0.3, cu_seqlens_k=cu_k, window_size=(2, -1), sinks=sinks)
    for (q0, q1), (k0, k1) in (((0, 3), (0, 5)), ((3, 5), (5, 7))):
        def seq(t, a, b):
            return t[a:b].transpose(0, 1)[None]
        want, want_lse = ref.flash_attention(seq(q, q0, q1), seq(k, k0, k1), seq(v, k0, k1), True, 0.3,
                                             window_size=(2, -1), sinks=sinks)
        torch.testing.assert_close(out[q0:q1], want[0].transpose(0, 1))
        torch.testing.assert_close(lse[:, q0:q1], want_lse[0])
    leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
    o, l = ref.flash_attention_varlen(*leaves[:3], cu_q, True, 0.3, cu_seqlens_k=cu_k, window_size=(2, -1),
                                      sinks=leaves[3])
    dout, dlse = torch.randn_like(o), torch.randn_like(l)
    want = torch.autograd.grad((o * dout).sum() + (l * dlse).sum(), leaves)
    got = ref.flash_attention_varlen_backward(dout, q, k, v, cu_q, True, 0.3, cu_seqlens_k=cu_k, window_size=(2, -1),
                                              sinks=sinks, dlse=dlse)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)


# --- the public function and the op's validator ------------------------------------------------

def test_public_function_features_and_lse_gradient():
    q, k, v = (t.float().requires_grad_() for t in _qkv())
    sinks = torch.tensor([0.3, -0.2, 1.0, 0.1], requires_grad=True)
    out, lse = qk.flash_attention(q, k, v, window_size=(3, 0), softcap=2.0, sinks=sinks, return_lse=True)
    want, want_lse = ref.flash_attention(q, k, v, True, None, window_size=(3, 0), softcap=2.0, sinks=sinks)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(out.sum() + lse.sum(), (q, k, v, sinks))
    wanted = torch.autograd.grad(want.sum() + want_lse.sum(), (q, k, v, sinks))
    for g, w in zip(got, wanted):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_dropout_falls_back_to_sdpa_once_or_raises_when_strict():
    q, k, v = (t.float() for t in _qkv())
    qk.attention._WARNED.clear()
    with pytest.warns(UserWarning, match="dropout") as record:
        torch.manual_seed(0)
        out = qk.flash_attention(q, k, v, dropout_p=0.5, window_size=(2, 0))
        qk.flash_attention(q, k, v, dropout_p=0.5)
    assert len([w for w in record if "dropout" in str(w.message)]) == 1
    torch.manual_seed(0)
    want = qk.attention._sdpa(q, k, v, True, 1 / math.sqrt(8), None, None, (2, 0), 0.5)
    torch.testing.assert_close(out, want)
    assert not torch.allclose(out, ref.flash_attention(q, k, v, True, window_size=(2, 0))[0])
    with pytest.raises(NotImplementedError, match="strict"):
        qk.flash_attention(q, k, v, dropout_p=0.5, strict=True)
    with pytest.raises(NotImplementedError, match="softcap"):
        qk.flash_attention(q, k, v, dropout_p=0.5, softcap=2.0)
    with pytest.raises(TypeError):
        qk.flash_attention(q, k, v, unknown_flag=True)


def test_sdpa_fallback_matches_reference_without_dropout():
    q, k, v = (t.float() for t in _qkv())
    slopes = torch.tensor([0.5, 0.25, 0.1, 0.05])
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, :8] = False
    got = qk.attention._sdpa(q, k, v, False, 0.3, slopes, mask, (2, 1), 0.0)
    want, _ = ref.flash_attention(q, k, v, False, 0.3, slopes, mask, window_size=(2, 1))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _op_args(**over):
    q, k, v = (t.float() for t in _qkv())
    args = dict(q=q, k=k, v=v, causal=True, softmax_scale=0.3, alibi_slopes=None, key_padding_mask=None,
                cu_seqlens=None, max_seqlen=0, cu_seqlens_k=None, max_seqlen_k=0, window_left=-1, window_right=-1,
                softcap=0.0, sinks=None)
    args.update(over)
    return args


def _varlen_args(**over):
    g = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(n, h, 8, generator=g) for n, h in ((6, 4), (6, 2), (6, 2)))
    args = dict(q=q, k=k, v=v, cu_seqlens=torch.tensor([0, 2, 6], dtype=torch.int32), max_seqlen=4)
    args.update(over)
    return _op_args(**args)


BAD_ARGS = [
    ("float key_padding_mask", _op_args(key_padding_mask=torch.zeros(2, 9)), "must be bool"),
    ("mask shape", _op_args(key_padding_mask=torch.ones(2, 7, dtype=torch.bool)), r"\[2, 9\]"),
    ("sinks shape", _op_args(sinks=torch.zeros(2)), "sinks"),
    ("sinks int", _op_args(sinks=torch.zeros(4, dtype=torch.int64)), "floating"),
    ("alibi shape", _op_args(alibi_slopes=torch.zeros(3)), "alibi_slopes"),
    ("window", _op_args(window_left=-2), r"window_size\[0\]"),
    ("softcap", _op_args(softcap=-1.0), "softcap"),
    ("softcap inf", _op_args(softcap=math.inf), "softcap"),
    ("scale nan", _op_args(softmax_scale=math.nan), "softmax_scale"),
    ("cu_seqlens_k alone", _op_args(cu_seqlens_k=torch.tensor([0, 9], dtype=torch.int32)), "needs cu_seqlens"),
    ("int64 offsets", _varlen_args(cu_seqlens=torch.tensor([0, 2, 6])), "int32"),
    ("short offsets", _varlen_args(cu_seqlens=torch.tensor([0], dtype=torch.int32)), "at least 2 offsets"),
    ("decreasing", _varlen_args(cu_seqlens=torch.tensor([0, 5, 4, 6], dtype=torch.int32)), "never decrease"),
    ("not ending at T", _varlen_args(cu_seqlens=torch.tensor([0, 2, 5], dtype=torch.int32)), "end at the 6"),
    ("max_seqlen short", _varlen_args(max_seqlen=3), "max_seqlen=3"),
    ("k offsets count", _varlen_args(cu_seqlens_k=torch.tensor([0, 6], dtype=torch.int32), max_seqlen_k=6),
     "same number"),
    ("max_seqlen_k short", _varlen_args(cu_seqlens_k=torch.tensor([0, 1, 6], dtype=torch.int32), max_seqlen_k=2),
     "max_seqlen_k=2"),
    ("padding with varlen", _varlen_args(key_padding_mask=torch.ones(6, 2, dtype=torch.bool)), "exclusive"),
]


@pytest.mark.parametrize("args,match", [a[1:] for a in BAD_ARGS], ids=[a[0] for a in BAD_ARGS])
def test_validator_refuses_in_the_op_and_its_fake(args, match):
    with pytest.raises(ValueError, match=match):
        ops.check_args(**args)
    with pytest.raises(ValueError, match=match):  # a direct call of the op (the CPU backend)
        torch.ops.qlora_kernels.flash_attention_fwd(*args.values())
    if "offsets" in match or "decrease" in match or "end at" in match or "max_seqlen" in match:
        return  # values: not in a fake tensor
    with torch._subclasses.FakeTensorMode(allow_non_fake_inputs=True):
        with pytest.raises(ValueError, match=match):
            torch.ops.qlora_kernels.flash_attention_fwd(*args.values())


def test_meta_device_runs_the_fake_path():
    q = torch.empty(2, 4, 16, 8, device="meta", requires_grad=True)
    k = torch.empty(2, 2, 16, 8, device="meta")
    sinks = torch.empty(4, device="meta", requires_grad=True)
    mask = torch.ones(2, 16, dtype=torch.bool, device="meta")
    out, lse = qk.flash_attention(q, k, k, window_size=(4, 0), softcap=5.0, sinks=sinks, key_padding_mask=mask,
                                  return_lse=True)
    assert out.device.type == "meta" and out.shape == q.shape and lse.shape == (2, 4, 16)
    dq, dsinks = torch.autograd.grad(out.sum() + lse.sum(), (q, sinks))
    assert dq.shape == q.shape and dsinks.shape == (4,)
    with pytest.raises(ValueError, match="on meta"):
        qk.flash_attention(q, k, k, key_padding_mask=torch.ones(2, 16, dtype=torch.bool))


def test_no_warning_on_the_kernel_path():
    q, k, v = (t.float() for t in _qkv())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        qk.flash_attention(q, k, v, window_size=(2, 0), softcap=1.0, deterministic=True)


def test_patched_model_on_the_meta_device():
    """Shape inference of a patched model (e.g. under accelerate's init_empty_weights) runs the
    fake path, packed position_ids included (they have no values to read on meta)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    with torch.device("meta"):
        model = LlamaForCausalLM(config)
    qk.patch(model)
    ids = torch.zeros(1, 10, dtype=torch.long, device="meta")
    position_ids = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0, 1, 2]]).to("meta")
    assert model(ids, position_ids=position_ids).logits.shape == (1, 10, 64)
    assert model(ids).logits.shape == (1, 10, 64)
