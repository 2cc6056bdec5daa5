"""qlora_kernels.patch / unpatch on whole QLoRA models (HF + bitsandbytes NF4 + PEFT LoRA) for
Llama (GQA), OPT and Bloom: patched vs stock loss and gradients, patch before / after
get_peft_model, quantize="nf4", unpatch back to stock bytes and logits, strictness.

The whole-model comparisons also run on a CUDA machine (the `cuda` parameters, `pytest -m gpu`).
Against bitsandbytes stock they run in bf16 there, as QLoRA trains on GPUs: each error against the
fp32 stock run at most twice stock's own (helpers.assert_within_twice_stock_error). The
quantize="nf4" tests stay fp32 (their stock side shares the NF4 weights in one dtype only), and so
does greedy generation, where a bf16 near-tie of two logits could flip a token."""

import warnings

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, GPT2Config, GPT2LMHeadModel

import qlora_kernels as qk
from qlora_kernels.modules import NF4Linear

from helpers import DEVICES, assert_within_twice_stock_error
from test_lora_any_model import OpCalls
from test_attention_models import make

FAMILIES = ["llama", "opt", "bloom"]
LORA_LAYERS = {"llama": 14, "opt": 12, "bloom": 8}  # all-linear, 2 blocks


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """A saved random-init bf16 checkpoint per family (the 'downloaded' model)."""
    root = tmp_path_factory.mktemp("ckpt")
    for family in FAMILIES:
        make(family, torch.bfloat16).save_pretrained(root / family)
    return root


def compute_dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def load_4bit(path, compute_dtype=torch.float32, device="cpu"):
    import bitsandbytes as bnb

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute_dtype, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map=device,
                                                 dtype=compute_dtype)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
    # bitsandbytes repacks its CPU weights in eval mode: stay in train mode (no dropout in these models)
    return model.train()


def add_lora(model, dropout=0.0, target_modules="all-linear"):
    torch.manual_seed(1)  # lora_A's init: the same in every model built here
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=dropout, target_modules=target_modules))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: make the LoRA branch count
            nn.init.normal_(p, std=0.05)
    return model


def batch(seed=0, vocab=128, shape=(2, 24)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, shape, generator=g)


def loss_and_grads(model, ids):
    model.zero_grad()
    ids = ids.to(next(model.parameters()).device)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return out.loss.detach(), grads


def byte_state(model):
    return {k: v.detach().reshape(-1).view(torch.uint8).clone() for k, v in model.state_dict().items()}


def assert_like_stock(got, want, path, device, ids):
    """(loss, grads) of the patched model against the stock model's `want`, both built from the
    checkpoint `path` on `device` in compute_dtype(device): fp32 on the CPU, where only the
    summation order differs; bf16 on a GPU, by the 2x rule against the fp32 stock run."""
    (loss, grads), (want_loss, want_grads) = got, want
    assert grads.keys() == want_grads.keys()
    if compute_dtype(device) != torch.float32:
        exact = loss_and_grads(add_lora(load_4bit(path, torch.float32, device)), ids)
        assert_within_twice_stock_error(got, want, exact)
        return
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=2e-5, rtol=1e-3, msg=name)


