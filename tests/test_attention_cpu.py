"""CPU flash attention kernels (csrc/attention_cpu.cpp) against reference/attention.py.

fp32 is checked tightly against an fp64 reference; fp16 / bf16 must stay within twice the error
of the reference itself run in that dtype (both measured against fp64 on the same rounded inputs).
"""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from qlora_kernels._native import native
from qlora_kernels.backends import attention_cpu
from qlora_kernels.backends.attention_cpu import flash_attention_bwd_cpu, flash_attention_fwd_cpu
from qlora_kernels.reference.attention import flash_attention, flash_attention_varlen

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


@contextlib.contextmanager
def _num_threads(n):
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


@pytest.fixture(autouse=True)
def _torch_single_threaded():
    # torch's thread pool makes the tiny reference ops slow (50x on a busy machine); the kernels
    # still run multithreaded (_kernel)
    with _num_threads(1):
        yield


def _reference(q, k, v, dout, compute_dtype, cu_seqlens=None, **kw):
    """(out, lse, dq, dk, dv) of the reference run in compute_dtype on the given inputs."""
    q, k, v = (t.detach().to(compute_dtype).requires_grad_() for t in (q, k, v))
    if cu_seqlens is None:
        out, lse = flash_attention(q, k, v, **kw)
    else:
        out, lse = flash_attention_varlen(q, k, v, cu_seqlens, **kw)
    grads = torch.autograd.grad(out, (q, k, v), dout.to(compute_dtype))
    return (out.detach(), lse.detach(), *grads)


def _kernel(q, k, v, dout, cu_seqlens=None, max_seqlen=None, **kw):
    with _num_threads(KERNEL_THREADS):
        out, lse = flash_attention_fwd_cpu(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw)
        dq, dk, dv = flash_attention_bwd_cpu(dout, q, k, v, out, lse, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                                             **kw)
    return out, lse, dq, dk, dv


def _error(x, ref):
    """Max |x - ref|; -inf entries (empty rows of lse) must match exactly."""
    x, ref = x.double(), ref.double()
    empty = torch.isinf(ref)
    assert torch.equal(torch.isinf(x), empty) and torch.equal(x[empty], ref[empty])
    return (x - ref)[~empty].abs().max().item() if (~empty).any() else 0.0


def _check_fp32(q, k, v, dout=None, cu_seqlens=None, max_seqlen=None, **kw):
    dout = torch.randn(q.shape) if dout is None else dout
    got = _kernel(q, k, v, dout, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen, **kw)
    want = _reference(q, k, v, dout, torch.float64, cu_seqlens=cu_seqlens, **kw)
    for name, x, ref, atol in zip(("out", "lse", "dq", "dk", "dv"), got, want, (FP32_ATOL,) * 2 + (GRAD_ATOL,) * 3):
        assert x.dtype == (torch.float32 if name == "lse" else q.dtype) and x.shape == ref.shape, name
        assert _error(x, ref) <= atol, (name, _error(x, ref))
    return got


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [16, 64, 80, 128])
@pytest.mark.parametrize("Sq, Sk", [(16, 16), (70, 70), (1, 33), (7, 33), (16, 100), (7, 100)])
def test_fp32_matches_fp64_reference(Sq, Sk, D, causal):
    _check_fp32(*_qkv(2, 2, 2, Sq, Sk, D), causal=causal)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Sq, Sk, D", [(16, 16, 64), (70, 70, 80), (7, 100, 128)])
