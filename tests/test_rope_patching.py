"""patch_rope on every RoPE family's small random-init model, against stock transformers:
loss and gradients in fp32 (tight) and bf16 (the 2x rule), Phi-3 with partial rotary, packed
sequences with position_ids (alone and with patch_attention, which then matches one run per
document), the QLoRA recipe (bitsandbytes NF4 base, PEFT LoRA, gradient checkpointing
reentrant or not), unpatch back to stock bit for bit, a second model of the same family left
stock, FSDP2's class swap, accelerate's hooks, and the Triton kernel at model level
(QLORA_KERNELS_TRITON_ON_CPU=1, in a subprocess). Each test counts the rope op's calls, so a
patch that silently ran stock code fails it.
"""

import collections
import contextlib
import copy
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

import qlora_kernels as qk
from qlora_kernels.patching import patch_attention, unpatch_attention
from qlora_kernels.patching.rope import FAMILIES, patch_rope, unpatch_rope

from helpers import assert_same_loss_and_grads, assert_within_twice_stock_error
from test_families import CONFIGS, build

TESTS = Path(__file__).resolve().parent
# every RoPE family, and Phi-3 with partial rotary (half the head dim rotated)
MODELS = {family: (family, {}) for family in FAMILIES}
MODELS["phi3-partial"] = ("phi3", dict(partial_rotary_factor=0.5))
LAYERS = CONFIGS["llama"]["num_hidden_layers"]


class OpCalls(TorchDispatchMode):
    """The qlora_kernels::rope calls (forward and backward) made while active."""

    def __init__(self):
        super().__init__()
        self.calls = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func._schema.name == "qlora_kernels::rope":
            self.calls[bool(args[4])] += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def counting():
    mode = OpCalls()
    with mode:
        yield mode.calls


def make(name, dtype=torch.float32):
    family, overrides = MODELS[name]
    return build(family, **overrides).to(dtype).train()


def batch(seed=0, shape=(2, 16)):
    return torch.randint(3, CONFIGS["llama"]["vocab_size"], shape, generator=torch.Generator().manual_seed(seed))


def loss_and_grads(model, ids, **kwargs):
    model.zero_grad()
    out = model(ids, labels=ids, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    return out.loss.detach(), grads


def assert_close_fp32(got, want, atol=1e-6):
    (loss, grads), (want_loss, want_grads) = got, want
    assert grads.keys() == want_grads.keys() and grads
    torch.testing.assert_close(loss, want_loss, atol=atol, rtol=1e-5)
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=atol, rtol=1e-4, msg=name)


def patched_run(model, ids, **kwargs):
    """(loss, grads) of `model` with rope patched (then unpatched), with the op's call counts."""
    names = patch_rope(model)
    assert names == [f"{type(model.model.layers[0].self_attn).__name__}.apply_rotary_pos_emb x{LAYERS}"]
    try:
        with counting() as calls:
            result = loss_and_grads(model, ids, **kwargs)
    finally:
        unpatch_rope(model)
    return result, calls


@pytest.mark.parametrize("name", list(MODELS))
def test_fp32_matches_stock_and_unpatch_restores_it(name):
    model = make(name)
    ids = batch()
    stock = loss_and_grads(model, ids)
    got, calls = patched_run(model, ids)
    # one forward call per layer, one backward (the transposed rotation) per layer
    assert calls == {False: LAYERS, True: LAYERS}
    assert_close_fp32(got, stock)
    assert all("forward" not in m.__dict__ for m in model.modules())
    with counting() as calls:
        again = loss_and_grads(model, ids)
    assert not calls
    assert_same_loss_and_grads(again, stock)


@pytest.mark.parametrize("name", list(MODELS))
def test_bf16_within_twice_stock_error(name):
    # 128 tokens: on fewer, a single loss's rounding error is too noisy a yardstick
    ids = batch(0, (4, 32))
    exact = loss_and_grads(make(name), ids)
    model = make(name, torch.bfloat16)
    stock = loss_and_grads(model, ids)
    got, calls = patched_run(model, ids)
    assert calls[False] == LAYERS
    assert_within_twice_stock_error(got, stock, exact)


def packed(lengths=(5, 7, 4), seed=2):
    ids = batch(seed, (1, sum(lengths)))
    return ids, torch.cat([torch.arange(n) for n in lengths])[None], lengths


@pytest.mark.parametrize("name", ["llama", "qwen3", "phi3-partial"])
def test_packed_position_ids_match_stock(name):
    model = make(name)
    ids, position_ids, _ = packed()
    stock = loss_and_grads(model, ids, position_ids=position_ids)
    # the positions restart: not the run without them
    assert not torch.equal(stock[0], loss_and_grads(model, ids)[0])
    got, calls = patched_run(model, ids, position_ids=position_ids)
    assert calls[False] == LAYERS
    assert_close_fp32(got, stock)


