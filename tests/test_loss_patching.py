"""patch_loss on every family's small random-init model against stock transformers: the training
loss and every gradient (fp32 tightly, bf16 within twice stock's error), Gemma2 / Gemma3's final
logit softcap, a PEFT LoRA adapter, an NF4 base, gradient checkpointing (reentrant or not), the HF
Trainer's num_items_in_batch with gradient accumulation, TRL's SFTTrainer, the other output
fields, the stock paths (eval, no labels), unpatch bit for bit, another model untouched."""

import inspect
import warnings

import pytest
import torch

from helpers import assert_within_twice_stock_error, tiny_causal_lm
from qlora_kernels.modules import NF4Linear
from qlora_kernels.patching import loss as loss_patch
from qlora_kernels.patching.loss import FAMILIES, patch_loss, unpatch_loss
from test_families import CONFIGS, STOCK_ATTENTION

SOFTCAP = {"gemma2": 3.0, "gemma3_text": 3.0}  # small enough to matter at these logits


def build(family, dtype=torch.float32):
    if family == "bloom":
        return tiny_causal_lm("bloom").to(dtype)
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    overrides = {"final_logit_softcapping": SOFTCAP[family]} if family in SOFTCAP else {}
    config = AutoConfig.for_model(family, **{**CONFIGS[family], **overrides})
    return AutoModelForCausalLM.from_config(config, attn_implementation=STOCK_ATTENTION.get(family)).to(dtype)


def batch(seed=1, shape=(2, 12)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, shape, generator=g)
    labels = ids.clone()
    labels[0, :4] = -100  # a prompt
    mask = torch.ones_like(ids)
    if shape[0] > 1:
        mask[1, -3:] = 0  # right padding, labels masked there
        labels[1, -3:] = -100
    return dict(input_ids=ids, attention_mask=mask, labels=labels)


def loss_and_grads(model, inputs=None, **kwargs):
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(**(inputs or batch()), **kwargs)
    out.loss.backward()
    return out, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def assert_same(ours, stock, atol=2e-6):
    (out, grads), (stock_out, stock_grads) = ours, stock
    torch.testing.assert_close(out.loss, stock_out.loss, rtol=1e-6, atol=atol)
    assert grads.keys() == stock_grads.keys() and grads
    for name in grads:
        torch.testing.assert_close(grads[name], stock_grads[name], rtol=1e-5, atol=atol, msg=name)


def test_families_cover_the_issue():
    assert set(FAMILIES) == {"llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "gemma3_text", "phi3", "opt",
                             "bloom"}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_loss_and_gradients_match_stock_fp32(family):
    model = build(family)
    stock = loss_and_grads(model)
    assert patch_loss(model) == ["lm_head"]
    out, grads = loss_and_grads(model)
    assert out.logits is None
    assert_same((out, grads), stock)
    unpatch_loss(model)
    assert "forward" not in model.__dict__
    again = loss_and_grads(model)
    assert torch.equal(again[0].loss, stock[0].loss) and torch.equal(again[0].logits, stock[0].logits)
    assert all(torch.equal(again[1][n], stock[1][n]) for n in stock[1])


def test_softcap_is_applied():
    model = build("gemma2")
    patch_loss(model)
    capped = loss_and_grads(model)[0].loss
    model.config.final_logit_softcapping = None
    uncapped = loss_and_grads(model)[0].loss
    assert (capped - uncapped).abs() > 1e-2


@pytest.mark.parametrize("family", ["llama", "gemma2", "opt"])
def test_bf16_within_twice_stocks_error(family):
    exact_model = build(family)
    exact = loss_and_grads(exact_model)
    model = build(family, torch.bfloat16)
    stock = loss_and_grads(model)
    patch_loss(model)
    ours = loss_and_grads(model)
    assert ours[0].loss.dtype == torch.float32
    assert_within_twice_stock_error((ours[0].loss, ours[1]), (stock[0].loss, stock[1]), (exact[0].loss, exact[1]))


