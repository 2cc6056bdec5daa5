"""The `qlora_kernels` logger: at INFO, patch(model) says what it patched and which backend
runs each op on the model's device; the library adds no handler of its own."""

from __future__ import annotations

import logging

import pytest
import torch

import qlora_kernels as qk
from helpers import tiny_causal_lm
from qlora_kernels.env import op_backends

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")


@pytest.fixture
def info(caplog):
    caplog.set_level(logging.INFO, logger="qlora_kernels")
    return caplog


def messages(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name.startswith("qlora_kernels")]


def lora_model(family="llama", target_modules=("q_proj", "v_proj")):
    model = tiny_causal_lm(family)
    return peft.get_peft_model(model, peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(target_modules)))


def test_attention_layers_family_and_backends(info):
    qk.patch(tiny_causal_lm("bloom"), lora=False)
    lines = messages(info)
    assert any(line.startswith("bloom: 2 attention layers -> flash_attention") for line in lines), lines
    (ops,) = [line for line in lines if line.startswith("ops on cpu: ")]
    for op, implementation in op_backends("cpu").items():
        assert f"{op} {implementation}" in ops


def test_quantized_and_fused_lora_layers(info):
    qk.patch(lora_model(), quantize="nf4")
    lines = messages(info)
    # every linear layer but lm_head (2 layers x 7 projections) is quantized; LoRA sits on q_proj and v_proj
    assert "14 nn.Linear layers -> NF4Linear (quantized, compute in torch.float32)" in lines
    assert "4 LoRA layers -> lora_linear (base and LoRA in one op)" in lines


def test_bitsandbytes_layers_converted(info, tmp_path):
    pytest.importorskip("bitsandbytes")
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    tiny_causal_lm("opt").save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    qk.patch(model)
    lines = messages(info)
    # every Linear4bit (2 layers x q, k, v, out_proj, fc1, fc2); LoRA on q_proj and v_proj
    assert "12 bitsandbytes Linear4bit layers -> NF4Linear (same bytes)" in lines
    assert "4 LoRA layers -> lora_linear (base and LoRA in one op)" in lines


def test_lora_fused_at_first_forward_is_logged(info):
    model = qk.patch(tiny_causal_lm("llama"))
    assert "no LoRA layers yet: those PEFT adds are fused at the model's first forward" in messages(info)
    info.clear()
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    assert messages(info) == ["4 LoRA layers -> lora_linear (fused at the first forward)"]


def test_attention_left_stock_says_why(info):
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64, n_positions=16))
    with pytest.warns(UserWarning, match="not supported"):
        qk.patch(gpt2, lora=False, strict=False)
    assert "attention left stock (model_type 'gpt2' is not supported)" in messages(info)
    qk.patch(tiny_causal_lm("llama"), attention=False, lora=False)
    assert "attention left stock (attention=False)" in messages(info)


def test_meta_model_names_no_backend(info):
    qk.patch(tiny_causal_lm("llama").to("meta"), lora=False)
    lines = messages(info)
    assert lines and not any(line.startswith("ops on") for line in lines)


def test_silent_below_info(caplog):
    caplog.set_level(logging.WARNING, logger="qlora_kernels")
    qk.patch(tiny_causal_lm("llama"), lora=False)
    assert messages(caplog) == []


def test_library_adds_no_handler():
    qk.patch(tiny_causal_lm("llama"), lora=False)
    loggers = [logging.getLogger(name) for name in logging.root.manager.loggerDict if name.startswith("qlora_kernels")]
    assert loggers and not any(logger.handlers for logger in loggers)
