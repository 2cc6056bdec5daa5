"""patching/mlp.py: every gated-MLP family's small random-init model with its MLPs through the
SwiGLU op, against the same model stock: loss and gradients in fp32 (tight), bf16 by the 2x
rule, with a PEFT LoRA adapter, with a bitsandbytes NF4 base under LoRA, with gradient
checkpointing (reentrant or not); unpatch gives stock back bit for bit, a second model in the
process stays stock, an activation swiglu does not implement stays stock, and (in a process of
its own) the Triton kernels run the patched models on the CPU."""

from __future__ import annotations

import collections
import copy
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from qlora_kernels.backends import triton_on_cpu
from qlora_kernels.patching import mlp
from qlora_kernels.patching.mlp import FAMILIES, patch_mlp, unpatch_mlp

from helpers import assert_close_loss_and_grads, assert_same_loss_and_grads, assert_within_twice_stock_error
from test_families import CONFIGS, build, models, stock  # noqa: F401  (models: the fixture)

TESTS = Path(__file__).resolve().parent
MLP_FAMILIES = list(FAMILIES)
PACKED = {"phi3"}


class OpCalls(TorchDispatchMode):
    """The qlora_kernels ops run (forward and backward) while active."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace == "qlora_kernels":
            self.calls[name] += 1
        return func(*args, **(kwargs or {}))


def batch(seed=0, shape=(2, 12)):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, shape, generator=g)


def loss_and_grads(model, ids):
    model.train()
    model.zero_grad()
    loss = model(ids, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return loss.detach(), grads


def op_names(family):
    return ("swiglu_packed_fwd", "swiglu_packed_bwd") if family in PACKED else ("swiglu_fwd", "swiglu_bwd")


def run_counting(model, ids):
    with OpCalls() as counts:
        result = loss_and_grads(model, ids)
    return result, counts.calls


def test_families_cover_the_gated_mlps_and_nothing_else():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3"}
    assert set(FAMILIES) <= set(CONFIGS)
    with pytest.raises(NotImplementedError, match="covers the model types llama, .*phi3, not 'opt'"):
        patch_mlp(build("opt"))


@pytest.mark.parametrize("family", MLP_FAMILIES)
def test_fp32_loss_and_grads_match_stock_and_unpatch_restores_it(models, family):
    model = stock(models, family)
    ids = batch()
    want = loss_and_grads(model, ids)
    names = patch_mlp(model)
    try:
        assert names == [f"model.layers.{i}.mlp" for i in range(CONFIGS[family]["num_hidden_layers"])]
        assert patch_mlp(model) == names  # a second patch changes nothing
        got, calls = run_counting(model, ids)
        fwd, bwd = op_names(family)
        assert calls[fwd] == len(names) and calls[bwd] == len(names), calls
        assert_close_loss_and_grads(got, want)
    finally:
        unpatch_mlp(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    unpatch_mlp(model)  # a no-op now
    assert_same_loss_and_grads(loss_and_grads(model, ids), want)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_bf16_within_twice_stock_error(models, family):
    ids = batch(1)
    exact = loss_and_grads(stock(models, family), ids)
    model = copy.deepcopy(stock(models, family)).to(torch.bfloat16)
    stock_run = loss_and_grads(model, ids)
    patch_mlp(model)
    got, calls = run_counting(model, ids)
    assert calls[op_names(family)[0]]
    assert_within_twice_stock_error(got, stock_run, exact)
    unpatch_mlp(model)
    assert_same_loss_and_grads(loss_and_grads(model, ids), stock_run)


def _lora(model):
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: make the adapter count
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma", "gemma3_text", "phi3"])
def test_peft_lora(models, family):
    model = _lora(copy.deepcopy(stock(models, family)))
    ids = batch(2)
    want = loss_and_grads(model, ids)
    assert any("lora_A" in n for n in want[1]) and all("lora_" in n for n in want[1])
    names = patch_mlp(model.get_base_model())
    assert names
    got, calls = run_counting(model, ids)
    assert calls[op_names(family)[1]] == len(names)
    assert_close_loss_and_grads(got, want)
    unpatch_mlp(model.get_base_model())
    assert_same_loss_and_grads(loss_and_grads(model, ids), want)


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3"])
def test_bitsandbytes_nf4_base_with_lora(models, family, tmp_path):
    import bitsandbytes as bnb
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from test_families import STOCK_ATTENTION

    stock(models, family).save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32, attn_implementation=STOCK_ATTENTION.get(family))
    proj = model.model.layers[0].mlp.gate_up_proj if family in PACKED else model.model.layers[0].mlp.gate_proj
    assert isinstance(proj, bnb.nn.Linear4bit)
    # bitsandbytes repacks its CPU weights in eval mode: loss_and_grads stays in train mode
    model = _lora(model)
    ids = batch(3)
    want = loss_and_grads(model, ids)
    assert patch_mlp(model.get_base_model())
    got, calls = run_counting(model, ids)
    assert calls[op_names(family)[0]]
    assert_close_loss_and_grads(got, want)
    unpatch_mlp(model.get_base_model())
    assert_same_loss_and_grads(loss_and_grads(model, ids), want)


@pytest.mark.parametrize("use_reentrant", [True, False])
@pytest.mark.parametrize("family", ["mistral", "gemma", "phi3"])
def test_gradient_checkpointing(models, family, use_reentrant):
    model = copy.deepcopy(stock(models, family))
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    ids = batch(4)
    want = loss_and_grads(model, ids)
    names = patch_mlp(model)
    got, calls = run_counting(model, ids)
    fwd, bwd = op_names(family)
    # each checkpointed layer runs its MLP forward twice: once in the forward, again in the backward
    assert calls[fwd] == 2 * len(names) and calls[bwd] == len(names), calls
    assert_close_loss_and_grads(got, want)
    unpatch_mlp(model)
    assert_same_loss_and_grads(loss_and_grads(model, ids), want)


def test_another_model_stays_stock(models):
    patched, other = build("llama"), build("llama")
    ids = batch(5)
    want = loss_and_grads(other, ids)
    stock_forward = type(other.model.layers[0].mlp).forward
    patch_mlp(patched)
    try:
        assert type(other.model.layers[0].mlp).forward is stock_forward
        assert all("forward" not in m.__dict__ for m in other.modules())
        got, calls = run_counting(other, ids)
        assert not calls
        assert_same_loss_and_grads(got, want)
    finally:
        unpatch_mlp(patched)


def test_class_swap_keeps_the_patch():
    # FSDP2's fully_shard swaps each module's class for a subclass of it: the patch lives on the
    # instance, so it survives the swap and unpatch still finds it
    model = build("qwen2")
    ids = batch(6)
    want = loss_and_grads(model, ids)
    names = patch_mlp(model)
    for m in model.modules():
        if isinstance(m, mlp._mlp_class("qwen2")):
            m.__class__ = types.new_class(f"Sharded{type(m).__name__}", (type(m),))
    assert patch_mlp(model) == names
    got, calls = run_counting(model, ids)
    assert calls["swiglu_fwd"] == len(names)
    assert_close_loss_and_grads(got, want)
    unpatch_mlp(model)
    assert_same_loss_and_grads(loss_and_grads(model, ids), want)


@pytest.mark.parametrize("family, key, act", [("llama", "hidden_act", "gelu"), ("gemma2", "hidden_activation",
                                                                                 "gelu_python_tanh")])
def test_an_activation_swiglu_lacks_stays_stock(family, key, act):
    model = build(family, **{key: act})
    ids = batch(7)
    want = loss_and_grads(model, ids)
    with pytest.warns(UserWarning, match=f"{family} MLPs left stock, their activation is not one swiglu implements"):
        assert patch_mlp(model) == []
    got, calls = run_counting(model, ids)
    assert not calls
    assert_same_loss_and_grads(got, want)


def test_swapped_activation_or_mixed_dtypes_take_the_stock_expression():
    model = build("llama")
    patch_mlp(model)
    x = model.model.embed_tokens(batch(8))
    layer = model.model.layers[0].mlp
    layer.act_fn = torch.nn.GELU()  # replaced after patching: the patched forward follows it
    want = layer.down_proj(torch.nn.functional.gelu(layer.gate_proj(x)) * layer.up_proj(x))
    with OpCalls() as counts:
        got = layer(x)
    assert not counts.calls and torch.equal(got, want)
    # up in bf16, gate in fp32 (not the kernels' inputs): PyTorch's promotion, as stock
    layer = model.model.layers[1].mlp
    layer.up_proj.register_forward_hook(lambda module, args, out: out.to(torch.bfloat16))
    want = layer.down_proj(torch.nn.functional.silu(layer.gate_proj(x)) * layer.up_proj(x))
    with OpCalls() as counts:
        got = layer(x)
    assert not counts.calls and torch.equal(got, want)
    unpatch_mlp(model)


def _triton_on_cpu_run():
    """Run in a process started with QLORA_KERNELS_TRITON_ON_CPU=1 and TRITON_INTERPRET=1: the
    patched models' SwiGLU through the Triton kernels, against stock."""
    from triton.runtime.interpreter import InterpretedFunction

    import qlora_kernels as qk

    assert triton_on_cpu.requested()
    assert qk.backends()["ops"]["swiglu_fwd"]["cpu"] == triton_on_cpu.IMPLEMENTATION
    launches = collections.Counter()
    run = InterpretedFunction.run

    def counted(self, *args, **kwargs):
        launches[self.fn.__name__] += 1
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted
    for family in ("llama", "gemma", "phi3"):
        model = build(family)
        ids = batch(9)
        want = loss_and_grads(model, ids)
        names = patch_mlp(model)
        launches.clear()
        got = loss_and_grads(model, ids)
        assert launches == {"_swiglu_fwd_kernel": len(names), "_swiglu_bwd_kernel": len(names)}, launches
        assert_close_loss_and_grads(got, want)
        unpatch_mlp(model)
    print("triton on cpu: ok")


def test_models_through_the_triton_kernels_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=os.pathsep.join(
        [str(TESTS), *filter(None, [os.environ.get("PYTHONPATH")])]), **{triton_on_cpu.SWITCH: "1"})
    proc = subprocess.run([sys.executable, "-c", "import test_mlp_patching as t; t._triton_on_cpu_run()"],
                          cwd=TESTS, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "triton on cpu: ok" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-8000:]
