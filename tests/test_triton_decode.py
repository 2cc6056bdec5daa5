"""Triton flash-decoding with sliding windows, logit softcap and attention sinks against
`reference.attention` (dense, and varlen over packed caches), and the CUDA backend's routing of such
decode calls to it.

fp32 is compared tightly against an fp64 reference; fp16 / bf16 get the honest tolerance:
the kernel's error against fp64 at most twice that of the same math done in the low dtype
(plus a small eps). Every case forces several splits, so the combine merges partials.
"""

import math
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from qlora_kernels.backends import cuda as glue  # noqa: E402
from qlora_kernels.reference import attention as ref  # noqa: E402
from qlora_kernels.triton import flash_decode  # noqa: E402
from qlora_kernels.triton.flash_decode import flash_decode_triton  # noqa: E402

from helpers import attention_in_dtype  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, HQ, HKV, SK, D = 2, 4, 2, 70, 40


def _qkv(Sq, Sk, dtype, seed=0):
    """q as HF passes it ([B, S, H, D].transpose(1, 2)), k / v as a contiguous cache."""
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(B, Sq, HQ, D, generator=g).to(DEVICE, dtype).transpose(1, 2)
    k, v = (torch.randn(B, HKV, Sk, D, generator=g).to(DEVICE, dtype) for _ in range(2))
    return q, k, v


def _features(names, Sk=SK, seed=0):
    """flash_decode_triton's keyword arguments for the named features."""
    g = torch.Generator().manual_seed(seed)
    kw = {}
    for name in names:
        if name.startswith("window"):
            kw["window_left"] = int(name[len("window"):])
        elif name == "softcap":
            kw["softcap"] = 1.5  # |scores| reach ~3: the cap bends them
        elif name == "sinks":
            kw["sinks"] = (torch.randn(HQ, generator=g) * 2).to(DEVICE)
        elif name == "alibi":
            kw["alibi_slopes"] = torch.tensor([2.0 ** (-2.0 * (h + 1) / HQ) for h in range(HQ)], device=DEVICE)
        elif name == "padding":
            mask = torch.rand(B, Sk, generator=g) > 0.3
            mask[:, -1] = True
            kw["key_padding_mask"] = mask.to(DEVICE)
        else:
            raise AssertionError(name)
    return kw


def _reference(q, k, v, window_left=-1, window_right=-1, **kw):
    return ref.flash_attention(q, k, v, True, kw.pop("softmax_scale", None), kw.pop("alibi_slopes", None),
                               kw.pop("key_padding_mask", None), window_size=(window_left, window_right), **kw)


def _attention_in(dtype, q, k, v, window_left=-1, window_right=-1, **kw):
    """The reference's math carried out in `dtype`: the low-precision baseline of the honest tolerance."""
    return attention_in_dtype(dtype, q, k, v, True, window_size=(window_left, window_right), **kw)


def _assert_honest(got, lowp, exact, what, eps=1e-4):
    err = (got.double() - exact.double()).abs().max().item()
    base = (lowp.double() - exact.double()).abs().max().item()
    assert err <= 2 * base + eps, f"{what}: kernel error {err:.3g} > 2 x {base:.3g} (low-precision math) + {eps}"


def _check(q, k, v, dtype, num_splits, **kw):
    out, lse = flash_decode_triton(q, k, v, num_splits=num_splits, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous()
    exact_out, exact_lse = _reference(q.double(), k.double(), v.double(), **kw)
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact_out, atol=2e-5, rtol=0)
    else:
        _assert_honest(out, _attention_in(dtype, q, k, v, **kw), exact_out, "out")
    torch.testing.assert_close(lse.double(), exact_lse, atol=2e-5, rtol=0)
    return out, lse


# window 5: inside one key block, every row with its own first key; 40: three 16-key splits
# (the interpreter's key step), the first starting mid-block; 0: the diagonal key alone;
# 200: wider than the cache (no key cut)
FEATURES = {
    "window5": ("window5", "padding"),
    "window40": ("window40", "padding"),
    "window0": ("window0",),
    "window200": ("window200", "padding"),
    "softcap": ("softcap", "padding"),
    "sinks": ("sinks", "padding"),
    "alibi": ("alibi", "padding"),
    "all": ("window40", "softcap", "sinks", "alibi", "padding"),
}


