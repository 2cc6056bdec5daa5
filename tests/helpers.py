"""Shared test inputs: the bitsandbytes oracle and weights with awkward values."""

from __future__ import annotations

import contextlib
import math

import pytest
import torch

from qlora_kernels.reference.attention import keep_mask

# Whole-model tests run on the CPU and, on a CUDA machine (`pytest -m gpu`), on the GPU:
# bitsandbytes' CUDA kernels against ours
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
BLOCKSIZES = (32, 64, 128, 256, 512, 1024, 2048, 4096)
# odd counts, shorter than a block, partial last blocks, exact multiples
SIZES = (1, 2, 3, 31, 63, 64, 65, 1000, 4096 + 17, 3 * 4096)


@contextlib.contextmanager
def num_threads(n: int):
    """torch's thread count (the one every CPU kernel is given) set to n, then restored."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def weight(n_or_shape, dtype=torch.float32, device="cpu"):
    """Normal values plus the edge cases that catch rounding and tie bugs: a zero block,
    a block with a single non-zero, exact NF4 midpoints of the block max, huge and tiny scales."""
    shape = (n_or_shape,) if isinstance(n_or_shape, int) else tuple(n_or_shape)
    w = torch.randn(shape, dtype=torch.float32, device=device)
    flat = w.view(-1)
    n = flat.numel()
    if n >= 128:
        flat[:64] = 0
        flat[64:128] = 0
        flat[70] = -3.0
    if n >= 256:
        from qlora_kernels.reference import nf4_midpoints

        mids = nf4_midpoints()
        flat[128:143] = mids * 2.0  # block max below is 2.0, so these scale to exact midpoints
        flat[143] = 2.0
    if n >= 512:
        flat[256:384] *= 1e-30  # fp16: subnormals and zeros
        flat[384:512] *= 1e3 if dtype == torch.float16 else 1e30
    return w.to(dtype)


def bnb_quantize(w, blocksize, double_quant=True, quant_storage=torch.uint8):
    import bitsandbytes.functional as F

    return F.quantize_4bit(w, blocksize=blocksize, compress_statistics=double_quant, quant_type="nf4",
                           quant_storage=quant_storage)


def bnb_dequantize(packed, qs):
    import bitsandbytes.functional as F

    return F.dequantize_4bit(packed, qs, quant_type="nf4")


def grad_error(grads: dict, exact: dict) -> float:
    """Relative L2 error of a gradient dict against exact ones (the 2x-PyTorch's-own-error tests)."""
    num = sum((grads[n].float() - exact[n].float()).square().sum() for n in exact)
    return float((num / sum(g.float().square().sum() for g in exact.values())).sqrt())


def assert_same_loss_and_grads(got, want) -> None:
    """(loss, {name: grad}) of two runs bit for bit: the same loss, gradient names and gradients."""
    (loss, grads), (want_loss, want_grads) = got, want
    assert torch.equal(loss, want_loss) and grads.keys() == want_grads.keys()
    assert all(torch.equal(grads[n], want_grads[n]) for n in want_grads)


def assert_close_loss_and_grads(got, want, atol=1e-5, rtol=1e-4) -> None:
    """(loss, {name: grad}) of two runs within atol / rtol, the same gradient names."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, atol=atol, rtol=rtol)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=atol, rtol=rtol, msg=name)


def assert_within_twice_stock_error(ours: tuple, stock: tuple, exact: tuple) -> None:
    """(loss, grads) of the patched and the stock model in bf16 / fp16 against the fp32 stock run
    `exact`: the patched model's loss and gradient errors are at most twice stock's own (+ 1e-3)."""
    (loss, grads), (stock_loss, stock_grads), (exact_loss, exact_grads) = ours, stock, exact
    stock_err, ours_err = (stock_loss.float() - exact_loss.float()).abs(), (loss.float() - exact_loss.float()).abs()
    assert ours_err <= 2 * stock_err + 1e-3, (ours_err, stock_err)
    ours_gerr, stock_gerr = grad_error(grads, exact_grads), grad_error(stock_grads, exact_grads)
    assert ours_gerr <= 2 * stock_gerr + 1e-3, (ours_gerr, stock_gerr)


def lora_inputs(M, N, K, r, dtype, has_bias, device, seed=0):
    """A LoRA linear's x, frozen W (fp32), bias, lora_A, lora_B and dy, drawn on the CPU from
    `seed` (the same values on every device), then moved to `device`."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, scale=1.0):
        return (torch.randn(shape, generator=g) * scale).to(device)

    return dict(
        x=randn(M, K).to(dtype),
        w=randn(N, K, scale=K**-0.5),
        bias=randn(N, scale=0.1).to(dtype) if has_bias else None,
        lora_A=randn(r, K, scale=K**-0.5).to(dtype),
        # PEFT starts lora_B at zero; non-zero so that every gradient path is exercised
        lora_B=randn(N, r, scale=0.5).to(dtype),
        dy=randn(M, N).to(dtype),
    )


def peft_like_lora(x, w, bias, lora_A, lora_B, scaling, keep, p):
    """The LoRA layer as PEFT runs it in x's dtype: each matmul's result rounded to the dtype."""
    base = torch.nn.functional.linear(x, w, bias)
    dropped = x if keep is None else x * keep.to(x.dtype) / (1.0 - p)
    return base + (dropped @ lora_A.t()) @ lora_B.t() * scaling


def tiny_causal_lm(family: str, hidden: int = 64, dtype=torch.float32, device="cpu"):
    """A random-init 2-layer Llama (GQA 4/2), OPT or Bloom of width `hidden` (seed 0): MLP and
    position tables twice that."""
    from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM, OPTConfig, OPTForCausalLM

    torch.manual_seed(0)
    if family == "llama":
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=hidden, intermediate_size=2 * hidden,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             max_position_embeddings=2 * hidden))
    elif family == "opt":
        model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=hidden, ffn_dim=2 * hidden, num_hidden_layers=2,
                                         num_attention_heads=4, word_embed_proj_dim=hidden, dropout=0.0,
                                         attention_dropout=0.0, max_position_embeddings=2 * hidden))
    elif family == "bloom":
        model = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=hidden, n_layer=2, n_head=4))
    else:
        raise ValueError(f"no tiny model for {family!r}")
    return model.to(device=device, dtype=dtype)