@pytest.mark.parametrize("name", ["llama", "mistral", "gemma2", "phi3-partial"])
def test_with_patch_attention_packed_matches_one_run_per_document(name):
    # with both patches, a packed row attends within its documents: the logits of each document
    # are those of its own run through the stock model
    model = make(name).eval()
    ids, position_ids, lengths = packed()
    with torch.no_grad():
        per_document = torch.cat([model(doc).logits for doc in ids.split(list(lengths), dim=1)], dim=1)
        patch_attention(model)
        patch_rope(model)
        try:
            with counting() as calls:
                logits = model(ids, position_ids=position_ids).logits
        finally:
            unpatch_rope(model)
            unpatch_attention(model)
    assert calls[False] == LAYERS
    torch.testing.assert_close(logits, per_document, atol=2e-5, rtol=1e-4)


@pytest.mark.parametrize("name", list(MODELS))
def test_with_patch_attention_matches_stock(name):
    model = make(name)
    ids = batch(3)
    stock = loss_and_grads(model, ids)
    patch_attention(model)
    try:
        got, calls = patched_run(model, ids)
    finally:
        unpatch_attention(model)
    assert calls == {False: LAYERS, True: LAYERS}
    # the attention kernel sums in another order than SDPA / eager
    assert_close_fp32(got, stock, atol=2e-5)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """name -> directory of the saved fp32 model, loaded again in 4 bits by qlora_model."""
    root = tmp_path_factory.mktemp("rope_models")
    paths = {}

    def get(name):
        if name not in paths:
            paths[name] = root / name
            make(name).save_pretrained(paths[name])
        return paths[name]

    return get