@pytest.mark.parametrize("features", FEATURES.values(), ids=FEATURES.keys())
@pytest.mark.parametrize("seq_q", (1, 3))
def test_decode_features_fp32(features, seq_q):
    q, k, v = _qkv(seq_q, SK, torch.float32)
    _check(q, k, v, torch.float32, 3, **_features(features))


@pytest.mark.parametrize("dtype", (torch.bfloat16, torch.float16), ids=("bf16", "fp16"))
@pytest.mark.parametrize("features", ("window5", "window40", "all"))
def test_decode_features_low_precision(features, dtype):
    q, k, v = _qkv(3, SK, dtype)
    kw = _features(FEATURES[features])
    if "sinks" in kw:
        kw["sinks"] = kw["sinks"].to(dtype)  # sinks come in any float dtype
    _check(q, k, v, dtype, 3, **kw)


@pytest.mark.parametrize("window_right", (0, 7))
def test_window_right_cuts_nothing_under_causal(window_right):
    q, k, v = _qkv(3, SK, torch.float32)
    out, lse = _check(q, k, v, torch.float32, 3, window_left=40, window_right=window_right)
    torch.testing.assert_close((out, lse), flash_decode_triton(q, k, v, window_left=40, num_splits=3), rtol=0, atol=0)


def test_alibi_is_the_symmetric_form():
    # the kernel adds slope * (j - r); the reference's -slope * |j - r| agrees on every key the causal mask keeps
    q, k, v = _qkv(3, SK, torch.float32)
    slopes = _features(("alibi",))["alibi_slopes"]
    out, _ = flash_decode_triton(q, k, v, alibi_slopes=slopes, num_splits=3)
    row = torch.arange(3)[:, None] + SK - 3
    col = torch.arange(SK)[None, :]
    scores = torch.matmul(q.double(), k.double().repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(D)
    scores = scores - slopes.double().view(1, HQ, 1, 1) * (row - col).abs()
    scores = scores.masked_fill(col > row, -math.inf)
    want = torch.matmul(torch.softmax(scores, -1), v.double().repeat_interleave(2, 1))
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=0)


@pytest.mark.parametrize(("seq_q", "seq_k"), ((3, 40), (4, 2)))
def test_rows_with_no_key_get_the_sink(seq_q, seq_k):
    # batch row 0 has every key padded (over 3 splits with 40 keys); with Sq > Sk the first
    # queries sit before the cache
    q, k, v = _qkv(seq_q, seq_k, torch.float32)
    kw = _features(("sinks",))
    mask = torch.ones(B, seq_k, dtype=torch.bool, device=DEVICE)
    mask[0] = False
    out, lse = flash_decode_triton(q, k, v, key_padding_mask=mask, num_splits=3, **kw)
    sink = kw["sinks"].view(HQ, 1).expand(HQ, seq_q)
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.equal(lse[0], sink)
    before = max(0, seq_q - seq_k)
    assert torch.equal(out[1, :, :before], torch.zeros_like(out[1, :, :before]))
    assert torch.equal(lse[1, :, :before], sink[:, :before])
    want_out, want_lse = _reference(q.double(), k.double(), v.double(), key_padding_mask=mask, **kw)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=0)


def test_no_keys_at_all_gives_the_sink():
    q, _, _ = _qkv(2, 0, torch.float32)
    k = v = torch.empty(B, HKV, 0, D, device=DEVICE)
    sinks = _features(("sinks",))["sinks"]
    out, lse = flash_decode_triton(q, k, v, sinks=sinks)
    assert torch.equal(out, torch.zeros_like(q)) and torch.equal(lse, sinks.view(1, HQ, 1).expand(B, HQ, 2))


@pytest.mark.parametrize("window_left", (5, 40))
def test_keys_before_the_window_are_never_read(window_left):
    # keys no query row can see hold NaN in K and V: one read would make the output NaN
    q, k, v = _qkv(3, SK, torch.float32)
    first = SK - 3 - window_left
    poisoned_k, poisoned_v = k.clone(), v.clone()
    poisoned_k[:, :, :first] = math.nan
    poisoned_v[:, :, :first] = math.nan
    kw = _features(("softcap", "sinks", "alibi", "padding"))
    out, lse = flash_decode_triton(q, poisoned_k, poisoned_v, window_left=window_left, num_splits=3, **kw)
    want_out, want_lse = _reference(q.double(), k.double(), v.double(), window_left=window_left, **kw)
    assert out.isfinite().all() and lse.isfinite().all()
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=0)


