"""patch_norm on every RMSNorm family's small random-init model against stock transformers: loss
and gradients in fp32 (tight), bf16 by the 2x rule, with a PEFT LoRA adapter over an NF4 base,
with gradient checkpointing (reentrant and not); unpatch gives stock bit for bit, a second
model in the process stays stock, patching twice changes nothing. Every norm module's weight is
drawn at random (Gemma's start at 0, Llama's at 1: either would hide a wrong weight term), and
each test counts the op calls, so a norm that is not routed through the kernel fails it.

One run of the fp32 cases goes through the Triton kernels on the CPU
(QLORA_KERNELS_TRITON_ON_CPU=1, in a subprocess: the switch is read at import)."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import qlora_kernels as qk
from qlora_kernels.backends import triton_on_cpu
from qlora_kernels.backends.common import REGISTERED
from qlora_kernels.ops import norm as norm_ops
from qlora_kernels.patching.norm import FAMILIES, patch_norm, unpatch_norm

from helpers import (
    assert_close_loss_and_grads,
    assert_same_loss_and_grads,
    assert_within_twice_stock_error,
    tiny_causal_lm,
)
from test_families import build
from test_patch_model import add_lora, batch, loss_and_grads

TESTS = Path(__file__).resolve().parent
LAYERS = 2
# RMSNorm modules per decoder layer (the final norm comes on top)
PER_LAYER = {"llama": 2, "mistral": 2, "qwen2": 2, "qwen3": 4, "gemma": 2, "gemma2": 4, "gemma3_text": 6, "phi3": 2}
GEMMA = ("gemma", "gemma2", "gemma3_text")


def expected_norms(family: str) -> int:
    return LAYERS * PER_LAYER[family] + 1


def _norm_modules(model):
    return [(n, m) for n, m in model.named_modules() if type(m).__name__.endswith("RMSNorm")]


def make(family: str) -> nn.Module:
    model = build(family)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for _, m in _norm_modules(model):
            base = 0.0 if family in GEMMA else 1.0
            m.weight.copy_(base + 0.5 * torch.randn(m.weight.shape, generator=g))
    return model.train()


@pytest.fixture
def op_calls(monkeypatch):
    """Counts of the norm ops' calls: {"fwd": n, "bwd": n}."""
    counts = {"fwd": 0, "bwd": 0}
    fwd, bwd = norm_ops.rms_norm_fwd, norm_ops.rms_norm_bwd

    def count_fwd(*args):
        counts["fwd"] += 1
        return fwd(*args)

    def count_bwd(*args):
        counts["bwd"] += 1
        return bwd(*args)

    monkeypatch.setattr(norm_ops, "rms_norm_fwd", count_fwd)
    monkeypatch.setattr(norm_ops, "rms_norm_bwd", count_bwd)
    return counts


def test_families_cover_the_rms_norm_families():
    assert set(FAMILIES) == set(PER_LAYER)
    for family in ("opt", "bloom"):  # LayerNorm
        with pytest.raises(NotImplementedError, match="llama, mistral, qwen2, qwen3, gemma, gemma2, gemma3_text"):
            patch_norm(tiny_causal_lm(family))


@pytest.mark.parametrize("family", list(PER_LAYER))
def test_fp32_matches_stock_and_unpatch_restores_it(family, op_calls):
    expected = ("Triton (interpreter)" if triton_on_cpu.requested() else "C++")
    assert REGISTERED["rms_norm_fwd"]["cpu"] == REGISTERED["rms_norm_bwd"]["cpu"] == expected
    model, ids = make(family), batch()
    stock = loss_and_grads(model, ids)
    assert op_calls["fwd"] == 0
    names = patch_norm(model)
    assert sorted(names) == sorted(n for n, _ in _norm_modules(model))
    assert len(names) == expected_norms(family)
    assert patch_norm(model) == names  # twice: the same modules, patched once
    ours = loss_and_grads(model, ids)
    # every norm's forward and backward ran the op (weights trainable: dweight too)
    assert op_calls == {"fwd": len(names), "bwd": len(names)}
    assert any(".weight" in n and "norm" in n for n in ours[1])
    assert_close_loss_and_grads(ours, stock)
    unpatch_norm(model)
    assert all("forward" not in m.__dict__ for _, m in _norm_modules(model))
    assert_same_loss_and_grads(loss_and_grads(model, ids), stock)
    assert op_calls["fwd"] == len(names)
    unpatch_norm(model)  # not patched: a no-op


