"""A patched QLoRA model inside the tools users train with: bf16 error vs PyTorch's own,
30-step training curves vs stock, gradient checkpointing (both use_reentrant), HF Trainer,
generate, saving the PEFT adapter, torch.compile(fullgraph=True) of a training step.

The model-level runs also go to a CUDA machine (the `cuda` parameters, `pytest -m gpu`): the
training curves in bf16 there (QLoRA's GPU dtype; their criterion is stock's own noise), the
comparisons of two runs that must agree closely (checkpointing, Trainer, compile, generation)
in fp32."""

import warnings

import pytest
import torch
from peft import LoraConfig, PeftModel, prepare_model_for_kbit_training
from safetensors.torch import load_file
from transformers import Trainer, TrainingArguments

import qlora_kernels as qk

from helpers import DEVICES, assert_within_twice_stock_error
from test_patch_model import (  # noqa: F401
    FAMILIES,
    add_lora,
    batch,
    checkpoints,
    compute_dtype,
    load_4bit,
    loss_and_grads,
)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_bf16_loss_and_grads_within_twice_pytorchs_own_error(checkpoints, family, device):
    ids = batch(4)
    exact = loss_and_grads(add_lora(load_4bit(checkpoints / family, torch.float32, device)), ids)
    stock = loss_and_grads(add_lora(load_4bit(checkpoints / family, torch.bfloat16, device)), ids)
    ours = loss_and_grads(qk.patch(add_lora(load_4bit(checkpoints / family, torch.bfloat16, device))), ids)
    assert_within_twice_stock_error(ours, stock, exact)


def _device(model):
    return next(model.parameters()).device


def _train(model, steps, lr=1e-2, dropout_seed=0):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    # something learnable: each sequence counts up by its own stride from its own start
    g = torch.Generator().manual_seed(0)
    starts, strides = torch.randint(3, 128, (8, 1), generator=g), torch.randint(1, 6, (8, 1), generator=g)
    pool = (3 + (starts + strides * torch.arange(32)) % 125).to(_device(model))
    torch.manual_seed(dropout_seed)  # the LoRA dropout draws
    losses = []
    for step in range(steps):
        ids = pool[torch.arange(4) + 4 * (step % 2)]
        loss = model(ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    return torch.tensor(losses)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_30_step_training_tracks_stock(checkpoints, family, device):
    # LoRA dropout 0.1 as QLoRA recipes run it: the patched layers draw other masks than PEFT's,
    # so the curves can agree only as closely as stock agrees with itself under other draws
    def build():
        return add_lora(load_4bit(checkpoints / family, compute_dtype(device), device), dropout=0.1)

    stock = _train(build(), 30)
    stock_redrawn = _train(build(), 30, dropout_seed=1)
    ours = _train(qk.patch(build()), 30)
    assert stock[-5:].mean() < stock[:5].mean() - 0.25, stock  # there is something to track
    noise = (stock_redrawn - stock).abs()
    assert (ours - stock).abs().max() <= 2 * noise.max() + 0.01, (ours, stock, stock_redrawn)
    final_gap, final_noise = ((c[-5:].mean() - stock[-5:].mean()).abs() for c in (ours, stock_redrawn))
    assert final_gap <= 2 * final_noise + 0.01, (ours, stock, stock_redrawn)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(checkpoints, use_reentrant, device):
    def build(checkpointing):
        model = load_4bit(checkpoints / "llama", device=device)
        if checkpointing:
            model = prepare_model_for_kbit_training(
                model, gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
        model = add_lora(model, dropout=0.1)
        return model.train()

    ids = batch(5)
    plain = qk.patch(build(False))
    torch.manual_seed(7)
    want_loss, want_grads = loss_and_grads(plain, ids)
    model = qk.patch(build(True))
    assert model.get_base_model().is_gradient_checkpointing
    torch.manual_seed(7)  # checkpointing replays the RNG: the same dropout masks on recompute
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # no fallback warning, no None-grad warning
        loss, grads = loss_and_grads(model, ids)
    torch.testing.assert_close(loss, want_loss, atol=1e-5, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=2e-5, rtol=1e-3, msg=name)


class _Batches(torch.utils.data.Dataset):
    def __len__(self):
        return 12

    def __getitem__(self, i):
        ids = batch(200 + i, shape=(1, 24))[0]
        return {"input_ids": ids, "labels": ids}


def _trainer_losses(model, out):
    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                             logging_steps=1, report_to=[], save_strategy="no", use_cpu=_device(model).type == "cpu",
                             seed=0, dataloader_num_workers=0, disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=_Batches())
    trainer.train()
    return [h["loss"] for h in trainer.state.log_history if "loss" in h]


@pytest.mark.parametrize("device", DEVICES)
def test_hf_trainer(checkpoints, tmp_path, device):
    stock = _trainer_losses(add_lora(load_4bit(checkpoints / "llama", device=device)), tmp_path / "stock")
    ours = _trainer_losses(qk.patch(add_lora(load_4bit(checkpoints / "llama", device=device))), tmp_path / "ours")
    assert len(ours) == len(stock) == 4
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("family", FAMILIES)
def test_generate_same_tokens(checkpoints, family, device):
    ids = batch(6, shape=(2, 8)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    kwargs = dict(attention_mask=mask, max_new_tokens=12, do_sample=False, pad_token_id=0)
    # train mode: bitsandbytes' CPU eval path repacks its weights (another kernel, other roundings)
    want = add_lora(load_4bit(checkpoints / family, device=device)).generate(ids, **kwargs)
    got = qk.patch(add_lora(load_4bit(checkpoints / family, device=device))).generate(ids, **kwargs)
    assert torch.equal(got, want)


def test_save_pretrained_adapter_is_peft_s(checkpoints, tmp_path):
    stock = add_lora(load_4bit(checkpoints / "llama"))
    stock.save_pretrained(tmp_path / "stock")
    model = qk.patch(add_lora(load_4bit(checkpoints / "llama")))
    model.save_pretrained(tmp_path / "ours")
    want, got = (load_file(tmp_path / d / "adapter_model.safetensors") for d in ("stock", "ours"))
    assert got.keys() == want.keys() and len(got) == 28
    assert all(torch.equal(got[k], want[k]) for k in got)
    # and stock PEFT loads it onto a stock 4-bit model
    loaded = PeftModel.from_pretrained(load_4bit(checkpoints / "llama"), tmp_path / "ours").train()
    ids = batch(7)
    with torch.no_grad():
        torch.testing.assert_close(loaded(ids).logits, model(ids).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("device", DEVICES)
def test_compile_fullgraph_training_step(checkpoints, device):
    model = qk.patch(add_lora(load_4bit(checkpoints / "llama", device=device), dropout=0.1))
    params = [p for p in model.parameters() if p.requires_grad]
    ids = batch(8).to(device)

    def step(ids):
        return model(ids, labels=ids).loss

    torch.manual_seed(3)
    want = step(ids)
    want_grads = torch.autograd.grad(want, params)
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    torch.manual_seed(3)
    got = compiled(ids)
    grads = torch.autograd.grad(got, params)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    for a, b in zip(grads, want_grads):
        torch.testing.assert_close(a, b, atol=2e-5, rtol=1e-3)


def _sft_losses(model, out, padding_free, peft_config=None):
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    vocab = {f"t{i}": i for i in range(128)}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="t0")),
                                        pad_token="t0", eos_token="t1")
    # lengths 10 ... 31: padded batches, or packed ones (padding_free) whose sequences
    # restart their position_ids, which patch turns into cu_seqlens
    data = Dataset.from_dict({"input_ids": [batch(300 + i, shape=(1, 10 + 3 * i))[0].tolist() for i in range(8)]})
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=_device(model).type == "cpu", seed=0,
                     disable_tqdm=True, dataloader_num_workers=0, padding_free=padding_free, max_length=None)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config)
    trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h]), trainer.model