class _Recorder:
    """Stands in for a kernel: records each launch's grid and arguments, runs nothing."""

    def __init__(self, kernel):
        self.names = kernel.arg_names
        self.launches = []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((grid, dict(zip(self.names, args), **kwargs)))


@pytest.mark.parametrize("num_splits", (1, 4, 64))
def test_splits_cover_only_the_window(monkeypatch, num_splits):
    # a 4096-key cache with a 100-key window: the split programs walk the window's keys only
    split = _Recorder(flash_decode._decode_split_kernel)
    monkeypatch.setattr(flash_decode, "_decode_split_kernel", split)
    monkeypatch.setattr(flash_decode, "_decode_combine_kernel", _Recorder(flash_decode._decode_combine_kernel))
    q, k, v = _qkv(2, 4096, torch.float32)
    flash_decode_triton(q, k, v, window_left=100, num_splits=num_splits)
    ((grid, args),) = split.launches
    assert grid[0] == args["num_splits"]
    assert args["window_left"] == 100
    # split s covers [key_lo + s * split_size, ...) up to the last key, key_lo = 4096 - 2 - 100: together
    # exactly the 102 keys the two queries see
    assert args["num_splits"] * args["split_size"] >= 102 > (args["num_splits"] - 1) * args["split_size"]
    assert args["split_size"] % args["BLOCK_N"] == 0
    assert args["num_splits"] == min(num_splits, math.ceil(102 / args["BLOCK_N"]))


def test_num_splits_must_be_positive():
    q, k, v = _qkv(1, SK, torch.float32)
    with pytest.raises(ValueError, match=r"num_splits must be a positive int or None, got 0"):
        flash_decode_triton(q, k, v, num_splits=0)


@pytest.mark.parametrize("features", (("window40",), ("softcap",), ("sinks",), ("window5", "softcap", "sinks")),
                         ids=("window", "softcap", "sinks", "all"))
def test_backend_routes_windowed_softcap_sinks_decode_to_the_decode_kernel(monkeypatch, features):
    calls = []

    def recording(*args, **kwargs):
        calls.append(args)
        return flash_decode_triton(*args, **kwargs)

    monkeypatch.setattr(flash_decode, "flash_decode_triton", recording)
    q, k, v = _qkv(1, glue.DECODE_MIN_KEYS, torch.float32)
    kw = dict(dict(window_left=-1, softcap=0.0, sinks=None), **_features(features, Sk=glue.DECODE_MIN_KEYS))
    out, lse = glue.triton_flash_attention_fwd(q, k, v, True, 0.2, None, None, None, 0, None, 0, kw["window_left"],
                                               -1, kw["softcap"], kw["sinks"])
    assert len(calls) == 1
    want_out, want_lse = _reference(q.double(), k.double(), v.double(), softmax_scale=0.2, **kw)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=0)


# packed caches: per sequence (queries, keys); a sequence without queries, one whose first
# query sits before its single key, one as long as three interpreter splits
VARLEN = ((1, 40), (3, 70), (0, 5), (2, 1), (2, 33))


