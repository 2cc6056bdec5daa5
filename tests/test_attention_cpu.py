"""CPU flash attention kernels (csrc/attention_cpu.cpp) against reference/attention.py.

fp32 is checked tightly against an fp64 reference; fp16 / bf16 must stay within twice the error
of the reference itself run in that dtype (both measured against fp64 on the same rounded inputs).
Gradients come from the reference's written-out backward (tested against autograd in
test_attention_reference.py), which also covers dsinks and a gradient into lse.
"""

from __future__ import annotations

import math

import pytest
import torch

import qlora_kernels as qk
from qlora_kernels._native import native
from qlora_kernels.backends import attention_cpu
from qlora_kernels.backends.attention_cpu import flash_attention_bwd_cpu, flash_attention_fwd_cpu
from qlora_kernels.ops import attention as attention_ops
from qlora_kernels.reference import attention as ref

from helpers import num_threads

pytestmark = pytest.mark.skipif(native() is None, reason="native module not built")

FP32_ATOL = 1e-5
GRAD_ATOL = 1e-4
KERNEL_THREADS = max(2, torch.get_num_threads())


def _qkv(B, Hq, Hkv, Sq, Sk, D, dtype=torch.float32):
    q = torch.randn(B, Hq, Sq, D).to(dtype)
    k = torch.randn(B, Hkv, Sk, D).to(dtype)
    v = torch.randn(B, Hkv, Sk, D).to(dtype)
    return q, k, v


def _alibi(H):
    # Bloom's slopes: 2^(-8 i / H)
    return torch.tensor([2 ** (-8 * (i + 1) / H) for i in range(H)])


@pytest.fixture(autouse=True)
def _torch_single_threaded():
    # torch's thread pool makes the tiny reference ops slow (50x on a busy machine); the kernels
    # still run multithreaded (_kernel)
    with num_threads(1):
        yield


def _reference(q, k, v, dout, compute_dtype, cu_seqlens=None, cu_seqlens_k=None, window=(-1, -1), dlse=None,
               **kw):
    """(out, lse, dq, dk, dv, dsinks) of the reference run in compute_dtype on the given inputs."""
    q, k, v = (t.to(compute_dtype) for t in (q, k, v))
    dout = dout.to(compute_dtype)
    feats = dict(window_size=window, softcap=kw.pop("softcap", 0.0), sinks=kw.pop("sinks", None))
    if cu_seqlens is None:
        out, lse = ref.flash_attention(q, k, v, **kw, **feats)
        grads = ref.flash_attention_backward(dout, q, k, v, **kw, **feats, dlse=dlse)
    else:
        kw.pop("key_padding_mask", None)
        out, lse = ref.flash_attention_varlen(q, k, v, cu_seqlens, **kw, cu_seqlens_k=cu_seqlens_k, **feats)
        grads = ref.flash_attention_varlen_backward(dout, q, k, v, cu_seqlens, **kw, cu_seqlens_k=cu_seqlens_k,
                                                    **feats, dlse=dlse)
    return (out, lse, *grads)


def _kernel(q, k, v, dout, cu_seqlens=None, cu_seqlens_k=None, window=(-1, -1), dlse=None, threads=KERNEL_THREADS,
            **kw):
    """(out, lse, dq, dk, dv, dsinks) of the C++ kernels, run on `threads` threads."""
    varlen = dict(cu_seqlens=cu_seqlens, cu_seqlens_k=cu_seqlens_k, window_left=window[0], window_right=window[1])
    with num_threads(threads):
        out, lse = flash_attention_fwd_cpu(q, k, v, **varlen, **kw)
        grads = flash_attention_bwd_cpu(dout, dlse, q, k, v, out, lse, **varlen, **kw)
    return (out, lse, *grads)


NAMES = ("out", "lse", "dq", "dk", "dv", "dsinks")


def _error(x, ref):
    """Max |x - ref|; -inf entries (empty rows of lse) must match exactly."""
    x, ref = x.double(), ref.double()
    empty = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), empty) and torch.equal(x[empty], ref[empty])
    return (x - ref)[~empty].abs().max().item() if (~empty).any() else 0.0


