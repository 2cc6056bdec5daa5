"""Whole QLoRA models through the GPU backend's Triton kernels, on the CPU.

Run in its own process with the Triton kernels registered for CPU tensors (Triton's interpreter),
which `test_triton_models.py` starts; by hand:

    TRITON_INTERPRET=1 QLORA_KERNELS_TRITON_ON_CPU=1 python -m pytest tests/triton_models_on_cpu.py

Tiny Llama (GQA), OPT and Bloom through the QLoRA recipe (bitsandbytes NF4 double quant stored
as bf16, prepare_model_for_kbit_training, gradient checkpointing, PEFT LoRA on all linear
layers), patched, against the same models stock: fp32 loss and gradients by the criteria of
test_patch_model.py / test_patch_training.py, bf16 ones by the 2x rule on both sides of the LoRA
token threshold, greedy generation token for token (the prompt through the flash-attention
kernel, decode steps through it and through flash-decoding). Every test counts the qlora_kernels
op calls and the Triton kernel launches and checks that each call ran its Triton kernel: a
fallback to the reference, the C++ kernels or stock PyTorch fails it.
"""

from __future__ import annotations

import collections
import contextlib

import pytest
import torch
from peft import prepare_model_for_kbit_training
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_kernels as qk
from qlora_kernels.backends import cuda, triton_on_cpu

from helpers import assert_within_twice_stock_error
from test_patch_model import add_lora, batch, checkpoints, load_4bit, loss_and_grads  # noqa: F401

FAMILIES = ["llama", "opt", "bloom"]
TRITON_OPS = ["nf4_dequantize", "nf4_dequantize_out", "nf4_linear", "nf4_linear_bwd", "lora_linear_fwd",
              "lora_linear_bwd", "flash_attention_fwd", "flash_attention_bwd"]
# the Triton kernel each op call launches exactly once, whichever path it takes (attention
# forward: one of two)
KERNELS = {
    "nf4_dequantize": ("_nf4_dequant_kernel",),
    "nf4_linear": ("_nf4_dequant_kernel",),  # W dequantized once, the GEMM left to torch
    "nf4_linear_bwd": ("_nf4_dequant_kernel",),
    "lora_linear_fwd": ("_lora_xa_kernel",),
    "lora_linear_bwd": ("_lora_dA_kernel",),
    "flash_attention_fwd": ("_fwd_kernel", "_decode_split_kernel"),
    "flash_attention_bwd": ("_bwd_dq_kernel",),
}


class Counts(TorchDispatchMode):
    """While active: `calls`, the qlora_kernels ops dispatched (below autograd, so forward and
    backward ops), and `launches`, the Triton kernels run by the interpreter, by (op, kernel)."""

    def __init__(self):
        super().__init__()
        self.calls, self.launches = collections.Counter(), collections.Counter()
        self._ops = []  # the qlora_kernels op being run (the mode is off inside its own handler)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        namespace, _, name = func._schema.name.partition("::")
        if namespace != "qlora_kernels":
            return func(*args, **(kwargs or {}))
        self.calls[name] += 1
        self._ops.append(name)
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self._ops.pop()

    def launched(self, kernel: str) -> None:
        self.launches[(self._ops[-1] if self._ops else None, kernel)] += 1


@contextlib.contextmanager
def counting():
    """A `Counts` of what runs inside the block."""
    from triton.runtime.interpreter import InterpretedFunction

    counts = Counts()
    run = InterpretedFunction.run

    def counted_run(self, *args, **kwargs):
        if not kwargs.get("warmup"):
            counts.launched(self.fn.__name__)
        return run(self, *args, **kwargs)

    InterpretedFunction.run = counted_run
    try:
        with counts:
            yield counts
    finally:
        InterpretedFunction.run = run


def assert_ran_triton(counts, *ops):
    """Each of `ops` was called, every call launched its Triton kernel, and no Triton kernel ran
    outside a qlora_kernels op."""
    for op in ops:
        assert counts.calls[op] > 0, (op, counts.calls)
        assert sum(counts.launches[op, k] for k in KERNELS[op]) == counts.calls[op], (op, counts.calls, counts.launches)
    assert not any(op is None for op, _ in counts.launches), counts.launches


def assert_lora_path(counts, path):
    """Every LoRA call took `path`: "fused" (W decoded inside the GEMM kernels) or
    "dequantize-once" (W dequantized by the Triton kernel, the base GEMMs left to torch)."""
    fwd, bwd, n = counts.calls["lora_linear_fwd"], counts.calls["lora_linear_bwd"], counts.launches
    fused = n["lora_linear_fwd", "_lora_forward_kernel"], n["lora_linear_bwd", "_lora_dx_kernel"]
    dequantize_once = (n["lora_linear_fwd", "_nf4_dequant_kernel"], n["lora_linear_bwd", "_nf4_dequant_kernel"],
                       n["lora_linear_bwd", "_lora_dx_lowrank_kernel"])
    if path == "fused":
        assert fused == (fwd, bwd) and dequantize_once == (0, 0, 0), (counts.calls, n)
    else:
        assert fused == (0, 0) and dequantize_once == (fwd, bwd, bwd), (counts.calls, n)


def qlora(path, dtype=torch.float32, dropout=0.0, target_modules="all-linear", checkpointing=True):
    """The QLoRA recipe on the checkpoint at `path`, on the CPU."""
    model = load_4bit(path, dtype)
    if checkpointing:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=True)
    return add_lora(model, dropout, target_modules)