def test_num_items_in_batch_ignore_index_and_shift_labels():
    model = build("llama")
    inputs = batch()
    shift = torch.nn.functional.pad(inputs["labels"], (0, 1), value=-100)[:, 1:]
    for kwargs in (dict(num_items_in_batch=torch.tensor(7)), dict(num_items_in_batch=5),
                   dict(shift_labels=shift.flip(1))):
        stock = loss_and_grads(model, inputs, **kwargs)
        patch_loss(model)
        assert_same(loss_and_grads(model, inputs, **kwargs), stock)
        unpatch_loss(model)


def test_other_output_fields_are_stock():
    model = build("llama")
    kwargs = dict(output_hidden_states=True, output_attentions=True, use_cache=True)
    stock, _ = loss_and_grads(model, **kwargs)
    patch_loss(model)
    ours, _ = loss_and_grads(model, **kwargs)
    assert set(ours.keys()) == set(stock.keys()) - {"logits"}
    for a, b in zip(ours.hidden_states, stock.hidden_states, strict=True):
        assert torch.equal(a, b)
    for a, b in zip(ours.attentions, stock.attentions, strict=True):
        assert torch.equal(a, b)
    cache = "cache" if "cache" in stock.keys() else "past_key_values"
    assert type(ours[cache]) is type(stock[cache]) and ours[cache].get_seq_length() == 12


def test_eval_mode_no_labels_and_tuples_run_stock():
    model = build("llama")
    patch_loss(model)
    inputs = batch()
    model.eval()
    with torch.no_grad():
        evaluated = model(**inputs)
    assert evaluated.logits is not None and evaluated.loss is not None
    model.train()
    without_labels = model(input_ids=inputs["input_ids"])
    assert without_labels.loss is None and without_labels.logits.shape == (2, 12, 128)
    positional = model(inputs["input_ids"], inputs["attention_mask"], labels=inputs["labels"])
    assert positional.logits is None
    with pytest.raises(ValueError, match="Expected input batch_size"):  # stock's own failure
        model(**inputs, logits_to_keep=1)


def test_another_model_stays_stock():
    model, other = build("llama"), build("llama")
    patch_loss(model)
    patch_loss(model)  # twice: a no-op
    assert loss_patch._is_ours(model.forward)
    assert inspect.signature(model.forward) == inspect.signature(other.forward)  # what the Trainer reads
    assert "forward" not in other.__dict__
    assert loss_and_grads(other)[0].logits is not None


@pytest.mark.parametrize("use_reentrant", [True, False])
def test_gradient_checkpointing(use_reentrant):
    model = build("qwen3")
    stock = loss_and_grads(model)
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
    patch_loss(model)
    assert_same(loss_and_grads(model), stock)


def test_peft_lora():
    import peft

    def adapted():
        model = peft.get_peft_model(build("mistral"), peft.LoraConfig(r=4, lora_alpha=8,
                                                                        target_modules=["q_proj", "v_proj"]))
        for name, p in model.named_parameters():
            if "lora_B" in name:  # PEFT starts at zero: non-zero so that lora_A gets a gradient too
                torch.nn.init.normal_(p, std=0.1, generator=torch.Generator().manual_seed(hash(name) % 2**31))
        return model

    stock_model, model = adapted(), adapted()
    stock = loss_and_grads(stock_model)
    assert patch_loss(model.get_base_model()) == ["lm_head"]
    ours = loss_and_grads(model)
    assert ours[0].logits is None and any("lora_A" in n for n in ours[1])
    assert_same(ours, stock)


def test_nf4_base():
    import qlora_kernels as qk

    def quantized():
        return qk.quantize_model(build("llama"), compute_dtype=torch.float32, progress=False)

    stock_model, model = quantized(), quantized()
    stock = loss_and_grads(stock_model)
    assert patch_loss(model) == ["lm_head"]
    assert_same(loss_and_grads(model), stock)


def test_lm_head_that_is_not_plain_linear_is_not_patched():
    import peft

    model = peft.get_peft_model(build("llama"), peft.LoraConfig(r=4, target_modules=["q_proj", "lm_head"]))
    with pytest.warns(UserWarning, match="not a plain torch.nn.Linear"):
        assert patch_loss(model.get_base_model()) == []
    assert "forward" not in model.get_base_model().__dict__
    # replaced after patching: stock runs, with one warning
    model = build("llama")
    patch_loss(model)
    model.lm_head = NF4Linear.from_linear(model.lm_head, compute_dtype=torch.float32)
    with pytest.warns(UserWarning, match="stock loss runs"):
        assert model(**batch()).logits is not None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model(**batch())