@pytest.mark.parametrize("family", list(PER_LAYER))
def test_bf16_each_norm_rounds_like_its_class(family):
    # fp32 cannot tell the roundings apart; in bf16 the patched module gives its class's bits
    # except where rstd's last bit differs (a different summation order), and the other rounding
    # would not
    model = make(family).to(torch.bfloat16)
    patch_norm(model)
    g = torch.Generator().manual_seed(2)
    for name, m in _norm_modules(model):
        x = (2 * torch.randn(3, 5, m.weight.shape[0], generator=g)).to(torch.bfloat16)
        stock, ours = type(m).forward(m, x), m(x)
        assert ours.dtype == stock.dtype
        assert (ours != stock).float().mean() < 0.02, name
        gemma = family in GEMMA
        eps = m.eps if gemma else m.variance_epsilon
        other = qk.rms_norm(x, m.weight, eps, 1.0 if gemma else 0.0, cast_before_weight=gemma)
        assert (other != stock).float().mean() > 0.1, name


@pytest.mark.parametrize("family", list(PER_LAYER))
def test_bf16_within_twice_stock_error(family):
    model, ids = make(family), batch()
    exact = loss_and_grads(model, ids)
    low = copy.deepcopy(model).to(torch.bfloat16)
    stock = loss_and_grads(low, ids)
    patch_norm(low)
    ours = loss_and_grads(low, ids)
    assert_within_twice_stock_error(ours, stock, exact)
    unpatch_norm(low)
    assert_same_loss_and_grads(loss_and_grads(low, ids), stock)


# every family with reentrant checkpointing; the non-reentrant one (saved-tensor hooks) on one family
# of each rounding, and on Qwen3 for its q_norm / k_norm
CHECKPOINTING = [(f, True) for f in PER_LAYER] + [(f, False) for f in ("llama", "qwen3", "gemma3_text")]


@pytest.mark.parametrize(("family", "reentrant"), CHECKPOINTING,
                         ids=[f"{f}-{'reentrant' if r else 'non-reentrant'}" for f, r in CHECKPOINTING])
def test_peft_lora_over_nf4_with_gradient_checkpointing(family, reentrant, op_calls):
    model = make(family)
    peft_model = add_lora(model, target_modules=["q_proj", "v_proj", "down_proj"])
    qk.quantize_model(peft_model, compute_dtype=torch.float32, progress=False)
    assert any(isinstance(m, qk.NF4Linear) for m in model.modules())
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    ids = batch(shape=(1, 16))
    stock = loss_and_grads(peft_model, ids)
    assert stock[1] and all("lora_" in n for n in stock[1])
    names = patch_norm(peft_model.get_base_model())
    ours = loss_and_grads(peft_model, ids)
    # checkpointing runs each layer's norms twice in the forward; frozen norm weights: no dweight
    n_layer_norms = LAYERS * PER_LAYER[family]
    assert op_calls["fwd"] == len(names) + n_layer_norms and op_calls["bwd"] == len(names)
    assert_close_loss_and_grads(ours, stock)
    unpatch_norm(peft_model.get_base_model())
    assert_same_loss_and_grads(loss_and_grads(peft_model, ids), stock)


def test_another_model_stays_stock(op_calls):
    from transformers.models.gemma3.modeling_gemma3 import Gemma3RMSNorm
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    forwards = (LlamaRMSNorm.forward, Gemma3RMSNorm.forward)
    patched, other = make("llama"), make("llama")
    ids = batch()
    want = loss_and_grads(other, ids)
    patch_norm(patched)
    patch_norm(make("gemma3_text"))
    assert (LlamaRMSNorm.forward, Gemma3RMSNorm.forward) == forwards
    assert all("forward" not in m.__dict__ for _, m in _norm_modules(other))
    calls = op_calls["fwd"]
    assert_same_loss_and_grads(loss_and_grads(other, ids), want)
    assert op_calls["fwd"] == calls


def test_class_swap_after_patching_keeps_the_patch(op_calls):
    # FSDP2's fully_shard gives each module a new class (a subclass of its own): the instance
    # forward stays and unpatch finds it without looking at the class
    model, ids = make("qwen3"), batch()
    stock = loss_and_grads(model, ids)
    names = patch_norm(model)
    for _, m in _norm_modules(model):
        m.__class__ = type(f"Sharded{type(m).__name__}", (type(m),), {})
    assert_close_loss_and_grads(loss_and_grads(model, ids), stock)
    assert op_calls["fwd"] == len(names)
    unpatch_norm(model)
    assert all("forward" not in m.__dict__ for _, m in _norm_modules(model))


@pytest.mark.skipif(triton_on_cpu.requested(), reason="this is the run that starts the Triton one")
def test_fp32_through_the_triton_kernels_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", **{triton_on_cpu.SWITCH: "1"})
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(TESTS / "test_norm_patching.py"),
         "-k", "test_fp32_matches_stock and (llama or gemma3_text)"],
        cwd=TESTS.parent, env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert "2 passed" in proc.stdout, proc.stdout[-3000:]
