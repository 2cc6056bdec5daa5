"""Patched attention beyond stock-vs-patched logits: Bloom's ALiBi slopes computed here (the
oldest supported transformers has no `_get_alibi_slopes`), and no device reads in Bloom's layers."""

import sys
from collections import Counter

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM
from transformers.models.bloom import modeling_bloom

from qlora_kernels.patching.attention import alibi_slopes, patch_attention


def _bloom(n_head, layers=2):
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=8 * n_head, n_layer=layers,
                                        n_head=n_head)).eval()


# --- Bloom's ALiBi slopes ---------------------------------------------------------------

@pytest.mark.parametrize("num_heads", [1, 2, 3, 4, 5, 6, 7, 8, 12, 16, 20, 32, 48, 112])
def test_alibi_slopes_are_those_stock_bloom_adds(num_heads):
    # stock Bloom's ALiBi bias of one unpadded row at key positions 0 and 1: 0 and the slope.
    # Stock raises a rounded fp32 ratio to integer powers, ours are rounded once: a few ulps apart
    alibi = modeling_bloom.build_alibi_tensor(torch.ones(1, 2), num_heads, torch.float32)[:, 0]
    assert torch.equal(alibi[:, 0], torch.zeros(num_heads))
    torch.testing.assert_close(torch.tensor(alibi_slopes(num_heads), dtype=torch.float32), alibi[:, 1],
                               rtol=1e-6, atol=0)


def test_alibi_slopes_bad_head_count():
    with pytest.raises(ValueError, match="num_heads must be >= 1, got 0"):
        alibi_slopes(0)


@pytest.mark.parametrize("n_head", [4, 6])  # a power of two and not
def test_patched_bloom_attention_runs_without_transformers_alibi_slopes(monkeypatch, n_head):
    model = _bloom(n_head)
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    mask[1, :4] = 0
    attentions = [block.self_attention for block in model.transformer.h]
    calls = []
    hooks = [m.register_forward_hook(lambda m, args, kwargs, out: calls.append((m, args, kwargs, out[0])),
                                     with_kwargs=True) for m in attentions]
    with torch.no_grad():
        model(ids, attention_mask=mask, use_cache=False)
    for h in hooks:
        h.remove()
    patch_attention(model)
    # transformers 5.17 has no _get_alibi_slopes; BloomModel.forward of later releases does
    # use it, so each attention layer is called on the inputs stock Bloom gave it
    monkeypatch.delattr(modeling_bloom, "_get_alibi_slopes", raising=False)
    keep = mask.bool()
    for module, args, kwargs, want in calls:
        with torch.no_grad():
            got, _ = module(*args, **kwargs)
        torch.testing.assert_close(got[keep], want[keep], atol=1e-5, rtol=1e-5)


# --- device reads once per batch ----------------------------------------------------------

_HOST_READS = [(torch, "nonzero"), (torch.Tensor, "nonzero"), (torch.Tensor, "item"), (torch.Tensor, "tolist"),
               (torch.Tensor, "cpu"), (torch.Tensor, "__bool__"), (torch.Tensor, "__int__"),
               (torch.Tensor, "__float__")]


@pytest.fixture
def host_reads(monkeypatch):
    """Counts, per kind, the calls made from qlora_kernels' own code that wait for the device
    on a GPU (a data-dependent size or a value read on the host)."""
    counts = Counter()

    def counting(owner, name, original):
        def wrapper(*args, **kwargs):
            if sys._getframe(1).f_globals.get("__name__", "").startswith("qlora_kernels"):
                counts[name] += 1
            return original(*args, **kwargs)
        return wrapper

    for owner, name in _HOST_READS:
        monkeypatch.setattr(owner, name, counting(owner, name, getattr(owner, name)))
    return counts


def test_bloom_reads_nothing_from_the_device(host_reads):
    model = _bloom(4, layers=4)
    ids = torch.randint(3, 128, (2, 12))
    mask = torch.ones(2, 12, dtype=torch.long)
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        patch_attention(model)
        host_reads.clear()
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not host_reads, host_reads