@pytest.mark.parametrize("device", DEVICES)
def test_trl_sft_trainer_padded_and_padding_free(checkpoints, tmp_path, device, monkeypatch):
    from qlora_kernels.patching import attention as patched_attention

    def build():
        return add_lora(load_4bit(checkpoints / "llama", device=device))

    # the packing the attention calls receive: offsets of the two sequences of each batch
    packings = []

    def recording(*args, cu_seqlens=None, **kwargs):
        packings.append(None if cu_seqlens is None else cu_seqlens.tolist())
        return flash_attention(*args, cu_seqlens=cu_seqlens, **kwargs)

    flash_attention = patched_attention.flash_attention
    monkeypatch.setattr(patched_attention, "flash_attention", recording)
    stock, _ = _sft_losses(build(), tmp_path / "stock", padding_free=False)
    padded, _ = _sft_losses(qk.patch(build()), tmp_path / "padded", False)
    assert packings and not any(packings)
    packings.clear()
    packed, _ = _sft_losses(qk.patch(build()), tmp_path / "packed", True)
    assert packings and all(p is not None and len(p) == 3 and p[0] == 0 for p in packings), packings
    assert len(stock) == 4
    torch.testing.assert_close(padded, stock, atol=1e-4, rtol=1e-4)
    # attending across the two sequences moves these losses by about 2e-2
    torch.testing.assert_close(packed, stock, atol=5e-4, rtol=1e-4)


def test_patch_before_sft_trainer_builds_the_peft_model(checkpoints, tmp_path):
    # SFTTrainer(peft_config=...) runs get_peft_model itself: patch can only come before it
    config = LoraConfig(r=8, lora_alpha=16, target_modules="all-linear")
    torch.manual_seed(1)
    stock, _ = _sft_losses(load_4bit(checkpoints / "llama"), tmp_path / "stock", False, config)
    torch.manual_seed(1)
    ours, model = _sft_losses(qk.patch(load_4bit(checkpoints / "llama")), tmp_path / "ours", False, config)
    report = qk.patch_report(model)
    assert len(report.lora_layers) == 14 and not report.lora_pending  # fused at the first forward
    torch.testing.assert_close(ours, stock, atol=1e-4, rtol=1e-4)