def _packed(dtype, lengths=VARLEN, seed=0):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(n for n, _ in lengths), sum(n for _, n in lengths)
    q = torch.randn(HQ, tq, D, generator=g).to(DEVICE, dtype).transpose(0, 1)  # [T, H, D] with a head stride of D
    k, v = (torch.randn(tk, HKV, D, generator=g).to(DEVICE, dtype) for _ in range(2))

    def offsets(ns):
        return torch.tensor([0, *torch.tensor(ns).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)

    return q, k, v, offsets([n for n, _ in lengths]), offsets([n for _, n in lengths])


@pytest.mark.parametrize("features", ("window5", "window40", "all"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16), ids=("fp32", "bf16"))
def test_varlen_decode_over_packed_caches(features, dtype):
    q, k, v, cu_seqlens, cu_seqlens_k = _packed(dtype)
    kw = _features(FEATURES[features])
    kw.pop("key_padding_mask", None)  # packed sequences carry no padding
    window_left = kw.pop("window_left")
    # keys no query of their sequence can see hold NaN: one read would make the output NaN
    poisoned_k, poisoned_v = k.clone(), v.clone()
    for (n_q, n_k), start in zip(VARLEN, cu_seqlens_k.tolist()):
        first = max(0, n_k - n_q - window_left)
        poisoned_k[start:start + first] = math.nan
        poisoned_v[start:start + first] = math.nan
    out, lse = flash_decode_triton(q, poisoned_k, poisoned_v, window_left=window_left, cu_seqlens=cu_seqlens,
                                   max_seqlen=3, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=70, num_splits=3, **kw)
    assert out.shape == q.shape and out.dtype == dtype and out.is_contiguous() and lse.shape == (HQ, q.shape[0])
    assert out.isfinite().all()

    def reference(*t):
        return ref.flash_attention_varlen(*t, cu_seqlens, True, None, kw.get("alibi_slopes"), cu_seqlens_k=cu_seqlens_k,
                                          window_size=(window_left, -1), softcap=kw.get("softcap", 0.0),
                                          sinks=kw.get("sinks"))

    exact_out, exact_lse = reference(q.double(), k.double(), v.double())
    if dtype == torch.float32:
        torch.testing.assert_close(out.double(), exact_out, atol=2e-5, rtol=0)
    else:
        lowp = []
        for (a, b), (c, d) in zip(zip(cu_seqlens.tolist(), cu_seqlens.tolist()[1:]),
                                  zip(cu_seqlens_k.tolist(), cu_seqlens_k.tolist()[1:])):
            o = _attention_in(dtype, *(t.transpose(0, 1).unsqueeze(0) for t in (q[a:b], k[c:d], v[c:d])),
                              window_left=window_left, **kw)
            lowp.append(o[0].transpose(0, 1))
        _assert_honest(out, torch.cat(lowp), exact_out, "out")
    torch.testing.assert_close(lse.double(), exact_lse, atol=2e-5, rtol=0)


def test_varlen_decode_with_keys_packed_like_queries():
    lengths = ((3, 3), (1, 1), (4, 4))
    q, k, v, cu_seqlens, _ = _packed(torch.float32, lengths)
    kw = _features(("softcap", "sinks"))
    out, lse = flash_decode_triton(q, k, v, cu_seqlens=cu_seqlens, max_seqlen=4, window_left=1, num_splits=2, **kw)
    want_out, want_lse = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_seqlens, True,
                                                    window_size=(1, -1), **kw)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=0)


@pytest.mark.parametrize("varlen", (False, True), ids=("dense", "varlen"))
def test_head_dim_with_a_stride_is_read_like_a_contiguous_copy(varlen):
    # the launcher copies a tensor whose head dim is not unit-stride: the kernel must then
    # walk the copy's strides, not the original's
    if varlen:
        q, k, v, cu_seqlens, cu_seqlens_k = _packed(torch.float32)
        kw = dict(cu_seqlens=cu_seqlens, max_seqlen=3, cu_seqlens_k=cu_seqlens_k, max_seqlen_k=70)
    else:
        q, k, v = _qkv(3, SK, torch.float32)
        kw = {}
    strided = [t.transpose(0, -1).contiguous().transpose(0, -1) for t in (q, k, v)]
    assert all(t.stride(-1) != 1 for t in strided)
    out, lse = flash_decode_triton(*strided, num_splits=2, **kw)
    want_out, want_lse = flash_decode_triton(*(t.contiguous() for t in (q, k, v)), num_splits=2, **kw)
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse)


def test_backend_routes_varlen_decode_over_packed_caches_to_the_decode_kernel(monkeypatch):
    calls = []

    def recording(*args, **kwargs):
        calls.append(args)
        return flash_decode_triton(*args, **kwargs)

    monkeypatch.setattr(flash_decode, "flash_decode_triton", recording)
    lengths = ((1, glue.DECODE_MIN_KEYS), (2, 40))
    q, k, v, cu_seqlens, cu_seqlens_k = _packed(torch.float32, lengths)
    kw = _features(("softcap", "sinks"))
    out, lse = glue.triton_flash_attention_fwd(q, k, v, True, 0.2, None, None, cu_seqlens, 2, cu_seqlens_k,
                                               glue.DECODE_MIN_KEYS, 40, -1, kw["softcap"], kw["sinks"])
    assert len(calls) == 1
    want_out, want_lse = ref.flash_attention_varlen(q.double(), k.double(), v.double(), cu_seqlens, True, 0.2,
                                                    cu_seqlens_k=cu_seqlens_k, window_size=(40, -1), **kw)
    torch.testing.assert_close(out.double(), want_out, atol=2e-5, rtol=0)
    torch.testing.assert_close(lse.double(), want_lse, atol=2e-5, rtol=0)
