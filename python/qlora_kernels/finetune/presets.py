"""Size presets of the finetune job (model shapes per family, run defaults per size) and the
checked configuration of one run."""

from __future__ import annotations

import dataclasses

import torch

from ..errors import JobArgumentError

VOCAB = 257  # 256 byte values + a pad id that never occurs in the text
PAD_ID = 256
FAMILIES = ("llama", "opt", "bloom")
SIDES = ("stock", "patched")
# the kernels `patch` puts in, each a keyword of qlora_kernels.patch: `--parts` trains stock,
# every part on ("patched"), and every part on but one ("patched -<part>") for each of them
PARTS = ("attention", "lora", "loss", "norm", "rope", "mlp")


def without(part: str) -> str:
    """The name of the configuration with every part on but `part`."""
    return f"patched -{part}"


def applicable_parts(family: str, parts: tuple[str, ...]) -> tuple[tuple[str, ...], dict[str, str]]:
    """The parts of `parts` the family has, and those it has not (part -> why): OPT and Bloom
    have no RMSNorm, rotary embedding or gated MLP, so switching those off changes nothing."""
    from ..patching.families import FAMILIES as REGISTRY

    kept, not_applicable = [], {}
    for part in parts:
        if part in ("attention", "lora") or part in REGISTRY[family].parts:
            kept.append(part)
        else:
            not_applicable[part] = f"{family} has nothing this part replaces"
    return tuple(kept), not_applicable


def configurations(sides: tuple[str, ...], parts: tuple[str, ...] | None) -> dict[str, dict | None]:
    """name -> the keywords of qlora_kernels.patch for that run (None: stock, not patched)."""
    if parts is None:
        return {side: (None if side == "stock" else {}) for side in sides}
    return {"stock": None, "patched": {}, **{without(part): {part: False} for part in parts}}

# Model shapes. 7b: Llama-2-7B, OPT-6.7B, BLOOM-7b1; 1b: TinyLlama-1.1B, OPT-1.3B, BLOOM-1b1;
# small / tiny / test: CPU-sized shapes of the same families (test is for the test suite).
PRESETS: dict[str, dict[str, dict]] = {
    "llama": {
        "test": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
                     num_key_value_heads=1),
        "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=4,
                     num_key_value_heads=4),
        "small": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=8,
                      num_key_value_heads=8),
        "1b": dict(hidden_size=2048, intermediate_size=5632, num_hidden_layers=22, num_attention_heads=32,
                   num_key_value_heads=4),
        "7b": dict(hidden_size=4096, intermediate_size=11008, num_hidden_layers=32, num_attention_heads=32,
                   num_key_value_heads=32),
    },
    "opt": {
        "test": dict(hidden_size=64, ffn_dim=256, num_hidden_layers=2, num_attention_heads=2),
        "tiny": dict(hidden_size=256, ffn_dim=1024, num_hidden_layers=4, num_attention_heads=4),
        "small": dict(hidden_size=512, ffn_dim=2048, num_hidden_layers=8, num_attention_heads=8),
        "1b": dict(hidden_size=2048, ffn_dim=8192, num_hidden_layers=24, num_attention_heads=32),
        "7b": dict(hidden_size=4096, ffn_dim=16384, num_hidden_layers=32, num_attention_heads=32),
    },
    "bloom": {
        "test": dict(hidden_size=64, n_layer=2, n_head=2),
        "tiny": dict(hidden_size=256, n_layer=4, n_head=4),
        "small": dict(hidden_size=512, n_layer=8, n_head=8),
        "1b": dict(hidden_size=1536, n_layer=24, n_head=16),
        "7b": dict(hidden_size=4096, n_layer=30, n_head=32),
    },
}
SIZES = tuple(PRESETS["llama"])
# per size: sequence length, batch size, steps, learning rate. The base model is random, so
# only LoRA learns (the byte statistics of Python source); the CPU sizes use a larger rate
# than QLoRA's 2e-4 to show a falling loss in few steps.
RUN_DEFAULTS = {
    "test": dict(seq_len=32, batch_size=2, steps=3, lr=1e-3),
    "tiny": dict(seq_len=256, batch_size=4, steps=50, lr=1e-3),
    "small": dict(seq_len=512, batch_size=4, steps=40, lr=1e-3),
    "1b": dict(seq_len=2048, batch_size=1, steps=30, lr=2e-4),
    "7b": dict(seq_len=2048, batch_size=1, steps=30, lr=2e-4),
}