def _check_fp32(q, k, v, dout=None, **kw):
    dout = torch.randn(q.shape) if dout is None else dout
    got = _kernel(q, k, v, dout, **kw)
    want = _reference(q, k, v, dout, torch.float64, **kw)
    for name, x, want_x, atol in zip(NAMES, got, want, (FP32_ATOL,) * 2 + (GRAD_ATOL,) * 4):
        if name == "dsinks" and want_x is None:
            assert x is None
            continue
        assert x.dtype == (torch.float32 if name in ("lse", "dsinks") else q.dtype), name
        assert x.shape == want_x.shape, name
        assert _error(x, want_x) <= atol, (name, _error(x, want_x))
    return got


def _dsinks_from_stored_out(out, lse, dout, dlse, sinks, varlen):
    """dsinks with delta = rowsum(dO * out) formed from the stored (rounded) output, as the kernels
    (and FlashAttention-2) do; the reference's written-out backward recomputes out in fp32."""
    delta = (dout.double() * out.double()).sum(-1)
    delta = delta.transpose(0, 1) if varlen else delta  # [Hq, T] like lse
    if dlse is not None:
        delta = delta - dlse.double()
    sink = sinks.double().view(-1, 1) if varlen else sinks.double().view(1, -1, 1)
    terms = torch.exp(sink - lse.double()) * delta
    return -(terms.sum(1) if varlen else terms.sum((0, 2)))


def _check_low_precision(q, k, v, **kw):
    """bf16 / fp16: every output within twice the reference's own error in that dtype."""
    dout = torch.randn(q.shape).to(q.dtype)
    got = _kernel(q, k, v, dout, **kw)
    low = _reference(q, k, v, dout, q.dtype, **kw)
    exact = _reference(q, k, v, dout, torch.float64, **kw)
    if kw.get("sinks") is not None:
        low = (*low[:5], _dsinks_from_stored_out(low[0], low[1], dout, kw.get("dlse"), kw["sinks"],
                                                 kw.get("cu_seqlens") is not None))
    eps = 1e-3 if q.dtype == torch.bfloat16 else 1e-4
    for name, x, ref_low, want in zip(NAMES, got, low, exact):
        if want is None:
            continue
        assert x.dtype == (torch.float32 if name in ("lse", "dsinks") else q.dtype), name
        assert _error(x, want) <= 2 * _error(ref_low, want) + eps, (name, _error(x, want), _error(ref_low, want))


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("Sq, Sk", [(16, 16), (70, 70), (1, 33), (7, 33), (16, 100), (7, 100)])
def test_fp32_matches_fp64_reference(Sq, Sk, D, causal):
    _check_fp32(*_qkv(2, 2, 2, Sq, Sk, D), causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Sq, Sk, D", [(16, 16, 64), (70, 70, 80), (7, 100, 128)])
def test_low_precision_within_twice_reference_error(dtype, Sq, Sk, D, causal):
    _check_low_precision(*_qkv(2, 4, 2, Sq, Sk, D, dtype), causal=causal, alibi_slopes=_alibi(4))


@pytest.mark.parametrize("Hq, Hkv", [(8, 2), (4, 1)])
@pytest.mark.parametrize("causal", [True, False])
def test_gqa_mqa_with_alibi(Hq, Hkv, causal):
    _check_fp32(*_qkv(2, Hq, Hkv, 16, 33, 64), causal=causal, alibi_slopes=_alibi(Hq))
    _check_fp32(*_qkv(1, Hq, Hkv, 70, 70, 16), causal=causal, alibi_slopes=_alibi(Hq), softmax_scale=0.3)


@pytest.mark.parametrize("causal", [True, False])
def test_key_padding_mask_with_fully_padded_row(causal):
    q, k, v = _qkv(3, 4, 2, 16, 40, 64)
    mask = torch.rand(3, 40) > 0.3
    mask[1] = False  # sequence 1 has no key at all
    out, lse, dq, dk, dv, _ = _check_fp32(q, k, v, causal=causal, alibi_slopes=_alibi(4), key_padding_mask=mask)
    assert torch.equal(out[1], torch.zeros_like(out[1])) and bool((lse[1] == -math.inf).all())
    for grad in (dq, dk, dv):
        assert bool(torch.isfinite(grad).all())
        assert torch.equal(grad[1], torch.zeros_like(grad[1]))
    # padded keys of the other sequences get exactly zero gradient
    assert bool((dk[0][:, ~mask[0]] == 0).all()) and bool((dv[2][:, ~mask[2]] == 0).all())


def test_strided_inputs_match_contiguous():
    B, S, Hq, Hkv, D = 2, 70, 4, 2, 64
    # HF attention layers hand over [B, S, H, D] projections viewed as [B, H, S, D]
    q = torch.randn(B, S, Hq, D).transpose(1, 2)
    k = torch.randn(B, S, Hkv, D).transpose(1, 2)
    v = torch.randn(B, S, Hkv, D).transpose(1, 2)
    dout = torch.randn(B, S, Hq, D).transpose(1, 2)
    assert attention_cpu._unit_stride_head_dim(q) is q  # read in place, no copy
    out, lse, dq, dk, dv, _ = got = _check_fp32(q, k, v, dout, alibi_slopes=_alibi(Hq))
    want = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), alibi_slopes=_alibi(Hq))
    for x, y in zip(got[:5], want[:5]):
        assert torch.equal(x, y)
    assert out.is_contiguous() and lse.is_contiguous()
    assert dq.stride() == q.stride() and dk.stride() == k.stride() and dv.stride() == v.stride()
    # head_dim itself strided: copied to unit stride first
    q2 = torch.randn(B, Hq, S, 2 * D)[..., ::2]
    _check_fp32(q2, k, v)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_packed_sequences(causal):
    lengths = (1, 17, 40)
    cu_seqlens = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    T, Hq, Hkv, D = sum(lengths), 4, 2, 64
    q, k, v = torch.randn(T, Hq, D), torch.randn(T, Hkv, D), torch.randn(T, Hkv, D)
    out, lse, *_ = _check_fp32(q, k, v, cu_seqlens=cu_seqlens, causal=causal, alibi_slopes=_alibi(Hq))
    assert out.shape == (T, Hq, D) and lse.shape == (Hq, T)