def assert_same_stock_run(got, want, device):
    """Two runs of the same stock model: bit-identical on the CPU. A GPU's SDPA backward may sum
    in another order from run to run (atomics), so there the gradients agree to bf16's resolution."""
    (loss, grads), (want_loss, want_grads) = got, want
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        if device == "cpu":
            assert torch.equal(grads[name], want_grads[name]), name
        else:
            torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=2**-7, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_after_peft_matches_stock_and_unpatch_restores_it(checkpoints, family, device):
    model = add_lora(load_4bit(checkpoints / family, compute_dtype(device), device))
    ids = batch()
    want_loss, want_grads = loss_and_grads(model, ids)
    stock_bytes = byte_state(model)
    n_params = sum(p.numel() for p in model.parameters())
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    packed_ptrs = sorted(m.weight.data_ptr() for m in model.modules() if type(m).__name__ == "Linear4bit"
                         and not hasattr(m, "lora_A"))

    assert qk.patch(model) is model
    report = qk.patch_report(model)
    assert report.family == family and report.attention
    assert len(report.lora_layers) == LORA_LAYERS[family] == len(report.converted)
    bases = [m for m in model.modules() if isinstance(m, NF4Linear)]
    assert sorted(m.weight.data_ptr() for m in bases) == packed_ptrs  # same bytes, not copies
    assert sum(p.numel() for p in model.parameters()) == n_params
    assert {n for n, p in model.named_parameters() if p.requires_grad} == trainable

    loss, grads = loss_and_grads(model, ids)
    assert len(grads) == 2 * LORA_LAYERS[family]
    assert_like_stock((loss, grads), (want_loss, want_grads), checkpoints / family, device, ids)

    qk.unpatch(model)
    assert qk.patch_report(model) is None
    assert not any(isinstance(m, NF4Linear) for m in model.modules())
    assert model.get_base_model().config._attn_implementation != "qlora_kernels"
    back = byte_state(model)
    assert back.keys() == stock_bytes.keys() and all(torch.equal(back[k], stock_bytes[k]) for k in back)
    assert_same_stock_run(loss_and_grads(model, ids), (want_loss, want_grads), device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_patch_before_get_peft_model_fuses_at_first_forward(checkpoints, family, device):
    dtype = compute_dtype(device)
    stock = add_lora(load_4bit(checkpoints / family, dtype, device))
    ids = batch(1)
    want_loss, want_grads = loss_and_grads(stock, ids)

    base = qk.patch(load_4bit(checkpoints / family, dtype, device))
    assert qk.patch_report(base).lora_pending and not qk.patch_report(base).lora_layers
    model = add_lora(base)  # PEFT still sees bitsandbytes Linear4bit layers
    loss, grads = loss_and_grads(model, ids)
    report = qk.patch_report(model)
    assert not report.lora_pending and len(report.lora_layers) == LORA_LAYERS[family]
    assert all("forward" in model.get_base_model().get_submodule(n).__dict__ for n in report.lora_layers)
    assert_like_stock((loss, grads), (want_loss, want_grads), checkpoints / family, device, ids)

    # calling patch again after get_peft_model takes over the bitsandbytes layers too
    qk.patch(model)
    assert len(qk.patch_report(model).converted) == LORA_LAYERS[family]
    assert_like_stock(loss_and_grads(model, ids), (want_loss, want_grads), checkpoints / family, device, ids)


def test_patch_twice_is_a_noop(checkpoints):
    model = add_lora(load_4bit(checkpoints / "llama"))
    qk.patch(model)
    before = {n: (type(m), m.__dict__.get("forward")) for n, m in model.named_modules()}
    report = str(qk.patch_report(model))
    qk.patch(model)
    after = {n: (type(m), m.__dict__.get("forward")) for n, m in model.named_modules()}
    assert before == after and str(qk.patch_report(model)) == report


@pytest.mark.parametrize("device", DEVICES)
def test_quantize_nf4_after_peft_quantizes_bases_only(device):
    model = add_lora(make("llama", device=device))
    ids = batch(2)
    qk.patch(model, quantize="nf4")
    report = qk.patch_report(model)
    assert len(report.quantized) == 14 == len(report.lora_layers)
    assert all(isinstance(model.get_base_model().get_submodule(n).base_layer, NF4Linear) for n in report.lora_layers)
    assert type(model.get_base_model().lm_head) is nn.Linear
    assert all(type(m) is nn.Linear for n, m in model.named_modules() if ".lora_A." in n or ".lora_B." in n)
    loss, grads = loss_and_grads(model, ids)
    # the same NF4 weights through PEFT's own forward and SDPA
    qk.unpatch(model)
    assert any(isinstance(m, NF4Linear) for m in model.modules())  # quantization stays
    want_loss, want_grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=2e-5, rtol=1e-3, msg=name)


def test_merge_and_unload_over_nf4_base_matches_bitsandbytes(checkpoints):
    ids = batch(3)
    stock = add_lora(load_4bit(checkpoints / "llama"))
    stock_merged = stock.merge_and_unload()
    with torch.no_grad():
        want = stock_merged(ids).logits
    model = qk.patch(add_lora(load_4bit(checkpoints / "llama")))
    with torch.no_grad():
        unmerged = model(ids).logits
        with model.disable_adapter():
            no_adapter = model(ids).logits
    merged = model.merge_and_unload()
    assert sum(isinstance(m, NF4Linear) for m in merged.modules()) == 14
    with torch.no_grad():
        got = merged(ids).logits
    # both requantize W + BA to NF4: the same lossy step, so the same logits
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    # and the adapter is in the merged weights (up to NF4's rounding of W + BA)
    assert (got - unmerged).norm() < 0.5 * (no_adapter - unmerged).norm()


def test_unsupported_architecture_strict_and_not_strict():
    torch.manual_seed(0)
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=64, n_layer=1, n_head=4))
    model = add_lora(gpt2)
    with pytest.raises(ValueError, match=r"'gpt2' is not supported; supported: llama .*opt .*bloom.*"
                                         r"patch\(model, attention=False\).*strict=False"):
        qk.patch(model)
    assert qk.patch_report(model) is None
    assert not any("forward" in m.__dict__ for m in model.modules())
    with pytest.warns(UserWarning, match="skipped: attention: model_type 'gpt2'"):
        qk.patch(model, strict=False)
    report = qk.patch_report(model)
    assert report.attention is None and report.skipped
    assert len(report.lora_layers) == 4
    with warnings.catch_warnings(record=True) as caught, OpCalls() as calls:
        warnings.simplefilter("always")
        model(batch(), labels=batch()).loss.backward()
    # GPT-2's Conv1D layers ran the fused op, each once forward and once backward
    assert calls.calls["lora_linear_fwd"] == 4 == calls.calls["lora_linear_bwd"], calls.calls
    assert not [w for w in caught if "qlora_kernels" in str(w.message)]


def test_bad_arguments():
    with pytest.raises(ValueError, match="quantize='int8' is not supported"):
        qk.patch(make("llama"), quantize="int8")
    model = make("llama")
    assert qk.unpatch(model) is model  # unpatched: nothing to do


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_nf4_without_peft_generates_like_quantize_model(family, device):
    ids = batch(9, shape=(2, 8)).to(device)
    kwargs = dict(max_new_tokens=10, do_sample=False, pad_token_id=0)
    stock = qk.quantize_model(make(family, device=device), compute_dtype=torch.float32, progress=False).eval()
    want = stock.generate(ids, **kwargs)
    model = qk.patch(make(family, device=device).eval(), quantize="nf4")
    assert len(qk.patch_report(model).quantized) == sum(isinstance(m, NF4Linear) for m in stock.modules())
    assert qk.patch_report(model).lora_pending  # no PEFT yet: nothing to fuse, the hook waits
    assert torch.equal(model.generate(ids, **kwargs), want)