@dataclasses.dataclass(frozen=True)
class RunConfig:
    """One finetune run, checked: what `run` trains and records."""

    family: str
    size: str
    steps: int
    seq_len: int
    batch_size: int
    lr: float
    seed: int
    device: torch.device
    sides: tuple[str, ...]
    warmup_steps: int
    vocab: int = VOCAB
    parts: tuple[str, ...] | None = None  # --parts: the parts switched off one at a time
    not_applicable: dict = dataclasses.field(default_factory=dict)  # --parts the family does not have

    @property
    def configurations(self) -> dict[str, dict | None]:
        return configurations(self.sides, self.parts)

    @property
    def tokens_per_step(self) -> int:
        return self.batch_size * self.seq_len

    @classmethod
    def resolve(cls, family: str, size: str, steps: int | None, seq_len: int | None, batch_size: int | None,
                lr: float | None, seed: int, device: str, only: str, warmup_steps: int, vocab: int | None = None,
                parts: str | list[str] | tuple[str, ...] | None = None) -> RunConfig:
        """The preset's defaults filled in; JobArgumentError names the argument that cannot run.
        parts: None (stock vs patched), or the parts to switch off one at a time (a list, or
        one comma-separated string; "all" for PARTS)."""
        if family not in FAMILIES:
            raise JobArgumentError(f"model family {family!r} is not one of {', '.join(FAMILIES)}")
        if size not in SIZES:
            raise JobArgumentError(f"size preset {size!r} is not one of {', '.join(SIZES)}")
        if only not in ("both", *SIDES):
            raise JobArgumentError(f"only={only!r}: use 'both', 'stock' or 'patched'")
        defaults = RUN_DEFAULTS[size]
        steps = defaults["steps"] if steps is None else steps
        seq_len = defaults["seq_len"] if seq_len is None else seq_len
        batch_size = defaults["batch_size"] if batch_size is None else batch_size
        lr = defaults["lr"] if lr is None else lr
        if steps <= warmup_steps:
            raise JobArgumentError(f"steps={steps}: must be more than the {warmup_steps} warm-up step(s), "
                                   "which are not timed")
        if seq_len < 2:  # the loss predicts token i + 1 from token i
            raise JobArgumentError(f"seq_len={seq_len}: a sequence needs at least 2 tokens")
        if batch_size < 1:
            raise JobArgumentError(f"batch_size={batch_size}: must be at least 1")
        if not lr > 0:
            raise JobArgumentError(f"lr={lr}: the learning rate must be positive")
        vocab = VOCAB if vocab is None else vocab
        if vocab < VOCAB:
            raise JobArgumentError(f"vocab={vocab}: the byte-level data needs at least {VOCAB} ids "
                                   f"(256 byte values and the pad id {PAD_ID})")
        not_applicable = {}
        if parts is not None:
            parts = _parts(parts)
            if only != "both":
                raise JobArgumentError(f"--parts trains stock and every configuration of the parts: it cannot run "
                                       f"with only={only!r}")
            parts, not_applicable = applicable_parts(family, parts)
        return cls(family, size, steps, seq_len, batch_size, lr, seed, _device(device),
                   SIDES if only == "both" else (only,), warmup_steps, vocab, parts, not_applicable)


def _parts(parts: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    names = [p.strip() for p in (parts.split(",") if isinstance(parts, str) else parts) if p.strip()]
    if names == ["all"]:
        return PARTS
    unknown = [p for p in names if p not in PARTS]
    if unknown or not names:
        raise JobArgumentError(f"parts={','.join(names)!r}: name parts among {', '.join(PARTS)} (comma-separated), "
                               "or all")
    return tuple(p for p in PARTS if p in names)  # in PARTS' order, each once


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise JobArgumentError(f"device {device!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type not in ("cpu", "cuda"):
        raise JobArgumentError(f"device {device!r}: the job runs on cpu or cuda")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise JobArgumentError(f"device {device!r}: no CUDA device is available here; use cpu or auto")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise JobArgumentError(f"device {device!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    return dev


def model_config(family: str, size: str, seq_len: int, vocab: int = VOCAB):
    """A transformers config for the preset: byte vocabulary (or `vocab` ids, of which the data
    use the first 257: the size of a real tokenizer's lm_head and logits), no dropout in the
    base model (released OPT configs use 0.1; off here so the two sides see the same forward
    pass and their losses can be compared; LoRA's own dropout 0.1 stays)."""
    from transformers import BloomConfig, LlamaConfig, OPTConfig

    shape = PRESETS[family][size]
    ids = dict(vocab_size=vocab, pad_token_id=PAD_ID, bos_token_id=PAD_ID, eos_token_id=PAD_ID)
    if family == "llama":
        return LlamaConfig(**shape, **ids, max_position_embeddings=max(4096, seq_len), rms_norm_eps=1e-5,
                           tie_word_embeddings=False)
    if family == "opt":
        return OPTConfig(**shape, **ids, word_embed_proj_dim=shape["hidden_size"],
                         max_position_embeddings=max(2048, seq_len), dropout=0.0, attention_dropout=0.0)
    if family == "bloom":
        return BloomConfig(**shape, **ids, hidden_dropout=0.0, attention_dropout=0.0)
    raise JobArgumentError(f"model family {family!r} is not one of {', '.join(FAMILIES)}")
