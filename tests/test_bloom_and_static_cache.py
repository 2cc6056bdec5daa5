"""Patched attention where the kernels' conventions differ from stock transformers: Bloom's
padded batches (a left pad's query sees no key), a static KV cache's empty slots (prefill,
chunks, greedy generation, compiled decoding) and Bloom under torch.compile(fullgraph=True)."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import StaticCache

from qlora_kernels import flash_attention
from qlora_kernels.patching import patch_attention
from qlora_kernels.patching.kv_cache import keys_seen_by_queries
from qlora_kernels.reference.attention import flash_attention as reference_attention

from helpers import tiny_causal_lm

FAMILIES = ["llama", "opt", "bloom"]


def make(family):
    return tiny_causal_lm(family, 32).eval()


def _batch(padding, length=12, pads=4):
    torch.manual_seed(1)
    ids = torch.randint(3, 128, (2, length))
    mask = torch.ones(2, length, dtype=torch.long)
    if padding == "left":
        mask[1, :pads] = 0
    elif padding == "right":
        mask[1, -pads:] = 0
    return ids, mask


# --- Bloom with padding ---------------------------------------------------------------------

def _loss_logits_grads(model, ids, mask):
    model.zero_grad()
    # every real token is a label, the first one too: the last left pad predicts it
    out = model(ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100), use_cache=False)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), out.logits.detach(), grads


@pytest.mark.parametrize("adapter", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("padding", ["left", "right"])
def test_bloom_padded_batch_loss_logits_and_grads_match_stock(padding, adapter):
    model = make("bloom").train()
    if adapter:  # random lora_B too, so that lora_A gets a gradient
        model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, target_modules=["query_key_value", "dense"],
                                                 init_lora_weights=False))
    ids, mask = _batch(padding)
    want_loss, want_logits, want_grads = _loss_logits_grads(model, ids, mask)
    patch_attention(model)
    loss, logits, grads = _loss_logits_grads(model, ids, mask)
    torch.testing.assert_close(loss, want_loss, atol=1e-6, rtol=1e-6)
    # the pads' logits too: a pad's hidden state is what stock gives it
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name, want in want_grads.items():
        torch.testing.assert_close(grads[name], want, atol=1e-6, rtol=1e-4, msg=name)


# --- static KV cache ------------------------------------------------------------------------

@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "compiled"])
@pytest.mark.parametrize("num_queries", [1, 3])
@pytest.mark.parametrize("last_slot", ["int", "tensor", "per_row", "mask"])
def test_keys_seen_by_queries_put_each_query_at_its_cache_slot(last_slot, num_queries, compiled):
    # a cache of 12 slots holding 9 (10 in the second row for per_row) tokens, the last
    # num_queries of them queries; empty slots hold large values that would show if attended
    batch, heads, slots, dim = 2, 2, 12, 8
    lengths = [9, 10] if last_slot == "per_row" else [9, 9]
    q = torch.randn(batch, heads, num_queries, dim)
    k, v = torch.randn(batch, heads, slots, dim), torch.randn(batch, heads, slots, dim)
    for b, n in enumerate(lengths):
        k[b, :, n:], v[b, :, n:] = 50.0, 1e4
    slopes = torch.tensor([0.5, 0.25])
    padding = torch.ones(batch, 9, dtype=torch.bool)
    padding[1, :2] = False  # a left-padded row
    given = {"int": (None, 8), "tensor": (None, torch.tensor(8)),
             "per_row": (None, torch.tensor([[8], [9]])), "mask": (padding, None)}[last_slot]

    def attend(q, k, v, padding, last_slot):
        keys, values, mask = keys_seen_by_queries(k, v, padding, num_queries, last_slot)
        return flash_attention(q, keys, values, causal=True, alibi_slopes=slopes, key_padding_mask=mask)

    if compiled:  # lengths symbolic: the mask's length and the slot are then traced, not read
        attend = torch.compile(attend, fullgraph=True, backend="aot_eager", dynamic=True)
    got = attend(q, k, v, *given)
    for b, n in enumerate(lengths):
        row_mask = padding[b:b + 1] if last_slot == "mask" else None
        want, _ = reference_attention(q[b:b + 1], k[b:b + 1, :, :n], v[b:b + 1, :, :n], True, None, slopes, row_mask)
        torch.testing.assert_close(got[b:b + 1], want, atol=1e-5, rtol=1e-5)


SLOTS = 24


def _cache(model):
    return StaticCache(config=model.config, max_cache_len=SLOTS)


def _static_mask(model, mask):
    """The 2-D mask a static cache takes: Bloom's spans the cache (its generate pads it with
    zeros, stock Bloom builds ALiBi from it), the others' the tokens seen so far."""
    if mask is None or model.config.model_type != "bloom":
        return mask
    return torch.nn.functional.pad(mask, (0, SLOTS - mask.shape[1]))


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_and_a_chunk_into_a_static_cache_match_stock(family, padding):
    # a prompt, then 3 more tokens at once: several queries at cache positions 12..14
    model = make(family)
    ids, mask = _batch(padding)
    more = torch.randint(3, 128, (2, 3))
    full_mask = torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1)

    def chunks():
        cache = _cache(model)
        # stock Bloom on transformers 5.17 needs a mask with a static cache
        given = padding != "none" or family == "bloom"
        masks = [_static_mask(model, m) for m in (mask, full_mask)] if given else (None, None)
        with torch.no_grad():
            first = model(ids, attention_mask=masks[0], past_key_values=cache).logits
            second = model(more, attention_mask=masks[1], past_key_values=cache).logits
        return torch.cat([first, second], 1)

    want = chunks()
    patch_attention(model)
    got = chunks()
    # Bloom's pads are stock's too; the interface families give 0 there, SDPA's convention
    keep = full_mask.bool() if family != "bloom" else torch.ones_like(full_mask, dtype=torch.bool)
    torch.testing.assert_close(got[keep], want[keep], atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("padding", ["none", "left"])
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_with_a_static_cache_equals_the_dynamic_cache(family, padding):
    model = make(family)
    ids, mask = _batch(padding)
    kwargs = dict(max_new_tokens=8, do_sample=False, pad_token_id=0, output_logits=True,
                  return_dict_in_generate=True)
    if padding != "none":
        kwargs["attention_mask"] = mask
    want = model.generate(ids, **kwargs)
    patch_attention(model)
    for cache in ["static", None]:
        got = model.generate(ids, cache_implementation=cache, **kwargs)
        assert torch.equal(got.sequences, want.sequences), cache
        torch.testing.assert_close(torch.stack(got.logits), torch.stack(want.logits), atol=2e-5, rtol=1e-4)


def _compiled_greedy(model, ids, mask, steps):
    """Prefill eagerly into a static cache, then decode with a forward compiled as one graph."""
    cache = _cache(model)
    decode = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    logits = model(ids, attention_mask=_static_mask(model, mask), past_key_values=cache).logits[:, -1]
    all_logits = [logits]
    for _ in range(steps - 1):
        token = logits.argmax(-1, keepdim=True)
        if mask is not None:
            mask = torch.cat([mask, torch.ones_like(token)], 1)
        logits = decode(token, attention_mask=_static_mask(model, mask), past_key_values=cache).logits[:, -1]
        all_logits.append(logits)
    return torch.stack(all_logits)


@pytest.mark.parametrize("family, padding", [("llama", "none"), ("opt", "left"), ("bloom", "left")])
def test_compiled_decoding_with_a_static_cache_matches_stock(family, padding):
    model = make(family)
    ids, mask = _batch(padding)
    kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0, output_logits=True, return_dict_in_generate=True)
    want = torch.stack(model.generate(ids, attention_mask=mask if padding != "none" else None, **kwargs).logits)
    patch_attention(model)
    with torch.no_grad():
        got = _compiled_greedy(model, ids, mask if padding != "none" else None, 4)
    torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)


# --- Bloom under torch.compile --------------------------------------------------------------

def test_compiled_bloom_loss_and_grads_match_eager():
    model = make("bloom").train()
    ids, mask = _batch("left")
    labels = ids.masked_fill(mask == 0, -100)
    patch_attention(model)

    def loss(ids, mask, labels):
        return model(ids, attention_mask=mask, labels=labels, use_cache=False).loss

    def loss_and_grads(fn):
        model.zero_grad()
        out = fn(ids, mask, labels)
        out.backward()
        return out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}

    want_loss, want_grads = loss_and_grads(loss)
    got_loss, got_grads = loss_and_grads(torch.compile(loss, fullgraph=True, backend="aot_eager"))
    torch.testing.assert_close(got_loss, want_loss, atol=1e-6, rtol=1e-6)
    for name, want in want_grads.items():
        torch.testing.assert_close(got_grads[name], want, atol=1e-6, rtol=1e-5, msg=name)