def test_empty_rows_and_sequences():
    # Sq > Sk causal: the first Sq - Sk rows see no key (bottom-right alignment)
    out, lse, dq, *_ = _check_fp32(*_qkv(1, 2, 1, 20, 5, 16), causal=True)
    assert bool((lse[..., :15] == -math.inf).all()) and torch.equal(dq[..., :15, :], torch.zeros(1, 2, 15, 16))
    # no keys at all
    q, k, v = _qkv(2, 2, 1, 3, 0, 16)
    out, lse, dq, dk, dv, _ = _kernel(q, k, v, torch.randn(q.shape))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape
    # no queries: dK / dV are zero
    q, k, v = _qkv(2, 2, 1, 0, 9, 16)
    out, lse, dq, dk, dv, _ = _kernel(q, k, v, torch.randn(q.shape))
    assert out.shape == q.shape and torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@pytest.mark.parametrize("D", [1, 3, 256])
def test_head_dim_extremes(D):
    _check_fp32(*_qkv(1, 2, 1, 9, 70, D), causal=True)


@pytest.mark.parametrize("features", [
    dict(alibi_slopes=_alibi(4)),
    dict(window=(40, 0), softcap=3.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), dlse=torch.randn(1, 4, 130)),
])
def test_thread_count_does_not_change_results(features):
    q, k, v = _qkv(1, 4, 2, 130, 130, 64)
    dout = torch.randn(q.shape)
    one = _kernel(q, k, v, dout, threads=1, **features)
    for threads in (2, 3, 8):
        many = _kernel(q, k, v, dout, threads=threads, **features)
        for x, y in zip(one, many):
            assert (x is None and y is None) or torch.equal(x, y)


def _backward_units(fn):
    before = native().flash_attention_cpu_backward_units()
    fn()
    return native().flash_attention_cpu_backward_units() - before


@pytest.mark.parametrize("B, Hkv, Sk, units", [(1, 1, 250, 1), (1, 1, 600, 2), (1, 1, 2100, 8), (2, 2, 1100, 16),
                                               (4, 4, 1100, 16), (1, 2, 40, 2)])
