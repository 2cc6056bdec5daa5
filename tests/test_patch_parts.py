"""patch(model, loss=, norm=, rope=, mlp=) on every registered family: the registry records the
parts each model_type has; with every part on, a small random-init fp32 model gives stock's loss
and gradients (the loss fused: logits None in training with labels, stock logits otherwise),
bf16 ones within twice PyTorch's own error, also with a PEFT LoRA adapter over an NF4 base
(patch(quantize="nf4"), bitsandbytes Linear4bit) and with gradient checkpointing; each part
runs its own ops and can be switched off alone; patching twice changes nothing, unpatch
restores stock bit for bit and another model in the process stays stock throughout."""

from __future__ import annotations

import pytest
import torch
from peft import LoraConfig, get_peft_model

import qlora_kernels as qk
from qlora_kernels.patching import families
from qlora_kernels.patching.families import FAMILIES, PART_MODULES, PARTS

from helpers import assert_within_twice_stock_error, tiny_causal_lm
from test_families import CONFIGS, build
from test_lora_any_model import OpCalls

ALL = [*CONFIGS, "bloom"]
# what a part that does not apply to these families would replace, they do not have
NO_GATED_RMSNORM_ROPE = {"opt", "bloom"}


def make(family: str, dtype=torch.float32) -> torch.nn.Module:
    model = tiny_causal_lm("bloom") if family == "bloom" else build(family)
    return model.to(dtype).train()


def ids_and_labels(seed=0, shape=(2, 16)):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, 128, shape, generator=g)
    labels = ids.clone()
    labels[0, :5] = -100  # a prompt that is not trained on
    return ids, labels


def run(model, ids, labels, **kwargs):
    """Loss, logits and the gradients of a training step."""
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=labels, **kwargs)
    out.loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out.loss.detach(), out.logits, grads


def assert_close_run(got, want, atol=5e-5):
    (loss, _, grads), (want_loss, _, want_grads) = got, want
    torch.testing.assert_close(loss, want_loss, atol=2e-6, rtol=1e-5)
    assert grads.keys() == want_grads.keys()
    for name in want_grads:
        torch.testing.assert_close(grads[name], want_grads[name], atol=atol, rtol=1e-3, msg=name)


def assert_same_run(got, want):
    (loss, _, grads), (want_loss, _, want_grads) = got, want
    assert torch.equal(loss, want_loss)
    assert grads.keys() == want_grads.keys() and all(torch.equal(grads[n], want_grads[n]) for n in grads)


def instance_forwards(model):
    return {n: m.__dict__.get("forward") for n, m in model.named_modules()}


def test_every_part_is_in_this_build_with_its_interface():
    assert set(PART_MODULES) == set(PARTS)
    for part, module in PART_MODULES.items():
        assert isinstance(module.FAMILIES, dict) and module.FAMILIES, part
        assert all(isinstance(k, str) and isinstance(v, str) and v for k, v in module.FAMILIES.items()), part
        assert set(module.FAMILIES) <= set(FAMILIES), f"{part} covers model types the registry does not know"
        assert callable(getattr(module, f"patch_{part}")) and callable(getattr(module, f"unpatch_{part}"))


def test_registry_records_the_parts_of_each_family():
    for model_type, family in FAMILIES.items():
        assert dict(family.parts) == {part: module.FAMILIES[model_type] for part, module in PART_MODULES.items()
                                      if model_type in module.FAMILIES}
    # the loss applies to every causal LM of the registry; RMSNorm, rotary embeddings and the gated
    # MLP to every family that has them
    assert all("loss" in family.parts for family in FAMILIES.values())
    for model_type, family in FAMILIES.items():
        expected = set() if model_type in NO_GATED_RMSNORM_ROPE else {"norm", "rope", "mlp"}
        assert {"norm", "rope", "mlp"} & set(family.parts) == expected, model_type


def test_a_part_refuses_a_model_type_it_does_not_cover():
    model = make("opt")
    for part in ("norm", "rope", "mlp"):
        patch_part, _ = families.part_functions(part)
        with pytest.raises(NotImplementedError, match="llama"):  # names the model types it covers
            patch_part(model)


@pytest.mark.parametrize("family", ALL)
def test_every_part_on_matches_stock_and_unpatch_restores_it(family):
    model, bystander = make(family), make(family)
    ids, labels = ids_and_labels()
    want = run(model, ids, labels)
    model.eval()
    with torch.no_grad():
        want_logits = model(ids).logits
    model.train()

    assert qk.patch(model) is model
    report = qk.patch_report(model)
    applicable = set(FAMILIES[family].parts)
    for part in PARTS:
        assert bool(getattr(report, part)) == (part in applicable), (part, report)
    assert set(report.not_applicable) == set(PARTS) - applicable
    assert report.attention and not report.skipped
    assert f"loss={len(report.loss)}" in str(report)

    got = run(model, ids, labels)
    assert got[1] is None  # training with labels: the fused loss, no logits
    assert_close_run(got, want)
    model.eval()
    with torch.no_grad():  # no labels: the stock head, logits as before
        torch.testing.assert_close(model(ids).logits, want_logits, atol=2e-5, rtol=1e-4)
    model.train()

    before, text = instance_forwards(model), str(report)
    qk.patch(model)
    assert instance_forwards(model) == before and str(qk.patch_report(model)) == text

    # another model of the same family in this process never changed
    assert not any(instance_forwards(bystander).values())
    assert_same_run(run(bystander, ids, labels), want)

    qk.unpatch(model)
    assert qk.patch_report(model) is None and not any(instance_forwards(model).values())
    assert_same_run(run(model, ids, labels), want)


