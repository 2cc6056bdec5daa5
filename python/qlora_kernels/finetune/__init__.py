"""`make demo` / `qlora-kernels finetune`: QLoRA fine-tuning, stock vs patched, side by side.

Builds a random-init Llama, OPT or Bloom model from a size preset (no download), saves it
as a bf16 checkpoint under the run folder and fine-tunes it twice from that checkpoint with
the recipe most QLoRA users run:

    from_pretrained(..., quantization_config=BitsAndBytesConfig(nf4, double quant, bf16 compute
                    and storage), attn_implementation="sdpa")   # Bloom has no SDPA: "eager"
    prepare_model_for_kbit_training(model)                      # gradient checkpointing on
    get_peft_model(model, LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules="all-linear"))

"stock" trains that model as is; "patched" adds `qlora_kernels.patch(model)`. With `parts`
(`--parts`) it also trains "patched -<part>", every part on but that one, for each part
(attention, lora, loss, norm, rope, mlp), so that each kernel's effect shows. All use the
same seed and the same batches: byte-level tokens (vocab 256 + a pad id; `vocab` / `--vocab`
makes the model's vocabulary larger, the data stay bytes) of the Python standard library's
.py sources, which every machine has. Each side runs in a fresh process
(so that peak memory is its own), shows a progress bar and the first step's loss of both is
compared before anything is timed. Writes `finetune.json` (config, device, versions, the git
commit of the source, per-step losses and times of every side, summary) and `finetune.png`
(loss curves, throughput and memory bars) to `<out>/finetune-<family>-<size>-<yyyymmdd-HHMMSS>/`.

Modules: presets (shapes, run defaults, the checked RunConfig), data (the batches), recipe
(checkpoint and QLoRA loading), train (one side, its time and memory), report (summary,
table, plot), job (`run`: the sides in their processes, the record). Arguments the job
cannot run with raise `JobArgumentError` before anything is built; a job that cannot run
here or whose sides disagree raises `JobFailed` (both in `qlora_kernels.errors`).
"""

from .data import make_batches
from .job import run
from .presets import FAMILIES, PARTS, PRESETS, RUN_DEFAULTS, SIZES, RunConfig

__all__ = ["FAMILIES", "PARTS", "PRESETS", "RUN_DEFAULTS", "SIZES", "RunConfig", "make_batches", "run"]