def test_backward_units_follow_the_shape_not_the_threads(B, Hkv, Sk, units):
    """The backward splits each kv head's keys until batch x kv heads x splits reaches 16 units, at
    most 8 splits of at least four 64-key blocks; never by the thread count, so its sums do not move."""
    q, k, v = _qkv(B, 2 * Hkv, Hkv, 70, Sk, 16)
    dout = torch.randn(q.shape)
    for threads in (1, 2, 8):
        with num_threads(threads):
            out, lse = flash_attention_fwd_cpu(q, k, v, causal=False)
            assert _backward_units(lambda: flash_attention_bwd_cpu(dout, None, q, k, v, out, lse,
                                                                   causal=False)) == units


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_batch_one_single_kv_head_split_over_keys(dtype, causal):
    """Batch 1, one kv head, 17 key blocks: 4 units that each own the dK / dV of every fourth key
    block and a partial dQ. Gradients match the reference and are the same bits on 1, 2 and 8 threads."""
    q, k, v = _qkv(1, 4, 1, 230, 1030, 64, dtype)
    feats = dict(causal=causal, alibi_slopes=_alibi(4))
    if dtype == torch.float32:
        feats.update(sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), key_padding_mask=torch.rand(1, 1030) > 0.2)
        _check_fp32(q, k, v, **feats)
    else:
        _check_low_precision(q, k, v, **feats)
    dout = torch.randn(q.shape).to(dtype)
    runs = []
    for threads in (1, 2, 8):
        assert _backward_units(lambda: runs.append(_kernel(q, k, v, dout, threads=threads, **feats))) == 4
    for run in runs[1:]:
        for x, y in zip(runs[0], run):
            assert (x is None and y is None) or torch.equal(x, y)


@pytest.mark.parametrize("causal", [True, False])
def test_varlen_with_fewer_key_blocks_than_splits(causal):
    """Five splits (3 sequences x 1 kv head, the longest 21 key blocks): the short sequences leave
    splits without keys, whose partial dQ is zero."""
    lengths_q, lengths_k = (10, 300, 70), (20, 1290, 70)
    q, cu_q = _packed(lengths_q, 2, 32)
    k, cu_k = _packed(lengths_k, 1, 32)
    v = torch.randn(k.shape)
    feats = dict(cu_seqlens=cu_q, cu_seqlens_k=cu_k, causal=causal, window=(100, -1), softcap=4.0,
                 dlse=torch.randn(2, sum(lengths_q)))
    assert _backward_units(lambda: _check_fp32(q, k, v, **feats)) == 3 * 5
    dout = torch.randn(q.shape)
    one = _kernel(q, k, v, dout, threads=1, **feats)
    for threads in (2, 8):
        for x, y in zip(one, _kernel(q, k, v, dout, threads=threads, **feats)):
            assert (x is None and y is None) or torch.equal(x, y)