@pytest.mark.parametrize("part", PARTS)
def test_each_part_alone_runs_its_ops_and_can_be_switched_off(part):
    """Llama: every part on against every part on but `part`: the part's own ops run only when
    it is on, and either way the model is stock's."""
    ids, labels = ids_and_labels(1)
    want = run(make("llama"), ids, labels)
    calls = {}
    for name, on in (("with", True), ("without", False)):
        model = qk.patch(make("llama"), **{part: on})
        report = qk.patch_report(model)
        assert bool(getattr(report, part)) == on
        assert all(getattr(report, other) for other in PARTS if other != part)
        with OpCalls() as counted:
            got = run(model, ids, labels)
        calls[name] = set(counted.calls)
        assert_close_run(got, want)
    assert calls["with"] - calls["without"], f"{part}: no op of its own ran"

    only = qk.patch(make("llama"), attention=False, lora=False, **{p: p == part for p in PARTS})
    report = qk.patch_report(only)
    assert [p for p in PARTS if getattr(report, p)] == [part] and report.attention is None
    assert_close_run(run(only, ids, labels), want)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen3", "opt"])
def test_bf16_within_twice_pytorchs_own_error(family):
    ids, labels = ids_and_labels(2)

    def step(model):
        loss, _, grads = run(model, ids, labels)
        return loss, grads

    exact = step(make(family))
    stock = step(make(family, torch.bfloat16))
    ours = step(qk.patch(make(family, torch.bfloat16)))
    assert_within_twice_stock_error(ours, stock, exact)


def lora(model, target_modules="all-linear"):
    torch.manual_seed(1)
    model = get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.0, target_modules=target_modules))
    for name, p in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at 0: make the adapter count
            torch.nn.init.normal_(p, std=0.05)
    return model


@pytest.mark.parametrize("family", ["llama", "gemma2", "phi3", "bloom"])
def test_peft_lora_over_nf4_with_every_part(family):
    """patch(quantize="nf4") after get_peft_model: NF4 bases, fused LoRA, every part; unpatch
    keeps the NF4 weights and restores the stock code, which is what the patched model must match."""
    ids, labels = ids_and_labels(3)
    model = qk.patch(lora(make(family)), quantize="nf4")
    report = qk.patch_report(model)
    assert report.quantized and report.lora_layers and report.loss
    got = run(model, ids, labels)
    assert any("lora_A" in n for n in got[2]) and not any("lora" not in n for n in got[2])
    qk.unpatch(model)
    want = run(model, ids, labels)
    assert_close_run(got, want, atol=1e-4)


@pytest.mark.parametrize("family, use_reentrant", [("llama", True), ("llama", False), ("gemma3_text", False),
                                                   ("phi3", True)])
def test_gradient_checkpointing_with_every_part(family, use_reentrant):
    ids, labels = ids_and_labels(4)

    def build_lora(checkpointing):
        model = make(family)
        if checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": use_reentrant})
            model.enable_input_require_grads()  # reentrant checkpoints need an input that requires grad
        return lora(model)

    want = run(build_lora(False), ids, labels)
    model = qk.patch(build_lora(True))
    assert model.get_base_model().is_gradient_checkpointing
    assert_close_run(run(model, ids, labels), want)


def test_bitsandbytes_qlora_recipe_with_every_part(tmp_path):
    """The QLoRA recipe users run: bitsandbytes NF4 double quant on load, prepare_model_for_kbit_training
    (gradient checkpointing), PEFT LoRA; every part on against stock."""
    import bitsandbytes as bnb
    from peft import prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    make("qwen3").save_pretrained(tmp_path)
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=torch.float32)

    def qlora():
        model = AutoModelForCausalLM.from_pretrained(tmp_path, quantization_config=config, device_map="cpu",
                                                     dtype=torch.float32)
        assert any(isinstance(m, bnb.nn.Linear4bit) for m in model.modules())
        model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
        return lora(model).train()  # bitsandbytes repacks its CPU weights in eval mode

    ids, labels = ids_and_labels(5)
    want = run(qlora(), ids, labels)
    model = qk.patch(qlora())
    report = qk.patch_report(model)
    assert report.converted and all(getattr(report, part) for part in PARTS)
    assert_close_run(run(model, ids, labels), want, atol=1e-4)


