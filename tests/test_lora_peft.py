"""Patched PEFT LoRA layers vs stock PEFT: outputs and gradients for Llama, OPT and Bloom
layer shapes, dense / bitsandbytes NF4 / NF4Linear bases, adapters, dropout, save/load."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, BloomConfig, BloomForCausalLM, LlamaConfig, \
    LlamaForCausalLM, OPTConfig, OPTForCausalLM

import qlora_kernels as qk
from qlora_kernels.ops.lora import keep_mask_cpu
from qlora_kernels.patching import lora as patching_lora
from qlora_kernels.patching.lora import patch_lora, unpatch_lora
from qlora_kernels.reference import lora as ref

from helpers import grad_error
from test_lora_any_model import OpCalls


def base_model(family, dtype=torch.float32):
    torch.manual_seed(0)
    if family == "llama":  # GQA: k/v project 64 -> 32
        model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                                             num_attention_heads=4, num_key_value_heads=2))
    elif family == "opt":  # biases everywhere
        model = OPTForCausalLM(OPTConfig(vocab_size=128, hidden_size=64, ffn_dim=128, num_hidden_layers=1,
                                         num_attention_heads=4, word_embed_proj_dim=64, dropout=0.0))
    else:  # Bloom's fused query_key_value 64 -> 192
        model = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=64, n_layer=1, n_head=4))
    return model.to(dtype)


def lora(model, dropout=0.0, **kw):
    model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear", lora_dropout=dropout,
                                             **kw))
    torch.manual_seed(1)
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: make the LoRA branch count
            nn.init.normal_(p, std=0.1)
    return model


def run(model, ids):
    model.zero_grad()
    out = model(ids, labels=ids)
    out.loss.backward()
    return out.logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_dense_base_fp32_matches_stock_peft(family):
    model = lora(base_model(family)).train()
    ids = torch.randint(0, 128, (2, 9))
    want_logits, want_grads = run(model, ids)
    patched = patch_lora(model)
    assert len(patched) == (7 if family == "llama" else 6 if family == "opt" else 4)
    logits, grads = run(model, ids)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-4)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    unpatch_lora(model)
    assert torch.equal(run(model, ids)[0], want_logits)


@pytest.mark.parametrize("family", ["llama", "opt", "bloom"])
def test_dense_base_bf16_within_twice_pytorchs_own_error(family):
    ids = torch.randint(0, 128, (2, 9))
    exact_logits, exact_grads = run(lora(base_model(family)).train(), ids)
    stock = lora(base_model(family, torch.bfloat16)).train()
    stock_logits, stock_grads = run(stock, ids)
    patch_lora(stock)
    logits, grads = run(stock, ids)
    stock_err = (stock_logits.float() - exact_logits).abs().max()
    ours_err = (logits.float() - exact_logits).abs().max()
    assert ours_err <= 2 * stock_err + 1e-3, (ours_err, stock_err)
    ours_gerr, stock_gerr = grad_error(grads, exact_grads), grad_error(stock_grads, exact_grads)
    assert ours_gerr <= 2 * stock_gerr + 1e-3, (ours_gerr, stock_gerr)


def _qlora_model(tmp_path, family="llama"):
    base_model(family).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=torch.bfloat16)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu")
    return lora(model).train()  # train mode: bitsandbytes' plain dequantize + matmul path


@pytest.mark.parametrize("family", ["llama", "opt"])
def test_nf4_bases_match_stock_qlora(tmp_path, family):
    model = _qlora_model(tmp_path, family)
    ids = torch.randint(0, 128, (2, 9))
    want_logits, want_grads = run(model, ids)
    assert patch_lora(model)  # over bitsandbytes Linear4bit, bytes read in place
    logits, grads = run(model, ids)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)
    qk.from_bnb(model, progress=False)  # now LoRA over NF4Linear, same bytes
    assert sum(isinstance(m, qk.NF4Linear) for m in model.modules()) == (7 if family == "llama" else 6)
    logits, grads = run(model, ids)
    torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-4)
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_adapters_disable_merge_and_save(tmp_path):
    model = lora(base_model("llama")).eval()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B.other" in name:
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        want_default = model(ids).logits
        model.set_adapter("other")
        want_other = model(ids).logits
        with model.disable_adapter():
            want_base = model(ids).logits
        model.set_adapter("default")
        patch_lora(model)
        assert torch.allclose(model(ids).logits, want_default, atol=1e-5)
        model.set_adapter("other")
        assert torch.allclose(model(ids).logits, want_other, atol=1e-5)
        with model.disable_adapter():
            assert torch.equal(model(ids).logits, want_base)
        model.set_adapter("default")

    model.save_pretrained(tmp_path / "adapter", selected_adapters=["default"])
    stock = PeftModel.from_pretrained(base_model("llama"), tmp_path / "adapter").eval()
    with torch.no_grad():
        torch.testing.assert_close(stock(ids).logits, want_default, atol=1e-5, rtol=1e-4)
        merged = model.merge_and_unload()
        torch.testing.assert_close(merged(ids).logits, want_default, atol=1e-4, rtol=1e-4)


def test_several_active_adapters_fall_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(patching_lora, "_warned", set())  # warned once per process: none yet
    model = lora(base_model("llama")).eval()
    model.add_adapter("other", LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B.other" in name:  # the second adapter changes the output
            nn.init.normal_(p, std=0.1)
    ids = torch.randint(0, 128, (2, 9))
    with torch.no_grad():
        first_only = model(ids).logits
        model.base_model.set_adapter(["default", "other"])
        want = model(ids).logits
        assert not torch.allclose(want, first_only, atol=1e-3)
        patch_lora(model)
        with warnings.catch_warnings(record=True) as caught, OpCalls() as calls:
            warnings.simplefilter("always")
            got = model(ids).logits
            model(ids)
    assert torch.equal(got, want) and not calls.calls  # PEFT's forward, the fused op never ran
    assert len([w for w in caught if "several active LoRA adapters" in str(w.message)]) == 1


def test_dora_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(patching_lora, "_warned", set())
    model = lora(base_model("llama"), use_dora=True).train()
    ids = torch.randint(0, 128, (2, 9))
    want_logits, want_grads = run(model, ids)
    patch_lora(model)
    with warnings.catch_warnings(record=True) as caught, OpCalls() as calls:
        warnings.simplefilter("always")
        logits, grads = run(model, ids)
        run(model, ids)
    assert torch.equal(logits, want_logits) and not calls.calls  # PEFT's DoRA forward
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[n], want_grads[n]) for n in grads)
    assert len([w for w in caught if "LoRA variant DoraLinearVariant is not fused" in str(w.message)]) == 1


def test_dropout_uses_a_reproducible_seeded_mask():
    torch.manual_seed(0)
    layer = nn.Linear(96, 48)
    model = get_peft_model(nn.Sequential(layer), LoraConfig(r=8, lora_alpha=16, target_modules=["0"],
                                                            lora_dropout=0.25))
    nn.init.normal_(model.base_model.model[0].lora_B["default"].weight)
    patch_lora(model)
    model.train()
    x = torch.randn(64, 96)
    torch.manual_seed(123)
    y1 = model(x)
    torch.manual_seed(123)
    y2 = model(x)
    assert torch.equal(y1, y2)
    # the same mask through the reference gives the same result
    torch.manual_seed(123)
    seed = int(torch.randint(0, 2**31 - 1, (1,)))
    keep = keep_mask_cpu(seed, 0.25, 64, 96, "cpu")
    assert abs(keep.float().mean().item() - 0.75) < 0.02
    peft_layer = model.base_model.model[0]
    want = ref.lora_linear(x, layer.weight, layer.bias, peft_layer.lora_A["default"].weight,
                           peft_layer.lora_B["default"].weight, 2.0, keep, 0.25)
    torch.testing.assert_close(y1, want, atol=1e-5, rtol=1e-4)
    model.eval()
    with torch.no_grad():  # eval: no dropout, deterministic
        assert torch.equal(model(x), model(x))


def test_rslora_and_lora_bias():
    torch.manual_seed(0)
    for kw in (dict(use_rslora=True), dict(lora_bias=True)):
        model = lora(base_model("opt"), **kw).train()
        if kw.get("lora_bias"):
            for name, p in model.named_parameters():
                if "lora_B" in name and name.endswith("bias"):
                    nn.init.normal_(p)
        ids = torch.randint(0, 128, (2, 9))
        want_logits, want_grads = run(model, ids)
        patch_lora(model)
        logits, grads = run(model, ids)
        torch.testing.assert_close(logits, want_logits, atol=1e-5, rtol=1e-4)
        for name in want_grads:
            torch.testing.assert_close(grads[name], want_grads[name], atol=1e-5, rtol=1e-4, msg=name)


def test_lora_linear_rejects_bad_input():
    w = torch.randn(8, 16)
    A, B = torch.randn(4, 16), torch.randn(8, 4)
    with pytest.raises(ValueError, match="features"):
        qk.lora_linear(torch.randn(2, 15), w, None, A, B, 1.0)
    with pytest.raises(ValueError, match="lora_A"):
        qk.lora_linear(torch.randn(2, 16), w, None, B.t(), B, 1.0)
    with pytest.raises(ValueError, match="frozen"):
        qk.lora_linear(torch.randn(2, 16), w.requires_grad_(), None, A, B, 1.0)
    with pytest.raises(ValueError, match="dtype|float"):
        qk.lora_linear(torch.randn(2, 16).double(), w, None, A, B, 1.0)
    with pytest.raises(ValueError, match="dropout_p"):
        qk.lora_linear(torch.randn(2, 16), w.detach(), None, A, B, 1.0, dropout_p=1.0)