def qlora_model(path, reentrant):
    """The QLoRA recipe: bitsandbytes NF4 double-quant base, PEFT LoRA on every linear layer,
    gradient checkpointing."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(path, quantization_config=config, device_map="cpu",
                                                 dtype=torch.float32)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=dict(use_reentrant=reentrant))
    model.enable_input_require_grads()
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules="all-linear"))
    for n, p in model.named_parameters():
        if "lora_B" in n:  # PEFT starts B at 0: make the LoRA branch count
            torch.nn.init.normal_(p, std=0.05)
    return model.train()


@pytest.mark.parametrize(("name", "reentrant"), [(name, False) for name in MODELS] + [
    (name, True) for name in ("llama", "phi3-partial")])
def test_qlora_recipe_matches_stock(checkpoints, name, reentrant):
    import bitsandbytes as bnb

    peft_model = qlora_model(checkpoints(name), reentrant)
    assert any(isinstance(m, bnb.nn.Linear4bit) for m in peft_model.modules())
    ids = batch(4)
    stock = loss_and_grads(peft_model, ids)
    assert stock[1] and all("lora_" in n for n in stock[1])
    model = peft_model.get_base_model()  # the transformers model under PEFT
    patch_rope(model)
    try:
        with counting() as calls:
            got = loss_and_grads(peft_model, ids)
    finally:
        unpatch_rope(model)
    # checkpointing runs each layer's forward again before its backward
    assert calls == {False: 2 * LAYERS, True: LAYERS}
    assert_close_fp32(got, stock, atol=1e-5)
    assert_same_loss_and_grads(loss_and_grads(peft_model, ids), stock)


def test_other_model_and_transformers_untouched():
    from transformers.models.llama import modeling_llama

    stock_forward, stock_rope = modeling_llama.LlamaAttention.forward, modeling_llama.apply_rotary_pos_emb
    model, other = make("llama"), make("llama")
    ids = batch(5)
    want = loss_and_grads(other, ids)
    patch_rope(model)
    try:
        with counting() as calls:
            got = loss_and_grads(other, ids)
        assert not calls
        assert_same_loss_and_grads(got, want)
        assert modeling_llama.LlamaAttention.forward is stock_forward
        assert modeling_llama.apply_rotary_pos_emb is stock_rope
        with counting() as calls:
            loss_and_grads(model, ids)
        assert calls[False] == LAYERS
    finally:
        unpatch_rope(model)


def test_patch_twice_is_a_noop_and_unpatch_without_patch_too():
    model = make("qwen2")
    unpatch_rope(model)
    assert all("forward" not in m.__dict__ for m in model.modules())
    first = patch_rope(model)
    forwards = [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__]
    assert patch_rope(model) == first and len(forwards) == LAYERS
    assert [m.__dict__["forward"] for m in model.modules() if "forward" in m.__dict__] == forwards
    unpatch_rope(model)
    unpatch_rope(model)
    assert all("forward" not in m.__dict__ and "_qlora_kernels_rope_previous" not in m.__dict__
               for m in model.modules())


@pytest.mark.parametrize("family", ["opt", "bloom"])
def test_families_without_rope_are_refused(family):
    model = build("opt") if family == "opt" else None
    if model is None:
        from transformers import BloomConfig, BloomForCausalLM

        model = BloomForCausalLM(BloomConfig(vocab_size=128, hidden_size=32, n_layer=1, n_head=2))
    for call in (patch_rope, unpatch_rope):
        with pytest.raises(NotImplementedError, match=f"supports the model types {', '.join(FAMILIES)}, not "
                                                      f"'{family}'"):
            call(model)


def test_fsdp2_class_swap_keeps_the_patch():
    # FSDP2's fully_shard swaps each module's class for a subclass made on the fly
    model = make("gemma")
    ids = batch(6)
    stock = loss_and_grads(model, ids)
    patch_rope(model)
    for m in model.modules():
        if type(m).__name__ == "GemmaAttention":
            m.__class__ = type(f"FSDP{type(m).__name__}", (type(m),), {})
    with counting() as calls:
        got = loss_and_grads(model, ids)
    assert calls[False] == LAYERS
    assert_close_fp32(got, stock)
    unpatch_rope(model)
    assert_same_loss_and_grads(loss_and_grads(model, ids), stock)


def test_accelerate_hooks_keep_working():
    from accelerate.hooks import ModelHook, add_hook_to_module, remove_hook_from_module

    class Count(ModelHook):
        def __init__(self):
            self.n = 0

        def pre_forward(self, module, *args, **kwargs):
            self.n += 1
            return args, kwargs

    model = make("mistral")
    hook = Count()
    attention = model.model.layers[0].self_attn
    add_hook_to_module(attention, hook)
    hooked = attention.__dict__["forward"]
    ids = batch(7)
    stock = loss_and_grads(model, ids)
    patch_rope(model)
    assert attention.__dict__["forward"] is hooked  # accelerate's forward calls the patched one
    with counting() as calls:
        got = loss_and_grads(model, ids)
    assert calls[False] == LAYERS and hook.n == 2
    assert_close_fp32(got, stock)
    unpatch_rope(model)
    assert getattr(attention._old_forward, "__func__", None) is type(attention).forward
    remove_hook_from_module(attention)
    assert_same_loss_and_grads(loss_and_grads(model, ids), stock)


def test_foreign_instance_forward_is_refused():
    model = make("llama")
    attention = model.model.layers[1].self_attn
    attention.forward = types.MethodType(lambda self, *a, **k: None, attention)
    with pytest.raises(NotImplementedError, match="already has a forward of its own"):
        patch_rope(model)


def test_deepcopy_of_patched_model_is_patched_on_its_own():
    model = make("qwen3")
    patch_rope(model)
    twin = copy.deepcopy(model)
    assert all(m.forward.__self__ is m for m in twin.modules() if "forward" in m.__dict__)
    ids = batch(8)
    with counting() as calls:
        loss_and_grads(twin, ids)
    assert calls[False] == LAYERS
    unpatch_rope(twin)
    unpatch_rope(model)


TRITON_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
import qlora_kernels
from qlora_kernels.backends.common import REGISTERED
from qlora_kernels.triton import rope as triton_rope
import test_rope_patching as t

assert REGISTERED["rope"]["cpu"] == "Triton (interpreter)", REGISTERED["rope"]
launches = []
run = triton_rope.rope_triton
triton_rope.rope_triton = lambda *a, **k: (launches.append(1), run(*a, **k))[1]
for name in ("llama", "phi3-partial"):
    for dtype in (torch.float32, torch.bfloat16):
        model = t.make(name, dtype)
        ids = t.batch()
        stock = t.loss_and_grads(model, ids)
        got, calls = t.patched_run(model, ids)
        assert calls == {{False: t.LAYERS, True: t.LAYERS}}, calls
        if dtype == torch.float32:
            t.assert_close_fp32(got, stock)
        else:
            t.assert_within_twice_stock_error(got, stock, t.loss_and_grads(t.make(name), ids))
assert len(launches) == 2 * 2 * 2 * t.LAYERS, len(launches)
print("triton rope ok", len(launches))
"""


def test_models_through_the_triton_kernel_on_cpu():
    env = dict(os.environ, TRITON_INTERPRET="1", QLORA_KERNELS_TRITON_ON_CPU="1")
    proc = subprocess.run([sys.executable, "-c", TRITON_SCRIPT.format(tests=str(TESTS))], cwd=TESTS.parent, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and "triton rope ok" in proc.stdout, proc.stdout[-4000:] + proc.stderr[-6000:]
