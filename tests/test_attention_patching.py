"""Patched attention beyond stock-vs-patched logits: Bloom's ALiBi slopes computed here (the
oldest supported transformers has no `_get_alibi_slopes`), packed sequences under
torch.compile, and device reads once per batch instead of once per layer."""

import sys
from collections import Counter

import pytest
import torch
from transformers import BloomConfig, BloomForCausalLM, LlamaConfig, LlamaForCausalLM
from transformers.models.bloom import modeling_bloom

from qlora_kernels.patching import patch_attention
from qlora_kernels.patching.attention import cu_seqlens_from_position_ids
from qlora_kernels.patching.bloom import alibi_slopes


def _llama(layers=2):
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128,
                                        num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                                        max_position_embeddings=128)).eval()


def _bloom(n_head, layers=2):
    torch.manual_seed(0)
    return BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=8 * n_head, n_layer=layers,
                                        n_head=n_head)).eval()


def _documents(lengths):
    torch.manual_seed(1)
    seqs = [torch.randint(3, 128, (n,)) for n in lengths]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None]
    return seqs, torch.cat(seqs)[None], position_ids


def _per_document_logits(model, seqs):
    with torch.no_grad():
        return torch.cat([model(s[None]).logits[0] for s in seqs])


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
    for module, args, kwargs, want in calls:
        with torch.no_grad():
            got, _ = module(*args, **kwargs)
        # the left pads too: their queries see no key, and get stock's mean of the values
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


# --- packed sequences ----------------------------------------------------------------------

@pytest.mark.parametrize("positions, offsets", [
    ([0, 1, 2, 0, 1, 0, 1, 2, 3], [0, 3, 5, 9]),
    ([0, 1, 2, 3], [0, 4]),
    ([4, 5, 0, 1, 2, 0], [0, 2, 5, 6]),  # a batch may start mid-document
])
def test_cu_seqlens_from_position_ids(positions, offsets):
    position_ids = torch.tensor([positions])
    assert cu_seqlens_from_position_ids(position_ids).tolist() == offsets
    torch.library.opcheck(cu_seqlens_from_position_ids, (position_ids,))