def test_parts_on_an_unknown_model_type_follow_strict():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    model = lora(GPT2LMHeadModel(GPT2Config(vocab_size=128, n_embd=32, n_layer=1, n_head=4)), ["c_attn"])
    with pytest.raises(ValueError, match=r"loss, norm, rope, mlp: model_type 'gpt2' is not in the registry"):
        qk.patch(model)
    assert qk.patch_report(model) is None
    with pytest.warns(UserWarning, match="loss, norm, rope, mlp: model_type 'gpt2'"):
        qk.patch(model, strict=False)
    assert not any(getattr(qk.patch_report(model), part) for part in PARTS)
    qk.unpatch(model)
    # attention=False, the way to fuse LoRA on any architecture: the parts do not apply, no error
    qk.patch(model, attention=False)
    report = qk.patch_report(model)
    assert set(report.not_applicable) == set(PARTS) and report.lora_layers and not report.skipped



def test_the_docs_parts_table_is_the_registry():
    from pathlib import Path

    text = (Path(__file__).resolve().parents[1] / "docs" / "patching.md").read_text()
    lines = text[text.index("| `model_type` | loss | norm | rope | mlp |"):].splitlines()
    rows = {}
    for line in lines[2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].strip("`")] = {part for part, cell in zip(PARTS, cells[1:]) if cell == "✓"}
    assert rows == {model_type: set(family.parts) for model_type, family in FAMILIES.items()}


class _Examples(torch.utils.data.Dataset):
    """Sequences whose first 2 to 9 labels are masked: the batches' token counts differ, so the
    loss depends on how the Trainer's num_items_in_batch divides it."""

    def __len__(self):
        return 8

    def __getitem__(self, i):
        ids, _ = ids_and_labels(100 + i, shape=(1, 16))
        labels = ids[0].clone()
        labels[: 2 + i] = -100
        return {"input_ids": ids[0], "labels": labels}


def test_hf_trainer_with_gradient_accumulation_gives_stock_losses(tmp_path):
    from transformers import Trainer, TrainingArguments

    def losses(model, out):
        args = TrainingArguments(output_dir=str(out), per_device_train_batch_size=2, gradient_accumulation_steps=2,
                                 max_steps=1, learning_rate=1e-3, logging_steps=1, report_to=[], save_strategy="no",
                                 use_cpu=True, seed=0, dataloader_num_workers=0, disable_tqdm=True)
        trainer = Trainer(model=model, args=args, train_dataset=_Examples())
        with OpCalls() as counted:
            trainer.train()
        return [h["loss"] for h in trainer.state.log_history if "loss" in h], set(counted.calls)

    stock, stock_ops = losses(lora(make("qwen3")), tmp_path / "stock")
    ours, ops = losses(qk.patch(lora(make("qwen3"))), tmp_path / "ours")
    assert len(ours) == len(stock) == 1 and not stock_ops and ops
    torch.testing.assert_close(torch.tensor(ours), torch.tensor(stock), atol=1e-5, rtol=1e-5)


def _sft_losses(model, out):
    """4 steps of TRL's SFTTrainer in fp32 (its config turns bf16 autocast on by default, whose
    roundings would hide a difference), padded batches of a word-level tokenizer over 128 ids."""
    from datasets import Dataset
    from tokenizers import Tokenizer, models
    from transformers import PreTrainedTokenizerFast
    from trl import SFTConfig, SFTTrainer

    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel(
        {f"t{i}": i for i in range(128)}, unk_token="t0")), pad_token="t0", eos_token="t1")
    data = Dataset.from_dict({"input_ids": [ids_and_labels(300 + i, shape=(1, 10 + 3 * i))[0][0].tolist()
                                            for i in range(8)]})
    args = SFTConfig(output_dir=str(out), per_device_train_batch_size=2, max_steps=4, learning_rate=1e-3,
                     logging_steps=1, report_to=[], save_strategy="no", use_cpu=True, seed=0, disable_tqdm=True,
                     dataloader_num_workers=0, max_length=None, bf16=False, fp16=False)
    trainer = SFTTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)
    with OpCalls() as counted:
        trainer.train()
    return torch.tensor([h["loss"] for h in trainer.state.log_history if "loss" in h]), set(counted.calls)


def test_trl_sft_trainer_gives_stock_losses(tmp_path):
    """TRL 1.16 computes the training loss with its own chunked LM head over the backbone: the
    fused loss is not called there, every other part is."""
    stock, stock_ops = _sft_losses(lora(make("gemma")), tmp_path / "stock")
    model = qk.patch(lora(make("gemma")))
    assert all(getattr(qk.patch_report(model), part) for part in PARTS)
    ours, ops = _sft_losses(model, tmp_path / "ours")
    assert len(stock) == 4 and not stock_ops and ops
    torch.testing.assert_close(ours, stock, atol=1e-5, rtol=1e-5)