def test_unknown_model_type_raises():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=64))
    with pytest.raises(NotImplementedError, match="llama"):
        patch_loss(model)


def _dataset(n=8):
    from datasets import Dataset

    rows = [batch(seed=100 + i, shape=(1, 12)) for i in range(n)]
    # prompts of different lengths: num_items_in_batch differs from a per-micro-batch mean
    for i, row in enumerate(rows):
        row["labels"][0, : 1 + i] = -100
    return Dataset.from_dict({k: [r[k][0].tolist() for r in rows] for k in rows[0]})


def _trainer_losses(model, out):
    from transformers import Trainer, TrainingArguments

    args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                             max_steps=2, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                             use_cpu=True, seed=0, disable_tqdm=True, dataloader_num_workers=0)
    trainer = Trainer(model=model, args=args, train_dataset=_dataset())
    trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h]), trainer.model


def test_hf_trainer_num_items_in_batch(tmp_path, monkeypatch):
    seen = []
    fused = loss_patch.fused_linear_cross_entropy

    def spy(*args, **kwargs):
        seen.append(kwargs["num_items_in_batch"])
        return fused(*args, **kwargs)

    monkeypatch.setattr(loss_patch, "fused_linear_cross_entropy", spy)
    stock, stock_model = _trainer_losses(build("llama"), tmp_path / "stock")
    model = build("llama")
    patch_loss(model)
    ours, model = _trainer_losses(model, tmp_path / "ours")
    assert len(seen) == 4 and all(n is not None for n in seen)  # 2 steps x 2 micro-batches
    torch.testing.assert_close(ours, stock, rtol=1e-5, atol=1e-5)
    for (name, p), q in zip(model.named_parameters(), stock_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


def test_trl_sft_trainer(tmp_path):
    # TRL's SFTTrainer puts its own fused LM head over the model's forward (fused_lm_head=True);
    # the patched model must train to the same losses under it
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel({f"t{i}": i for i in range(128)}, unk_token="t0")),
        pad_token="t0", eos_token="t1")

    def losses(model, out):
        data = _dataset().remove_columns(["labels", "attention_mask"])
        args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=2, learning_rate=1e-3,
                         logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                         dataloader_num_workers=0, max_length=None)
        trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
        trainer.train()
        return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h])

    stock = losses(build("llama"), tmp_path / "stock")
    model = build("llama")
    patch_loss(model)
    torch.testing.assert_close(losses(model, tmp_path / "ours"), stock, rtol=1e-5, atol=1e-5)
    unpatch_loss(model)  # under TRL's wrapper: the wrapper stays and reaches the stock forward
    assert model(**batch()).logits is not None


@pytest.fixture
def triton_rows_on_cpu():
    """The op's CPU kernel replaced by the Triton one under the interpreter, as
    QLORA_KERNELS_TRITON_ON_CPU=1 does at import (backends/triton_on_cpu.py), for one test."""
    from qlora_kernels.backends import loss as loss_backend
    from qlora_kernels.backends.common import REGISTERED, kernel
    from qlora_kernels.ops import loss as loss_ops

    before = REGISTERED["linear_cross_entropy"]["cpu"]
    loss_backend.register_triton_on_cpu("Triton (interpreter)")
    yield
    restore = (loss_backend.linear_cross_entropy_cpu if before.startswith("C++")
               else loss_backend.linear_cross_entropy_triton)
    kernel(loss_ops.linear_cross_entropy, "cpu", before)(restore)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_model_level_through_the_triton_row_kernel(family, triton_rows_on_cpu, monkeypatch):
    from qlora_kernels.backends import loss as loss_backend
    from qlora_kernels.env import op_backends

    assert op_backends("cpu")["linear_cross_entropy"] == "Triton (interpreter)"
    calls = []
    rows = loss_backend.cross_entropy_rows_triton
    monkeypatch.setattr(loss_backend, "cross_entropy_rows_triton", lambda *a: calls.append(1) or rows(*a))
    model = build(family)
    stock = loss_and_grads(model)
    patch_loss(model)
    assert_same(loss_and_grads(model), stock)
    assert calls