def test_low_precision_within_twice_reference_error(dtype, Sq, Sk, D, causal):
    q, k, v = _qkv(2, 4, 2, Sq, Sk, D, dtype)
    dout = torch.randn(q.shape).to(dtype)
    got = _kernel(q, k, v, dout, causal=causal, alibi_slopes=_alibi(4))
    low = _reference(q, k, v, dout, dtype, causal=causal, alibi_slopes=_alibi(4))
    exact = _reference(q, k, v, dout, torch.float64, causal=causal, alibi_slopes=_alibi(4))
    eps = 1e-3 if dtype == torch.bfloat16 else 1e-4
    for name, x, ref_low, ref in zip(("out", "lse", "dq", "dk", "dv"), got, low, exact):
        assert x.dtype == (torch.float32 if name == "lse" else dtype), name
        assert _error(x, ref) <= 2 * _error(ref_low, ref) + eps, (name, _error(x, ref), _error(ref_low, ref))


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
    out, lse, dq, dk, dv = _check_fp32(q, k, v, causal=causal, alibi_slopes=_alibi(4), key_padding_mask=mask)
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
    out, lse, dq, dk, dv = got = _check_fp32(q, k, v, dout, alibi_slopes=_alibi(Hq))
    want = _kernel(q.contiguous(), k.contiguous(), v.contiguous(), dout.contiguous(), alibi_slopes=_alibi(Hq))
    for x, y in zip(got, want):
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
    out, lse, *_ = _check_fp32(q, k, v, cu_seqlens=cu_seqlens, causal=causal, alibi_slopes=_alibi(Hq),
                               max_seqlen=max(lengths))
    assert out.shape == (T, Hq, D) and lse.shape == (Hq, T)


def test_empty_rows_and_sequences():
    # Sq > Sk causal: the first Sq - Sk rows see no key (bottom-right alignment)
    out, lse, dq, *_ = _check_fp32(*_qkv(1, 2, 1, 20, 5, 16), causal=True)
    assert bool((lse[..., :15] == -math.inf).all()) and torch.equal(dq[..., :15, :], torch.zeros(1, 2, 15, 16))
    # no keys at all
    q, k, v = _qkv(2, 2, 1, 3, 0, 16)
    out, lse, dq, dk, dv = _kernel(q, k, v, torch.randn(q.shape))
    assert torch.equal(out, torch.zeros_like(out)) and bool((lse == -math.inf).all())
    assert torch.equal(dq, torch.zeros_like(dq)) and dk.shape == k.shape and dv.shape == v.shape
    # no queries: dK / dV are zero
    q, k, v = _qkv(2, 2, 1, 0, 9, 16)
    out, lse, dq, dk, dv = _kernel(q, k, v, torch.randn(q.shape))
    assert out.shape == q.shape and torch.equal(dk, torch.zeros_like(dk)) and torch.equal(dv, torch.zeros_like(dv))


@pytest.mark.parametrize("D", [1, 3, 256])
def test_head_dim_extremes(D):
    _check_fp32(*_qkv(1, 2, 1, 9, 70, D), causal=True)


def test_thread_count_does_not_change_results():
    q, k, v = _qkv(1, 4, 2, 130, 130, 64)
    dout = torch.randn(q.shape)
    with _num_threads(1):
        one = _kernel(q, k, v, dout, alibi_slopes=_alibi(4))
    with _num_threads(3):
        many = _kernel(q, k, v, dout, alibi_slopes=_alibi(4))
    for x, y in zip(one, many):
        assert torch.equal(x, y)


def test_invalid_sizes_raise():
    with pytest.raises(ValueError, match="head_dim"):
        flash_attention_fwd_cpu(*_qkv(1, 1, 1, 4, 4, 257))
    with pytest.raises(ValueError, match="multiple of heads_kv"):
        flash_attention_fwd_cpu(*_qkv(1, 3, 2, 4, 4, 16))
    with pytest.raises(ValueError, match="cu_seqlens"):
        q = torch.randn(10, 2, 16)
        flash_attention_fwd_cpu(q, q, q, cu_seqlens=torch.tensor([0, 4, 9], dtype=torch.int32))
    with pytest.raises(ValueError, match="dtype"):
        flash_attention_fwd_cpu(*_qkv(1, 1, 1, 4, 4, 16, torch.float64))


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
    with _num_threads(2):
        flash_attention_fwd_cpu(q[..., :64, :], k[..., :64, :], v[..., :64, :])  # starts up what runs once
        _reset_peak_rss()
        before = _peak_rss()
        flash_attention_fwd_cpu(q, k, v, causal=False)
        grown = _peak_rss() - before
    assert grown < 4096 * 4096 * 4 // 4, grown
