"""Patched attention vs stock (SDPA, and eager for Bloom) on small random Llama (GQA), OPT
and Bloom models: logits, gradients, greedy generation, packed sequences, unpatch. The model-level
comparisons also run on a CUDA machine (the `cuda` parameters, `pytest -m gpu`), with the same
criteria: fp32 ones within summation-order tolerances, bf16 ones by the 2x rule."""

import pytest
import torch

from qlora_kernels.patching import patch_attention, unpatch_attention

from helpers import DEVICES, grad_error, tiny_causal_lm


def make(family, dtype=torch.float32, device="cpu"):
    return tiny_causal_lm(family, 64, dtype, device)


FAMILIES = ["llama", "opt", "bloom"]


def _inputs(device="cpu"):
    ids = torch.randint(3, 128, (2, 16))
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, :5] = 0  # left padding
    return ids.to(device), mask.to(device)


def _loss_and_grads(model, ids, mask):
    model.zero_grad()
    # the first real token is predicted from the last padding position: the pad rows count
    labels = ids.masked_fill(mask == 0, -100)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.logits.detach(), out.loss.detach(), grads


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_fp32_logits_and_grads_match_stock(family, device):
    model = make(family, device=device).train()
    ids, mask = _inputs(device)
    ref_logits, ref_loss, ref_grads = _loss_and_grads(model, ids, mask)
    assert patch_attention(model)
    logits, loss, grads = _loss_and_grads(model, ids, mask)
    torch.testing.assert_close(logits, ref_logits, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(loss, ref_loss, atol=2e-6, rtol=1e-5)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], atol=5e-5, rtol=1e-3, msg=name)
    unpatch_attention(model)
    logits_back, _, _ = _loss_and_grads(model, ids, mask)
    assert torch.equal(logits_back, ref_logits)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_logits_and_grads_within_twice_pytorchs_own_error(family, device):
    ids, mask = _inputs(device)
    keep = mask.bool()
    exact_logits, _, exact_grads = _loss_and_grads(make(family, torch.float32, device).train(), ids, mask)
    model = make(family, torch.bfloat16, device).train()
    stock_logits, _, stock_grads = _loss_and_grads(model, ids, mask)
    patch_attention(model)
    logits, _, grads = _loss_and_grads(model, ids, mask)
    stock_err = (stock_logits[keep].float() - exact_logits[keep]).abs().max()
    ours_err = (logits[keep].float() - exact_logits[keep]).abs().max()
    assert ours_err <= 2 * stock_err + 1e-3, (ours_err, stock_err)
    ours_gerr, stock_gerr = grad_error(grads, exact_grads), grad_error(stock_grads, exact_grads)
    assert ours_gerr <= 2 * stock_gerr + 1e-3, (ours_gerr, stock_gerr)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generate_left_padded_batch_same_tokens(family, device):
    model = make(family, device=device).eval()
    ids, mask = _inputs(device)
    kwargs = dict(attention_mask=mask, max_new_tokens=32, do_sample=False, pad_token_id=0)
    want = model.generate(ids, **kwargs)
    patch_attention(model)
    assert torch.equal(model.generate(ids, **kwargs), want)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", ["llama", "opt"])
def test_packed_batch_gives_the_same_loss_as_unpacked(family, device):
    model = make(family, device=device).train()
    lengths = [5, 11, 8]
    seqs = [torch.randint(3, 128, (n,)).to(device) for n in lengths]
    patch_attention(model)
    # unpacked: one forward per sequence, token-weighted mean of the per-sequence losses
    total, count = 0.0, 0
    for s in seqs:
        out = model(s[None], labels=s[None])
        total += out.loss * (len(s) - 1)
        count += len(s) - 1
    packed_ids = torch.cat(seqs)[None]
    position_ids = torch.cat([torch.arange(n) for n in lengths])[None].to(device)
    labels = torch.cat([torch.cat([s[:1].new_full((1,), -100), s[1:]]) for s in seqs])[None]
    # labels are shifted inside the model: mask each sequence's first token as a target
    out = model(packed_ids, position_ids=position_ids, labels=labels)
    torch.testing.assert_close(out.loss, total / count, atol=1e-5, rtol=1e-5)


def test_patch_twice_is_a_noop_and_reports():
    model = make("llama")
    first = patch_attention(model)
    assert model.config._attn_implementation == "qlora_kernels"
    patch_attention(model)
    unpatch_attention(model)
    assert model.config._attn_implementation == "sdpa", first


def test_from_pretrained_with_attn_implementation_qlora_kernels(tmp_path):
    import qlora_kernels
    from transformers import AutoModelForCausalLM

    make("llama").save_pretrained(tmp_path)
    qlora_kernels.register_attention()
    model = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="qlora_kernels")
    assert model.config._attn_implementation == "qlora_kernels"
    stock = AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa")
    ids, mask = _inputs()
    with torch.no_grad():
        keep = mask.bool()
        torch.testing.assert_close(model(ids, attention_mask=mask).logits[keep],
                                   stock(ids, attention_mask=mask).logits[keep], atol=2e-5, rtol=1e-4)