def assert_close_fp32(got, want):
    """(loss, grads) of two fp32 runs that differ in summation order only (test_patch_model's criteria)."""
    (loss, grads), (want_loss, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=2e-5, rtol=1e-3, msg=name)


def test_backends_report_triton_for_cpu(capsys):
    ops = qk.backends()["ops"]
    assert {op: ops[op]["cpu"] for op in TRITON_OPS} == dict.fromkeys(TRITON_OPS, triton_on_cpu.IMPLEMENTATION)
    assert ops["nf4_quantize_blocks"]["cpu"] == "C++"  # Triton has no quantize kernel
    from qlora_kernels.cli import main

    assert main(["env"]) == 0
    assert f'"cpu": "{triton_on_cpu.IMPLEMENTATION}"' in capsys.readouterr().out


@pytest.mark.parametrize("family", FAMILIES)
def test_qlora_recipe_loss_and_grads_match_stock(checkpoints, family):
    ids = batch(0, shape=(2, 16))
    want = loss_and_grads(qlora(checkpoints / family), ids)
    model = qk.patch(qlora(checkpoints / family))
    assert model.get_base_model().is_gradient_checkpointing
    with counting() as counted:
        got = loss_and_grads(model, ids)
    assert_ran_triton(counted, "lora_linear_fwd", "lora_linear_bwd", "flash_attention_fwd", "flash_attention_bwd")
    assert_close_fp32(got, want)


# fp32 LoRA always takes the dequantize-once path; in bf16 the token threshold picks it: both
# sides of it at 32 tokens, the fused kernels with every family (OPT and Bloom have biases)
@pytest.mark.parametrize("family, lora_path", [("llama", "fused"), ("opt", "fused"), ("bloom", "fused"),
                                               ("llama", "dequantize-once")])
def test_qlora_recipe_bf16_within_twice_stock_error(checkpoints, family, lora_path, monkeypatch):
    ids = batch(4, shape=(2, 16))
    monkeypatch.setattr(cuda, "LORA_DEQUANT_ONCE_MIN_TOKENS", ids.numel() + 1 if lora_path == "fused" else 1)
    path = checkpoints / family
    exact = loss_and_grads(qlora(path, checkpointing=False), ids)
    stock = loss_and_grads(qlora(path, torch.bfloat16, checkpointing=False), ids)
    model = qk.patch(qlora(path, torch.bfloat16, checkpointing=False))
    with counting() as counted:
        ours = loss_and_grads(model, ids)
    assert_ran_triton(counted, "lora_linear_fwd", "lora_linear_bwd", "flash_attention_fwd", "flash_attention_bwd")
    assert_lora_path(counted, lora_path)
    assert_within_twice_stock_error(ours, stock, exact)


def test_layers_without_lora_dequantize_through_triton(checkpoints):
    # LoRA on q_proj / v_proj only: the other NF4 layers (NF4Linear's op) compute x·Wᵀ and dy·W over
    # a W dequantized by Triton
    ids = batch(1, shape=(2, 16))
    modules = ["q_proj", "v_proj"]
    want = loss_and_grads(qlora(checkpoints / "llama", target_modules=modules), ids)
    model = qk.patch(qlora(checkpoints / "llama", target_modules=modules))
    with counting() as counted:
        got = loss_and_grads(model, ids)
    assert_ran_triton(counted, "nf4_linear", "nf4_linear_bwd", "lora_linear_fwd", "lora_linear_bwd")
    assert_close_fp32(got, want)


def test_dropout_masks_are_drawn_again_when_checkpointing_recomputes(checkpoints):
    # the patched layers' dropout (LoRA dropout 0.1, as QLoRA runs it) is regenerated from its
    # seed in the backward and in the checkpointed forward's recompute: the same gradients
    ids = batch(5, shape=(2, 16))
    plain = qk.patch(qlora(checkpoints / "llama", dropout=0.1, checkpointing=False))
    torch.manual_seed(7)
    want = loss_and_grads(plain, ids)
    model = qk.patch(qlora(checkpoints / "llama", dropout=0.1))
    torch.manual_seed(7)
    with counting() as counted:
        got = loss_and_grads(model, ids)
    assert_ran_triton(counted, "lora_linear_fwd", "lora_linear_bwd")
    assert_close_fp32(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_same_tokens(checkpoints, family, monkeypatch):
    from qlora_kernels.triton import flash_decode

    ids = batch(6, shape=(2, 10))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    # Decode steps attend to 11 ... 17 keys: from 14 keys on they take the flash-decoding kernel
    # (on a GPU from 256), split into as many key ranges as there are key blocks (2 at 17 keys)
    monkeypatch.setattr(cuda, "DECODE_MIN_KEYS", 14)
    monkeypatch.setattr(flash_decode, "_auto_splits", lambda programs, key_blocks, device: key_blocks)
    # train mode, no dropout: bitsandbytes' CPU eval path repacks its weights (other roundings)
    want = qlora(checkpoints / family, checkpointing=False).generate(ids, **kwargs)
    model = qk.patch(qlora(checkpoints / family, checkpointing=False))
    with counting() as counted:
        got = model.generate(ids, **kwargs)
    assert_ran_triton(counted, "lora_linear_fwd", "flash_attention_fwd")
    launches = counted.launches
    assert launches["flash_attention_fwd", "_fwd_kernel"] > 0, launches
    assert launches["flash_attention_fwd", "_decode_split_kernel"] > 0, launches
    assert torch.equal(got, want)