def test_sizes_the_memory_safety_needs_raise():
    # ops.attention.check_args validates everything first on the op path; the kernels themselves
    # still refuse what would read or write outside the tensors
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention_fwd_cpu(*_qkv(1, 1, 1, 4, 4, 257))
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        flash_attention_fwd_cpu(*_qkv(1, 3, 2, 4, 4, 16))
    q = torch.randn(10, 2, 16)
    with pytest.raises(ValueError, match="cu_seqlens must start at 0 and end"):
        flash_attention_fwd_cpu(q, q, q, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens_k must start at 0 and end"):
        flash_attention_fwd_cpu(q, q[:7], q[:7], cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32),
                                cu_seqlens_k=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="pass cu_seqlens_k"):
        flash_attention_fwd_cpu(q, q[:7], q[:7], cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_fwd_cpu(*_qkv(1, 1, 1, 4, 4, 16, torch.float64))


def test_op_validates_before_the_kernel():
    q, k, v = _qkv(1, 2, 1, 4, 4, 16)
    args = dict(causal=True, softmax_scale=0.25, alibi_slopes=None, key_padding_mask=None, cu_seqlens=None,
                max_seqlen=0, cu_seqlens_k=None, max_seqlen_k=0, window_left=-1, window_right=-1, softcap=0.0,
                sinks=None)
    with pytest.raises(ValueError, match=r"window_size\[0\]"):
        attention_ops.flash_attention_fwd(q, k, v, **{**args, "window_left": -2})
    with pytest.raises(ValueError, match="softcap"):
        attention_ops.flash_attention_fwd(q, k, v, **{**args, "softcap": -1.0})
    with pytest.raises(ValueError, match="sinks"):
        attention_ops.flash_attention_fwd(q, k, v, **{**args, "sinks": torch.zeros(3)})


# --- windows, softcap, sinks, keys packed apart, a gradient into lse --------------------------

WINDOWS = [
    (True, (16, -1)),   # causal sliding window (Mistral): left only
    (True, (0, 0)),     # the diagonal alone
    (True, (70, 5)),    # causal caps the right side
    (False, (0, 0)),
    (False, (20, 9)),
    (False, (-1, 3)),   # right only
    (False, (33, -1)),  # left only, unbounded right
]


@pytest.mark.parametrize("causal, window", WINDOWS)
@pytest.mark.parametrize("Sq, Sk", [(200, 200), (70, 150), (150, 70)])
def test_sliding_window_matches_reference(causal, window, Sq, Sk):
    _check_fp32(*_qkv(1, 4, 2, Sq, Sk, 32), causal=causal, window=window)


@pytest.mark.parametrize("causal", [True, False])
def test_window_with_alibi_gqa_and_padding(causal):
    q, k, v = _qkv(2, 8, 2, 90, 130, 64)
    mask = torch.rand(2, 130) > 0.2
    _check_fp32(q, k, v, causal=causal, window=(24, 24), alibi_slopes=_alibi(8), key_padding_mask=mask)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("softcap", [0.7, 5.0, 50.0])
def test_softcap_matches_reference(causal, softcap):
    # softmax_scale 1 with head dim 64: scores up to ~30, deep into tanh's saturation at 0.7 / 5
    _check_fp32(*_qkv(2, 4, 2, 70, 100, 64), causal=causal, softcap=softcap, softmax_scale=1.0)


@pytest.mark.parametrize("causal", [True, False])
def test_softcap_before_symmetric_alibi(causal):
    _check_fp32(*_qkv(1, 4, 1, 33, 80, 16), causal=causal, softcap=2.0, alibi_slopes=_alibi(4))


@pytest.mark.parametrize("causal", [True, False])
def test_sinks_forward_backward_and_dsinks(causal):
    sinks = torch.tensor([0.5, -1.0, 3.0, 0.0])
    out, lse, dq, dk, dv, dsinks = _check_fp32(*_qkv(2, 4, 2, 70, 90, 64), causal=causal, sinks=sinks)
    assert dsinks.shape == (4,) and bool((dsinks != 0).all())


def test_sinks_rows_without_keys():
    # Sq > Sk causal: the first 15 rows see no key; they get out 0, lse = sink, zero dq, and their
    # delta (-dlse, as out is 0) still reaches dsinks
    sinks = torch.tensor([0.5, -1.0])
    dlse = torch.randn(1, 2, 20)
    out, lse, dq, *_ = _check_fp32(*_qkv(1, 2, 1, 20, 5, 16), causal=True, sinks=sinks, dlse=dlse)
    assert torch.equal(out[..., :15, :], torch.zeros(1, 2, 15, 16))
    assert torch.equal(lse[0, :, :15], sinks[:, None].expand(2, 15))
    assert torch.equal(dq[..., :15, :], torch.zeros(1, 2, 15, 16))


@pytest.mark.parametrize("features", [dict(), dict(sinks=torch.tensor([0.3, -0.2, 1.0, 0.1])),
                                      dict(window=(10, 0), softcap=2.0, alibi_slopes=_alibi(4))])
def test_gradient_into_lse(features):
    q, k, v = _qkv(2, 4, 2, 70, 70, 32)
    _check_fp32(q, k, v, dlse=torch.randn(2, 4, 70), **features)


def _packed(lengths, H, D):
    return torch.randn(sum(lengths), H, D), torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()],
                                                         dtype=torch.int32)