def attention_in_dtype(dtype, q, k, v, causal=True, softmax_scale=None, alibi_slopes=None, key_padding_mask=None,
                  window_size=(-1, -1), softcap=0.0, sinks=None):
    """The reference's math carried out in `dtype` (matmuls and softmax), differentiable:
    the low-precision baseline of the honest tolerance."""
    B, Hq, Sq, D = q.shape
    Hkv, Sk = k.shape[1], k.shape[2]
    scale = softmax_scale if softmax_scale is not None else 1.0 / math.sqrt(D)
    q, k, v = q.to(dtype), k.to(dtype).repeat_interleave(Hq // Hkv, 1), v.to(dtype).repeat_interleave(Hq // Hkv, 1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    row = torch.arange(Sq, device=q.device)[:, None] + (Sk - Sq)
    col = torch.arange(Sk, device=q.device)[None, :]
    if alibi_slopes is not None:
        scores = scores - (alibi_slopes.view(1, Hq, 1, 1) * (col - row).abs()).to(dtype)
    keep = keep_mask(Sq, Sk, causal, window_size, q.device).view(1, 1, Sq, Sk)
    if key_padding_mask is not None:
        keep = keep & key_padding_mask.view(B, 1, 1, Sk)
    keep = keep.expand(B, Hq, Sq, Sk)
    scores = torch.where(keep, scores, torch.full_like(scores, -math.inf))
    if sinks is not None:
        scores = torch.cat([scores, sinks.to(dtype).view(1, Hq, 1, 1).expand(B, Hq, Sq, 1)], dim=-1)
        keep = torch.cat([keep, torch.ones_like(keep[..., :1])], dim=-1)
    any_key = keep.any(-1, keepdim=True)
    scores = torch.where(any_key, scores, torch.zeros_like(scores))
    probs = (torch.softmax(scores, -1) * any_key)[..., :Sk]
    return torch.matmul(probs, v)
