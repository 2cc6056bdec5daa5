"""The QLoRA recipe the finetune job runs on both sides: a random-init bf16 checkpoint, loaded
the way most QLoRA users load a model, with `qlora_kernels.patch` on the patched side."""

from __future__ import annotations

from pathlib import Path

import torch

from .presets import VOCAB, model_config

# LoRA on every linear layer, the QLoRA paper's setting at a small rank
LORA = dict(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear")


def stock_attention(family: str) -> str:
    """The attention implementation the stock side loads: transformers has no SDPA path for Bloom."""
    return "eager" if family == "bloom" else "sdpa"


def build_checkpoint(family: str, size: str, seq_len: int, seed: int, device: torch.device, path: Path,
                     vocab: int = VOCAB) -> dict:
    """Random-init bf16 model saved to `path`; returns facts about it.

    Why a bf16 checkpoint on disk rather than quantizing in memory: both sides must start
    from the same weights in separate fresh processes, and the stock side must take the
    unmodified `from_pretrained(..., quantization_config=...)` path (bitsandbytes quantizes
    on load), not our quantizer nor transformers internals. For 7b this is 13.5 GB of disk
    and about a minute; the folder is removed after the run unless --keep-checkpoint.
    The weights are drawn on `device` (a 7B CPU init takes minutes, on a GPU seconds).
    """
    from transformers import AutoModelForCausalLM

    config = model_config(family, size, seq_len, vocab)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    n_params = sum(p.numel() for p in model.parameters())
    model.save_pretrained(path, max_shard_size="2GB")
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return {"parameters": n_params, "config": config.to_diff_dict()}


def load_model(spec: dict, side: str):
    """The QLoRA recipe on the saved checkpoint; every side but "stock" adds
    qlora_kernels.patch(model, **spec["patch"]) (all parts on when the spec names none).
    Returns the model and, on a patched side, what patch did."""
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    device = torch.device(spec["device"])
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=torch.bfloat16, bnb_4bit_quant_storage=torch.bfloat16)
    device_map = {"": device.index or 0} if device.type == "cuda" else {"": "cpu"}
    model = AutoModelForCausalLM.from_pretrained(spec["checkpoint"], quantization_config=bnb, dtype=torch.bfloat16,
                                                 attn_implementation=spec["stock_attention"], device_map=device_map)
    # use_reentrant=False is transformers' own default; PEFT passes no value, which torch warns about
    model = prepare_model_for_kbit_training(model, gradient_checkpointing_kwargs={"use_reentrant": False})
    torch.manual_seed(spec["seed"])  # LoRA A init: the same on both sides
    model = get_peft_model(model, LoraConfig(**LORA, task_type="CAUSAL_LM"))
    patch_info = None
    if side != "stock":
        import qlora_kernels

        # strict: an unsupported layer raises instead of falling back
        model = qlora_kernels.patch(model, **(spec.get("patch") or {}))
        patch_info = str(qlora_kernels.patch_report(model))
    # bitsandbytes' Linear4bit repacks its weights for CPU inference in eval mode: stay in train
    model.train()
    return model, patch_info