@pytest.mark.parametrize("causal, window", [(True, (-1, -1)), (False, (-1, -1)), (True, (8, -1)), (False, (5, 3))])
def test_varlen_keys_packed_apart(causal, window):
    # per sequence (queries, keys): decode-like, chunked prefill, more queries than keys, no
    # queries, no keys, one query and one key
    lengths_q, lengths_k = (1, 40, 70, 0, 5, 1), (90, 100, 30, 7, 0, 1)
    Hq, Hkv, D = 4, 2, 32
    q, cu_q = _packed(lengths_q, Hq, D)
    k, cu_k = _packed(lengths_k, Hkv, D)
    v = torch.randn(k.shape)
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out, lse, dq, dk, dv, _ = _check_fp32(
        q, k, v, cu_seqlens=cu_q, cu_seqlens_k=cu_k, causal=causal, window=window, alibi_slopes=_alibi(Hq),
        sinks=sinks, softcap=4.0, dlse=torch.randn(Hq, sum(lengths_q)))
    assert out.shape == q.shape and lse.shape == (Hq, sum(lengths_q)) and dk.shape == k.shape
    # the sequence without keys: out 0, lse = sink; the one without queries: dK, dV 0
    assert torch.equal(out[111:116], torch.zeros(5, Hq, D))
    assert torch.equal(lse[:, 111:116], sinks[:, None].expand(Hq, 5))
    assert torch.equal(dk[220:227], torch.zeros(7, Hkv, D)) and torch.equal(dv[220:227], torch.zeros(7, Hkv, D))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_features_within_twice_reference_error(dtype):
    q, k, v = _qkv(2, 4, 2, 100, 130, 64, dtype)
    _check_low_precision(q, k, v, causal=True, window=(32, 0), softcap=5.0, sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]),
                         alibi_slopes=_alibi(4), dlse=torch.randn(2, 4, 100))
    lengths_q, lengths_k = (3, 60, 0), (70, 60, 9)
    q, cu_q = _packed(lengths_q, 4, 64)
    k, cu_k = _packed(lengths_k, 2, 64)
    _check_low_precision(q.to(dtype), k.to(dtype), torch.randn(k.shape).to(dtype), cu_seqlens=cu_q, cu_seqlens_k=cu_k,
                         causal=False, window=(16, 16), softcap=3.0, sinks=torch.tensor([0.1, 0.2, -0.3, 1.0]))


def test_every_feature_at_once():
    """A window, softcap, ALiBi, sinks and a gradient into lse in one call (test_baseline_isa.py runs
    this on the baseline ISA too)."""
    q, k, v = _qkv(1, 4, 2, 100, 130, 48)
    _check_fp32(q, k, v, causal=False, window=(20, 9), softcap=3.0, alibi_slopes=_alibi(4),
                sinks=torch.tensor([0.5, -1.0, 2.0, 0.0]), dlse=torch.randn(1, 4, 100))


def _tile_steps(fn):
    before = native().flash_attention_cpu_tile_steps()
    fn()
    return native().flash_attention_cpu_tile_steps() - before


def _visible_tiles(Sq, Sk, causal, window, heads):
    """64 x 64 (query block, key block) tiles with at least one visible key, per the reference's mask."""
    keep = ref.keep_mask(Sq, Sk, causal, window)
    return heads * sum(int(keep[i:i + 64, j:j + 64].any()) for i in range(0, Sq, 64) for j in range(0, Sk, 64))


@pytest.mark.parametrize("causal, window", [(True, (256, -1)), (False, (100, 30)), (True, (-1, -1)),
                                            (False, (-1, -1))])