def test_packed_batch_starting_mid_document_matches_stock_per_document():
    model = _llama()
    seqs, ids, _ = _documents([4, 7, 5])
    position_ids = torch.cat([torch.arange(3, 7), torch.arange(7), torch.arange(5)])[None]
    with torch.no_grad():
        want = torch.cat([model(seqs[0][None], position_ids=position_ids[:, :4]).logits[0],
                          _per_document_logits(model, seqs[1:])])
        patch_attention(model)
        got = model(ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --- packed sequences under torch.compile -------------------------------------------------

def test_packed_sequences_under_compile_attend_within_their_document():
    model = _llama()
    seqs, ids, position_ids = _documents([5, 11, 8])
    want = _per_document_logits(model, seqs)
    patch_attention(model)

    def logits(ids, position_ids):
        return model(ids, position_ids=position_ids).logits[0]

    with torch.no_grad():
        eager = logits(ids, position_ids)
        compiled = torch.compile(logits, fullgraph=True, backend="aot_eager")(ids, position_ids)
    torch.testing.assert_close(eager, want, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(compiled, want, atol=2e-5, rtol=1e-4)


def test_packed_sequences_under_compile_gradients_match_eager():
    model = _llama().train()
    _, ids, position_ids = _documents([7, 4, 9])
    patch_attention(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def loss(ids, position_ids):
        return model(ids, position_ids=position_ids, labels=ids).loss

    want = loss(ids, position_ids)
    want_grads = torch.autograd.grad(want, params)
    got = torch.compile(loss, fullgraph=True, backend="aot_eager")(ids, position_ids)
    grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-6, rtol=1e-4)


@pytest.mark.parametrize("max_length", [11, None])
def test_collator_cu_seq_lens_are_honoured_under_compile(max_length):
    # DataCollatorWithFlattening(return_flash_attn_kwargs=True) gives offsets and no restart
    # in position_ids here: RoPE is relative, so only the offsets keep documents apart
    model = _llama()
    seqs, ids, _ = _documents([5, 11, 8])
    want = _per_document_logits(model, seqs)
    patch_attention(model)
    cu = torch.tensor([0, 5, 16, 24], dtype=torch.int32)

    def logits(ids, cu):
        return model(ids, cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=max_length,
                     max_length_k=max_length).logits[0]

    with torch.no_grad():
        torch.testing.assert_close(logits(ids, cu), want, atol=2e-5, rtol=1e-4)
        compiled = torch.compile(logits, fullgraph=True, backend="aot_eager")(ids, cu)
    torch.testing.assert_close(compiled, want, atol=2e-5, rtol=1e-4)


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


def test_packing_is_read_from_the_device_once_per_batch(host_reads):
    model = _llama(layers=4)
    seqs, ids, position_ids = _documents([5, 11, 8])
    want = _per_document_logits(model, seqs)
    patch_attention(model)
    host_reads.clear()
    with torch.no_grad():
        got = model(ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert host_reads and max(host_reads.values()) == 1, host_reads
    # the same tensor updated in place is another batch
    seqs, ids, new_positions = _documents([9, 6, 9])
    position_ids.copy_(new_positions)
    want = _per_document_logits(model, seqs)
    host_reads.clear()
    with torch.no_grad():
        got = model(ids, position_ids=position_ids).logits[0]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert max(host_reads.values()) == 1, host_reads


@pytest.mark.parametrize("train", [False, True])
def test_packing_under_compile_is_read_once_per_forward(monkeypatch, train):
    from qlora_kernels.patching import attention

    model = _llama(layers=4).train(train)
    _, ids, position_ids = _documents([5, 11, 8])
    patch_attention(model)
    reads = []
    offsets = attention._offsets_from_position_ids
    monkeypatch.setattr(attention, "_offsets_from_position_ids", lambda p: reads.append(p) or offsets(p))

    def loss(ids, position_ids):
        return model(ids, position_ids=position_ids, labels=ids).loss

    compiled = torch.compile(loss, fullgraph=True, backend="aot_eager")
    with torch.set_grad_enabled(train):
        for _ in range(2):  # a new position_ids tensor each batch
            reads.clear()
            out = compiled(ids, position_ids.clone())
            if train:
                out.backward()
            assert len(reads) == 1


@pytest.mark.parametrize("cache", [None, "static"])
def test_bloom_reads_nothing_from_the_device(host_reads, cache):
    # left padding (queries that see no key are found on the device) and a static cache (its
    # length is a device value) included: a prefill of 12 tokens, then 3 more at once
    from transformers import StaticCache

    model = _bloom(4, layers=4)
    ids, more = torch.randint(3, 128, (2, 12)), torch.randint(3, 128, (2, 3))
    mask = torch.ones(2, 18, dtype=torch.long)
    mask[1, :4] = 0
    mask[:, 15:] = 0  # the cache's empty slots, as Bloom's generate pads its mask

    def logits():
        past = StaticCache(config=model.config, max_cache_len=18) if cache else None
        first = model(ids, attention_mask=mask[:, :12] if past is None else mask, past_key_values=past).logits
        if past is None:
            return first
        return torch.cat([first, model(more, attention_mask=mask, past_key_values=past).logits], 1)

    with torch.no_grad():
        want = logits()
        patch_attention(model)
        host_reads.clear()
        got = logits()
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    assert not host_reads, host_reads


def test_rows_without_key_are_read_once_per_batch_and_window(host_reads):
    # Gemma2's attention was eager before the patch: its left pads get eager's value, and the
    # pads are found on the host once per forward and window, not in each of the 4 layers
    from transformers import Gemma2Config, Gemma2ForCausalLM

    torch.manual_seed(0)
    config = Gemma2Config(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                          num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=4,
                          query_pre_attn_scalar=16, attn_implementation="eager")
    model = Gemma2ForCausalLM(config).eval()
    ids = torch.randint(3, 128, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.long)
    mask[1, :3] = 0
    with torch.no_grad():
        want = model(ids, attention_mask=mask).logits
        patch_attention(model)
        host_reads.clear()
        got = model(ids, attention_mask=mask).logits
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)  # the pads' rows too
    assert host_reads == {"nonzero": 2}, host_reads