def test_only_tiles_with_visible_keys_are_computed(causal, window):
    """The kernels skip every key block no row of a query block can see: they run exactly the tiles
    the mask leaves something in, forward and backward. So a sliding window's work grows with
    S * W, not S^2."""
    steps = {}
    for S in (1024, 2048):
        q, k, v = _qkv(1, 2, 1, S, S, 16)
        dout = torch.randn(q.shape)
        kw = dict(causal=causal, window_left=window[0], window_right=window[1])
        with num_threads(2):
            fwd = []
            forward = _tile_steps(lambda: fwd.extend(flash_attention_fwd_cpu(q, k, v, **kw)))
            backward = _tile_steps(lambda: flash_attention_bwd_cpu(dout, None, q, k, v, *fwd, **kw))
        assert forward == backward == _visible_tiles(S, S, causal, window, 2), (S, forward, backward)
        steps[S] = forward
    growth = steps[2048] / steps[1024]
    if window[0] >= 0:
        assert growth < 2.2, steps  # linear in S at a fixed window
    else:
        assert growth > 3.5, steps


def test_op_runs_the_kernel_for_every_feature():
    """flash_attention on CPU tensors computes windows, softcap, sinks, keys packed apart and lse
    gradients in the C++ kernels, not by a fallback."""
    q, k, v = (t.requires_grad_() for t in _qkv(1, 4, 2, 100, 100, 32))
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0], requires_grad=True)
    outputs = []
    feats = dict(window_size=(30, 0), softcap=5.0, sinks=sinks, return_lse=True)
    assert _tile_steps(lambda: outputs.extend(qk.flash_attention(q, k, v, **feats))) > 0
    out, lse = outputs
    assert _tile_steps(lambda: (out.sum() + lse.sum()).backward()) > 0
    want, want_lse = ref.flash_attention(q, k, v, True, None, window_size=(30, 0), softcap=5.0, sinks=sinks)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, want_lse, rtol=1e-5, atol=1e-5)
    grads = (q.grad, k.grad, v.grad, sinks.grad)
    wanted = torch.autograd.grad(want.sum() + want_lse.sum(), (q, k, v, sinks))
    for g, w in zip(grads, wanted):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)
    # keys packed apart from queries
    lengths_q, lengths_k = (3, 20), (50, 20)
    qp, cu_q = _packed(lengths_q, 4, 32)
    kp, cu_k = _packed(lengths_k, 2, 32)
    assert _tile_steps(lambda: qk.flash_attention(qp, kp, kp, cu_seqlens=cu_q, max_seqlen=20, cu_seqlens_k=cu_k,
                                                  max_seqlen_k=50)) > 0


def _peak_rss() -> int:
    """This process's peak resident set (VmHWM) in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def test_forward_memory_is_linear_in_sequence_length():
    """Sq = Sk = 4096: an S x S fp32 matrix would be 64 MiB. The kernel needs the output (1 MiB)
    and, per thread, tiles plus an fp32 copy of one kv head (2 MiB)."""
    try:
        _reset_peak_rss()
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    q, k, v = (torch.randn(1, 1, 4096, 64) for _ in range(3))
    with num_threads(2):
        flash_attention_fwd_cpu(q[..., :64, :], k[..., :64, :], v[..., :64, :])  # starts up what runs once
        _reset_peak_rss()
        before = _peak_rss()
        flash_attention_fwd_cpu(q, k, v, causal=False)
        grown = _peak_rss() - before
    assert grown < 4096 * 4096 * 4 // 4, grown


def test_backward_memory_is_linear_in_sequence_length():
    """Batch 1, one kv head, Sq = Sk = 4096: 8 key splits, whose partial dQ buffers take
    8 * 4 bytes per query token and head_dim (2 MiB here); an S x S fp32 matrix would be 64 MiB."""
    try:
        _reset_peak_rss()
    except OSError:
        pytest.skip("cannot reset the peak RSS here")
    q, k, v = (torch.randn(1, 1, 4096, 16) for _ in range(3))
    dout = torch.randn(q.shape)
    with num_threads(2):
        out, lse = flash_attention_fwd_cpu(q, k, v)
        short = [t[..., :64, :] for t in (dout, q, k, v, out)]
        flash_attention_bwd_cpu(short[0], None, *short[1:], lse[..., :64])  # starts up what runs once
        _reset_peak_rss()
        before = _peak_rss()
        flash_attention_bwd_cpu(dout, None, q, k, v, out, lse)
        grown = _peak_rss() - before
    assert grown < 4096 * 4096 * 4 // 4, grown
